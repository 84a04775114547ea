"""Fused MoE for decode, verify and small prefill chunks (T <= 256) through the Pallas Triton lowering.

Decode-sized MoE is bound by reading expert weights, so the work is organised around touched experts, each read
once per call however many tokens chose it:

  1. routing in XLA (`reference.route`: softmax, top-k, renormalisation), then the T*K (token, expert) pairs
     sorted by expert. Slot s of a static list of min(E, T*K) slots holds one touched expert's id and the
     [start, start + count) range of its pairs in the sorted order; slots past the touched ones have count 0.
  2. `_gate_up_kernel`, grid (slot, F tile): streams the expert's gate and up [D, block_f] columns once and
     multiplies them by all the expert's token rows (block_m at a time; block_m >= 16 for Triton's dot):
         h[p, f] = silu(x[p] @ Wg[e, :, f]) * (x[p] @ Wu[e, :, f])      h: [pairs, F] in sorted pair order
  3. `_down_kernel`, grid (slot, D tile): out[p, d] = w[p] * (h[p] @ Wd[e, :, d]), w the routing weight.
  4. the combine in XLA: every token sums its K pair rows (a gather back to token order, no scatter-add).

Empty slots run zero row tiles, so they read no weights; their outputs are never written because no pair
belongs to them. Row tiles read past a slot's pairs only into the next slot's rows or the zero padding after
the last pair (arrays are padded by block_m rows), and loads and stores are masked to the slot's rows.

GEMV mode (block_m in 1, 2, 4, 8; `plan` picks it when touched experts average about one row): at decode a
16-row dot spends its tensor-core work and int8->bf16 conversions on 15 dead rows, and the kernel is latency-
rather than bandwidth-shaped. Instead each k-step loads the [block_k, block_f] weight tile once, converts it
to float32 in registers and, for each of up to block_m rows of the slot (a static unroll; rows past the slot's
count are skipped by a branch, so they read nothing), accumulates x_row[:, None] * w on the CUDA cores, summed
over the k axis after the loop where the [block_k, block_f] accumulators fit in registers, else every k-step.
A slot with more than block_m rows takes further passes (re-reading its tile, from L2 in practice).
On the H100 at T=1 neither mode is the bottleneck: steps 1 and 4 in XLA (routing, sort, slot metadata, gathers)
alone take ~31 us at both Qwen3 shapes, of 67-74 us in all at 30B.

fused_combine (a config option the tuner tries at T <= 8; off by default until a GPU run picks it): step 3
becomes `_down_combine_kernel`, grid (token, D tile): each program runs the K experts its token chose in one
(expert, F step) loop, accumulates w_k * (h_k @ Wd[e_k, :, tile]) in registers (GEMV: float32 FMAs; dot mode:
the pair's h row in row 0 of a 16-row tile) and writes out[t, tile] once, so step 4 and the [pairs, D] float32
intermediate go away. At T=1 the gate/up kernel then reads x itself (no broadcast), and with fused_route the
routing is `_route_kernel` (softmax, top-k, renormalisation in Pallas; "all" also computes the logits and the
one-token slot table): route, gate/up, down = 3 launches in all.

Int8 weights (`QuantizedWeight`) load as int8 (half the bytes), convert to the activation dtype in registers
(exact for |v| <= 127) and the float32 dot result is scaled per output column. Stored k-major ([E, Out, In],
QuantizedWeight.k_major), every kernel reads them through `_KMajor` views (see `pallas_call`): the same [e, In rows,
Out columns] indexing, each tile loaded as stored and transposed in registers, which a dot takes as its K-major
operand (int8 x int8 dots need one: on the H200 a Qwen3-235B gate/up pass streamed 3.1 TB/s k-major against 2.3).

At T=1 the tuned table's paths are one kernel ("single") and the split two-kernel path (`triton_split.py`, see
TritonMoEConfig); this module holds the config, the plan, the building blocks both share and the entry point.

Triton limits: power-of-two block element counts and dot dimensions >= 16, so every block is a power of two
dividing D or F (F = 768 = 3 * 256 takes 256, 128, 64, ...). Unsupported shapes raise NotImplementedError for
the dispatcher's fallback.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.moe.reference import QuantizedWeight, route, router_logits

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MIN_DOT = 16  # Triton's tl.dot needs M, N, K >= 16
GEMV_ROWS = (1, 2, 4, 8)  # block_m values selecting GEMV mode: rows one pass over a weight tile serves
# GEMV when the expected rows per touched expert are <= this: about one (T <= 4 at E=128, K=8). A GEMV row costs
# float32 FMAs plus conversions on the CUDA cores where a dot row up to 16 is free on the tensor cores. Measured
# on the H100 (JAX 0.11.2, Qwen3 shapes): at T=1 GEMV and dot are close (30B bf16 74 vs 67 us, int8 70 vs 76;
# 235B bf16 162 vs 166, int8 135 vs 148), at T=8 (~1.2 rows) GEMV lost clearly (336 vs 244 us at 30B bf16).
# The tuned table overrides this per shape.
GEMV_MAX_MEAN_ROWS = 1.1
MAX_PERSISTENT = 4  # TritonMoEConfig.persistent: gate/up programs per SM
MAX_PREFETCH = 2  # TritonMoEConfig.prefetch: k-steps loaded ahead (3 spilled registers on the H200, a9a357e)
GEMV_ACC2D_MAX = 16384  # float32 accumulator values per GEMV program (128 registers a thread at 4 warps)
FUSED_ROUTES = ("none", "topk", "all")  # TritonMoEConfig.fused_route with fused_combine
# T=1 without fused_combine: "inline" 4 launches, "single" 1 kernel, "split" 2 kernels
ONE_TOKEN_ROUTES = ("inline", "single", "split")
ROUTES = FUSED_ROUTES + ONE_TOKEN_ROUTES
DEQUANTS = ("convert", "bits", "prmt")  # TritonMoEConfig.dequant
IN_KERNEL_TOPKS = ("rounds", "rank")  # TritonMoEConfig.topk: every program routes the token itself
ROUTED_TOPKS = ("kernel", "xla")  # fused_route "split": routed once before the kernels, which read a [2, K] table
TOPKS = IN_KERNEL_TOPKS + ROUTED_TOPKS
ROUTE_TABLE_WARPS = 1  # topk="kernel": the one-program routing kernel's warps (K rounds of max over E values)
# dequant="bits": int8 v + MAGIC_BITS read as float32 is 2^23 + 128 + v exactly (v + 128 fills the low mantissa
# byte), so subtracting MAGIC_FLOAT gives v: an integer add and a float subtract where `sitofp` is an I2F
# instruction, a quarter of the integer rate on Hopper (16 per SM per clock)
MAGIC_BITS = 0x4B000080
MAGIC_FLOAT = float(2**23 + 128)
# dequant="prmt": the same float32 bits built from each loaded 32-bit word of four int8 values at once: one xor
# flips the four sign bits (v + 128 as an unsigned byte), then one byte permute per value puts the byte under
# 0x4B0000 (prmt's selector 0x754i: byte i of t, then bytes 4, 5, 7 of the constant, 0x00 0x00 0x4B). That drops
# the sign extension and the integer add of "bits" for every value. PTX, so GPU only: the interpreter runs "bits"
PRMT_ASM = """{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
}"""
# fused_route="all": one program per token streams the whole router (512 KB at Qwen3-30B), so it wants many
# loads in flight: [E, block_k] tiles of up to this many float32 products, 8 warps, 4 stages (not yet timed)
ROUTE_ACC_MAX = 16384
ROUTE_WARPS, ROUTE_STAGES = 8, 4
MAX_TOKENS = 256  # beyond this (prefill) grouped matmuls do as well; the dispatcher falls back
DEFAULT_SMS = 132  # H100 SXM, when the device does not say


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _largest_block(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (0 if below the dot's minimum)."""
    b = cap
    while b >= MIN_DOT and n % b:
        b //= 2
    return b if b >= MIN_DOT else 0


