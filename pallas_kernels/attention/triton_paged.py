"""Paged attention through the Pallas Triton lowering, for NVIDIA GPUs without Mosaic GPU (Ampere, Ada, ...).

Split-KV flash decoding with a combine step, like `mosaic_paged.py`, in Triton's terms. One program per
(batch row, KV head, query tile, KV split). A query tile holds `block_q` rows of the whole GQA group of one
KV head for the row's new tokens (row n is token n // G, head n % G), so each KV page is read once for the
group; `block_q` is at least 16 because `pltriton.dot` needs every dimension >= 16 (decode with G < 16 pads
the group with zero rows). Each program walks its split's KV blocks of `pages_per_block` pages:

    S[n, kv] = Q[n, :] @ K[kv, :]^T          O[n, :] += P[n, kv] @ V[kv, :]      (float32 online softmax)

Triton has no scalar prefetch, so the page table is an ordinary input: for every token of a block the kernel
loads its page id from the table and gathers its K/V row from the whole pool (a BlockSpec over one head's
pool, indexed by (page id, slot) vectors), i.e. one [BK, D] tile per block with no reshape. Loads are masked
to the row's tokens (other = 0), so pages past a sequence are never read and NaN garbage there cannot
reach the PV dot (0 * NaN would). Masks come from per-row query positions (-1 for rows past q_lens):
causality, ragged `q_lens`, empty slots and the sliding window are one comparison each.

The kernel takes q, kv_lens, q_lens and the page table as the caller holds them: each program gathers its
tile's query rows from q [B, T, Hq, D] and derives the positions and its KV range from the two lengths, so no
XLA pass runs before it. (On the H200 at B=1, L=2k those passes, 2 pads, a concatenate and a multiply,
took ~4 us of GPU time beside the kernel's 5.8. In benchmarks/attention.py's chain the time per call moved
little, 18.3 to 18.2 us: the chain's link adds, which those passes had absorbed, now run as kernels.) With
several splits, each writes its unnormalised output with its running max and sum (log2 domain) and
`common.combine_splits` merges them in XLA (or, with `combine_in_kernel`, the last split of each query tile to
arrive merges them in the kernel); with one split the program normalises and writes its rows of the final
[B, T, Hq, D] output itself.

Triton requires every load/store block to have a power-of-two element count: page sizes, `pages_per_block` and
`block_q` are powers of two and head_dim is 64/128/256. Anything else raises NotImplementedError so that the
dispatcher can fall back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.attention.common import output_rows
from pallas_kernels.triton_sync import last_arrival

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": a fully masked row keeps exp2(NEG - NEG) finite
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MIN_DOT = 16  # Triton's tl.dot needs M, N, K >= 16
MAX_BLOCK_KV = 512  # tokens per KV block: beyond this the [block_q, BK] logits spill registers
DEFAULT_SMS = 108  # A100, when the device does not say


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TritonAttentionConfig:
    """Tuning of the Triton paged attention kernel; None fields are picked per shape by `plan`.

    pages_per_block: pages per KV block (power of two); the block is pages_per_block * page_size tokens,
      16..512 (raised to 16 tokens for pages under 16). None: 64 tokens (32 at head_dim 256) or one page if
      pages are larger.
    block_q: query rows per program (power of two, 16..128). None: the group's T * G rows rounded up to a
      power of two, capped at 64 (32 at head_dim 256). More rows go to more programs, which re-read the same
      KV (mostly from L2).
    num_splits: KV splits per (row, KV head, query tile) (flash decoding), combined afterwards. None: enough
      programs for about two per SM, capped at the number of KV blocks, then the fewest with no more blocks in
      the longest (`trim_splits`).
    num_warps: warps per program. None: 8 for query tiles of 64 x 128 or more (the float32 accumulator's
      registers), else 4 (a guess until measured: benchmarks/attention.py --tune searches it).
    num_stages: Triton's software pipelining depth of the KV loop (loads in flight).
    combine_in_kernel: with several splits, the last split of each query tile to finish merges the tile's
      partial outputs and writes the final rows (a counter per tile, bumped atomically), instead of XLA's
      combine passes after the kernel: one launch per call (and a memset of the counters) instead of 3-5, but
      the merge is one program's work after every other program of the tile is done. The merge reads only the
      group's rows (4 of a 16-row decode tile at G=4) in a few independent [chunk, rows, D] loads; its first
      form, one dependent load per split, lost everywhere but B=8, L=8k, page 64 on the H200 (31.4 against 12.7
      us at B=1, L=2k; benchmarks/results/logs/README.md, session 12). Off by default; the tuner tries it.
    early_v: each KV step issues its V tile's load beside its K tile's, before the QK dot and the softmax, so the
      two loads' latencies overlap instead of following one another; V's tile then stays in registers across the
      QK dot. Where a program walks few KV blocks (small batches, short sequences) each step waits on its loads
      (the page ids, then K, then V): on the H200 at B=1, L=2k the in-kernel merge took 15.8 us at 8 splits (4
      blocks a program) against 13.5 at 32 (one block each; attn_fused_merge_h200_db3eaa5.log). Off by
      default; the tuner tries it.
    combine_kernel: with several splits, a second small Triton kernel (one program per query tile) merges the
      partial outputs and writes the final rows, instead of XLA's combine passes (four kernels, ~4.9 us of a 14.2
      us call at B=1, L=2k on the H200: attn_profile_small_h200_30ba836.log); unlike combine_in_kernel no program
      waits for the others. Excludes combine_in_kernel. Off by default; the tuner tries it.
    """

    pages_per_block: int | None = None
    block_q: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    combine_in_kernel: bool = False
    early_v: bool = False
    combine_kernel: bool = False

    def __post_init__(self):
        if self.combine_kernel and self.combine_in_kernel:
            raise ValueError("combine_kernel and combine_in_kernel are two ways to merge the splits: pick one")
        if self.pages_per_block is not None and not (_pow2(self.pages_per_block) and self.pages_per_block <= 64):
            raise ValueError(f"pages_per_block={self.pages_per_block} must be a power of two in [1, 64]")
        if self.block_q is not None and not (_pow2(self.block_q) and MIN_DOT <= self.block_q <= 128):
            raise ValueError(f"block_q={self.block_q} must be a power of two in [16, 128]")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")
        if self.num_warps not in (None, 1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages} must be in [1, 8]")


class Plan(NamedTuple):
    """What one call runs: the config with every choice made."""

    pages_per_block: int
    block_kv: int  # tokens per KV block
    block_q: int  # query rows per program
    num_q_tiles: int
    num_splits: int
    num_warps: int
    num_stages: int
    combine_in_kernel: bool
    early_v: bool = False
    combine_kernel: bool = False


def check_supported(q_shape, k_shape, dtype) -> None:
    """Raises NotImplementedError for what this kernel does not handle (the dispatcher then falls back)."""
    _, _, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        raise NotImplementedError(f"triton paged attention supports bf16/f16, got {jnp.dtype(dtype).name}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"triton paged attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {D}")
    if Hq % Hkv:
        raise NotImplementedError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if not _pow2(S) or S > MAX_BLOCK_KV:
        raise NotImplementedError(f"page size {S} must be a power of two <= {MAX_BLOCK_KV} (Triton block sizes)")


def triton_available() -> bool:
    """True on NVIDIA GPUs other than Hopper (compute capability 9.x), which has the Mosaic GPU kernel."""
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", ""))
    return dev.platform == "gpu" and cc[:1].isdigit() and not cc.startswith("9.")


def _sm_count() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or DEFAULT_SMS)


def trim_splits(blocks: int, splits: int) -> int:
    """The fewest splits whose longest holds no more blocks than with `splits` (at full length): the splits past those
    would run short or empty. 33 splits of 512 blocks hold 16 each and leave the last empty; 32 do the same work
    (H200, B=1, L=32k, the in-kernel merge: 45-48 us against 49-51, two rounds, attn_splits_h200_7d60785.log)."""
    return -(-blocks // -(-blocks // max(1, splits)))


def plan(q_shape, k_shape, num_pages: int, config: TritonAttentionConfig, sms: int | None = None) -> Plan:
    """Fills in the config's open choices for one shape; raises NotImplementedError if the config cannot run."""
    B, T, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    n_rows = Hq // Hkv * T
    if config.pages_per_block is not None:
        ppb = config.pages_per_block
    else:
        ppb = max(1, (64 if D <= 128 else 32) // S)
    ppb = max(ppb, MIN_DOT // S)  # the PV dot contracts over the block: >= 16 tokens
    BK = ppb * S
    if BK > MAX_BLOCK_KV:
        raise NotImplementedError(f"pages_per_block={ppb} x page size {S} = {BK} tokens per block "
                                  f"(max {MAX_BLOCK_KV}): lower pages_per_block")
    R = config.block_q or min(max(_next_pow2(n_rows), MIN_DOT), 64 if D <= 128 else 32)
    nqt = -(-n_rows // R)
    max_blocks = max(1, -(-(num_pages * S) // BK))
    splits = config.num_splits or -(-2 * (sms or _sm_count()) // (B * Hkv * nqt))
    splits = max(1, min(splits, max_blocks))
    if config.num_splits is None:
        splits = trim_splits(max_blocks, splits)
    warps = config.num_warps or (8 if R * D >= 64 * 128 else 4)
    return Plan(ppb, BK, R, nqt, splits, warps, config.num_stages, config.combine_in_kernel, config.early_v,
                config.combine_kernel)


def _kernel(
    kv_len_ref,  # [1] int32: the row's KV length (its new tokens included)
    q_len_ref,  # [1] int32: the row's new tokens
    pt_ref,  # [Npad] int32 page table of the row
    q_ref,  # [T, Hq, D] the row's queries, as the caller holds them
    k_ref,  # [P, S, D] the head's whole pool
    v_ref,  # [P, S, D]
    *out_refs,  # normalise: o [T, Hq, D] in q's dtype; fused: the tile's arrival counter [1] int32 (input), o,
    # every split's o [splits, M, D] float32 unnormalised, m, l [splits, M] float32, the counter (output, the same
    # buffer); else o [M, D] float32 unnormalised, m, l [M] float32; M = merge_rows(R, T * G) <= R
    pages_per_block: int,
    splits: int,
    num_pages: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    rows: int,
    group: int,
    normalise: bool,
    fused: bool,
    interpret: bool,
    early_v: bool = False,
):
    h, tile, split = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    T, _, D = q_ref.shape
    P, S, _ = k_ref.shape
    BK = pages_per_block * S
    R, G = rows, group

    kv_len = kv_len_ref[0]
    q_len = q_len_ref[0]
    # the row's visible KV range: hi 0 for an empty slot, the window's first token with sliding_window
    hi = jnp.where(q_len > 0, jnp.clip(kv_len, 0, num_pages * S), 0)
    lo = jnp.int32(0) if sliding_window is None else jnp.clip(kv_len - q_len - sliding_window + 1, 0, hi)
    blk_lo = lax.div(lo, BK)
    blk_hi = lax.div(hi + (BK - 1), BK)
    per_split = lax.div(blk_hi - blk_lo + (splits - 1), splits)
    first = blk_lo + split * per_split
    nsteps = jnp.maximum(jnp.minimum(per_split, blk_hi - first), 0)

    t, head = _tile_rows(h, tile, R, rows=R, group=G, tokens=T)  # [R]
    row_live = t < q_len
    qpos = jnp.where(row_live, kv_len - q_len + t, -1)  # [R]; -1 sees nothing
    cols = jnp.arange(D, dtype=jnp.int32)
    q_idx = (t[:, None], head[:, None], cols[None, :])
    # padding rows and tokens past q_len load as 0 (the caller's padding may hold anything)
    q = pltriton.load(q_ref.at[q_idx], mask=jnp.broadcast_to(row_live[:, None], (R, D)), other=0)  # [R, D]
    offs = jnp.arange(BK, dtype=jnp.int32)  # [BK]
    page_in_blk = lax.div(offs, S)
    slot = lax.rem(offs, S)

    def body(step, carry):
        acc, m, l = carry
        blk = first + step
        kpos = blk * BK + offs  # [BK]
        live = kpos < hi
        # one page-id load per token (the same few addresses, served by L1) keeps the tile [BK, D] without a
        # reshape; tokens past the sequence read nothing and use page 0
        pid = pltriton.load(pt_ref.at[blk * pages_per_block + page_in_blk], mask=live, other=0)
        pid = jnp.clip(pid, 0, P - 1)
        # all-array indexers (the interpreter cannot mix them with slices), broadcast to [BK, D]
        kv_idx = (pid[:, None], slot[:, None], cols[None, :])
        live2 = jnp.broadcast_to(live[:, None], (BK, D))
        k = pltriton.load(k_ref.at[kv_idx], mask=live2, other=0)  # [BK, D]
        # V past the sequence loads as 0: p = 0 alone would not cancel NaN garbage inside the dot
        v = pltriton.load(v_ref.at[kv_idx], mask=live2, other=0) if early_v else None  # [BK, D]
        s = pltriton.dot(q, k, trans_b=True)  # [R, BK] float32
        if soft_cap is None:
            s = s * (scale * LOG2E)
        else:
            s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * LOG2E)
        valid = kpos[None, :] <= qpos[:, None]  # also excludes padding rows (qpos -1) and tokens >= hi
        if sliding_window is not None:
            valid = valid & (kpos[None, :] > qpos[:, None] - sliding_window)
        s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=1)
        if not early_v:
            v = pltriton.load(v_ref.at[kv_idx], mask=live2, other=0)  # [BK, D]
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((R, D), jnp.float32)
    m = jnp.full((R,), NEG, jnp.float32)
    l = jnp.zeros((R,), jnp.float32)
    acc, m, l = lax.fori_loop(0, nsteps, body, (acc, m, l))

    def write_final(o_ref, acc, l):
        _write_rows(o_ref, acc, l, h, tile, q_len, rows=R, group=G)

    if normalise:  # one split
        write_final(out_refs[0], acc, l)
        return
    if fused:
        _, o_ref, op_ref, mp_ref, lp_ref, count_ref = out_refs
        _store_partial(op_ref, mp_ref, lp_ref, acc, m, l, split)
        last_arrival(count_ref, jnp.int32(0), splits,
                     lambda: write_final(o_ref, *_merge_splits(op_ref, mp_ref, lp_ref, splits, op_ref.shape[1])),
                     interpret)
    else:
        _store_partial(*out_refs, acc, m, l)


def _store_partial(o_ref, m_ref, l_ref, acc, m, l, split=None):
    """A split's partial (acc [R, D], m, l [R]) into its refs (o [M, D], m, l [M], or with `split` their
    [splits, M, ...] forms), which hold only the M rows a merge reads (`merge_rows`): a decode tile pads the
    group's G rows to 16, and the rows past them are never merged, so their float32 stores (3/4 of a G=4 tile's
    bytes) are left out."""
    lead = () if split is None else (split,)
    keep, R = o_ref.shape[len(lead)], acc.shape[0]
    if keep == R:
        for ref, val in ((o_ref, acc), (m_ref, m), (l_ref, l)):
            (ref.at[split] if lead else ref)[...] = val
        return
    # rows past M index past the ref, masked: the GPU stores nothing there, the interpreter drops them (a
    # scatter's out-of-bounds updates); a clamped index would give the interpreter duplicate addresses
    r = jnp.arange(R, dtype=jnp.int32)
    live = r < keep
    cols = jnp.arange(acc.shape[1], dtype=jnp.int32)
    pltriton.store(o_ref.at[(*lead, r[:, None], cols[None, :])], acc,
                   mask=jnp.broadcast_to(live[:, None], acc.shape))
    pltriton.store(m_ref.at[(*lead, r)], m, mask=live)
    pltriton.store(l_ref.at[(*lead, r)], l, mask=live)


def _tile_rows(h, tile, count: int, *, rows: int, group: int, tokens: int):
    """(token t, query head) of query tile `tile`'s first `count` rows for KV head h: row n = t * G + g is query
    head h * G + g of new token t. The last tile's rows past the group repeat its last row (the same values
    computed twice and stored to the same place, so stores need no mask and no two lanes of a store ever write
    different values to one address)."""
    n = jnp.minimum(tile * rows + jnp.arange(count, dtype=jnp.int32), tokens * group - 1)
    return lax.div(n, group), h * group + lax.rem(n, group)


def _write_rows(o_ref, acc, l, h, tile, q_len, *, rows: int, group: int):
    """The tile's first acc.shape[0] rows (acc [n, D] unnormalised, l [n] its sums), normalised, straight into the
    caller's [T, Hq, D] layout o_ref; rows of tokens past q_len are written 0."""
    T, _, D = o_ref.shape
    t, head = _tile_rows(h, tile, acc.shape[0], rows=rows, group=group, tokens=T)
    cols = jnp.arange(D, dtype=jnp.int32)
    o = jnp.where((t < q_len)[:, None], acc / jnp.where(l == 0, 1.0, l)[:, None], 0.0)
    pltriton.store(o_ref.at[(t[:, None], head[:, None], cols[None, :])], o.astype(o_ref.dtype))


def _combine_kernel(q_len_ref, op_ref, mp_ref, lp_ref, o_ref, *, splits: int, rows: int, group: int):
    """combine_kernel: program (b, h, tile) merges the tile's split partials (o [splits, R, D], m, l [splits, R])
    as the in-kernel merge does (`_merge_splits`) and writes its rows of o [T, Hq, D]."""
    h, tile = pl.program_id(1), pl.program_id(2)
    T = o_ref.shape[0]
    acc, l = _merge_splits(op_ref, mp_ref, lp_ref, splits, merge_rows(rows, T * group))
    _write_rows(o_ref, acc, l, h, tile, q_len_ref[0], rows=rows, group=group)


MERGE_VALUES = 8192  # float32 partial-output values one merge step loads: 64 registers a thread at 4 warps


def merge_rows(block_q: int, n_rows: int) -> int:
    """Rows of a query tile the in-kernel merge reads: the group's T * G rows rounded up to a power of two when
    one tile holds them all (decode pads 4 rows to 16; the padding repeats the last row), else the tile."""
    return min(block_q, _next_pow2(n_rows))


def _merge_splits(op_ref, mp_ref, lp_ref, splits: int, rows: int):
    """combine_in_kernel: the last split of a tile to arrive merges every split's partial (o [splits, R, D]
    unnormalised, running max m and sum l [splits, R], log2 domain) into (acc [rows, D], l [rows]) for
    `write_final`. Only the tile's first `rows` rows are read, and the splits go in a few independent loads
    ([chunk, rows, D] each, a static unroll) rather than one dependent load per split: the merge is one
    program's work after every other program of the tile is done, so its latency is the call's tail."""
    D = op_ref.shape[-1]
    SP = _next_pow2(splits)
    r = jnp.arange(rows, dtype=jnp.int32)
    s_all = jnp.arange(SP, dtype=jnp.int32)[:, None]  # [SP, 1]
    live_s = jnp.broadcast_to(s_all < splits, (SP, rows))
    m_all = pltriton.load(mp_ref.at[(s_all, r[None, :])], mask=live_s, other=NEG)  # [SP, rows]
    l_all = pltriton.load(lp_ref.at[(s_all, r[None, :])], mask=live_s, other=0)
    m = jnp.max(m_all, axis=0)  # [rows]
    l = jnp.sum(jnp.where(live_s, jnp.exp2(m_all - m[None, :]), 0.0) * l_all, axis=0)
    chunk = max(1, min(SP, MERGE_VALUES // (rows * D)))
    cols = jnp.arange(D, dtype=jnp.int32)
    acc = jnp.zeros((rows, D), jnp.float32)
    for c0 in range(0, splits, chunk):  # static: every chunk's loads are independent of the previous merge
        s = c0 + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        live = s < splits
        mc = pltriton.load(mp_ref.at[(s[:, None], r[None, :])], mask=jnp.broadcast_to(live[:, None], (chunk, rows)),
                           other=NEG)  # [C, rows]
        w = jnp.where(live[:, None], jnp.exp2(mc - m[None, :]), 0.0)
        o = pltriton.load(op_ref.at[(s[:, None, None], r[None, :, None], cols[None, None, :])],
                          mask=jnp.broadcast_to(live[:, None, None], (chunk, rows, D)), other=0)  # [C, rows, D]
        acc = acc + jnp.sum(o * w[:, :, None], axis=0)
    return acc, l


def paged_attention_triton(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    q_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: TritonAttentionConfig | dict | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Paged attention through Pallas Triton; same contract as `paged_attention_reference`.

    Args:
      q: [B, T, Hq, D] bf16/f16 queries, q_lens[b] valid rows at positions kv_lens[b] - q_lens[b] + t.
      k_pages, v_pages: [Hkv, P, S, D] page pool; page ids past a sequence may hold anything.
      page_table: [B, N] int32; kv_lens, q_lens: [B] int32.
      config: tuning; interpret: run in the Pallas interpreter (CPU).
    Returns:
      [B, T, Hq, D] in q's dtype, rows t >= q_lens[b] exactly 0.
    Raises:
      NotImplementedError for unsupported dtypes, head dims, page sizes or block sizes.
    """
    config = TritonAttentionConfig(**config) if isinstance(config, dict) else config or TritonAttentionConfig()
    check_supported(q.shape, k_pages.shape, q.dtype)
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise NotImplementedError(f"q, k, v dtypes differ: {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    p = plan(q.shape, k_pages.shape, page_table.shape[1], config, sms=DEFAULT_SMS if interpret else None)
    return _paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_lens, scale=float(scale),
                            sliding_window=sliding_window, soft_cap=soft_cap, plan=p, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "plan", "interpret"))
def _paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window, soft_cap, plan,
                     interpret):
    B, T, Hq, D = q.shape
    Hkv, P, S, _ = k_pages.shape
    N = page_table.shape[1]
    ppb, _, R, nqt, splits, num_warps, num_stages, fused, early_v, combine_kernel = plan
    # the kernel reads q, the lengths and the page table as the caller holds them (no XLA pass before it);
    # the table is padded only where its last block would end past it
    n_pad = -(-N // ppb) * ppb
    page_table = page_table.astype(jnp.int32)
    if n_pad != N:
        page_table = jnp.pad(page_table, ((0, 0), (0, n_pad - N)))
    normalise = splits == 1
    fused = fused and not normalise
    keep = merge_rows(R, T * (Hq // Hkv))  # the partials' rows: those a merge reads (`_store_partial`)
    kernel = functools.partial(_kernel, pages_per_block=ppb, splits=splits, num_pages=N, scale=scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, rows=R, group=Hq // Hkv,
                               normalise=normalise, fused=fused, interpret=interpret, early_v=early_v)
    f32 = jnp.float32
    final_spec = pl.BlockSpec((None, T, Hq, D), lambda b, h, t, s: (b, 0, 0, 0))
    final_shape = jax.ShapeDtypeStruct((B, T, Hq, D), q.dtype)
    extra_in, aliases = [], {}
    if normalise:  # every program writes its rows of the final output
        out_specs, out_shape = final_spec, final_shape
    elif fused:  # partials of every split of the tile; one arrival counter per tile, zeroed per call
        out_specs = [
            final_spec,
            pl.BlockSpec((None, None, None, splits, keep, D), lambda b, h, t, s: (b, h, t, 0, 0, 0)),
            pl.BlockSpec((None, None, None, splits, keep), lambda b, h, t, s: (b, h, t, 0, 0)),
            pl.BlockSpec((None, None, None, splits, keep), lambda b, h, t, s: (b, h, t, 0, 0)),
            pl.BlockSpec((None, None, None, 1), lambda b, h, t, s: (b, h, t, 0)),
        ]
        out_shape = [
            final_shape,
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep, D), f32),
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep), f32),
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep), f32),
            jax.ShapeDtypeStruct((B, Hkv, nqt, 1), jnp.int32),
        ]
        extra_in = [jnp.zeros((B, Hkv, nqt, 1), jnp.int32)]
        aliases = {6: 4}  # the counter: input 6 (after the lengths, table, q, k, v) is output 4
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, None, keep, D), lambda b, h, t, s: (b, h, t, s, 0, 0)),
            pl.BlockSpec((None, None, None, None, keep), lambda b, h, t, s: (b, h, t, s, 0)),
            pl.BlockSpec((None, None, None, None, keep), lambda b, h, t, s: (b, h, t, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep, D), f32),
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep), f32),
            jax.ShapeDtypeStruct((B, Hkv, nqt, splits, keep), f32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(B, Hkv, nqt, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, t, s: (b,)),
            pl.BlockSpec((1,), lambda b, h, t, s: (b,)),
            pl.BlockSpec((None, n_pad), lambda b, h, t, s: (b, 0)),
            pl.BlockSpec((None, T, Hq, D), lambda b, h, t, s: (b, 0, 0, 0)),
            pl.BlockSpec((None, P, S, D), lambda b, h, t, s: (h, 0, 0, 0)),
            pl.BlockSpec((None, P, S, D), lambda b, h, t, s: (h, 0, 0, 0)),
        ] + [pl.BlockSpec((None, None, None, 1), lambda b, h, t, s: (b, h, t, 0))] * len(extra_in),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"paged_attention_triton_bq{R}_bk{ppb * S}{'_ev' if early_v else ''}",
    )(kv_lens.astype(jnp.int32), q_lens.astype(jnp.int32), page_table, q, k_pages, v_pages, *extra_in)
    if normalise:
        return out
    if fused:
        return out[0]
    if combine_kernel:
        part = lambda *tail: pl.BlockSpec((None, None, None, splits, *tail),  # noqa: E731
                                          lambda b, h, t: (b, h, t, 0) + (0,) * len(tail))
        return pl.pallas_call(
            functools.partial(_combine_kernel, splits=splits, rows=R, group=Hq // Hkv),
            grid=(B, Hkv, nqt),
            in_specs=[pl.BlockSpec((1,), lambda b, h, t: (b,)), part(keep, D), part(keep), part(keep)],
            out_specs=pl.BlockSpec((None, T, Hq, D), lambda b, h, t: (b, 0, 0, 0)),
            out_shape=final_shape,
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret,
            name=f"paged_attention_triton_combine_s{splits}",
        )(q_lens.astype(jnp.int32), *out)
    row_ok = jnp.arange(T)[None, :] < q_lens[:, None]  # [B, T]
    return output_rows(*out, row_ok, num_q_heads=Hq, dtype=q.dtype)
