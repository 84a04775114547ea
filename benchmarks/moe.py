"""MoE layer at decode sizes: touched-expert GB/s and microseconds of ours beside XLA's, same inputs, same run.

GB/s counts the bytes of the experts the call's tokens actually chose (3 x D x F weights each, at the weights'
storage width; int8 adds its scales), each counted once: the least any implementation must read.
  ours          what the model gets: `pallas_kernels.moe` (the tuned table's winner, else the default kernel)
  ours_int8     what the model gets with int8 per-output-channel weights (quantised from the same bf16 weights)
  ours_int8k    the same int8 weights stored k-major ([E, Out, In]: `quantize_int8(w, k_major=True)`), the layout
                int8 x int8 tensor-core dots read without a transpose
  ragged_dot    `moe_reference`: routing, sort, three `jax.lax.ragged_dot`s, scatter-add
  gather_einsum routing, then each (token, expert) pair's weights gathered and contracted with einsum
Shapes: Qwen3-30B-A3B (hidden 2048, expert FFN 768) and Qwen3-235B-A22B (4096, 1536), 128 experts, top-8,
norm_topk_prob, bf16, T in {1, 8, 64, 256} tokens. Timing (pallas_kernels.tuning.time_interleaved): many chained
calls in one jitted function over 4 rotating token sets (different experts per set), median of 9 runs / calls, the
runs round-robin over the implementations of a shape. Each output is checked against ragged_dot first
(max |diff| / max |ref| <= 2e-2, int8 4e-2, NaN-free).

--tune runs the search loop over Triton configs for each of --shapes first and writes the winners to
pallas_kernels/tuned/moe.json (and $OUT/tuned_moe.json), which `ours` then uses. At T <= 8 it also tries the
GEMV mode (no dot; block_m = rows per pass over a weight tile) over block_f/block_d, block_k, warps and stages, and
fused_combine (the weighted combine inside the down kernel, routing in XLA or in Pallas: 3-4 launches at T=1),
and at T=1 fused_route="inline" (each gate/up program routes the token itself: 4 launches with the per-slot down
kernel), fused_route="single" (one kernel: gate/up and the down projection's partial sums, added atomically) and
fused_route="split" (two kernels of many short programs; "merge": their partial sums merged by the last program
of each tile, no XLA pass between or after them; "one": those in one launch); with int8 weights also w8a8 (int8
activations: int8 x int8 dots). --families limits the search to some of these (e.g. `--families dot,inline,single`),
--formats to bf16, int8 or int8k weights (int8k: k-major int8, searched over the dot modes alone: "kmajor" and
"kmerge" at T=1, else "dot" and "w8a8").

The result JSON is rewritten after every tuned T and every benchmarked shape, so a run cut off by a time limit
keeps what it measured.

Run on the GPU machine:  python benchmarks/moe.py [--tune] [--shapes 30b]      (CPU: --tiny, a smoke test)
Writes benchmarks/results/moe.json; `python benchmarks/plot.py` draws it (moe.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402

SHAPES = {  # name: (D, F, E, top_k)
    "30b": (2048, 768, 128, 8),
    "235b": (4096, 1536, 128, 8),
}
TOKENS = (1, 8, 64, 256)
TINY = {"tiny": (64, 48, 8, 2)}
TINY_TOKENS = (1, 8)
SETS = 4
TOL, TOL_INT8 = 2e-2, 4e-2
GATHER_LIMIT = 24e9  # bytes of gathered expert copies gather_einsum may materialise (H100: 80 GB)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def gather_einsum(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob):
    """Each (token, expert) pair's weights gathered, then contracted: reads K expert copies per token."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.moe.reference import route

    weights, experts = route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)  # [T, K]
    f32 = jnp.float32
    g = jnp.einsum("td,tkdf->tkf", x, w_gate[experts], preferred_element_type=f32)
    u = jnp.einsum("td,tkdf->tkf", x, w_up[experts], preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    out = jnp.einsum("tkf,tkfd->tkd", h, w_down[experts], preferred_element_type=f32)
    return jnp.einsum("tkd,tk->td", out, weights).astype(x.dtype)


def make_sets(T, D, F, E, top_k, seed=0):
    """SETS argument tuples sharing one set of expert weights (far larger than L2) with different tokens."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 4 + 2 * SETS)
    bf16 = jnp.bfloat16
    w_gate = (jax.random.normal(keys[0], (E, D, F), bf16) * D ** -0.5).astype(bf16)
    w_up = (jax.random.normal(keys[1], (E, D, F), bf16) * D ** -0.5).astype(bf16)
    w_down = (jax.random.normal(keys[2], (E, F, D), bf16) * F ** -0.5).astype(bf16)
    sets = []
    for i in range(SETS):
        x = jax.random.normal(keys[4 + 2 * i], (T, D), bf16)
        router = (jax.random.normal(keys[5 + 2 * i], (E, D), bf16) * D ** -0.5).astype(bf16)
        sets.append((x, router, w_gate, w_up, w_down))
    return sets


def touched(sets, top_k) -> float:
    """Mean number of distinct experts the sets' tokens choose."""
    import numpy as np

    from pallas_kernels.moe.reference import route

    return float(np.mean([len(np.unique(np.asarray(route(x, r, top_k=top_k, norm_topk_prob=True)[1])))
                          for x, r, *_ in sets]))


GEMV_MAX_T = 8  # T the tuner tries the GEMV mode at


def gemv_configs(T: int, F: int, *, quick: bool) -> list:
    """GEMV-mode candidates: block_m = rows per pass (one pass serves a slot of up to min(8, T) rows), column
    blocks 16..64, k-steps 128..512 (the down kernel's capped at the largest dividing F: 768 takes 256), and two
    (warps, stages) pairs. [512, 64] tiles are left out: gate and up at float32 hold 64K values per program, past
    the register file at 4 warps and spilling at 8. 8 block pairs x 2 = 16 candidates (8 when quick)."""
    from pallas_kernels.moe import TritonMoEConfig

    bm = min(8, 1 << (T - 1).bit_length())
    out = []
    for bf in (16, 32, 64):
        for bk in (128, 256, 512):
            if bf * bk > 16384:
                continue
            bkf = bk
            while F % bkf:
                bkf //= 2
            for warps, stages in ((4, 3),) if quick else ((4, 3), (8, 4)):
                out.append(TritonMoEConfig(block_m=bm, block_f=bf, block_d=bf, block_k=bk, block_kf=bkf,
                                           num_warps=warps, num_stages=stages))
    return out


FUSED_MAX_T = 8  # T the tuner tries fused_combine at: one program per (token, D tile) reads all K experts


def fused_configs(T: int, *, quick: bool) -> list:
    """fused_combine candidates (the down kernel sums the token's K experts in registers and writes [T, D] once),
    in the GEMV mode and the dot mode (block_m 16), with each routing ("none": XLA, "topk": XLA logits + one
    Pallas top-k kernel, "all": one Pallas routing kernel), down column blocks 16 and 32 (T=1 at D=2048: 128
    and 64 programs) and, unless quick, 256-row down k-steps. 18 candidates (6 when quick)."""
    from pallas_kernels.moe import TritonMoEConfig
    from pallas_kernels.moe.triton_moe import FUSED_ROUTES

    out = []
    for bm in (min(8, 1 << (T - 1).bit_length()), 16):
        for route in FUSED_ROUTES:
            for bd, bkf in ((16, None),) if quick else ((16, None), (32, None), (16, 256)):
                out.append(TritonMoEConfig(block_m=bm, block_f=64, block_d=bd, block_kf=bkf, fused_combine=True,
                                           fused_route=route))
    return out


def inline_configs(*, quick: bool) -> list:
    """fused_route="inline" candidates (T=1: the gate/up kernel takes the top-k of XLA's logits itself, 4 launches
    in all): the dot mode at column blocks 32 and 64, each with both in-kernel routings (topk "rounds", "rank"),
    and the GEMV mode's two best block pairs of the last H200 tune, the first also with the rank routing and the
    int8 bit conversion; unless quick, each dot block also at 4 stages. 7 candidates (9 when not quick)."""
    from pallas_kernels.moe import TritonMoEConfig
    from pallas_kernels.moe.triton_moe import IN_KERNEL_TOPKS

    out = [TritonMoEConfig(block_m=16, block_f=bf, block_d=bf, fused_route="inline", topk=t)
           for bf in (32, 64) for t in IN_KERNEL_TOPKS]
    if not quick:
        out += [TritonMoEConfig(block_m=16, block_f=bf, block_d=bf, num_stages=4, fused_route="inline")
                for bf in (32, 64)]
    return out + [TritonMoEConfig(block_m=1, block_f=64, block_d=64, block_k=128, block_kf=128, fused_route="inline"),
                  TritonMoEConfig(block_m=1, block_f=32, block_d=32, block_k=256, block_kf=256, fused_route="inline"),
                  TritonMoEConfig(block_m=1, block_f=64, block_d=64, block_k=128, block_kf=128, fused_route="inline",
                                  topk="rank", dequant="bits")]


def single_configs(D: int, *, quick: bool) -> list:
    """fused_route="single" candidates (T=1, one kernel: gate/up and the down projection's partial sums per
    (expert, F tile), added atomically): column blocks 16..64 (8 experts x F / block_f programs), gate/up k-steps
    128 and 256 and down column steps 128..512, each tile at most 16K float32 values, 4 warps (and 8 unless
    quick). 10 candidates (20 when not quick)."""
    from pallas_kernels.moe import TritonMoEConfig

    out = []
    for bf, bk, bd in ((16, 256, 512), (16, 256, 256), (32, 128, 256), (32, 256, 256), (32, 256, 512),
                       (64, 128, 128), (64, 128, 256), (64, 256, 128), (16, 128, 512), (32, 128, 512)):
        if D % bd:
            continue
        for warps in (4,) if quick else (4, 8):
            out.append(TritonMoEConfig(block_f=bf, block_k=bk, block_d=bd, num_warps=warps, fused_route="single"))
    return out


def w8a8_configs(T: int, *, quick: bool) -> list:
    """w8a8 candidates (int8 weights only: token rows and h go to int8 x int8 dots too): the dot mode's per-slot
    kernels at column blocks 32 and 64 (the down k-step is the column block), routing in XLA and, at T=1, inline;
    unless quick, each also at 4 stages. 2-4 candidates (4-8 when not quick)."""
    from pallas_kernels.moe import TritonMoEConfig

    out = []
    for route in ("none", "inline") if T == 1 else ("none",):
        for bf in (32, 64):
            for stages in (3,) if quick else (3, 4):
                out.append(TritonMoEConfig(w8a8=True, block_f=bf, block_d=bf, num_stages=stages, fused_route=route))
    return out


def split_fits(D, F, bf, bk, splits, bd, bkf, fsplits) -> bool:
    """Whether a split candidate's blocks and ranges divide the shape (plan would refuse it otherwise)."""
    return not (F % bf or F % (bkf * fsplits) or D % (bk * splits) or D % bd)


def gemv_split(D: int, F: int, blocks: list, **options) -> list:
    """The split path's GEMV configs of `blocks` ((block_f, block_k, k_splits, block_d, block_kf, f_splits,
    num_warps) each) that divide the shape, with `options` (TritonMoEConfig fields) on each."""
    from pallas_kernels.moe import TritonMoEConfig

    return [TritonMoEConfig(block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs, num_warps=w,
                            fused_route="split", **options)
            for bf, bk, ks, bd, bkf, fs, w in blocks if split_fits(D, F, bf, bk, ks, bd, bkf, fs)]


def split_configs(D: int, F: int, *, quick: bool) -> list:
    """fused_route="split" candidates (T=1, two kernels of many short programs: gate/up partial sums over
    k_splits D ranges per (expert, F tile), then the down projection per (expert, D tile)): column blocks 32..256,
    k-steps 32..256, 2 to 8 D ranges, down tiles 64..512 wide with 32..128-row F steps; the first in each
    in-kernel routing x int8 conversion (TritonMoEConfig.topk, .dequant), the rest with "rank" and "bits".
    Then SPLIT_DOT_PICKS on the tensor cores, each with and without w8a8 (int8 weights only).
    23 candidates at Qwen3-30B (27 when not quick)."""
    from pallas_kernels.moe import TritonMoEConfig
    from pallas_kernels.moe.triton_moe import DEQUANTS, IN_KERNEL_TOPKS

    # (block_f, block_k, k_splits, block_d, block_kf, f_splits). Wide rows: a weight tile's rows are block_f
    # (block_d) contiguous elements, and the first H200 tune (a8851dc) ranked 16- and 32-column tiles last
    # (32-64 B DRAM segments); the D (F) ranges give the programs. The second (4dc47d0) took
    # (128, 64, 8, 64, 128, 1) for int8; wider down tiles over F ranges follow it
    picks = [(128, 64, 8, 64, 128, 1), (128, 64, 8, 256, 32, 4), (128, 64, 8, 128, 64, 2),
             (128, 64, 4, 256, 64, 2), (256, 32, 8, 256, 32, 4), (128, 64, 8, 512, 32, 4),
             (128, 64, 4, 64, 128, 1), (64, 128, 2, 64, 128, 1)]
    if not quick:
        picks += [(128, 64, 2, 128, 64, 1), (256, 64, 8, 128, 64, 1), (128, 128, 4, 256, 64, 4),
                  (256, 32, 4, 128, 64, 2)]
    out = []
    for i, (bf, bk, splits, bd, bkf, fsplits) in enumerate(picks):
        if not split_fits(D, F, bf, bk, splits, bd, bkf, fsplits):
            continue
        # the first pick in each routing x conversion (what each is worth alone), the rest with both new ones
        for topk, dequant in itertools.product(IN_KERNEL_TOPKS, DEQUANTS) if i == 0 else [("rank", "bits")]:
            out.append(TritonMoEConfig(block_f=bf, block_k=bk, k_splits=splits, block_d=bd, block_kf=bkf,
                                       f_splits=fsplits, fused_route="split", topk=topk, dequant=dequant))
    # the tensor cores (block_m 16: the row in a 16-row tile), bf16 dots and, for int8 weights, w8a8's int8 dots
    for bf, bk, splits, bd, bkf, fsplits in SPLIT_DOT_PICKS:
        if not split_fits(D, F, bf, bk, splits, bd, bkf, fsplits):
            continue
        for w8a8 in (False, True):
            out.append(TritonMoEConfig(block_m=16, block_f=bf, block_k=bk, k_splits=splits, block_d=bd,
                                       block_kf=bkf, f_splits=fsplits, fused_route="split", topk="rank", w8a8=w8a8))
    return out


# (block_f, block_k, k_splits, block_d, block_kf, f_splits) of the split path's dot mode: 192-768 gate/up and
# 128-256 down programs at Qwen3-30B, 64-256 columns wide
SPLIT_DOT_PICKS = [(128, 64, 8, 128, 64, 2), (64, 128, 4, 64, 128, 1), (128, 128, 4, 128, 128, 2),
                   (256, 64, 8, 256, 64, 4), (64, 64, 8, 64, 64, 2)]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_stages) of "sweep": the split path's dot mode with