@dataclasses.dataclass(frozen=True)
class TritonMoEConfig:
    """Tuning of the Triton MoE kernels; None fields are picked per shape by `plan`.

    block_m: token rows per dot (power of two, 16..128), or 1, 2, 4, 8 for GEMV mode (no dot; rows per pass over
      a weight tile). None: GEMV with min(8, next_pow2(T)) rows when touched experts average about one row
      (GEMV_MAX_MEAN_ROWS), else twice the mean rows per touched expert, 16..64.
    block_f: F columns per gate/up program (power of two dividing F). None: the largest of 64, 32 giving about
      two programs per SM, else 16.
    block_k: D rows per gate/up loop step (power of two dividing D). None: 128.
    block_d: D columns per down program (power of two dividing D). None: as block_f, over D.
    block_kf: F rows per down loop step (power of two dividing F). None: 128.
    num_warps, num_stages: Triton's warps per program and software pipelining depth of the weight loop.
    fused_combine: the down kernel (`_down_combine_kernel`, grid (token, D tile)) runs every expert its token
      chose and writes out[t, tile] = sum_k w_k * (h_k @ Wd[e_k, :, tile]) once: no [pairs, D] float32
      intermediate and no XLA combine; with one token the gate/up kernel also reads x itself (no broadcast).
      block_d then defaults to the wider of 64/32 giving T * D / block_d >= one program per SM, else 16.
    fused_route: (with fused_combine) "all": router logits, softmax, top-k and renormalisation in one Pallas
      program per token (`_route_kernel`; E a power of two), which at T=1 also writes the slot table: the whole
      op is 3 launches, but one program streams the [E, D] router. "topk": logits by XLA's matmul (all SMs),
      the rest in that kernel: 4 launches. "none": routing in XLA as `reference.route` does.
      "inline" (T=1, fused_combine False): XLA's matmul gives the [1, E] logits and every gate/up program takes
      the softmax and top-k of those E floats itself (K rounds of max; redundant, and far cheaper than a
      launch), runs its slot's expert (slot k: the k-th choice) and, in its first F tile, writes the slot table
      and routing weight the down kernel reads: logits, gate/up, down, sum = 4 launches in all.
      "single" (T=1, GEMV mode, fused_combine False): one kernel, grid (K, F / block_f). Program (k, j) takes the
      top-k of XLA's logits as "inline" does, computes its expert's h columns [f0, f0 + block_f) (gate and up
      over all of D) and at once their share of the down projection, w_k * h[f0:f0 + block_f] @ Wd[e_k, f0:, :]
      in block_d column steps, added atomically into a float32 [1, D] output: every touched weight is read once,
      no h goes through memory and no kernel waits for another (logits, the kernel and the cast to x's dtype are
      the launches). The partial sums land in any order: float32 rounding may differ from run to run.
      "split" (T=1, fused_combine False): two kernels with many short programs, for shapes where a
      program per (expert, F tile) is too few to keep HBM busy (Qwen3-30B: 192 programs of ~260 KB each, gate/up
      at ~2.2 TB/s on the H200 where 235B's 1 MB programs reach ~3.5). `triton_split._split_gate_up_kernel`, grid
      (K, F / block_f, k_splits): program (k, j, s) routes as "inline" and writes float32 partial gate and up sums
      of its expert's F tile j over D rows [s * D / k_splits, (s + 1) * D / k_splits); XLA sums the partials
      and applies SiLU (h [K, F], a few KB); `_split_down_kernel`, grid (K, D / block_d,
      f_splits): program (k, i, r) routes again and writes w_k * h_k @ Wd[e_k, :, tile i] over the r-th F range
      into a float32 [f_splits * K, D]; XLA sums the rows (logits, 2 kernels, 2 small fusions: no atomics, the
      same bits every run). Both splits let the tiles be wide (128-256 contiguous columns) and still cover the SMs.
      block_m 1 runs them in the GEMV mode; block_m 16 (or w8a8) on the tensor cores (`_dot_row_pass`: the one
      row in a 16-row tile), where the weight loads are Triton's pipelined dot operands and no CUDA-core
      instruction touches a weight: with int8 weights and w8a8 the token's row is rounded to int8 in the
      gate/up kernel and h to int8 rows (a scale each) in XLA, so both kernels run int8 x int8 -> int32 dots.
      H200 tunes (c7108b1, before h moved to XLA): int8 weights 47.7 us against "single"'s 49.3 at Qwen3-30B and
      97.7 against 115.8 at 235B; with bf16 weights "inline" stayed ahead (43.6 against 51.3 at 30B, 4dc47d0).
      3f5108a (GEMV, "rank" and "bits"): int8 38.5 us at 30B, where ncu read the gate/up kernel at 33% of DRAM
      bandwidth, 165 registers a thread (3 programs an SM) and an instruction issued every 6.1 cycles a warp.
      91dc255's tune (the tuned table's H200 T=1 entries): bf16 weights on the tensor cores 39.7 us at 30B
      (inline: 42.1) and 94.4 at 235B (inline 94.7); int8 in the GEMV mode 37.3 and 76.1, with the dot and w8a8
      modes 1-5 us behind. At 30B no mode reads int8 faster than ~1.5 TB/s: the programs are latency-bound.
    merge: (fused_route "split") the two XLA passes between and after the kernels move into them: the
      last gate/up program of an (expert, F tile) to finish (a counter each, bumped atomically) sums the tile's
      k_splits partials and writes its h columns, and the last down program of a D tile sums its f_splits * K
      rows and writes out's columns in x's dtype. One memset (the counters) instead of two fusions and their
      launches; the sums run in a fixed order, so the result is the same bits every run. Off until a GPU tune
      picks it. With w8a8 the merged h is written in x's dtype and each down program rounds its row to int8
      itself (the row's max |h| over all of F, from L2, as the gate/up kernel rounds x): XLA's h pass (3-4 fusions,
      with the row sum ~6 us of a 26 us call at Qwen3-30B with k-major weights, f92c202's profile) is gone: on the
      H200 that form won the k-major tune at Qwen3-30B, T=1 (c3f2844: 5.0 kernels a call instead of 9.8, 24.7 us
      against the unmerged entry's 26.6; moe_tune_kmerge30_h200_c3f2844.log). A first form, h's int8 rows made
      by one Pallas program per choice, ran no faster than XLA's fusions (c8f2944). Not with one_launch.
    prefetch: (fused_route "split", GEMV mode) how many k-steps ahead both kernels load (0: none). Each k-step
      issues the weight tile loads (and the token's x slice) of the step `prefetch` ahead before its own
      conversions and FMAs, carrying the loaded tiles in registers, so a program has that many steps' loads in
      flight while it computes. Triton's pipeline (num_stages) only stages loads that feed its dots; ncu saw these
      GEMV programs stall on their loads 44% of the time (3f5108a), and at T=1 a program's k-steps are a chain of
      load latencies: one wave of programs, each 6-8 steps long. Steps past the last re-load the last tile (from
      L1/L2) rather than branch. On the H200 at Qwen3-30B int8 one step ahead with dequant "prmt" took the call
      from 30.7 to 29.2 us (962f3a7); with "bits" it was slower (31.1 to 40.3). Two and three steps ahead lost
      to one at every block shape tried (a9a357e: 34-75 and 47-843 us against 28-35), three spilling registers.
    h_in_down: (fused_route "split", GEMV mode, not one_launch) no XLA pass between the kernels: each down program
      k-step loads the k_splits float32 partial gate and up sums of its [block_kf] slice of h from the gate/up
      kernel's output (L2: a quarter of an int8 [32, 256] weight tile's bytes at k_splits 8) and makes h there, as
      the XLA pass would (summed, SiLU, rounded to x's dtype). The gate/up kernel then never merges; with merge
      the down kernel still merges its rows (so the op is logits, a memset, 2 kernels). On the H200 at Qwen3-30B
      int8 T=1 the pass it removes took 1.3 us and the down kernel 1.0 us more (0e8b8a3's profile): within the
      noise in two interleaved runs, and 6fcf3bd's tune kept h in XLA (28.3 us against 28.9).
    fold: (fused_route "split", GEMV mode) k-steps taller than the float32 accumulator load as accumulator-high
      pieces that all fold into one [rows, block_c] accumulator, reduced once after the loop, instead of a
      cross-warp reduction every step. Without it a k-step whose tile would make more than GEMV_ACC2D_MAX
      accumulator values reduces every step, so the tall steps (more bytes in flight a program) have lost: at
      Qwen3-30B int8 the 64-row steps took 39.3 us against 32-row steps' 27.4-28.3 (0e8b8a3). The int8 gate/up
      kernel reads 25 MB in 12.3 us (2.0 TB/s) where the bf16 dot kernel's pipelined loads read 50 MB in 17.3
      (moe_t1_bench_30b_h200_2e4775d.log): the GEMV programs have too few bytes in flight. First tunes (H200,
      int8, T=1): at Qwen3-30B the best fold config tied the unfolded entry (27.0 against 26.9 us in one run,
      moe_tune_fold_30b_h200_18e8a40.log); at 235B fold with four D ranges took the call from 67.5 to 59.2 us
      (moe_tune_fold_235b_h200_858eed8.log).
    persistent: (fused_route "split", GEMV mode, topk "kernel" or "xla", not merge) the gate/up kernel runs
      min(units, persistent * SMs) programs instead of one per work unit (an (expert, F tile, D range) of the
      K * F / block_f * k_splits): program p takes units p, p + P, p + 2P, ... in one loop over their k-steps,
      loading `prefetch` steps ahead across the units' edges, and writes each unit's partial sums where its own
      program would have (`triton_split._split_gate_up_persistent_kernel`; the same bits). The point is the tail:
      both tuned fold configs run 192 gate/up programs, 1.45 per SM on a 132-SM H200; if one 8-warp program
      fills an SM's registers (not measured), about 60 SMs run a second one after the rest have finished. With
      k_splits 16-32 the units are short and every program gets within one of the same number. It lost every
      trial of its first tune (H200, int8, T=1, the same blocks with a program per unit beside it): at Qwen3-30B
      34.4-43.0 us against 29.9-32.6, at 235B 82.3-118.2 against 62.1-92.0, 5-90% behind the same blocks
      (moe_tune_persist_*_h200_dbc28b3.log). So the guess was wrong, or the loop over units costs more than the
      tail did; the "persist" family is opt-in.
    one_launch: (merge) both kernels in one launch (`_split_one_launch_kernel`): each program takes a ticket from
      an atomic counter; the first K * F / block_f * k_splits tickets are gate/up work, the rest down work, in
      that order, and a down program waits until every h tile of its expert is written (a counter per expert).
      Taking roles by ticket rather than by program id means a waiting program only waits on programs that have
      already started, so it cannot deadlock however the GPU schedules them; the down programs' launch and
      start overlap the gate/up programs' tail instead of following it. Measured on the H200 at Qwen3-30B with
      bf16 weights (23601ce, 2 interleaved rounds): 1-3 us slower than the same blocks in two launches (e.g.
      39.7/39.2 us against 37.7/39.5). Why is not profiled; a guess: the waiting down programs hold SM slots
      that gate/up work could use. Off by default; the tune family "one" is opt-in.
    w8a8: (int8 weights, the dot mode, fused_route "none", "inline" or "split") the activations go to the tensor
      cores as int8 too: token rows quantised per row (max |x| / 127) before the gate/up kernel, h per (row, F
      tile) inside it ("split": per row, in XLA), so both kernels run int8 x int8 -> int32 dots with no
      conversion of the weight tiles, and the scales apply to the int32 sums. The per-slot down kernel's k-step
      is then block_f (one h scale a step). A looser accuracy bound than int8 weights alone (the activations are
      rounded too).
    dequant: how the GEMV mode turns int8 weight tiles into float32 (bf16 weights ignore it): "convert" is
      `sitofp`, which Hopper runs at 16 values per SM per clock, about the rate int8 weights arrive from HBM at
      T=1; "bits" adds MAGIC_BITS to the sign-extended value and subtracts MAGIC_FLOAT from the float32 those bits
      read as (integer and float pipes, 64-128 per clock); "prmt" builds the same bits with a byte permute per
      value from each word of four (PRMT_ASM, GPU only). All three are exact. "bits" is the default: on the H200
      (b445ce3, T=1, the same split blocks) it took 30B int8 from 46.9 to 39.3 us and 235B from 99.5 to 90.7.
    topk: how the in-kernel routing (fused_route inline, single, split) finds a program's k-th choice among the E
      logits. "rounds": K rounds of (max, lowest index of the max), each a reduction across the program's warps
      before any weight load can start; "rank": every logit's rank (how many beat it: larger, or equal at a lower
      index) from an [E, 32] comparison per 32 logits, then one masked sum each for the expert id, the softmax
      maximum, its denominator and the weight: 4 reductions however large K is.
      "kernel" and "xla" (fused_route "split" only): the token is routed once before the two kernels, which read
      their choice from a [2, K] float32 table (row 0 the weights, row 1 the expert ids; exact as floats below
      2^24): "kernel" by XLA's logits and a one-program, one-warp Triton kernel (`_route_kernel`), "xla" by
      `reference.route` in XLA. On the H200 at Qwen3-30B int8, T=1 (moe_parts_30b_h200_30ba836.log, its script
      beside it) the in-kernel "rank" cost 3.6 us in the gate/up kernel and 3.7 in the down kernel at 8 warps (1.9
      and 1.4 in bf16's at 4): the kernels with e = k instead took 9.9 and 5.5 us against 13.6 and 9.4, and with the
      id behind one dependent load the same. In the tune that followed (e5ab985, moe_routed_30b_h200_e5ab985.log: 8
      split configs, each routed all three ways) "kernel" beat "rank" on every config, by 0.7-3.5 us with bf16
      weights and 1.0-4.7 with int8, and "xla" was 4.7-8.8 us slower than "kernel" on each (its top-k and softmax
      are several XLA kernels); the routing kernel itself takes 2.2 us of the call. Both formats' tuned T=1 entries
      route with "kernel" since. A one-launch form of "kernel" (the logits made by 8-64 programs of 1-4 warps,
      the last to finish routing from all E; session 26) took 10.5-13.7 us at Qwen3-30B against "kernel"'s 4.4
      (route_variants_h200_388011e.log, its script beside it) and was dropped.
    """

    block_m: int | None = None
    block_f: int | None = None
    block_k: int | None = None
    block_d: int | None = None
    block_kf: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    fused_combine: bool = False
    fused_route: str = "none"
    w8a8: bool = False
    k_splits: int = 1  # fused_route="split": D row ranges per (expert, F tile) of the gate/up kernel
    f_splits: int = 1  # fused_route="split": F row ranges per (expert, D tile) of the down kernel
    dequant: str = "bits"  # int8 tiles in the GEMV mode: "bits" (see MAGIC_BITS), "prmt" (PRMT_ASM) or "convert"
    topk: str = "rounds"  # in-kernel routing (inline, single, split): "rounds" of max, or "rank" (_kth_choice)
    merge: bool = False  # fused_route="split": the partial sums merged in the kernels, not in XLA (see above)
    one_launch: bool = False  # merge: the gate/up and down kernels as one launch (see above)
    prefetch: int = 0  # split GEMV: k-steps whose weight tiles load ahead of the arithmetic (0-2, see above)
    h_in_down: bool = False  # split GEMV: the down kernel makes h from the gate/up partials (see above)
    fold: bool = False  # split GEMV: tall k-steps fold into one accumulator (see above)
    persistent: int = 0  # split GEMV, routed: gate/up programs per SM, each over a strided set of work units

    def __post_init__(self):
        for name in ("block_f", "block_k", "block_d", "block_kf"):
            v = getattr(self, name)
            if v is not None and not (_pow2(v) and MIN_DOT <= v <= 512):
                raise ValueError(f"{name}={v} must be a power of two in [16, 512]")
        bm = self.block_m
        if bm is not None and bm not in GEMV_ROWS and not (_pow2(bm) and MIN_DOT <= bm <= 128):
            raise ValueError(f"block_m={bm} must be 1, 2, 4, 8 (GEMV mode) or a power of two in [16, 128]")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages} must be in [1, 8]")
        if self.fused_route not in ROUTES:
            raise ValueError(f"fused_route={self.fused_route!r} must be one of {', '.join(ROUTES)}")
        if self.fused_route in ("topk", "all") and not self.fused_combine:
            raise ValueError(f"fused_route={self.fused_route!r} needs fused_combine=True (it feeds the fused down)")
        if self.fused_route in ONE_TOKEN_ROUTES and self.fused_combine:
            raise ValueError(f"fused_route={self.fused_route!r} does its own down projection: it needs "
                             "fused_combine=False")
        if self.fused_route == "single" and bm is not None and bm != 1:
            raise ValueError(f"fused_route='single' is GEMV-only: block_m must be 1 or None, got {bm}")
        if self.fused_route == "split" and bm not in (None, 1, MIN_DOT):
            raise ValueError(f"fused_route='split' runs GEMV (block_m 1) or 16-row dots (block_m 16), got {bm}")
        for name in ("k_splits", "f_splits"):
            v = getattr(self, name)
            if v < 1 or not _pow2(v) or (v > 1 and self.fused_route != "split"):
                raise ValueError(f"{name}={v}: a power of two, above 1 only with fused_route='split'")
        if self.dequant not in DEQUANTS:
            raise ValueError(f"dequant={self.dequant!r} must be one of {', '.join(DEQUANTS)}")
        if self.topk not in TOPKS:
            raise ValueError(f"topk={self.topk!r} must be one of {', '.join(TOPKS)}")
        if self.topk in ROUTED_TOPKS and (self.fused_route != "split" or self.one_launch):
            raise ValueError(f"topk={self.topk!r} routes before the split path's two launches: it needs "
                             "fused_route='split' and not one_launch")
        if self.merge and self.fused_route != "split":
            raise ValueError("merge is the split path's (fused_route='split')")
        if self.one_launch and self.w8a8:
            raise ValueError("one_launch merges h in its gate/up work, and w8a8's int8 h rows take a scale over all "
                             "of F, which no one program sees")
        if self.one_launch and not self.merge:
            raise ValueError("one_launch runs the merged split path: it needs merge=True")
        if not 0 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch={self.prefetch} must be in [0, {MAX_PREFETCH}]")
        split_gemv = self.fused_route == "split" and bm in (None, 1) and not self.w8a8
        if self.prefetch and not split_gemv:
            raise ValueError("prefetch is the split path's GEMV mode's (fused_route='split', block_m 1 or None)")
        if self.fold and not split_gemv:
            raise ValueError("fold is the split path's GEMV mode's (fused_route='split', block_m 1 or None)")
        if not 0 <= self.persistent <= MAX_PERSISTENT:
            raise ValueError(f"persistent={self.persistent} must be in [0, {MAX_PERSISTENT}] (programs per SM)")
        if self.persistent and (not split_gemv or self.topk not in ROUTED_TOPKS or self.merge):
            raise ValueError("persistent is the split path's GEMV mode's (fused_route='split', block_m 1 or None) "
                             "routed before the kernels (topk 'kernel' or 'xla'), without merge")
        if self.h_in_down and (not split_gemv or self.one_launch):
            raise ValueError("h_in_down is the split path's GEMV mode's (fused_route='split', block_m 1 or None), "
                             "not w8a8's or one_launch's")
        if self.w8a8 and (self.fused_combine or self.fused_route not in ("none", "inline", "split")
                          or (bm is not None and bm < MIN_DOT)):
            raise ValueError("w8a8 runs the dot mode's kernels: block_m >= 16 or None, no fused_combine, "
                             "fused_route 'none', 'inline' or 'split'")


