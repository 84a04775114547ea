"""Paged attention for Hopper through Mosaic GPU (`plgpu.kernel`): split-KV flash decoding with a combine step.

One CTA per (query tile, KV split, KV head, batch row). A query tile holds all G = Hq / Hkv query heads of
its KV head for the row's new tokens (row n is token n // G, head n % G), so every KV page is read once for
the whole group. KV blocks of `block_kv` tokens (one or more pages, one TMA copy per page: Hopper has no TMA
gather) stream GMEM -> SMEM through `num_stages` buffers, loads in flight while a block is computed. Two
layouts of the two matmuls, both with float32 online softmax:

- decode (few query rows, G * T <= 32 by default): the KV block on the wgmma M side (>= 64 rows), the query
  rows on the N side (any multiple of 8), one warpgroup per CTA:
      S^T[kv, n] = K[kv, :] @ Q^T[:, n]          O^T[d, n] += V^T[d, kv] @ P^T[kv, n]   (P^T through SMEM)
- verify / chunked prefill (more rows): queries on the M side, 64 rows per warpgroup and up to 4 warpgroups
  per CTA sharing one KV stream that one more warpgroup fetches (FlashAttention-3 style; two compute
  warpgroups take turns on the tensor cores, P stays in registers):
      S[n, kv] = Q[n, :] @ K^T[:, kv]            O[n, d] += P[n, kv] @ V[kv, d]
KV blocks that every query row of the sequence sees whole (the cached prefix) skip the mask.

Each split writes its unnormalised output with its running max and sum; `common.combine_splits` merges the
splits in XLA (a verify call with one split normalises in the kernel and writes q's dtype: no combine step).
Masks come from per-row query positions computed in the wrapper (-1 marks a padding row), so causality,
ragged `q_lens`, empty slots and the sliding window are one comparison each. Pages past a sequence are
replaced by the scratch page 0, and V rows past `kv_lens` are zeroed in SMEM before the PV matmul, so NaN
garbage in unused pages or slots never reaches the output (0 * NaN would).

Supported: bf16/f16, head_dim 64/128/256, any GQA ratio, page sizes that are multiples of 8 and divide or are
divided by block_kv (16..128 with the default 64), any T, sliding window, soft cap. Anything else raises
NotImplementedError so that the dispatcher can fall back.
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.common import output_rows, query_tiles

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": a fully masked row keeps exp2(NEG - NEG) finite
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
H100_SMS = 132
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100/H200
SMEM_PER_SM = 228 * 1024  # per SM, shared by its resident blocks (1 KiB of each reserved by the driver)
REDUCTION_SCRATCH = 128 * 4 * 4  # plgpu.CompilerParams' default scratch for cross-warp reductions
MAX_PAGE_SLICE = 4096  # page ids per CTA held in SMEM (16 KiB)
WG_ROWS = 64  # query rows per warpgroup in the verify layout (the wgmma M instruction size)


@dataclasses.dataclass(frozen=True)
class MosaicAttentionConfig:
    """Tuning of the Mosaic GPU paged attention kernel; None fields are picked per shape by `plan`.

    block_kv: KV tokens per pipeline step, a multiple of 64. Pages smaller than a block are copied
      block_kv / page_size per step; a page larger than a block is copied in block_kv slices.
    q_warpgroups: 0 picks the decode layout (KV on the wgmma M side); k in 1..4 the verify layout with k
      warpgroups of 64 query rows each per CTA. None: decode layout for G * T <= 32 rows, else
      min(2, ceil(G * T / 64)) warpgroups.
    block_q: query rows per CTA in the decode layout (the wgmma N side), a multiple of 8 up to 256.
    num_splits: KV splits per (row, KV head, query tile) (flash decoding), combined afterwards.
    num_stages: SMEM buffers per K and V, i.e. KV blocks in flight while one is computed, at least 2.
    release_k: verify layout only: a KV slot's K buffer is handed back to the fetching warpgroup as soon as the
      QK matmul has read it (its V buffer after the PV matmul), so the next K copy starts a softmax earlier.
    fence_softmax: verify layout only: an optimization barrier ends the softmax before the warpgroups' turn
      taking, so the compiler cannot sink softmax work past the point where the other warpgroup's matmuls
      start (JAX's FlashAttention-3 kernel does both; which pays off depends on the shape: the tuner decides).
    Rows beyond one CTA's tile go to more CTAs, which re-read the same KV (mostly from L2).
    """

    block_kv: int = 64
    q_warpgroups: int | None = None
    block_q: int | None = None
    num_splits: int | None = None
    num_stages: int | None = None
    release_k: bool = False
    fence_softmax: bool = False

    def __post_init__(self):
        if self.block_kv <= 0 or self.block_kv % 64:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
        if self.q_warpgroups is not None and not 0 <= self.q_warpgroups <= 4:
            raise ValueError(f"q_warpgroups={self.q_warpgroups} must be in [0, 4]")
        if self.block_q is not None and not (0 < self.block_q <= 256 and self.block_q % 8 == 0):
            raise ValueError(f"block_q={self.block_q} must be a multiple of 8 in [8, 256]")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1")
        if self.num_stages is not None and not 2 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages} must be in [2, 8]")


class Plan(NamedTuple):
    """What one call runs: the config with every choice made, plus the derived sizes."""

    block_kv: int
    q_warpgroups: int  # 0: decode layout, one warpgroup
    rows: int  # query rows per CTA
    num_q_tiles: int
    num_splits: int
    num_stages: int
    page_slice: int  # page-table columns each CTA copies to SMEM
    smem_bytes: int


def check_supported(q_shape, k_shape, dtype, config: MosaicAttentionConfig) -> None:
    """Raises NotImplementedError for what this kernel does not handle (the dispatcher then falls back)."""
    _, _, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        raise NotImplementedError(f"mosaic paged attention supports bf16/f16, got {jnp.dtype(dtype).name}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"mosaic paged attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {D}")
    if Hq % Hkv:
        raise NotImplementedError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if S % 8 or not (config.block_kv % S == 0 or S % config.block_kv == 0):
        raise NotImplementedError(
            f"page size {S} must be a multiple of 8 that divides or is divided by block_kv={config.block_kv}")


def _smem_bytes(rows, block_kv, D, stages, page_slice, itemsize, p_tile: bool = True) -> int:
    tiles = rows * D + 2 * stages * block_kv * D + (rows * block_kv if p_tile else 0)
    return tiles * itemsize + 4 * 1024 + 4 * (rows + page_slice) + 8 * (8 + 3 * stages) + REDUCTION_SCRATCH


def _page_slice_len(max_blocks: int, splits: int, block_kv: int, page: int) -> int:
    # page-table columns one split can touch, plus up to 3 for aligning its start down to 16 bytes
    per_split = -(-max_blocks // splits)
    return -(-(-(-per_split * block_kv // page) + 4) // 4) * 4


def plan(q_shape, k_shape, num_pages: int, itemsize: int, config: MosaicAttentionConfig, *,
         native: bool = True) -> Plan:
    """Fills in the config's open choices for one shape; raises NotImplementedError if it cannot fit. `native`:
    compiled for the GPU, where the verify layout keeps P in registers (the interpreter needs an SMEM tile)."""
    B, T, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    n_rows = Hq // Hkv * T
    BKV = config.block_kv
    nwg = config.q_warpgroups
    if nwg is None:
        nwg = 0 if n_rows <= 32 else min(2, -(-n_rows // WG_ROWS))
    if nwg:
        rows = WG_ROWS * nwg
    else:  # smallest multiple of 8 holding the group's rows, capped where the [D, rows] float32
        # accumulator and the [BKV, rows] logits still fit in registers beside each other
        rows = config.block_q or min(-(-n_rows // 8) * 8, 128 if D <= 64 else 64)
    nqt = -(-n_rows // rows)
    max_blocks = max(1, -(-(num_pages * S) // BKV))

    def smem(stages, pts):
        return _smem_bytes(rows, BKV, D, stages, pts, itemsize, p_tile=not (native and nwg))

    # float32 registers per thread: accumulator + logits (+ deferred sums) + ~48 of everything else; the
    # verify layout adds a warpgroup that fetches KV (40 registers), and two compute warpgroups that take
    # turns claim the whole register file
    threads = 128 * max(nwg, 1)
    regs = (D * rows + BKV * rows * (2 if rows <= 32 else 1)) // threads + 48
    reg_file = 65536 if nwg == 2 else threads * regs + (128 * 40 if nwg else 0)

    def ctas_per_sm(stages, pts):
        by_smem = SMEM_PER_SM // (smem(stages, pts) + 1024)
        return max(1, min(by_smem, 65536 // reg_file, 2048 // (threads + (128 if nwg else 0))))

    if config.num_stages is not None:
        stages = config.num_stages
    else:  # 64 KiB of KV or more in flight per CTA, keeping two CTAs per SM where they fit
        stages = 4 if 2 * BKV * D * itemsize <= 16 * 1024 else 3
        while stages > 2 and (smem(stages, 8) > SMEM_LIMIT or
                              ctas_per_sm(stages, 8) < min(2, ctas_per_sm(2, 8))):
            stages -= 1
    # One wave: as many splits as leave every CTA a slot on the GPU at once; a wave lasts as long as its
    # longest CTA, so a second, partial wave would cost as much as a full one.
    splits = config.num_splits or max(1, H100_SMS * ctas_per_sm(stages, 8) // (B * Hkv * nqt))
    splits = min(splits, max_blocks)
    pts = _page_slice_len(max_blocks, splits, BKV, S)
    if pts > MAX_PAGE_SLICE:
        if config.num_splits is not None:
            raise NotImplementedError(f"num_splits={config.num_splits} leaves {pts} page ids per CTA "
                                      f"(max {MAX_PAGE_SLICE}): use more splits")
        while pts > MAX_PAGE_SLICE:
            splits *= 2
            pts = _page_slice_len(max_blocks, splits, BKV, S)
    if smem(stages, pts) > SMEM_LIMIT:
        raise NotImplementedError(f"{config} needs ~{smem(stages, pts)} bytes of shared memory at head_dim {D} "
                                  f"(limit {SMEM_LIMIT}): lower block_kv, block_q, q_warpgroups or num_stages")
    return Plan(BKV, nwg, rows, nqt, splits, stages, pts, smem(stages, pts))


class _KVStream(NamedTuple):
    hi: jax.Array  # one past the last KV token of the row
    first: jax.Array  # this split's first KV block
    nsteps: jax.Array  # this split's number of KV blocks (0 if it has none)
    load_page_table: object  # () -> None: copies the split's page ids to SMEM and waits (issuing thread only)
    issue: object  # (step, slot, k=True, v=True) -> None: TMA copies of KV block `first + step` into `slot`


def _kv_stream(meta_ref, pt_ref, k_ref, v_ref, k_smem, v_smem, pt_smem, pt_bar, k_bars, v_bars, *, b, h, split,
               splits, num_pages) -> _KVStream:
    """This CTA's share of the row's KV blocks, and how to fetch them."""
    _, BKV, _ = k_smem.shape
    _, P, S, _ = k_ref.shape
    (PTS,) = pt_smem.shape
    Npad = pt_ref.shape[1]
    tok_per_copy = min(S, BKV)

    lo = meta_ref[b, 0]
    hi = meta_ref[b, 1]
    blk_lo = lax.div(lo, BKV)
    blk_hi = lax.div(hi + (BKV - 1), BKV)
    per_split = lax.div(blk_hi - blk_lo + (splits - 1), splits)
    first = blk_lo + split * per_split
    nsteps = jnp.maximum(jnp.minimum(per_split, blk_hi - first), 0)
    # Page ids come from SMEM, one bulk copy per CTA (16-byte aligned start) instead of a GMEM round trip per
    # page. The wrapper's padding keeps the slice in bounds; promising so makes it a plain bulk copy, without
    # the 256-element limit of a TMA box.
    col_base = jnp.minimum(lax.div(lax.div(first * BKV, S), 4) * 4, Npad - PTS)

    def load_page_table():
        plgpu.copy_gmem_to_smem(pt_ref.at[b, pl.ds(col_base, PTS)], pt_smem, pt_bar,
                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
        plgpu.barrier_wait(pt_bar)

    def issue(step, slot, k: bool = True, v: bool = True):
        blk = first + step
        for c in range(BKV // tok_per_copy):
            tok = blk * BKV + c * tok_per_copy
            pid = pt_smem[jnp.minimum(lax.div(tok, S), num_pages - 1) - col_base]
            # pages past the sequence may hold any id: read the scratch page 0 instead
            pid = jnp.where(tok < hi, jnp.minimum(jnp.maximum(pid, 0), P - 1), 0)
            src = (h, pid, pl.ds(lax.rem(tok, S), tok_per_copy)) if S > BKV else (h, pid)
            dst = pl.ds(c * tok_per_copy, tok_per_copy)
            if k:
                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot, dst], k_bars.at[slot])
            if v:
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot, dst], v_bars.at[slot])

    return _KVStream(hi, first, nsteps, load_page_table, issue)


def _softmax_step(s, m, qpos, kv_start, *, kv_axis, scale, sliding_window, soft_cap):
    """Logits of the KV block starting at token `kv_start` -> (p, new running max, rescale of the old state); log2
    domain, float32. `qpos`: the query rows' positions broadcast to s's shape, for the mask; None for a block
    every query row sees whole (no comparisons, no selects). Without a soft cap the scale is applied inside the
    exponent, s * c - m as one FMA per logit, and to the block's max (a multiply per row), not to every logit
    first (measured on the H200, verify at B=8, L=8k, T=64: 1-8% faster over six configs and page sizes)."""
    if soft_cap is None:
        c = scale * LOG2E
    else:
        s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * LOG2E)
        c = 1.0
    valid = None
    if qpos is not None:
        kpos = kv_start + plgpu.broadcasted_iota(jnp.int32, s.shape, kv_axis, layout=plgpu.Layout.WGMMA)
        valid = kpos <= qpos
        if sliding_window is not None:
            valid = valid & (kpos > qpos - sliding_window)
        s = jnp.where(valid, s, NEG)  # also drops logits of NaN keys past the sequence
    m_new = jnp.maximum(m, s.max(axis=kv_axis) * c)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [1 - kv_axis]))
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    return p, m_new, alpha


def _full_steps(kv, meta_ref, b, block_kv, sliding_window):
    """How many of this split's KV blocks every query row of the sequence sees whole: those end at or before the
    first new token and before the sequence's end. They skip the mask; the rest (the new tokens' own block, the
    tail, a sliding window's edge) take it."""
    if sliding_window is not None:
        return jnp.int32(0)
    ends = lax.div(jnp.minimum(meta_ref[b, 2] + 1, kv.hi), block_kv)  # blocks wholly at or below both bounds
    return jnp.clip(ends - kv.first, 0, kv.nsteps)


def _zero_v_tail(v_tile, blk, hi):
    # V rows past the sequence may be NaN, and p = 0 does not cancel NaN inside the matmul
    BKV, D = v_tile.shape
    rows = blk * BKV + plgpu.broadcasted_iota(jnp.int32, (BKV, D), 0, layout=plgpu.Layout.WGMMA)
    v_tile[...] = jnp.where(rows < hi, v_tile[...], jnp.zeros((BKV, D), v_tile.dtype))


def _decode_kernel(
    meta_ref,  # [B, 3] int32: first and one-past-last KV token any query of the row may see, first new token
    pt_ref,  # [B, Npad] int32 page table, zero padded so that every CTA's slice is in bounds
    qpos_ref,  # [B, nqt, R] int32 position of each query row, -1 for padding rows
    q_ref,  # [B, Hkv, nqt, R, D]
    k_ref,  # [Hkv, P, S, D]
    v_ref,  # [Hkv, P, S, D]
    o_ref,  # [B, Hkv, nqt, splits, D, R] float32, unnormalised O^T
    m_ref,  # [B, Hkv, nqt, splits, R] float32 running max (log2 domain)
    l_ref,  # [B, Hkv, nqt, splits, R] float32 running sum
    q_smem,  # [R, D]
    k_smem,  # [stages, BKV, D]
    v_smem,  # [stages, BKV, D]
    p_smem,  # [R, BKV] probabilities, read transposed by the PV wgmma
    qpos_smem,  # [R] int32
    pt_smem,  # [PTS] int32: the page-table columns this CTA reads
    q_bar,
    pt_bar,
    k_bars,
    v_bars,
    *,
    splits: int,
    stages: int,
    num_pages: int,
    sliding_window: int | None,
    **softmax_kw,
):
    qt, sh, b = lax.axis_index("q"), lax.axis_index("sh"), lax.axis_index("b")
    split, h = lax.rem(sh, splits), lax.div(sh, splits)
    R, D = q_smem.shape
    _, BKV, _ = k_smem.shape
    defer_sum = R <= 32

    kv = _kv_stream(meta_ref, pt_ref, k_ref, v_ref, k_smem, v_smem, pt_smem, pt_bar, k_bars, v_bars, b=b, h=h,
                    split=split, splits=splits, num_pages=num_pages)
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, qt], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(qpos_ref.at[b, qt], qpos_smem, q_bar)
    kv.load_page_table()
    for i in range(stages):
        pl.when(i < kv.nsteps)(functools.partial(kv.issue, i, i))

    plgpu.barrier_wait(q_bar)
    qpos = lax.broadcast_in_dim(plgpu.load(qpos_smem, layout=plgpu.Layout.WGMMA.reduce(0)), (BKV, R), [1])

    def body(step, carry, *, masked):
        acc, m, l_part = carry
        slot = lax.rem(step, stages)
        blk = kv.first + step
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.T)
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((BKV, R), jnp.float32))  # [BKV, R]
        p, m_new, alpha = _softmax_step(s, m, qpos if masked else None, blk * BKV, kv_axis=0,
                                        sliding_window=sliding_window, **softmax_kw)
        if defer_sum:  # per-thread partial sums: one cross-warp reduction after the loop, not one per step
            l_part = l_part * lax.broadcast_in_dim(alpha, (BKV, R), [1]) + p
        else:  # saves registers for wide query tiles
            l_part = l_part * alpha + p.sum(axis=0)

        plgpu.barrier_wait(v_bars.at[slot])
        if masked:
            pl.when((blk + 1) * BKV > kv.hi)(lambda: _zero_v_tail(v_smem.at[slot], blk, kv.hi))
        p_smem.T[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, v_smem.at[slot].T, p_smem.T)
            return acc_ref[...]

        # a fresh accumulator (the interpreter has no pl.run_state); the rescale fuses into one FMA
        acc = acc * lax.broadcast_in_dim(alpha, (D, R), [1]) + pl.run_scoped(pv, plgpu.ACC((D, R), jnp.float32))
        # the PV wgmma has completed (its result was read), so the slot can be refilled
        pl.when(step + stages < kv.nsteps)(lambda: kv.issue(step + stages, slot))
        return acc, m_new, l_part

    acc = plgpu.layout_cast(jnp.zeros((D, R), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((R,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(0))
    if defer_sum:
        l_part = plgpu.layout_cast(jnp.zeros((BKV, R), jnp.float32), plgpu.Layout.WGMMA)
    else:
        l_part = plgpu.layout_cast(jnp.zeros((R,), jnp.float32), plgpu.Layout.WGMMA.reduce(0))
    full = _full_steps(kv, meta_ref, b, BKV, sliding_window)
    carry = lax.fori_loop(0, full, functools.partial(body, masked=False), (acc, m, l_part))
    acc, m, l_part = lax.fori_loop(full, kv.nsteps, functools.partial(body, masked=True), carry)

    # straight from registers: partial outputs are tiny next to the KV stream, and SMEM is better spent on it
    o_ref.at[b, h, qt, split][...] = acc
    m_ref.at[b, h, qt, split][...] = m
    l_ref.at[b, h, qt, split][...] = l_part.sum(axis=0) if defer_sum else l_part


def _verify_kernel(
    meta_ref,  # [B, 3] int32
    pt_ref,  # [B, Npad] int32
    qpos_ref,  # [B, nqt, R] int32, R = 64 * warpgroups
    q_ref,  # [B, Hkv, nqt, R, D]
    k_ref,  # [Hkv, P, S, D]
    v_ref,  # [Hkv, P, S, D]
    o_ref,  # [B, Hkv, nqt, splits, R, D] float32, unnormalised; one split: [B, Hkv, nqt, 1, R, D] in q's dtype,
    # normalised (no combine step)
    m_ref,  # [B, Hkv, nqt, splits, R] float32
    l_ref,  # [B, Hkv, nqt, splits, R] float32
    q_smem,  # [warpgroups, 64, D]
    k_smem,  # [stages, BKV, D], shared by the warpgroups
    v_smem,  # [stages, BKV, D]
    qpos_smem,  # [warpgroups, 64] int32
    pt_smem,  # [PTS] int32
    q_bars,  # one per warpgroup
    pt_bar,
    k_bars,
    v_bars,
    consumed_bars,  # per slot: every compute warpgroup is done with it (with release_k: with its K)
    v_consumed_bars,  # release_k: per slot, every compute warpgroup is done with its V
    tail_bar,  # warpgroup 0 has zeroed the V tail
    sched_bar,  # two compute warpgroups take turns on the tensor cores
    *p_smem,  # interpreter only: [warpgroups, 64, BKV] probabilities
    splits: int,
    stages: int,
    num_pages: int,
    sliding_window: int | None,
    native: bool,
    release_k: bool,
    fence_softmax: bool,
    **softmax_kw,
):
    """`warpgroups` compute warpgroups of 64 query rows each, and one more that only fetches KV. Natively P goes
    to the PV wgmma from registers and the accumulator is updated in place, and two compute warpgroups take
    turns (one's softmax runs while the other's matmuls hold the tensor cores, FlashAttention-3's ping-pong);
    the interpreter, which takes neither register operands nor pl.run_state, passes P through SMEM."""
    qt, sh, b = lax.axis_index("q"), lax.axis_index("sh"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    split, h = lax.rem(sh, splits), lax.div(sh, splits)
    nwg, W, D = q_smem.shape
    _, BKV, _ = k_smem.shape
    pingpong = native and nwg == 2

    kv = _kv_stream(meta_ref, pt_ref, k_ref, v_ref, k_smem, v_smem, pt_smem, pt_bar, k_bars, v_bars, b=b, h=h,
                    split=split, splits=splits, num_pages=num_pages)

    @pl.when(wg == nwg)
    def _fetch():
        if pingpong:
            plgpu.set_max_registers(40, action="decrease")
        kv.load_page_table()
        for i in range(stages):
            pl.when(i < kv.nsteps)(functools.partial(kv.issue, i, i))

        @pl.loop(0, jnp.maximum(kv.nsteps - stages, 0))
        def _refill(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(consumed_bars.at[slot])
            if release_k:
                kv.issue(step + stages, slot, v=False)
                plgpu.barrier_wait(v_consumed_bars.at[slot])
                kv.issue(step + stages, slot, k=False)
            else:
                kv.issue(step + stages, slot)

        # observe the last uses of every slot too: a barrier phase must not pass unobserved
        @pl.loop(jnp.maximum(kv.nsteps - stages, 0), kv.nsteps)
        def _drain(step):
            plgpu.barrier_wait(consumed_bars.at[lax.rem(step, stages)])
            if release_k:
                plgpu.barrier_wait(v_consumed_bars.at[lax.rem(step, stages)])

    def take_turn():
        if pingpong:
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

    @pl.when(wg < nwg)
    def _compute():
        if pingpong:
            plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(wg * W, W)
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, qt, rows], q_smem.at[wg], q_bars.at[wg])
        plgpu.copy_gmem_to_smem(qpos_ref.at[b, qt, rows], qpos_smem.at[wg], q_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])
        qpos = lax.broadcast_in_dim(plgpu.load(qpos_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)), (W, BKV),
                                    [0])

        def body(step, carry, *, masked):
            acc, m, l = carry
            slot = lax.rem(step, stages)
            blk = kv.first + step

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].T)
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((W, BKV), jnp.float32))  # [W, BKV]
            if release_k:
                plgpu.barrier_arrive(consumed_bars.at[slot])
            p, m_new, alpha = _softmax_step(s, m, qpos if masked else None, blk * BKV, kv_axis=1,
                                            sliding_window=sliding_window, **softmax_kw)
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, (W, D), [0])
            p16 = p.astype(k_smem.dtype)
            if fence_softmax and native:  # it orders the GPU's schedule, which the interpreter does not have
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            if pingpong:
                plgpu.barrier_arrive(sched_bar)  # softmax done
            plgpu.barrier_wait(v_bars.at[slot])
            if masked:
                tail = (blk + 1) * BKV > kv.hi

                @pl.when(tail & (wg == 0))
                def _zero():
                    _zero_v_tail(v_smem.at[slot], blk, kv.hi)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(tail_bar)  # happens at most once per CTA: the row's last block

                pl.when(tail & (wg != 0))(lambda: plgpu.barrier_wait(tail_bar))
            if pingpong:
                plgpu.barrier_wait(sched_bar)  # the other warpgroup's matmuls are issued

            def wait_next_k():  # while the PV wgmma runs
                nxt = step + 1
                pl.when(nxt < kv.nsteps)(lambda: plgpu.barrier_wait(k_bars.at[lax.rem(nxt, stages)]))

            if native:
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:
                (p_tile,) = p_smem
                p_tile.at[wg][...] = p16
                plgpu.commit_smem()

                def pv_smem(acc_ref):
                    plgpu.wgmma(acc_ref, p_tile.at[wg], v_smem.at[slot])
                    wait_next_k()
                    return acc_ref[...]

                acc = acc + pl.run_scoped(pv_smem, plgpu.ACC((W, D), jnp.float32))
            plgpu.barrier_arrive((v_consumed_bars if release_k else consumed_bars).at[slot])
            return acc, m_new, l

        acc = plgpu.layout_cast(jnp.zeros((W, D), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((W,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((W,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        pl.when(kv.nsteps > 0)(lambda: plgpu.barrier_wait(k_bars.at[0]))
        if pingpong:
            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first
        full = _full_steps(kv, meta_ref, b, BKV, sliding_window)
        carry = lax.fori_loop(0, full, functools.partial(body, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(full, kv.nsteps, functools.partial(body, masked=True), carry)
        if pingpong:
            pl.when(wg == 0)(take_turn)
        if splits == 1:
            acc = acc / lax.broadcast_in_dim(jnp.where(l == 0, 1.0, l), (W, D), [0])
        o_ref.at[b, h, qt, split, rows][...] = acc.astype(o_ref.dtype)
        m_ref.at[b, h, qt, split, rows][...] = m
        l_ref.at[b, h, qt, split, rows][...] = l


def paged_attention_mosaic(
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
    config: MosaicAttentionConfig | dict | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Paged attention on Hopper; same contract as `paged_attention_reference`.

    Args:
      q: [B, T, Hq, D] bf16/f16 queries, q_lens[b] valid rows at positions kv_lens[b] - q_lens[b] + t.
      k_pages, v_pages: [Hkv, P, S, D] page pool; page ids past a sequence may hold anything.
      page_table: [B, N] int32; kv_lens, q_lens: [B] int32.
      config: tuning (a MosaicAttentionConfig, or its fields as a dict from the tuned table).
      interpret: False (native), True or `plgpu.InterpretGPUParams` (CPU interpreter).
    Returns:
      [B, T, Hq, D] in q's dtype, rows t >= q_lens[b] exactly 0.
    Raises:
      NotImplementedError for unsupported dtypes, head dims, page sizes or configs that do not fit.
    """
    config = MosaicAttentionConfig(**config) if isinstance(config, dict) else config or MosaicAttentionConfig()
    check_supported(q.shape, k_pages.shape, q.dtype, config)
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise NotImplementedError(f"q, k, v dtypes differ: {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return _paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_lens, scale=float(scale),
                            sliding_window=sliding_window, soft_cap=soft_cap, config=config,
                            interpret=interpret or None)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "config", "interpret"))
def _paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window, soft_cap,
                     config, interpret):
    B, T, Hq, D = q.shape
    Hkv, P, S, _ = k_pages.shape
    N = page_table.shape[1]
    BKV, nwg, R, nqt, splits, stages, pts, _ = plan(q.shape, k_pages.shape, N, q.dtype.itemsize, config,
                                                    native=interpret is None)
    qt, qpos, row_ok, lo, hi = query_tiles(q, kv_lens, q_lens, num_kv_heads=Hkv, rows=R, num_tiles=nqt,
                                           kv_cap=N * S, sliding_window=sliding_window)
    meta = jnp.stack([lo, hi, (kv_lens - q_lens).astype(jnp.int32)], axis=1).astype(jnp.int32)
    n_pad = -(-N // 4) * 4 + pts
    page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, n_pad - N)))

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    copies = BKV // min(S, BKV)
    kv_scratch = (plgpu.SMEM((stages, BKV, D), q.dtype, transforms=tiled),
                  plgpu.SMEM((stages, BKV, D), q.dtype, transforms=tiled))
    kv_bars = (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
               plgpu.Barrier(num_arrivals=copies, num_barriers=stages))
    f32 = jnp.float32
    ml_type = jax.ShapeDtypeStruct((B, Hkv, nqt, splits, R), f32)
    kw = dict(splits=splits, stages=stages, num_pages=N, scale=scale, sliding_window=sliding_window,
              soft_cap=soft_cap)
    if nwg == 0:
        kernel = plgpu.kernel(
            functools.partial(_decode_kernel, **kw),
            out_type=(jax.ShapeDtypeStruct((B, Hkv, nqt, splits, D, R), f32), ml_type, ml_type),
            scratch_types=(plgpu.SMEM((R, D), q.dtype, transforms=tiled), *kv_scratch,
                           plgpu.SMEM((R, BKV), q.dtype, transforms=tiled), plgpu.SMEM((R,), jnp.int32),
                           plgpu.SMEM((pts,), jnp.int32), plgpu.Barrier(num_arrivals=2), plgpu.Barrier(), *kv_bars),
            grid=(nqt, Hkv * splits, B), grid_names=("q", "sh", "b"),
            compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)
    else:
        kernel = plgpu.kernel(
            functools.partial(_verify_kernel, native=interpret is None, release_k=config.release_k,
                              fence_softmax=config.fence_softmax, **kw),
            out_type=(jax.ShapeDtypeStruct((B, Hkv, nqt, splits, R, D), f32 if splits > 1 else q.dtype), ml_type,
                      ml_type),
            scratch_types=(plgpu.SMEM((nwg, WG_ROWS, D), q.dtype, transforms=tiled), *kv_scratch,
                           plgpu.SMEM((nwg, WG_ROWS), jnp.int32), plgpu.SMEM((pts,), jnp.int32),
                           plgpu.Barrier(num_arrivals=2, num_barriers=nwg), plgpu.Barrier(), *kv_bars,
                           plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
                           plgpu.Barrier(num_arrivals=nwg, num_barriers=stages), plgpu.Barrier(),
                           plgpu.Barrier(num_arrivals=2),
                           *([] if interpret is None else [plgpu.SMEM((nwg, WG_ROWS, BKV), q.dtype,
                                                                      transforms=tiled)])),
            grid=(nqt, Hkv * splits, B), grid_names=("q", "sh", "b"), num_threads=nwg + 1, thread_name="wg",
            compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)
    o, m, l = kernel(meta, page_table, qpos, qt, k_pages, v_pages)
    if nwg == 0:
        o = o.swapaxes(-1, -2)  # O^T -> O
    # one verify split: normalised in the kernel
    return output_rows(o, m, l, row_ok, num_q_heads=Hq, dtype=q.dtype, normalised=nwg > 0 and splits == 1)