# one to four k-steps a program, so Triton's pipeline has a program's whole range in flight at once (the
# 3f5108a/b445ce3 tunes: 30B's kernels are latency-bound, int8 at half bf16's GB/s), at 2-3 stages
SWEEP_DOT = [(128, 128, 8, 128, 128, 2, 3), (128, 256, 8, 128, 128, 2, 2), (64, 256, 8, 64, 128, 2, 2),
             (128, 128, 4, 128, 64, 2, 3), (256, 128, 8, 64, 64, 4, 3), (128, 256, 8, 64, 64, 4, 2),
             (128, 128, 8, 64, 128, 2, 3), (64, 256, 8, 128, 64, 2, 2)]
# and the GEMV split's best blocks at 8 warps: half the float32 accumulator registers a thread (165 at 4 warps,
# 3 programs an SM in ncu)
SWEEP_GEMV = [(128, 64, 8, 128, 64, 2), (128, 64, 8, 64, 128, 1), (256, 32, 8, 256, 32, 4), (128, 32, 8, 128, 32, 2)]


def sweep_configs(D: int, F: int) -> list:
    """The "sweep" family (T=1): SWEEP_DOT with and without w8a8 (int8 weights only) and SWEEP_GEMV at 8 warps
    with the rank routing and the bit conversion ("prmt" is the "prefetch" family's: alone it lost to "bits",
    962f3a7); those whose blocks do not divide the shape are left out."""
    from pallas_kernels.moe import TritonMoEConfig

    out = [TritonMoEConfig(block_m=16, block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs,
                           num_stages=stages, fused_route="split", topk="rank", w8a8=w8a8)
           for bf, bk, ks, bd, bkf, fs, stages in SWEEP_DOT if split_fits(D, F, bf, bk, ks, bd, bkf, fs)
           for w8a8 in (False, True)]
    return out + [TritonMoEConfig(block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs,
                                  num_warps=8, fused_route="split", topk="rank", dequant="bits")
                  for bf, bk, ks, bd, bkf, fs in SWEEP_GEMV if split_fits(D, F, bf, bk, ks, bd, bkf, fs)]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits) of "wide": the split path's GEMV mode with one k-step a