class Plan(NamedTuple):
    block_m: int
    block_f: int
    block_k: int
    block_d: int
    block_kf: int
    num_slots: int  # min(E, T * K)
    num_warps: int
    num_stages: int
    fused_combine: bool = False
    fused_route: str = "none"
    route_block_k: int = 0  # D columns per `_route_kernel` step with fused_route="all"
    w8a8: bool = False
    k_splits: int = 1
    f_splits: int = 1
    dequant: str = "bits"
    topk: str = "rounds"
    merge: bool = False
    one_launch: bool = False
    prefetch: int = 0
    h_in_down: bool = False
    fold: bool = False
    gate_up_programs: int = 0  # TritonMoEConfig.persistent: the gate/up grid (0: a program per work unit)

    @property
    def gemv(self) -> bool:
        return self.block_m < MIN_DOT


def triton_available() -> bool:
    """True on NVIDIA GPUs of compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell)."""
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", ""))
    return dev.platform == "gpu" and cc[:1].isdigit() and float(cc.split(".")[0]) >= 8


def _sm_count() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or DEFAULT_SMS)


def _pick(n: int, programs_per_block: int, want: int, name: str, given: int | None) -> int:
    """A column block for an axis of n: `given`, else the widest of 64/32 giving `want` programs, else 32
    (narrower rows waste DRAM bursts; the benchmark's sweep tries 16)."""
    if given is not None:
        if n % given:
            raise NotImplementedError(f"{name}={given} does not divide {n}")
        return given
    for b in (64, 32):
        if n % b == 0 and programs_per_block * (n // b) >= want:
            return b
    b = _largest_block(n, 32)
    if not b:
        raise NotImplementedError(f"{n} has no power-of-two block >= {MIN_DOT} (Triton block sizes)")
    return b


def plan(T: int, D: int, F: int, E: int, top_k: int, config: TritonMoEConfig, sms: int | None = None) -> Plan:
    """Fills in the config's open choices for one shape; raises NotImplementedError if it cannot run."""
    if T > MAX_TOKENS:
        raise NotImplementedError(f"T={T} tokens: the Triton MoE kernel is for T <= {MAX_TOKENS}")
    slots = min(E, T * top_k)
    want = 2 * (sms or _sm_count())
    bm = config.block_m
    if bm is None and gemv_expected(T, E, top_k) and not config.w8a8:
        bm = min(GEMV_ROWS[-1], _next_pow2(T))  # a slot holds at most T rows: T <= 8 takes one pass
    elif bm is None:
        mean_rows = -(-T * top_k // E)
        bm = min(64, max(MIN_DOT, _next_pow2(2 * mean_rows)))
    if bm < MIN_DOT:  # GEMV: wide column blocks (fewer, longer programs measured best at T=1 on the H100)
        bf = _pick(F, slots, 0, "block_f", config.block_f)
        bd = _pick(D, slots, 0, "block_d", config.block_d)
    else:
        bf = _pick(F, slots, want, "block_f", config.block_f)
        bd = _pick(D, slots, want, "block_d", config.block_d)
    if config.fused_combine and config.block_d is None:
        # T * D / block_d programs each read all K experts' [F, block_d] columns: narrow blocks to cover the SMs
        bd = next((b for b in (64, 32) if D % b == 0 and T * (D // b) >= want // 2), _largest_block(D, MIN_DOT))
        if not bd:
            raise NotImplementedError(f"D={D} has no power-of-two block >= {MIN_DOT} (Triton block sizes)")
    bk = config.block_k or _largest_block(D, 128)
    bkf = config.block_kf or _largest_block(F, 128)
    split_dot = config.fused_route == "split" and (config.block_m == MIN_DOT or config.w8a8)
    if config.w8a8 and split_dot:  # h has one scale per row: any down k-step; int8 dots want K >= 32
        if min(bk, bkf) < 32:
            raise NotImplementedError(f"w8a8: int8 dots need block_k and block_kf >= 32, got {bk} and {bkf}")
    elif config.w8a8:  # one h scale per down k-step; int8 dots want K >= 32
        if config.block_kf not in (None, bf):
            raise NotImplementedError(f"w8a8: the down k-step is block_f ({bf}), got block_kf={config.block_kf}")
        bkf = bf
        if min(bf, bk) < 32:
            raise NotImplementedError(f"w8a8: int8 dots need block_f and block_k >= 32, got {bf} and {bk}")
    for name, b, n in (("block_k", bk, D), ("block_kf", bkf, F)):
        if not b or n % b:
            raise NotImplementedError(f"{name}={b} does not divide {n} (power-of-two blocks >= {MIN_DOT})")
    rbk = 0
    if config.fused_route in ONE_TOKEN_ROUTES and T != 1:
        raise NotImplementedError(f"fused_route={config.fused_route!r} is the one-token path, got T={T}")
    if config.fused_route in ("single", "split"):
        bm = MIN_DOT if split_dot else 1
    if D % (config.k_splits * bk):
        raise NotImplementedError(f"k_splits={config.k_splits} x block_k={bk} does not divide D={D}")
    if F % (config.f_splits * bkf):
        raise NotImplementedError(f"f_splits={config.f_splits} x block_kf={bkf} does not divide F={F}")
    if split_dot and config.w8a8 and not _pow2(D):
        raise NotImplementedError(f"split w8a8 rounds x in the kernel over all of D (a Triton block), got D={D}")
    if config.fused_route != "none" and not _pow2(E):
        raise NotImplementedError(f"fused_route needs a power-of-two expert count (Triton blocks), got E={E}")
    if config.fused_route == "all":
        rbk = max(1, min(D, ROUTE_ACC_MAX // E))
        while D % rbk:
            rbk //= 2
    # persistent: as many gate/up programs as asked per SM, never more than the work units
    programs = min(top_k * (F // bf) * config.k_splits, config.persistent * (sms or _sm_count()))
    return Plan(bm, bf, bk, bd, bkf, slots, config.num_warps, config.num_stages, config.fused_combine,
                config.fused_route, rbk, config.w8a8, config.k_splits, config.f_splits, config.dequant,
                config.topk, config.merge, config.one_launch, config.prefetch, config.h_in_down, config.fold,
                programs)


def gemv_expected(T: int, E: int, top_k: int) -> bool:
    """True if uniform routing leaves touched experts <= GEMV_MAX_MEAN_ROWS rows on average: T*K pairs over the
    E * (1 - (1 - K/E)^T) experts expected to be touched (Qwen3 E=128, K=8: GEMV up to T=4)."""
    touched = E * (1.0 - (1.0 - top_k / E) ** T)
    return T * top_k <= GEMV_MAX_MEAN_ROWS * touched


class _KMajor:
    """A k-major weight ref ([E, Out, In], QuantizedWeight.k_major) read as the kernels index weights, [E, In, Out]:
    ref[e, rows, cols] loads the [cols, rows] tile and transposes it in registers (for a dot, Triton's operand
    view of the tile as loaded: the tensor cores read it K-major)."""

    def __init__(self, ref):
        self.ref = ref

    @property
    def shape(self):
        E, out, inp = self.ref.shape
        return (E, inp, out)

    @property
    def dtype(self):
        return self.ref.dtype

    def __getitem__(self, idx):
        e, rows, cols = idx
        return self.ref[e, cols, rows].T


def _read_k_major(kernel, positions, *refs, **kw):
    return kernel(*(_KMajor(r) if i in positions else r for i, r in enumerate(refs)), **kw)


def k_major_values(*weights) -> tuple:
    """The stored values of the k-major QuantizedWeights among `weights`, for `pallas_call`."""
    return tuple(w.values for w in weights if isinstance(w, QuantizedWeight) and w.k_major)


def pallas_call(kernel, k_major=(), **kw):
    """pl.pallas_call(kernel, **kw) whose kernel gets the arguments that are k-major weight values (`k_major`, by
    identity) as `_KMajor` views, so every kernel indexes weights [e, In rows, Out columns] in either layout."""

    def call(*args):
        positions = {i for i, a in enumerate(args) if any(a is w for w in k_major)}
        body = functools.partial(_read_k_major, kernel, positions) if positions else kernel
        return pl.pallas_call(body, **kw)(*args)

    return call


def check_supported(x_shape, x_dtype, w_gate, w_up, w_down) -> None:
    """Raises NotImplementedError for what this kernel does not handle (the dispatcher then falls back)."""
    if jnp.dtype(x_dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        raise NotImplementedError(f"triton MoE supports bf16/f16 activations, got {jnp.dtype(x_dtype).name}")
    kinds = {isinstance(w, QuantizedWeight) for w in (w_gate, w_up, w_down)}
    if len(kinds) > 1:
        raise NotImplementedError("triton MoE needs all three expert weights quantised or none")
    for w in (w_gate, w_up, w_down):
        want = jnp.int8 if isinstance(w, QuantizedWeight) else x_dtype
        if jnp.dtype(w.dtype) != jnp.dtype(want):
            raise NotImplementedError(f"expert weights are {jnp.dtype(w.dtype).name}, expected {jnp.dtype(want).name}")


def _silu(g):
    return g / (1.0 + jnp.exp(-g))


def _gate_up_kernel(
    meta_ref,  # [4] int32: expert, first sorted pair, pair count, unused
    xs_ref,  # [Ppad, D] token rows in sorted pair order (int8 with w8a8, unless quantize_x)
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    *rest,  # (sg_ref [E, F], su_ref [E, F] float32 when quantised), (xsc_ref [Ppad] float32 scale of each int8
    #         row with w8a8, unless quantize_x), h_ref [Ppad, F] (int8 with w8a8), (hs_ref [Ppad, F / block_f]
    #         float32 scale of each h row's F tile with w8a8)
    block_m: int,
    block_f: int,
    block_k: int,
    quantized: bool,
    one_token: bool = False,  # xs_ref is x [1, D]: every row is token 0's
    w8a8: bool = False,  # int8 x int8 -> int32 dots; h leaves as int8 with a scale per (row, F tile)
    quantize_x: bool = False,  # w8a8, one token: x comes in its own dtype and is rounded to int8 here
):
    """The dot mode's gate/up: h = silu(x @ Wg) * (x @ Wu) for one slot's rows, F columns [f0, f0 + block_f).
    quantize_x saves the XLA launches that would round the one token's row: every program takes its max over D (a
    few KB from L2) and rounds each k-step's slice as it goes."""
    h_ref, hs_ref = (rest[-2], rest[-1]) if w8a8 else (rest[-1], None)
    xsc_ref = rest[2] if w8a8 and not quantize_x else None
    D = xs_ref.shape[1]
    e, start, count = meta_ref[0], meta_ref[1], meta_ref[2]
    j = pl.program_id(1)
    f0 = pl.multiple_of(j * block_f, block_f)
    rows = jnp.arange(block_m, dtype=jnp.int32)
    if quantize_x:
        x_scale = _int8_scale(jnp.max(jnp.abs(xs_ref[0, pl.ds(0, D)].astype(jnp.float32))))

    def row_tile(r, carry):
        r0 = start + r * block_m
        live_r = rows < count - r * block_m
        live = jnp.broadcast_to(live_r[:, None], (block_m, block_f))

        def k_step(kk, acc):
            g, u = acc
            k0 = pl.multiple_of(kk * block_k, block_k)
            if one_token:
                xrow = xs_ref[0, pl.ds(k0, block_k)]
                if quantize_x:
                    xrow = _to_int8(xrow.astype(jnp.float32) / x_scale)
                xt = jnp.broadcast_to(xrow[None, :], (block_m, block_k))
            else:
                xt = xs_ref[pl.ds(r0, block_m), pl.ds(k0, block_k)]  # [BM, BK]
            wg = wg_ref[e, pl.ds(k0, block_k), pl.ds(f0, block_f)]  # [BK, BF]
            wu = wu_ref[e, pl.ds(k0, block_k), pl.ds(f0, block_f)]
            if quantized and not w8a8:
                wg, wu = wg.astype(xt.dtype), wu.astype(xt.dtype)
            return g + pltriton.dot(xt, wg), u + pltriton.dot(xt, wu)  # int32 with w8a8, else float32

        zero = jnp.zeros((block_m, block_f), jnp.int32 if w8a8 else jnp.float32)
        g, u = lax.fori_loop(0, D // block_k, k_step, (zero, zero))
        if w8a8:  # the int32 sums times each row's scale
            if quantize_x:
                xsc = jnp.broadcast_to(x_scale, (block_m,))
            elif one_token:
                xsc = jnp.broadcast_to(xsc_ref[0], (block_m,))
            else:
                xsc = pltriton.load(xsc_ref.at[pl.ds(r0, block_m)], mask=live_r, other=0.0)  # [BM]
            g, u = g.astype(jnp.float32) * xsc[:, None], u.astype(jnp.float32) * xsc[:, None]
        if quantized:
            sg_ref, su_ref = rest[0], rest[1]
            g = g * sg_ref[e, pl.ds(f0, block_f)][None, :]
            u = u * su_ref[e, pl.ds(f0, block_f)][None, :]
        h = _silu(g) * u
        if w8a8:
            h, hs = _quantize_rows(h)
            pltriton.store(hs_ref.at[pl.ds(r0, block_m), j], hs, mask=live_r)
        pltriton.store(h_ref.at[pl.ds(r0, block_m), pl.ds(f0, block_f)], h.astype(h_ref.dtype), mask=live)
        return carry

    # an empty slot (count 0) runs no tile and reads no weights
    lax.fori_loop(0, lax.div(count + (block_m - 1), block_m), row_tile, 0)


def _down_kernel(
    meta_ref,  # [4] int32
    h_ref,  # [Ppad, F] sorted pair order (int8 with w8a8)
    pw_ref,  # [Ppad] float32 routing weight of each sorted pair
    wd_ref,  # [E, F, D] (int8 when quantised)
    *rest,  # (sd_ref [E, D] float32 when quantised), (hs_ref [Ppad, F / block_kf] float32 with w8a8),
    #         o_ref [Ppad, D] float32
    block_m: int,
    block_d: int,
    block_kf: int,
    quantized: bool,
    w8a8: bool = False,  # int8 h x int8 weights -> int32, each k-step scaled by its h scales
):
    o_ref = rest[-1]
    F = h_ref.shape[1]
    e, start, count = meta_ref[0], meta_ref[1], meta_ref[2]
    d0 = pl.multiple_of(pl.program_id(1) * block_d, block_d)
    rows = jnp.arange(block_m, dtype=jnp.int32)

    def row_tile(r, carry):
        r0 = start + r * block_m
        live = rows < count - r * block_m  # [BM]
        # h rows past the slot belong to the next slot or are unwritten padding (garbage, NaN in the
        # interpreter): load them as 0 so nothing non-finite enters the dot
        live_h = jnp.broadcast_to(live[:, None], (block_m, block_kf))

        def k_step(kk, acc):
            k0 = pl.multiple_of(kk * block_kf, block_kf)
            ht = pltriton.load(h_ref.at[pl.ds(r0, block_m), pl.ds(k0, block_kf)], mask=live_h, other=0)
            wd = wd_ref[e, pl.ds(k0, block_kf), pl.ds(d0, block_d)]  # [BKF, BD]
            if w8a8:
                hs = pltriton.load(rest[1].at[pl.ds(r0, block_m), kk], mask=live, other=0.0)  # [BM]
                return acc + pltriton.dot(ht, wd).astype(jnp.float32) * hs[:, None]
            if quantized:
                wd = wd.astype(ht.dtype)
            return acc + pltriton.dot(ht, wd)

        acc = lax.fori_loop(0, F // block_kf, k_step, jnp.zeros((block_m, block_d), jnp.float32))
        if quantized:
            acc = acc * rest[0][e, pl.ds(d0, block_d)][None, :]
        w = pltriton.load(pw_ref.at[pl.ds(r0, block_m)], mask=live, other=0.0)  # [BM]
        live_o = jnp.broadcast_to(live[:, None], (block_m, block_d))
        pltriton.store(o_ref.at[pl.ds(r0, block_m), pl.ds(d0, block_d)], acc * w[:, None], mask=live_o)
        return carry

    lax.fori_loop(0, lax.div(count + (block_m - 1), block_m), row_tile, 0)


def _quantize_rows(v):
    """[R, C] float32 -> (int8 values, [R] float32 scales): symmetric, max |v| of each row / 127 (1 for a row of
    zeros), rounded half away from zero by floor (Triton has no round)."""
    scale = _int8_scale(jnp.max(jnp.abs(v), axis=1))
    return _to_int8(v / scale[:, None]), scale


def _int8_scale(amax):
    """Symmetric int8 scale(s) for values of largest magnitude amax: amax / 127, 1 where amax is 0."""
    return jnp.where(amax > 0, amax / 127.0, 1.0)


def _row0_tile(row):
    """[C] -> [16, C]: the row in row 0, zeros below. Triton's dot needs 16 rows; the zero rows' products add
    nothing, so column sums of the dot's result are the row's results exactly."""
    rows = jnp.arange(MIN_DOT, dtype=jnp.int32)[:, None]
    return jnp.where(rows == 0, row[None, :], jnp.zeros((), row.dtype))


def _to_int8(y):
    """float32 values already divided by their scale -> int8, rounded half away from zero, clipped to +-127."""
    q = jnp.where(y >= 0, jnp.floor(y + 0.5), -jnp.floor(0.5 - y))
    return jnp.clip(q, -127.0, 127.0).astype(jnp.int32).astype(jnp.int8)


def _acc_rows(block_k: int, values_per_row: int, fold: bool) -> int:
    """Rows of a GEMV program's float32 accumulators (values_per_row values a row, all of them together): the
    whole k-step where they fit GEMV_ACC2D_MAX; else with fold (TritonMoEConfig.fold) the most that fit, the
    step's tiles then loading in pieces of that height; else 0 (each step reduces its products at once)."""
    if block_k * values_per_row <= GEMV_ACC2D_MAX:
        return block_k
    if not fold:
        return 0
    rows = 1
    while rows * 2 <= block_k and rows * 2 * values_per_row <= GEMV_ACC2D_MAX:
        rows *= 2
    return rows


def _pieces(k0, block_k: int, height: int) -> list:
    """The first rows of a k-step's `height`-row pieces (k0 the step's first, a multiple of block_k)."""
    return [k0 if j == 0 else pl.multiple_of(k0 + j * height, height) for j in range(block_k // height)]


def _gemv_pass(x_ref, w_refs, e, r0, live, c0, *, rows: int, block_c: int, block_k: int, one_token: bool = False,
               k_lo=0, k_len: int | None = None, dequant: str = "bits", prefetch: int = 0, fold: bool = False):
    """One pass over columns [c0, c0 + block_c) of expert e's weights for the sorted rows r0 .. r0 + rows - 1:
    returns acc[i][j] = x[r0 + i] @ w_refs[j][e, :, c0:c0 + block_c] in float32 ([block_c] each). Each k-step
    loads every weight tile once and shares it across the rows; row 0 is always live, rows i >= live are skipped
    by a branch (nothing loaded, accumulators stay 0). one_token: x_ref is x [1, D], every row token 0's.
    k_lo, k_len: only the contracted rows [k_lo, k_lo + k_len) (default all), a partial sum. prefetch: see
    TritonMoEConfig.prefetch (one row of one token); fold: TritonMoEConfig.fold."""
    K = x_ref.shape[1] if k_len is None else k_len
    # [BK, BC] float32 accumulators reduced once after the loop, where they fit in registers: a reduction over
    # BK every k-step is a cross-warp shared-memory round trip (H100, Qwen3-30B T=1: 77 vs 82 us at
    # block_f=64, block_k=128); past GEMV_ACC2D_MAX values per program they would spill, so with fold a taller
    # step loads in pieces of the accumulator's height
    height = _acc_rows(block_k, rows * len(w_refs) * block_c, fold)
    acc2d = height > 0
    height = height or block_k

    if prefetch and not (one_token and rows == 1):
        raise NotImplementedError("prefetch runs one row of one token")

    def load(kk):  # the k-step's raw weight tiles ([height, BC] pieces of each) and, with prefetch, x's slices
        return _gemv_load(x_ref, w_refs, e, pl.multiple_of(k_lo + kk * block_k, block_k), c0, block_k=block_k,
                          height=height, block_c=block_c, with_x=bool(prefetch))

    def k_step(kk, loaded, acc):
        offs = _pieces(pl.multiple_of(k_lo + kk * block_k, block_k), block_k, height)
        # int8 or bf16 -> float32 in registers; the multiply-reduce runs on the CUDA cores
        ws = [[_to_f32(w, dequant) for w in tiles] for tiles in loaded[0]]  # [height, BC] pieces

        def row(i, a):
            xs = loaded[1] if prefetch else [x_ref[0 if one_token else r0 + i, pl.ds(o, height)] for o in offs]
            return _gemv_fma(ws, xs, a, acc2d)

        return tuple(row(0, acc[0]) if i == 0 else lax.cond(i < live, functools.partial(row, i), lambda a: a, acc[i])
                     for i in range(rows))

    shape = (height, block_c) if acc2d else (block_c,)
    acc = _k_loop(K // block_k, load, k_step, (tuple(jnp.zeros(shape, jnp.float32) for _ in w_refs),) * rows,
                  prefetch)
    return tuple(tuple(jnp.sum(a, axis=0) for a in r) for r in acc) if acc2d else acc


def _gemv_load(x_ref, w_refs, e, k0, c0, *, block_k: int, height: int, block_c: int, with_x: bool):
    """A GEMV k-step's loads from row k0 (a multiple of block_k): ([height, block_c] pieces of expert e's columns
    [c0, c0 + block_c) of each weight, x's [height] slices of the one token (with_x) or None)."""
    offs = _pieces(k0, block_k, height)
    ws = tuple(tuple(w_ref[e, pl.ds(o, height), pl.ds(c0, block_c)] for o in offs) for w_ref in w_refs)
    return ws, (tuple(x_ref[0, pl.ds(o, height)] for o in offs) if with_x else None)


def _gemv_fma(ws, xs, acc, acc2d: bool) -> tuple:
    """One row's k-step on the CUDA cores: acc[j] += x . ws[j] over the step's pieces (ws[j] the float32
    [height, BC] pieces of weight j, xs the row's [height] slices); acc2d: [height, BC] accumulators, reduced once
    after the loop, else [BC] ones, reduced here."""
    xs = [x.astype(jnp.float32)[:, None] for x in xs]  # [height, 1] each
    out = []
    for a_j, tiles in zip(acc, ws, strict=True):
        for x, w in zip(xs, tiles, strict=True):
            a_j = a_j + (x * w if acc2d else jnp.sum(x * w, axis=0))
        out.append(a_j)
    return tuple(out)


def _scaled(values, scale_refs, e, c0, block_c: int) -> list:
    """Each of `values` ([block_c] float32 sums over int8 weights' columns [c0, c0 + block_c) of expert e) times
    its weight's per-column scales there. Linear, so a partial sum takes them as the whole would."""
    return [v * sc[e, pl.ds(c0, block_c)] for v, sc in zip(values, scale_refs, strict=True)]


def _k_loop(n: int, load, step, init, prefetch: int):
    """fori_loop over n k-steps, step(i, load(i), acc) -> acc. prefetch (TritonMoEConfig.prefetch) = p > 0: the loop
    carries the loads of steps i .. i + p - 1; step i issues load(i + p) (past the end: the last step's again,
    min(i + p, n - 1)) and then runs on its own."""
    if not prefetch:
        return lax.fori_loop(0, n, lambda i, acc: step(i, load(i), acc), init)

    def body(i, carry):
        ahead, acc = carry
        nxt = load(jnp.minimum(i + prefetch, n - 1))
        return (*ahead[1:], nxt), step(i, ahead[0], acc)

    first = tuple(load(min(j, n - 1)) for j in range(prefetch))
    return lax.fori_loop(0, n, body, (first, init))[1]


def _dot_row_pass(x_ref, row, w_refs, e, c0, *, block_c: int, block_k: int, k_lo, k_len: int, quantize: bool):
    """The split path's dot mode: x[row, k_lo:k_lo + k_len] @ w_refs[j][e, k_lo:k_lo + k_len, c0:c0 + block_c] for
    each weight, on the tensor cores, as [block_c] float32. The row goes in row 0 of a 16-row tile whose other
    rows are 0 (their products add nothing, so the column sums are row 0's results exactly), and the weight tiles
    stream through Triton's pipelined dot loads. int8 weights meet x as int8 when x_ref is int8 already (h with
    w8a8) or when `quantize` rounds the bf16 row here (its max |x| over the whole row, from L2, / 127): int32 dots,
    no conversion of the weights; else they convert to x's dtype."""
    if quantize:
        n = x_ref.shape[1]
        if _pow2(n):
            whole = x_ref[row, pl.ds(0, n)]
        else:  # (h's rows at F = 768) one block of the next power of two, the columns past the row masked to 0
            cols = jnp.arange(_next_pow2(n), dtype=jnp.int32)
            whole = pltriton.load(x_ref.at[(row, cols)], mask=cols < n, other=0)
        x_scale = _int8_scale(jnp.max(jnp.abs(whole.astype(jnp.float32))))

    def step(kk, acc):
        k0 = pl.multiple_of(k_lo + kk * block_k, block_k)
        xrow = x_ref[row, pl.ds(k0, block_k)]
        if quantize:
            xrow = _to_int8(xrow.astype(jnp.float32) / x_scale)
        xt = _row0_tile(xrow)  # [16, BK]
        out = []
        for a, w_ref in zip(acc, w_refs, strict=True):
            w = w_ref[e, pl.ds(k0, block_k), pl.ds(c0, block_c)]  # [BK, BC]
            out.append(a + pltriton.dot(xt, w if w.dtype == xt.dtype else w.astype(xt.dtype)))
        return tuple(out)

    int_dot = quantize or x_ref.dtype == jnp.int8
    zero = jnp.zeros((MIN_DOT, block_c), jnp.int32 if int_dot else jnp.float32)
    acc = lax.fori_loop(0, k_len // block_k, step, (zero,) * len(w_refs))
    res = [jnp.sum(a, axis=0).astype(jnp.float32) for a in acc]
    return [r * x_scale for r in res] if quantize else res


def _gemv_slot(meta_ref, x_ref, w_refs, scale_refs, c0, store, *, block_m: int, block_c: int, block_k: int,
               one_token: bool = False, dequant: str = "bits"):
    """The GEMV mode's loop over one slot's rows, block_m per pass (`_gemv_pass`): each row's float32 results
    (one [block_c] per weight, scaled per column when quantised) go to store(row, *results), for live rows only.
    An empty slot (count 0) runs no pass and reads no weights."""
    e, start, count = meta_ref[0], meta_ref[1], meta_ref[2]

    def row_pass(r, carry):
        r0, live = start + r * block_m, count - r * block_m
        acc = _gemv_pass(x_ref, w_refs, e, r0, live, c0, rows=block_m, block_c=block_c, block_k=block_k,
                         one_token=one_token, dequant=dequant)
        for i, results in enumerate(acc):
            results = _scaled(results, scale_refs, e, c0, block_c) if scale_refs else list(results)
            row_store = functools.partial(store, r0 + i, *results)
            if i == 0:
                row_store()
            else:
                pl.when(i < live)(row_store)
        return carry

    lax.fori_loop(0, lax.div(count + (block_m - 1), block_m), row_pass, 0)


def _gate_up_gemv_kernel(
    meta_ref,  # [4] int32: expert, first sorted pair, pair count, unused
    xs_ref,  # [Ppad, D] token rows in sorted pair order
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    *rest,  # (sg_ref [E, F], su_ref [E, F] float32 when quantised), h_ref [Ppad, F]
    block_m: int,
    block_f: int,
    block_k: int,
    quantized: bool,
    one_token: bool = False,  # xs_ref is x [1, D]
    dequant: str = "bits",
):
    h_ref = rest[-1]
    f0 = pl.multiple_of(pl.program_id(1) * block_f, block_f)

    def store(row, g, u):
        h_ref[row, pl.ds(f0, block_f)] = (_silu(g) * u).astype(h_ref.dtype)

    _gemv_slot(meta_ref, xs_ref, (wg_ref, wu_ref), rest[:2] if quantized else (), f0, store, block_m=block_m,
               block_c=block_f, block_k=block_k, one_token=one_token, dequant=dequant)


def _down_gemv_kernel(
    meta_ref,  # [4] int32
    h_ref,  # [Ppad, F] sorted pair order
    pw_ref,  # [Ppad] float32 routing weight of each sorted pair
    wd_ref,  # [E, F, D] (int8 when quantised)
    *rest,  # (sd_ref [E, D] float32 when quantised), o_ref [Ppad, D] float32
    block_m: int,
    block_d: int,
    block_kf: int,
    quantized: bool,
    dequant: str = "bits",
):
    o_ref = rest[-1]
    d0 = pl.multiple_of(pl.program_id(1) * block_d, block_d)

    def store(row, o):
        o_ref[row, pl.ds(d0, block_d)] = o * pw_ref[row]

    # only live h rows are loaded: rows past the slot are the next slot's or unwritten padding
    _gemv_slot(meta_ref, h_ref, (wd_ref,), rest[:1] if quantized else (), d0, store, block_m=block_m,
               block_c=block_d, block_k=block_kf, dequant=dequant)


def _down_combine_kernel(
    pe_ref,  # [T*K] int32 expert of pair t*K + k (token order)
    pw_ref,  # [T*K] float32 routing weight of pair t*K + k
    h_ref,  # [Ppad, F] h rows (sorted pair order; with one token pair k is row k)
    wd_ref,  # [E, F, D] (int8 when quantised)
    *rest,  # (pos_ref [T*K] int32 h row of each pair, unless one token), (sd_ref [E, D] float32 when quantised),
    #         o_ref [T, D] in x's dtype
    top_k: int,
    block_d: int,
    block_kf: int,
    gemv: bool,
    quantized: bool,
    one_token: bool,
    dequant: str = "bits",
):
    """fused_combine's down projection: program (t, j) writes out[t, j-th D tile] = sum_k w_k * (h_k @ Wd[e_k])
    over the K experts token t chose. One loop runs over (expert, F step) so the software pipeline prefetches
    the next expert's first tile while the current one finishes."""
    o_ref = rest[-1]
    pos_ref = None if one_token else rest[0]
    sd_ref = rest[-2] if quantized else None
    F = h_ref.shape[1]
    nf = F // block_kf
    t = pl.program_id(0)
    d0 = pl.multiple_of(pl.program_id(1) * block_d, block_d)
    acc2d = block_kf * block_d <= GEMV_ACC2D_MAX  # GEMV: reduce over F once after the loop (see _gemv_pass)

    def step(i, acc):
        k, kk = lax.div(i, nf), lax.rem(i, nf)
        p = t * top_k + k
        e = pe_ref[p]
        row = p if one_token else pos_ref[p]
        k0 = pl.multiple_of(kk * block_kf, block_kf)
        hrow = h_ref[row, pl.ds(k0, block_kf)]  # [BKF]
        wd = wd_ref[e, pl.ds(k0, block_kf), pl.ds(d0, block_d)]  # [BKF, BD]
        w = pw_ref[p]
        if gemv:
            wf = _to_f32(wd, dequant)
            if quantized:
                wf = wf * sd_ref[e, pl.ds(d0, block_d)][None, :]
            y = (hrow.astype(jnp.float32) * w)[:, None] * wf  # [BKF, BD]
            return acc + (y if acc2d else jnp.sum(y, axis=0))
        ht = _row0_tile(hrow)  # [16, BKF]: the pair's h row in row 0
        y = pltriton.dot(ht, wd.astype(ht.dtype))  # [16, BD] float32
        scale = w * sd_ref[e, pl.ds(d0, block_d)][None, :] if quantized else w
        return acc + y * scale

    shape = (block_kf, block_d) if acc2d else (block_d,)
    acc = lax.fori_loop(0, top_k * nf, step, jnp.zeros(shape if gemv else (MIN_DOT, block_d), jnp.float32))
    o = acc if acc.ndim == 1 else jnp.sum(acc, axis=0)  # [BD]
    o_ref[t, pl.ds(d0, block_d)] = o.astype(o_ref.dtype)


def _topk(logits, top_k: int, norm_topk_prob: bool):
    """One token's routing in a kernel, as `reference.route`: logits [E] float32 -> (K expert ids, best first,
    lowest id among equals as lax.top_k; K float32 weights: softmax probabilities, renormalised over the K with
    norm_topk_prob). K rounds of a max over E values."""
    E = logits.shape[0]
    ids = jnp.arange(E, dtype=jnp.int32)
    top = jnp.max(logits)
    left, chosen, probs = logits, [], []
    for _ in range(top_k):
        m = jnp.max(left)
        e = jnp.min(jnp.where(left == m, ids, E))
        chosen.append(e)
        probs.append(jnp.exp(m - top))  # unnormalised softmax probability
        left = jnp.where(ids == e, -jnp.inf, left)
    total = sum(probs[1:], probs[0]) if norm_topk_prob else jnp.sum(jnp.exp(logits - top))
    return chosen, [p / total for p in probs]


RANK_CHUNK = 32  # logits compared per step of topk="rank": [E, 32] comparisons, 32 values a thread at E=128


def _kth_choice(logits_ref, k, top_k: int, norm_topk_prob: bool, topk: str = "rounds"):
    """The one token's k-th expert and its routing weight from its [1, E] logits (k traced), as `reference.route`
    chooses (lowest index among equal logits). "rounds": `_topk`, then a select per choice; "rank": see
    TritonMoEConfig.topk."""
    if topk in ROUTED_TOPKS:  # logits_ref is the [2, K] routing table (see TritonMoEConfig.topk)
        return logits_ref[1, k].astype(jnp.int32), logits_ref[0, k]
    E = logits_ref.shape[1]
    logits = logits_ref[0, pl.ds(0, E)]
    if topk == "rounds":
        chosen, weights = _topk(logits, top_k, norm_topk_prob)
        e = sum(jnp.where(k == i, c, 0) for i, c in enumerate(chosen))
        w = sum(jnp.where(k == i, c, 0.0) for i, c in enumerate(weights))
        return e, w
    ids = jnp.arange(E, dtype=jnp.int32)
    chunk = min(E, RANK_CHUNK)
    rank = jnp.zeros((E,), jnp.int32)
    for j0 in range(0, E, chunk):  # rank[i] = #{j: l_j > l_i, or l_j == l_i and j < i}
        lj = logits_ref[0, pl.ds(j0, chunk)][None, :]
        jid = (j0 + jnp.arange(chunk, dtype=jnp.int32))[None, :]
        beats = (lj > logits[:, None]) | ((lj == logits[:, None]) & (jid < ids[:, None]))  # [E, chunk]
        rank = rank + jnp.sum(beats.astype(jnp.int32), axis=1)
    mine = rank == k
    p = jnp.exp(logits - jnp.max(logits))  # unnormalised softmax probabilities
    total = jnp.sum(jnp.where(rank < top_k, p, 0.0)) if norm_topk_prob else jnp.sum(p)
    return jnp.sum(jnp.where(mine, ids, 0)), jnp.sum(jnp.where(mine, p, 0.0)) / total


def _to_f32(w, dequant: str = "bits"):
    """A loaded weight tile in float32 (see TritonMoEConfig.dequant)."""
    if dequant == "bits" and w.dtype == jnp.int8:
        return lax.bitcast_convert_type(w.astype(jnp.int32) + MAGIC_BITS, jnp.float32) - MAGIC_FLOAT
    if dequant == "prmt" and w.dtype == jnp.int8:
        (bits,) = pltriton.elementwise_inline_asm(PRMT_ASM, args=[w], constraints="=r,=r,=r,=r,r", pack=4,
                                                  result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])
        return lax.bitcast_convert_type(bits, jnp.float32) - MAGIC_FLOAT
    return w.astype(jnp.float32)


def _inline_routed(
    kernel,  # _gate_up_kernel or _gate_up_gemv_kernel
    logits_ref,  # [1, E] float32 router logits of the one token
    x_ref,  # [1, D] (int8 with w8a8 where D is not a power of two: see quantize_x)
    wg_ref,  # [E, D, F]
    wu_ref,  # [E, D, F]
    *rest,  # (sg_ref, su_ref when quantised), (row scales with w8a8, unless quantize_x), h_ref, (hs_ref: w8a8),
    #         meta_ref out [K, 4] int32, pw_ref out [Ppad] f32
    top_k: int,
    norm_topk_prob: bool,
    topk: str = "rounds",
    **kw,
):
    """fused_route="inline": program (k, j) routes the token itself (`_topk` of its E logits) and runs the gate/up
    kernel for its k-th expert, F tile j; the j=0 programs write slot k's table row (expert, pair k, 1 pair)
    and routing weight for the down kernel."""
    *inner, meta_ref, pw_ref = rest
    k = pl.program_id(0)
    e, w = _kth_choice(logits_ref, k, top_k, norm_topk_prob, topk)

    @pl.when(pl.program_id(1) == 0)
    def _():
        meta_ref[k, 0] = e
        meta_ref[k, 1] = k
        meta_ref[k, 2] = jnp.int32(1)
        meta_ref[k, 3] = jnp.int32(0)
        pw_ref[k] = w

    kernel((e, k, jnp.int32(1)), x_ref, wg_ref, wu_ref, *inner, one_token=True, **kw)


def _single_kernel(
    logits_ref,  # [1, E] float32 router logits of the one token
    x_ref,  # [1, D]
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    wd_ref,  # [E, F, D]
    *rest,  # (sg_ref [E, F], su_ref [E, F], sd_ref [E, D] float32 when quantised), o_in (aliased), o_ref [1, D] f32
    top_k: int,
    norm_topk_prob: bool,
    block_f: int,
    block_k: int,
    block_d: int,
    quantized: bool,
    dequant: str = "bits",
    topk: str = "rounds",
):
    """fused_route="single" (see TritonMoEConfig): program (k, j) routes the token, computes h for its k-th expert's
    F columns [f0, f0 + block_f) and adds w_k * h @ Wd[e_k, f0:f0 + block_f, :] into out, block_d columns a step."""
    o_ref = rest[-1]
    D = x_ref.shape[1]
    k = pl.program_id(0)
    f0 = pl.multiple_of(pl.program_id(1) * block_f, block_f)
    e, w = _kth_choice(logits_ref, k, top_k, norm_topk_prob, topk)
    ((g, u),) = _gemv_pass(x_ref, (wg_ref, wu_ref), e, 0, 1, f0, rows=1, block_c=block_f, block_k=block_k,
                           one_token=True, dequant=dequant)
    if quantized:
        g, u = _scaled((g, u), rest[:2], e, f0, block_f)
    h = (_silu(g) * u).astype(x_ref.dtype).astype(jnp.float32) * w  # [BF], rounded as the reference's h

    def d_step(jd, carry):
        d0 = pl.multiple_of(jd * block_d, block_d)
        wd = _to_f32(wd_ref[e, pl.ds(f0, block_f), pl.ds(d0, block_d)], dequant)  # [BF, BD]
        y = jnp.sum(h[:, None] * wd, axis=0)  # [BD]
        if quantized:
            y = y * rest[2][e, pl.ds(d0, block_d)]
        pltriton.atomic_add(o_ref, (jnp.int32(0), pl.ds(d0, block_d)), y)
        return carry

    lax.fori_loop(0, D // block_d, d_step, 0)


def _route_kernel(
    *refs,  # block_k 0: logits_ref [T, E] float32; else x_ref [T, D], r_ref [E, D] (the router)
    #         then w_ref out [T, K] float32 routing weights, ex_ref out [T, K] int32 expert ids (best first),
    #         (meta_ref out [K, 4] int32 slot table, with one token)
    top_k: int,
    norm_topk_prob: bool,
    block_k: int,
    table: bool = False,  # (block_k 0, one token) the only output is the [2, K] table of TritonMoEConfig.topk
):
    """fused_route: program t takes token t's router logits (computes them with block_k: float32 FMAs over
    [E, block_k] router tiles), then softmax, top-k (K rounds of max, lowest id among equals, as lax.top_k) and
    renormalisation, as `reference.route`."""
    t = pl.program_id(0)
    if block_k:
        x_ref, r_ref, w_ref, ex_ref, *meta = refs
        E, D = r_ref.shape

        def k_step(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            x = x_ref[t, pl.ds(k0, block_k)].astype(jnp.float32)  # [BK]
            r = r_ref[pl.ds(0, E), pl.ds(k0, block_k)].astype(jnp.float32)  # [E, BK]
            return acc + r * x[None, :]

        acc = lax.fori_loop(0, D // block_k, k_step, jnp.zeros((E, block_k), jnp.float32))
        logits = jnp.sum(acc, axis=1)  # [E]
    elif table:
        logits_ref, table_ref = refs
        chosen, weights = _topk(logits_ref[0, pl.ds(0, logits_ref.shape[1])], top_k, norm_topk_prob)
        for k, (e, w) in enumerate(zip(chosen, weights, strict=True)):
            table_ref[0, k] = w
            table_ref[1, k] = e.astype(jnp.float32)
        return
    else:
        logits_ref, w_ref, ex_ref, *meta = refs
        E = logits_ref.shape[1]
        logits = logits_ref[t, pl.ds(0, E)]
    chosen, weights = _topk(logits, top_k, norm_topk_prob)
    for k, (e, w) in enumerate(zip(chosen, weights, strict=True)):
        w_ref[t, k] = w
        ex_ref[t, k] = e
        if meta:  # one token: slot k holds pair k (as group_by_expert's one-token case)
            meta[0][k, 0] = e
            meta[0][k, 1] = jnp.int32(k)
            meta[0][k, 2] = jnp.int32(1)
            meta[0][k, 3] = jnp.int32(0)


def group_by_expert(experts: jax.Array, num_experts: int, num_slots: int):
    """experts: [T, K] int32 -> (order [P] sorted pair -> flat pair index, meta [S, 4] int32 per slot: expert,
    first sorted pair, pair count, 0). Slots past the touched experts have count 0."""
    P = experts.size
    if experts.shape[0] == 1:
        # one token: its top-k experts are distinct, so pair k is slot k as it stands. No sort, no scatters: at
        # decode the XLA ops around the kernels cost as much as the kernels (~31 us of ~67 on an H100, 30B T=1)
        order = jnp.arange(P, dtype=jnp.int32)
        ones = jnp.ones((P,), jnp.int32)
        return order, jnp.stack([experts[0].astype(jnp.int32), order, ones, 0 * ones], axis=1)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sorted_e = flat[order]
    first = jnp.concatenate([jnp.ones((1,), bool), sorted_e[1:] != sorted_e[:-1]])
    slot = jnp.cumsum(first.astype(jnp.int32)) - 1  # [P] slot of each sorted pair
    idx = jnp.arange(P, dtype=jnp.int32)
    expert = jnp.zeros((num_slots,), jnp.int32).at[slot].max(sorted_e)
    start = jnp.full((num_slots,), P, jnp.int32).at[slot].min(idx)
    count = jnp.zeros((num_slots,), jnp.int32).at[slot].add(1)
    del num_experts  # slots are bounded by min(E, P) statically; ids need no bound check
    return order, jnp.stack([expert, start, count, jnp.zeros_like(count)], axis=1)


def moe_triton(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array | QuantizedWeight,
    w_up: jax.Array | QuantizedWeight,
    w_down: jax.Array | QuantizedWeight,
    *,
    top_k: int,
    norm_topk_prob: bool,
    config: TritonMoEConfig | dict | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Fused MoE through Pallas Triton; same contract as `moe_reference`.

    Args:
      x: [T, D] bf16/f16 tokens, T <= 256; router: [E, D].
      w_gate, w_up: [E, D, F] in x's dtype, or QuantizedWeight (int8 [E, D, F], scale [E, F]).
      w_down: [E, F, D] in x's dtype, or QuantizedWeight (int8 [E, F, D], scale [E, D]).
      config: tuning; interpret: run in the Pallas interpreter (CPU).
    Returns:
      [T, D] in x's dtype.
    Raises:
      NotImplementedError for unsupported dtypes, shapes or block sizes.
    """
    config = TritonMoEConfig(**config) if isinstance(config, dict) else config or TritonMoEConfig()
    check_supported(x.shape, x.dtype, w_gate, w_up, w_down)
    if config.w8a8 and not isinstance(w_gate, QuantizedWeight):
        raise NotImplementedError("w8a8 needs int8 (QuantizedWeight) expert weights")
    T, D = x.shape
    E, _, F = w_gate.shape
    if k_major_values(w_gate, w_up, w_down) and config.block_m is None:
        # the GEMV mode reads k-major tiles transposed through registers: the dot mode reads them as stored, where
        # the config's path has one ("single", loading ahead and folding are GEMV's alone)
        try:
            config = dataclasses.replace(config, block_m=MIN_DOT)
        except ValueError:
            pass
    p = plan(T, D, F, E, top_k, config, sms=DEFAULT_SMS if interpret else None)
    if interpret and p.dequant == "prmt":  # PTX has no interpreter; "bits" gives the same values
        p = p._replace(dequant="bits")
    return _moe(x, router, w_gate, w_up, w_down, top_k=top_k, norm_topk_prob=norm_topk_prob, plan=p,
                interpret=interpret)


def _route_fused(x, router, *, top_k, norm_topk_prob, block_k, interpret):
    """`_route_kernel` over T programs: ([T, K] float32 weights, [T, K] int32 experts, + [K, 4] slot table at
    T=1). block_k 0: the logits come from XLA's matmul."""
    T = x.shape[0]
    args = (x, router) if block_k else (router_logits(x, router),)
    out_shape = [jax.ShapeDtypeStruct((T, top_k), jnp.float32), jax.ShapeDtypeStruct((T, top_k), jnp.int32)]
    if T == 1:
        out_shape.append(jax.ShapeDtypeStruct((top_k, 4), jnp.int32))
    spec = lambda shape: pl.BlockSpec(shape, lambda t: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_route_kernel, top_k=top_k, norm_topk_prob=norm_topk_prob, block_k=block_k),
        grid=(T,),
        in_specs=[spec(a.shape) for a in args],
        out_specs=[spec(o.shape) for o in out_shape],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=ROUTE_WARPS, num_stages=ROUTE_STAGES),
        interpret=interpret,
        name=f"moe_route_bk{block_k}" if block_k else "moe_route_topk",
    )(*args)


@functools.partial(jax.jit, static_argnames=("top_k", "norm_topk_prob", "plan", "interpret"))
def _moe(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob, plan, interpret):
    T, D = x.shape
    E, _, F = w_gate.shape
    bm, bf, bk, bd, bkf, S = plan.block_m, plan.block_f, plan.block_k, plan.block_d, plan.block_kf, plan.num_slots
    P = T * top_k
    Ppad = P + bm  # a row tile starting at any pair stays in bounds
    quantized = isinstance(w_gate, QuantizedWeight)
    fused = plan.fused_combine
    one_token = fused and T == 1  # the gate/up kernel reads x [1, D] itself

    if plan.fused_route in ("single", "split"):
        if plan.fused_route == "split":  # (imported here: triton_split.py builds on this module's pieces)
            from pallas_kernels.moe.triton_split import moe_split
        one = _moe_single if plan.fused_route == "single" else moe_split
        return one(x, router, w_gate, w_up, w_down, top_k=top_k, norm_topk_prob=norm_topk_prob, plan=plan,
                   interpret=interpret)
    inline = plan.fused_route == "inline"  # T=1: the gate/up kernel routes (see TritonMoEConfig)
    if plan.fused_route in ("topk", "all"):
        weights, experts, *meta = _route_fused(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob,
                                               block_k=plan.route_block_k, interpret=interpret)
        # at T=1 the route kernel wrote the slot table
        order, meta = (None, meta[0]) if meta else group_by_expert(experts, E, S)
    elif inline:  # the gate/up kernel routes and writes the slot table and pair weights
        logits = router_logits(x, router)  # [1, E]
        order = meta = None
    else:
        weights, experts = route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)  # [T, K]
        order, meta = group_by_expert(experts, E, S)
    if one_token or inline:
        xs, pw = x, None
    elif T == 1:  # pairs in token order already (group_by_expert's one-token case): no gathers
        xs = jnp.pad(jnp.broadcast_to(x, (P, D)), ((0, bm), (0, 0)))  # [Ppad, D]
        pw = jnp.pad(weights.reshape(-1), (0, bm))  # [Ppad]
    else:
        xs = jnp.pad(x[order // top_k], ((0, bm), (0, 0)))
        pw = jnp.pad(weights.reshape(-1)[order], (0, bm))

    def full(shape):
        return pl.BlockSpec(shape, lambda s, j: (0,) * len(shape))

    meta_spec = pl.BlockSpec((None, 4), lambda s, j: (s, 0))
    params = pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    km = k_major_values(w_gate, w_up, w_down)
    if quantized:
        wg, wu, wd = w_gate.values, w_up.values, w_down.values
        gu_scales, d_scales = (w_gate.scale, w_up.scale), (w_down.scale,)
    else:
        wg, wu, wd = w_gate, w_up, w_down
        gu_scales, d_scales = (), ()

    gate_up, down = (_gate_up_gemv_kernel, _down_gemv_kernel) if plan.gemv else (_gate_up_kernel, _down_kernel)
    mode = "gemv" if plan.gemv else "bm"
    gu_kw = dict(block_m=bm, block_f=bf, block_k=bk, quantized=quantized)
    dq = dict(dequant=plan.dequant) if plan.gemv else {}  # the dot mode converts for the tensor cores
    gu_in = (xs, wg, wu, *gu_scales)
    h_shapes = [jax.ShapeDtypeStruct((Ppad, F), x.dtype)]
    if plan.w8a8:  # the token rows go in as int8 with a scale each; h comes out as int8 with a scale per F tile
        mode = "w8a8_bm"
        in_kernel = inline and _pow2(D)  # the one token's row is rounded by the gate/up kernel itself
        gu_kw.update(w8a8=True, quantize_x=in_kernel)
        if not in_kernel:
            xq, xscale = _quantize_rows(xs.astype(jnp.float32))
            gu_in = (xq, wg, wu, *gu_scales, xscale)
        h_shapes = [jax.ShapeDtypeStruct((Ppad, F), jnp.int8), jax.ShapeDtypeStruct((Ppad, F // bf), jnp.float32)]
    gu_specs = [full(a.shape) for a in gu_in]
    h_specs = [full(s.shape) for s in h_shapes]
    if inline:  # the kernel also writes the slot table and the pair weights (its j=0 programs)
        *hh, meta, pw = pallas_call(
            functools.partial(_inline_routed, gate_up, top_k=top_k, norm_topk_prob=norm_topk_prob, topk=plan.topk,
                              **gu_kw, **dq),
            grid=(S, F // bf),
            in_specs=[full((1, E))] + gu_specs,
            out_specs=[*h_specs, full((S, 4)), full((Ppad,))],
            out_shape=[*h_shapes, jax.ShapeDtypeStruct((S, 4), jnp.int32),
                       jax.ShapeDtypeStruct((Ppad,), jnp.float32)],
            compiler_params=params,
            interpret=interpret,
            name=f"moe_route_gate_up_{mode}{bm}_bf{bf}_bk{bk}",
            k_major=km,
        )(logits, *gu_in)
    else:
        hh = pallas_call(
            functools.partial(gate_up, **gu_kw, **dq, **(dict(one_token=True) if one_token else {})),
            grid=(S, F // bf),
            in_specs=[meta_spec] + gu_specs,
            out_specs=h_specs,
            out_shape=h_shapes,
            compiler_params=params,
            interpret=interpret,
            name=f"moe_gate_up_{mode}{bm}_bf{bf}_bk{bk}",
            k_major=km,
        )(meta, *gu_in)
    h = hh[0]

    if fused:
        # h row of each pair in token order: pair t*K + k sits at sorted position inv[t*K + k]
        pos = () if one_token else (jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32)),)
        return pallas_call(
            functools.partial(_down_combine_kernel, top_k=top_k, block_d=bd, block_kf=bkf, gemv=plan.gemv,
                              quantized=quantized, one_token=one_token, **dq),
            grid=(T, D // bd),
            in_specs=[full((P,)), full((P,)), full((Ppad, F)), full(wd.shape)] + [full((P,))] * len(pos)
            + [full((E, D))] * len(d_scales),
            out_specs=full((T, D)),
            out_shape=jax.ShapeDtypeStruct((T, D), x.dtype),
            compiler_params=params,
            interpret=interpret,
            name=f"moe_down_combine_{mode}_bd{bd}_bk{bkf}",
            k_major=km,
        )(experts.reshape(-1), weights.reshape(-1), h, wd, *pos, *d_scales)

    down_in = (h, pw, wd, *d_scales, *hh[1:])  # w8a8: h's scales last
    out = pallas_call(
        functools.partial(down, block_m=bm, block_d=bd, block_kf=bkf, quantized=quantized, **dq,
                          **(dict(w8a8=True) if plan.w8a8 else {})),
        grid=(S, D // bd),
        in_specs=[meta_spec] + [full(a.shape) for a in down_in],
        out_specs=full((Ppad, D)),
        out_shape=jax.ShapeDtypeStruct((Ppad, D), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name=f"moe_down_{mode}{bm}_bd{bd}_bk{bkf}",
        k_major=km,
    )(meta, *down_in)

    if T == 1:
        return out[:P].sum(axis=0, keepdims=True).astype(x.dtype)
    # back to token order: flat pair t * K + k sits at sorted position inv[t * K + k]
    inv = jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))
    return out[inv].reshape(T, top_k, D).sum(axis=1).astype(x.dtype)


def _moe_single(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob, plan, interpret):
    """fused_route="single": the one-token MoE as XLA's logits, `_single_kernel` and a cast."""
    _, D = x.shape
    E, _, F = w_gate.shape
    bf, bk, bd = plan.block_f, plan.block_k, plan.block_d
    quantized = isinstance(w_gate, QuantizedWeight)
    ws = [w.values if quantized else w for w in (w_gate, w_up, w_down)]
    scales = [w.scale for w in (w_gate, w_up, w_down)] if quantized else []
    logits = router_logits(x, router)  # [1, E]

    def full(shape):
        return pl.BlockSpec(shape, lambda k, j: (0,) * len(shape))

    args = (logits, x, *ws, *scales, jnp.zeros((1, D), jnp.float32))
    out = pallas_call(
        functools.partial(_single_kernel, top_k=top_k, norm_topk_prob=norm_topk_prob, block_f=bf, block_k=bk,
                          block_d=bd, quantized=quantized, dequant=plan.dequant, topk=plan.topk),
        grid=(top_k, F // bf),
        in_specs=[full(a.shape) for a in args],
        out_specs=full((1, D)),
        out_shape=jax.ShapeDtypeStruct((1, D), jnp.float32),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=interpret,
        name=f"moe_single_bf{bf}_bk{bk}_bd{bd}",
        k_major=k_major_values(w_gate, w_up, w_down),
    )(*args)
    return out.astype(x.dtype)