# gate/up program at Qwen3-30B (k_splits = D / block_k) and three a down program (F = 768 has no power-of-two
# range of one step), so every program has its loads in flight at once and the grid holds several times the
# programs an SM can run (768-1,536 gate/up and 512-1,024 down programs at Qwen3-30B). The sweep's programs had
# 1-4 steps each in one wave: int8 moved half of bf16's bytes in 80-85% of its time (91dc255), and ncu's first
# split int8 kernel ran 3 programs an SM, waiting on loads (3f5108a)
SPLIT_WIDE = [(128, 64, 32, 128, 64, 4), (128, 128, 16, 256, 64, 4), (256, 64, 32, 128, 32, 8),
              (128, 64, 32, 256, 32, 8), (64, 128, 16, 512, 32, 8), (256, 128, 16, 128, 64, 4),
              (128, 256, 8, 256, 64, 4)]


def wide_configs(D: int, F: int) -> list:
    """The "wide" family (T=1): SPLIT_WIDE at 4 warps, rank routing, bit conversion; those whose blocks do not
    divide the shape are left out."""
    from pallas_kernels.moe import TritonMoEConfig

    return [TritonMoEConfig(block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs,
                            fused_route="split", topk="rank", dequant="bits")
            for bf, bk, ks, bd, bkf, fs in SPLIT_WIDE if split_fits(D, F, bf, bk, ks, bd, bkf, fs)]


def merge_configs(D: int, F: int) -> list:
    """The "merge" family (T=1): the split path with its partial sums merged in the kernels (TritonMoEConfig.merge):
    SPLIT_DOT_PICKS on the tensor cores, SWEEP_GEMV at 8 warps and the first four GEMV split picks at 4, rank
    routing and the bit conversion (these hold the H200's tuned T=1 winners of 91dc255; "prefetch" has the
    merge with "prmt")."""
    from pallas_kernels.moe import TritonMoEConfig

    gemv = [(bf, bk, ks, bd, bkf, fs, 8) for bf, bk, ks, bd, bkf, fs in SWEEP_GEMV]
    gemv += [(bf, bk, ks, bd, bkf, fs, 4) for bf, bk, ks, bd, bkf, fs in
             [(128, 64, 8, 64, 128, 1), (128, 64, 8, 256, 32, 4), (128, 64, 8, 128, 64, 2), (128, 64, 4, 256, 64, 2)]]
    out = [TritonMoEConfig(block_m=16, block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs,
                           fused_route="split", topk="rank", merge=True)
           for bf, bk, ks, bd, bkf, fs in SPLIT_DOT_PICKS if split_fits(D, F, bf, bk, ks, bd, bkf, fs)]
    return out + [TritonMoEConfig(block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf, f_splits=fs,
                                  num_warps=warps, fused_route="split", topk="rank", dequant="bits", merge=True)
                  for bf, bk, ks, bd, bkf, fs, warps in gemv if split_fits(D, F, bf, bk, ks, bd, bkf, fs)]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps) of "prefetch": SWEEP_GEMV at 8 warps and
# neighbours of int8's tuned T=1 entry (256, 32, 8, 256, 32, 4) at 8 warps, with 16 D ranges, 64-row k-steps or
# narrower down tiles, and two at 4 warps
PREFETCH_GEMV = [(bf, bk, ks, bd, bkf, fs, 8) for bf, bk, ks, bd, bkf, fs in SWEEP_GEMV] + [
    (256, 32, 16, 256, 32, 4, 8), (256, 64, 8, 256, 64, 4, 8), (256, 32, 8, 128, 32, 2, 8),
    (256, 32, 8, 256, 32, 4, 4), (128, 64, 8, 256, 32, 4, 4)]


def prefetch_configs(D: int, F: int) -> list:
    """The "prefetch" family (T=1): the split path's GEMV mode loading 1 and 2 k-steps ahead with the byte-permute
    conversion (TritonMoEConfig.prefetch, dequant "prmt"), each beside the same blocks with "bits" and no prefetch.
    The first H200 run (962f3a7, moe_int8_30b_h200_962f3a7.log) had "bits" one step ahead 8-16 us behind "bits"
    alone, and "prmt" alone 1-3 us behind "bits" alone, so those are left out; the family's first tune (a9a357e,
    moe_tune_prefetch_30b_h200_a9a357e.log) had 3 steps ahead last everywhere (registers spilled)."""
    out = [c for blocks in PREFETCH_GEMV for dq, pf in (("prmt", 1), ("prmt", 2), ("bits", 0))
           for c in gemv_split(D, F, [blocks], topk="rank", dequant=dq, prefetch=pf)]
    # and int8's tuned T=1 blocks with the in-kernel merge (TritonMoEConfig.merge), 1 and 2 steps ahead
    return out + [c for w in (4, 8) for pf in (1, 2)
                  for c in gemv_split(D, F, [(256, 32, 8, 256, 32, 4, w)], topk="rank", dequant="prmt", prefetch=pf,
                                      merge=True)]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps) of "hdown": int8's tuned T=1 entry at 4 and 8
# warps and three PREFETCH_GEMV neighbours
HDOWN_GEMV = [(256, 32, 8, 256, 32, 4, 4), (256, 32, 8, 256, 32, 4, 8), (128, 64, 8, 256, 32, 4, 4),
              (256, 32, 16, 256, 32, 4, 8), (256, 64, 8, 256, 64, 4, 8)]


def hdown_configs(D: int, F: int) -> list:
    """The "hdown" family (T=1): the split path's GEMV mode with the down kernel making h from the gate/up
    partials (TritonMoEConfig.h_in_down: no XLA pass between the kernels), with and without the down kernel's
    merge, byte permute one step ahead (as the "prefetch" family's winner); "prefetch" has the same blocks
    without h_in_down."""
    return [c for blocks in HDOWN_GEMV for m in (False, True)
            for c in gemv_split(D, F, [blocks], topk="rank", dequant="prmt", prefetch=1, h_in_down=True, merge=m)]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps) of "routed"'s GEMV configs: int8's tuned T=1
# entry at 8 and 4 warps and one 4-warp neighbour of "prefetch"
ROUTED_GEMV = [(256, 32, 8, 256, 32, 4, 8), (256, 32, 8, 256, 32, 4, 4), (128, 64, 8, 256, 32, 4, 4)]


def routed_configs(D: int, F: int) -> list:
    """The "routed" family (T=1): the split path routed once before its kernels (TritonMoEConfig.topk "kernel" and
    "xla") beside the same configs routing in every program ("rank"): the first two dot-mode merge picks (bf16's
    tuned T=1 entry first) and ROUTED_GEMV with the byte permute one step ahead (int8's tuned entry first), with
    XLA's merge and with the kernels'. Each program's routing had cost more at 8 warps than at 4
    (moe_parts_30b_h200_30ba836.log), so 4-warp GEMV configs come back in. Then ROUTED_GEMV routed by the kernel
    with h made in the down kernel (TritonMoEConfig.h_in_down, no XLA pass between the kernels), with and without
    the down kernel's merge: with "rank" routing that had won the "hdown" tune (moe_tune_hdown_30b_h200_0e8b8a3)."""
    dots = [c for c in merge_configs(D, F) if c.block_m == 16][:2]  # SPLIT_DOT_PICKS' first two, merged
    gemv = [c for blocks in ROUTED_GEMV for m in (False, True)
            for c in gemv_split(D, F, [blocks], dequant="prmt", prefetch=1, merge=m)]
    hdown = [dataclasses.replace(c, topk="kernel", h_in_down=True) for c in gemv]
    return [dataclasses.replace(c, topk=t) for c in dots + gemv for t in ("rank", "kernel", "xla")] + hdown


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps) of "fold": int8's tuned T=1 blocks with
# 64- and 128-row k-steps (down: 64 and 128), at 8 and 4 warps
FOLD_GEMV = [(256, 64, 8, 256, 64, 4, 8), (256, 64, 8, 256, 64, 4, 4), (256, 128, 8, 256, 64, 4, 8),
             (256, 64, 4, 256, 128, 2, 8)]
# and neighbours of the last one, which won at Qwen3-235B (moe_tune_fold_235b_h200_858eed8.log: 59.2 us against
# 66.1-86.3 for the other three, its four D ranges giving each program twice the bytes): taller steps, narrower
# gate/up or down tiles, 16 warps, two D ranges; one step ahead, h made in XLA (the down kernel's h lost every
# pair there). None beat it at 235B (moe_tune_folddeep_235b_h200_9c0ade7.log: 63.3-73.6 us against 58.5; two
# steps ahead, since dropped, 94.7-2,155: registers spilled)
FOLD_DEEP = [(256, 128, 4, 256, 128, 2, 8), (128, 64, 4, 256, 128, 2, 8), (256, 64, 4, 128, 128, 2, 8),
             (256, 64, 4, 256, 128, 2, 16), (256, 64, 2, 256, 128, 2, 8)]


def fold_configs(D: int, F: int) -> list:
    """The "fold" family (T=1): the split path's GEMV mode with k-steps taller than its accumulator, folded into
    it (TritonMoEConfig.fold: twice to four times the bytes in flight a step), routed by the kernel, loading 0 and
    1 steps ahead, h made in XLA and in the down kernel; then FOLD_DEEP one step ahead, h made in XLA."""
    return [c for blocks in FOLD_GEMV for pf in (0, 1) for hd in (False, True)
            for c in gemv_split(D, F, [blocks], topk="kernel", dequant="prmt", prefetch=pf, h_in_down=hd, fold=True)
            ] + gemv_split(D, F, FOLD_DEEP, topk="kernel", dequant="prmt", prefetch=1, fold=True)


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps) of "persist": both tuned fold configs' blocks
# (Qwen3-30B's, then 235B's) over 16 and 32 D ranges (short units: 2 and 1 64-row steps at 30B, 4 and 2 at 235B),
# and the "routed" entry's 32-row blocks over 16
PERSIST_GEMV = [(256, 64, 16, 256, 64, 4, 8), (256, 64, 32, 256, 64, 4, 8), (256, 64, 16, 256, 128, 2, 8),
                (256, 64, 32, 256, 128, 2, 8), (256, 32, 16, 256, 32, 4, 4)]


def persist_configs(D: int, F: int) -> list:
    """The "persist" family (T=1): the gate/up kernel as 1 and 2 programs an SM, each over a strided share of the
    short work units of PERSIST_GEMV's blocks (TritonMoEConfig.persistent), beside the same blocks with a program
    per unit; folded steps, one step ahead, routed by the kernel, h made in XLA."""
    return [c for blocks in PERSIST_GEMV for per in (1, 2, 0)
            for c in gemv_split(D, F, [blocks], topk="kernel", dequant="prmt", prefetch=1, fold=True,
                                persistent=per)]


def one_launch_configs(D: int, F: int) -> list:
    """The "one" family (T=1): the "merge" family with both kernels in one launch (TritonMoEConfig.one_launch)."""
    return [dataclasses.replace(c, one_launch=True) for c in merge_configs(D, F)]


FAMILIES = ("default", "dot", "gemv", "fused", "inline", "single", "split", "sweep", "wide", "merge", "one",
            "prefetch", "hdown", "routed", "fold", "persist", "w8a8", "mosaic", "kmajor", "kmerge")  # --families
# ("kmajor" and "kmerge" are the int8k format's own, at T=1: kmajor_configs)
# what --tune searches unless --families says otherwise: "wide" lost every trial at Qwen3-30B, T=1 on the H200
# (5a1676f: int8 41.6-48.7 us against the sweep's 38.8, bf16 45.4-57.2 against 44.6), and "one" was 1-3 us
# behind the same blocks in two launches with bf16 weights there (23601ce, moe_one_30b_h200_23601ce.log), so both
# are opt-in, as is "persist": every persistent trial lost to the same blocks with a program per unit, by 7-44% at
# Qwen3-30B and 5-90% at 235B (int8, T=1, moe_tune_persist_*_h200_dbc28b3.log)
DEFAULT_FAMILIES = tuple(f for f in FAMILIES if f not in ("wide", "one", "persist"))


def triton_configs(T: int, E: int, K: int, F: int, *, quick: bool, D: int = 2048,
                   families: tuple[str, ...] = DEFAULT_FAMILIES) -> list:
    """The Triton kernel's candidates at T tokens: plan's choice ("default"), the dot mode over column blocks and
    stages, wider row tiles at T >= 64 ("dot"), the GEMV mode and fused_combine at decode sizes ("gemv",
    "fused"), inline routing, the one-kernel and the split two-kernel paths at T=1 ("inline", "single", "split",
    "sweep", "wide", "merge", "one"), the register prefetch and byte permute ("prefetch"), h made in the down
    kernel ("hdown"), routing once before the kernels ("routed"), tall k-steps folded into the accumulator ("fold"),
    the gate/up kernel as a few programs an SM over short units ("persist"); `families` picks among them."""
    from pallas_kernels.moe import TritonMoEConfig
    from pallas_kernels.moe.triton_moe import gemv_expected

    configs = [TritonMoEConfig()] if "default" in families else []  # the GEMV mode at small T, else the dot
    dot_bm = 16 if gemv_expected(T, E, K) else None  # these stay dot candidates where plan picks GEMV
    if "dot" in families:
        for bf in (16, 32, 64):
            for stages in ((3,) if quick else (2, 4)):
                configs.append(TritonMoEConfig(block_m=dot_bm, block_f=bf, block_d=bf, num_stages=stages))
        if T >= 64:
            configs += [TritonMoEConfig(block_m=bm) for bm in (16, 64)]
    if T <= GEMV_MAX_T and "gemv" in families:
        configs += gemv_configs(T, F, quick=quick)
    if T <= FUSED_MAX_T and "fused" in families:
        configs += fused_configs(T, quick=quick)
    if T == 1 and "inline" in families:
        configs += inline_configs(quick=quick)
    if T == 1 and "single" in families:
        configs += single_configs(D, quick=quick)
    if T == 1 and "split" in families:
        configs += split_configs(D, F, quick=quick)
    if T == 1 and "sweep" in families:
        configs += sweep_configs(D, F)
    if T == 1 and "wide" in families:
        configs += wide_configs(D, F)
    if T == 1 and "merge" in families:
        configs += merge_configs(D, F)
    if T == 1 and "one" in families:
        configs += one_launch_configs(D, F)
    if T == 1 and "prefetch" in families:
        configs += prefetch_configs(D, F)
    if T == 1 and "hdown" in families:
        configs += hdown_configs(D, F)
    if T == 1 and "routed" in families:
        configs += routed_configs(D, F)
    if T == 1 and "fold" in families:
        configs += fold_configs(D, F)
    if T == 1 and "persist" in families:
        configs += persist_configs(D, F)
    return list(dict.fromkeys(configs))


def mosaic_configs(T: int) -> list:
    """The Mosaic kernel's candidates: the ring depth and D split at decode (covering the SMs at T=1), wider
    tiles at T=64. Configs that do not fit shared memory fail their trial and drop out."""
    from pallas_kernels.moe.mosaic_moe import MosaicMoEConfig as C

    if T <= 2:
        return [C(), C(split_k=1), C(split_k=2, num_stages=6), C(split_k=4, num_stages=6),
                C(block_k=256, num_stages=3), C(block_d=128, block_kf=256, num_stages=3)]
    if T <= 16:
        return [C(), C(split_k=1, num_stages=3), C(split_k=2), C(block_f=128, block_d=128, num_stages=3)]
    return [C(num_stages=s) for s in (2, 3, 4)] + [C(block_d=128, block_kf=256, num_stages=3)]


INT8_TUNE_T = (1, 8)  # decode sizes, where int8's halved bytes should show; larger T keeps plan's choice
FORMATS = ("bf16", "int8", "int8k")  # expert weights: bf16, int8 [E, In, Out], int8 stored k-major [E, Out, In]
QUANTISED = tuple(f"ours_{f}" for f in FORMATS[1:])  # the benchmark's int8 rows, one a format


def in_format(sets: list, fmt: str) -> list:
    """`make_sets`' input sets with their (shared) expert weights in weight format `fmt` (one of FORMATS)."""
    if fmt == "bf16":
        return sets
    from pallas_kernels.moe import quantize_int8

    q = [quantize_int8(w, k_major=fmt == "int8k") for w in sets[0][2:]]
    return [(x, r, *q) for x, r, *_ in sets]


# (block_f, block_k, k_splits, block_d, block_kf, f_splits, num_warps, num_stages) of "kmajor": the split path's dot
# mode over k-major int8 weights at T=1. A one-off gate/up pass (session 25's int8_layout_*_h200_d37c3d3.log)
# streamed k-major int8 tiles at 3.1 TB/s (Qwen3-235B; 2.1 at 30B) with 128-wide tiles of 128-row steps over 4 D
# ranges, against 2.3 (1.6) in the [E, In, Out] layout; its best blocks, wider and narrower neighbours, and the down
# kernel at the same tile shape over 2 and 4 F ranges. Each with and without w8a8.
KMAJOR_DOT = [(128, 128, 4, 128, 128, 2, 4, 3), (128, 128, 4, 128, 128, 4, 4, 3), (256, 128, 4, 256, 128, 2, 8, 3),
              (128, 256, 2, 128, 128, 2, 4, 3), (128, 128, 8, 128, 64, 4, 4, 3), (64, 128, 8, 64, 128, 2, 4, 3),
              (128, 128, 4, 64, 128, 2, 4, 4), (128, 64, 8, 128, 64, 4, 4, 4)]
# w8a8 only (the first tune, 658dac3, had w8a8 ahead at 15 of 16 blocks): the winners' blocks at 2 stages (a
# 128 x 128 int8 gate/up step is 32 KB of tiles: 3 programs an SM fit beside 2 at 3 stages, and Qwen3-235B's 384
# gate/up programs then run in one wave of 396, not 1.5 of 264), with 8 D ranges, with 64-row steps at 4 stages,
# and 256-row down steps over the whole F
KMAJOR_W8A8 = [(128, 128, 4, 128, 128, 2, 4, 2), (128, 128, 4, 128, 128, 4, 4, 2), (128, 128, 8, 128, 128, 2, 4, 2),
               (128, 64, 4, 128, 128, 2, 4, 4), (64, 128, 8, 64, 128, 2, 4, 2), (128, 128, 4, 128, 256, 1, 4, 2),
               (128, 128, 4, 256, 128, 2, 8, 2), (64, 128, 4, 64, 128, 2, 4, 3)]
# "kmerge": w8a8 with merge (h merged by the gate/up kernel, rounded to int8 by each down program, the down rows
# summed in the down kernel: 9.8 kernels a call at f92c202, ~6 us of them XLA's passes at Qwen3-30B), at the two
# tunes' winners (Qwen3-235B's 128 x 128 tiles at 2 and 3 stages, 30B's 64-wide at 3 and 2) and 235B's over 4 F
# ranges
KMAJOR_MERGE = [(128, 128, 4, 128, 128, 2, 4, 2), (128, 128, 4, 128, 128, 2, 4, 3), (64, 128, 8, 64, 128, 2, 4, 3),
                (64, 128, 8, 64, 128, 2, 4, 2), (128, 128, 4, 128, 128, 4, 4, 2)]
# and neighbours of the one that won at Qwen3-30B (64-wide at 2 stages, 24.6 us; moe_tune_kmerge30_h200_c3f2844),
# one side at a time: gate/up over 16 D ranges, 256-row steps, 128- and 32-wide tiles; down over 4 F ranges of
# 64-row steps, in one range of 256-row steps, 128- and 32-wide tiles; both at 8 and 2 warps. In their first tune
# (moe_tune_kmerge30_h200_388011e.log) all but 8 warps (30.9 us) ran 24.4-26.9 us, within the run's noise; the
# 256-row gate/up steps over 4 D ranges won on their rerun (24.8) and are the table's 30B int8k entry
KMERGE_NEAR = [(64, 128, 16, 64, 128, 2, 4, 2), (64, 256, 4, 64, 128, 2, 4, 2), (128, 128, 8, 64, 128, 2, 4, 2),
               (32, 128, 8, 64, 128, 2, 4, 2), (64, 128, 8, 64, 64, 4, 4, 2), (64, 128, 8, 64, 256, 1, 4, 2),
               (64, 128, 8, 128, 128, 2, 4, 2), (64, 128, 8, 32, 128, 2, 4, 2), (64, 128, 8, 64, 128, 2, 8, 2),
               (64, 128, 8, 64, 128, 2, 2, 2)]


def kmajor_configs(T: int, E: int, K: int, D: int, F: int, *, quick: bool, families=DEFAULT_FAMILIES) -> list:
    """The k-major int8 format's candidates (moe_triton reads k-major weights in any mode, but GEMV transposes each
    tile through registers): at T=1 ("kmajor") KMAJOR_DOT with and without w8a8 and KMAJOR_W8A8 with it, and
    ("kmerge") KMAJOR_MERGE and KMERGE_NEAR with w8a8 and merge, routed by the table kernel, where the blocks
    divide the shape; at other T the "dot" family and w8a8's per-slot kernels."""
    from pallas_kernels.moe import TritonMoEConfig

    if T == 1:
        groups = ([(KMAJOR_DOT, (False, True), False), (KMAJOR_W8A8, (True,), False)] if "kmajor" in families
                  else []) + ([(KMAJOR_MERGE + KMERGE_NEAR, (True,), True)] if "kmerge" in families else [])
        return [TritonMoEConfig(block_m=16, block_f=bf, block_k=bk, k_splits=ks, block_d=bd, block_kf=bkf,
                                f_splits=fs, num_warps=w, num_stages=st, fused_route="split", topk="kernel",
                                w8a8=w8a8, merge=merge)
                for blocks, modes, merge in groups
                for bf, bk, ks, bd, bkf, fs, w, st in blocks if split_fits(D, F, bf, bk, ks, bd, bkf, fs)
                for w8a8 in modes]
    return triton_configs(T, E, K, F, quick=quick, D=D, families=("dot",)) + w8a8_configs(T, quick=quick)


def candidate(impl: str, config, top_k: int):
    """The search loop's candidate running `impl` ("triton" or "mosaic") with `config` (its config class, or a
    dict of one as the tuned table holds it) at Qwen3's routing (top_k, norm_topk_prob)."""
    import functools

    from pallas_kernels import tuning
    from pallas_kernels.moe import TritonMoEConfig, moe_triton
    from pallas_kernels.moe.mosaic_moe import MosaicMoEConfig, moe_mosaic

    cls, fn = {"triton": (TritonMoEConfig, moe_triton), "mosaic": (MosaicMoEConfig, moe_mosaic)}[impl]
    config = cls(**config) if isinstance(config, dict) else config
    return tuning.Candidate(impl, config, functools.partial(fn, top_k=top_k, norm_topk_prob=True, config=config))


def tune(shape_name, tokens, *, quick, families=DEFAULT_FAMILIES, formats=FORMATS) -> list[dict]:
    """The search loop over Triton (and Mosaic) configs for each T, bf16 weights and, at decode sizes, int8;
    winners go to pallas_kernels/tuned/moe.json."""
    import functools

    from pallas_kernels import tuning
    from pallas_kernels.moe import TritonMoEConfig, dispatch, moe_reference
    from pallas_kernels.moe.mosaic_moe import MAX_TOKENS

    D, F, E, K = SHAPES[shape_name]
    rows = []
    for T, fmt in [(T, "bf16") for T in tokens if "bf16" in formats] + [
            (T, f) for f in FORMATS[1:] for T in tokens if T in INT8_TUNE_T and f in formats]:
        sets = in_format(make_sets(T, D, F, E, K), fmt)
        if fmt == "int8k":
            configs = kmajor_configs(T, E, K, D, F, quick=quick, families=families)
        else:
            configs = triton_configs(T, E, K, F, quick=quick, D=D, families=families)
        if fmt == "bf16":  # dequant is the int8 conversion: bf16 weights would run the same kernel twice
            default = TritonMoEConfig().dequant
            configs = list(dict.fromkeys(dataclasses.replace(c, dequant=default) for c in configs if not c.w8a8))
        if fmt == "int8" and "w8a8" in families:  # (int8k's own list has them)
            configs += w8a8_configs(T, quick=quick)
        cands = [candidate("triton", c, K) for c in configs]
        if T <= MAX_TOKENS and fmt == "bf16" and "mosaic" in families:  # the Mosaic kernel has no int8 path
            cands += [candidate("mosaic", c, K) for c in mosaic_configs(T)]
        ref = functools.partial(moe_reference, top_k=K, norm_topk_prob=True)
        key = dispatch.shape_key((T, D), sets[0][2], K, sets[0][0].dtype)
        # the table's current entry timed beside the families: a family it is not in cannot replace it with a
        # slower winner
        cands = tuning.with_incumbent(cands, dispatch.DISPATCH.tuned(key),
                                      lambda impl, config: candidate(impl, config, K))
        best, trials = tuning.search(cands, ref, sets, tol=TOL if fmt == "bf16" else TOL_INT8,
                                     progress=log)
        for t in trials:  # each trial in the log too (the JSON is written only at the end)
            log(t.line())
        if best is not None:
            path = dispatch.DISPATCH.record(key, best)
            if os.environ.get("OUT"):
                # named apart from the benchmark's own moe.json, which write_result also puts under $OUT
                shutil.copy(path, Path(os.environ["OUT"], f"tuned_{path.name}"))
            log(f"tune {shape_name} T={T} {fmt}: best {best.impl} {best.config} {best.us:.1f} us (of {len(trials)})")
            rows.append({"shape": shape_name, "T": T, "weights": fmt, "impl": best.impl, "best": best.config,
                         "us": round(best.us, 1),
                         "trials": [vars(t) for t in trials]})
    return rows


def bench(shape_name, T, *, tiny, profile: bool = False) -> list[dict]:
    import functools

    import jax

    from benchmarks import gpu_trace
    from pallas_kernels import moe, tuning
    from pallas_kernels.moe import dispatch, moe_reference, moe_triton
    from pallas_kernels.moe.mosaic_moe import MAX_TOKENS as MOSAIC_MAX_TOKENS

    D, F, E, K = (TINY if tiny else SHAPES)[shape_name]
    sets = make_sets(T, D, F, E, K)
    n_touched = touched(sets, K)
    kw = dict(top_k=K, norm_topk_prob=True)
    qsets = None
    impls = {
        "ours": functools.partial(moe, **kw),
        "ragged_dot": functools.partial(moe_reference, **kw),
        "gather_einsum": functools.partial(gather_einsum, **kw),
        "mosaic": functools.partial(moe, **kw, impl="mosaic"),  # Hopper only: elsewhere its row records the error
    }
    if tiny:  # the CPU: the kernel runs in the interpreter
        impls["ours"] = functools.partial(moe_triton, **kw, interpret=True)
    ref = jax.jit(impls["ragged_dot"])(*sets[0])
    rows = []
    timed = {}  # name -> (fn, input sets, touched bytes) of those that passed their check
    for name in ["ours", *QUANTISED, "ragged_dot", "gather_einsum", "mosaic"]:
        bytes_per_expert = 3 * D * F * 2
        if name in QUANTISED:
            qsets = in_format(sets, name.removeprefix("ours_"))
            fn = functools.partial(moe_triton, **kw, interpret=True) if tiny else functools.partial(moe, **kw)
            bytes_per_expert = 3 * D * F + 4 * (2 * F + D)
            args, tol = qsets, TOL_INT8
        else:
            fn, args, tol = impls[name], sets, TOL
        row = {"shape": shape_name, "T": T, "impl": name, "experts_touched": round(n_touched, 1)}
        if name == "gather_einsum" and 3 * T * K * D * F * 2 > GATHER_LIMIT:
            row["error"] = f"skipped: the gathered weights would take {3 * T * K * D * F * 2 / 1e9:.0f} GB"
            rows.append(row)
            continue
        if name == "mosaic" and T > MOSAIC_MAX_TOKENS:
            row["error"] = f"skipped: the Mosaic kernel declines T > {MOSAIC_MAX_TOKENS}; the dispatcher falls back"
            rows.append(row)
            continue
        weights = qsets[0][2] if name in QUANTISED else sets[0][2]
        if name in ("ours", *QUANTISED) and tiny:
            row["picked"] = "triton (interpreter)"
        elif name in ("ours", *QUANTISED):
            entry = dispatch.tuned((T, D), weights, K, sets[0][0].dtype)
            row["picked"] = f"tuned {entry['impl']} {entry['config']}" if entry else dispatch.choose()
        try:
            err = tuning.max_rel_err(jax.jit(fn)(*args[0]), ref)
            row["max_rel_err"] = f"{err:.2e}"
            if not err <= tol:
                raise AssertionError(f"max rel err {err:.3g} > {tol}")
            timed[name] = (fn, args, n_touched * bytes_per_expert)  # timed below, round-robin with the others
        except Exception as e:  # one failing implementation is recorded, the others still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(traceback.format_exc(limit=3))
        rows.append(row)
    cases = {k: v[:2] for k, v in timed.items()}
    if profile:  # the chain's own cost per call (the link between calls, see tuning._depend): x returned as is
        cases["chain_floor"] = (lambda x, *_: x, sets)
    errors: dict[str, str] = {}
    times = tuning.time_interleaved(cases, repeats=3 if tiny else 9, errors=errors)
    for row in rows:
        name = row["impl"]
        if name in times:
            us = times[name]["us"]
            row["us"] = round(us, 1)
            row["GB/s"] = round(timed[name][2] / (us * 1e-6) / 1e9, 1)
        elif name in errors:
            row["error"] = errors[name]
        log(f"{shape_name} T={T} {name}: {row.get('us', '-')} us, {row.get('GB/s', '-')} GB/s "
            f"{row.get('error', '')}")
        if profile and name in ("ours", *QUANTISED) and name in times:  # where one call's time goes, by kernel
            row["profile"], line = gpu_trace.profile_call(*timed[name][:2], max_calls=SETS)
            log(f"  {line}")
    if "chain_floor" in times:
        rows.append({"shape": shape_name, "T": T, "impl": "chain_floor", "us": round(times["chain_floor"]["us"], 1)})
    del sets, qsets, timed
    jax.clear_caches()
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """One shape's rows, each timed one given its ratio to ours (bf16 weights) in the same run: "ours x" on the
    other implementations (their time over ours: how many times faster ours is) and "x bf16" on ours_int8 and
    ours_int8k (ours' time over theirs: the quantised format's speedup, the issue's 1.6x bar at T=1)."""
    ours = next((r.get("us") for r in rows if r["impl"] == "ours"), None)
    for r in rows:
        if not ours or not r.get("us") or r["impl"] in ("ours", "chain_floor"):
            continue
        if r["impl"] in QUANTISED:
            r["x bf16"] = round(ours / r["us"], 2)
        else:
            r["ours x"] = round(r["us"] / ours, 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--tune", action="store_true", help="search Triton configs for --shapes first")
    p.add_argument("--quick-tune", action="store_true", help="fewer configs in --tune")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"weight formats --tune searches (default: {','.join(FORMATS)})")
    p.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                   help=f"config families --tune searches, comma-separated, of {','.join(FAMILIES)} (default: all "
                        "but wide)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes in the Pallas interpreter: a CPU smoke test")
    p.add_argument("--profile", action="store_true",
                   help="also time the chain's own cost (chain_floor) and profile ours: time per kernel, busy vs span")
    args = p.parse_args()
    families = tuple(f for f in args.families.split(",") if f)
    if not families or set(families) - set(FAMILIES):
        p.error(f"--families: comma-separated names among {', '.join(FAMILIES)}, got {args.families!r}")
    formats = tuple(f for f in args.formats.split(",") if f)
    if not formats or set(formats) - set(FORMATS):
        p.error(f"--formats: some of {', '.join(FORMATS)} (comma-separated), got {args.formats!r}")
    import jax

    shapes = list(TINY) if args.tiny else args.shapes
    tuned_rows, rows = [], []

    def save() -> Path:  # after every step: a run cut off by its time limit keeps what it measured
        return write_result("moe_tiny" if args.tiny else "moe", {
            "device": device(), "versions": versions("jax", "jaxlib"), "backend": jax.default_backend(),
            "shapes": {s: dict(zip(("D", "F", "E", "top_k"), (TINY if args.tiny else SHAPES)[s], strict=True))
                       for s in shapes},
            "rows": rows, "tune": tuned_rows,
        })

    if args.tune and not args.tiny:
        for name in args.shapes:
            for T in args.tokens:
                tuned_rows += tune(name, [T], quick=args.quick_tune, families=families, formats=formats)
                save()
    for shape in shapes:
        for T in (TINY_TOKENS if args.tiny else args.tokens):
            rows += bench(shape, T, tiny=args.tiny, profile=args.profile)
            save()
    cols = ["shape", "T", "impl", "experts_touched", "us", "GB/s", "ours x", "x bf16", "max_rel_err", "picked",
            "error"]
    print(table(rows, [c for c in cols if any(c in r for r in rows)]))
    print(f"wrote {save()}")
    if any("error" in r for r in rows if r["impl"] in ("ours", *QUANTISED)):
        raise SystemExit("our kernel failed on some shape (see the error column)")


if __name__ == "__main__":
    main()
