"""The one-token split path of the Triton MoE op (TritonMoEConfig fused_route="split"): two kernels of many short
programs, or both in one launch.

    gate/up: program (k, j, s) sums choice k's gate and up columns [j * block_f, ...) over the s-th of k_splits D
             ranges (partials in float32; with merge the last of a tile's programs makes its h columns); with
             TritonMoEConfig.persistent a few programs an SM each run a strided share of those (k, j, s) units
    down:    program (k, i, r) multiplies h_k's r-th F range by the expert's down rows for the i-th D tile (partials
             again; with merge the last of a D tile's programs writes out's columns)

At T=1 every touched expert is one token's, so work is organised around the weights' tiles: enough programs to
cover the SMs however few experts there are, each streaming one tile. The token is routed in every program
(TritonMoEConfig.topk "rounds"/"rank") or once before the kernels ("kernel"/"xla": a [2, K] table the kernels read
in the logits' place). The building blocks (GEMV and dot passes, routing, int8 conversion) and the config are
`triton_moe.py`'s; `triton_moe.moe_triton` is the entry point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.moe.reference import QuantizedWeight, route, router_logits
from pallas_kernels.moe.triton_moe import (
    ROUTE_TABLE_WARPS,
    ROUTED_TOPKS,
    _acc_rows,
    _dot_row_pass,
    _gemv_fma,
    _gemv_load,
    _gemv_pass,
    _k_loop,
    _kth_choice,
    _next_pow2,
    _pieces,
    _quantize_rows,
    _route_kernel,
    _scaled,
    _silu,
    _to_f32,
    k_major_values,
    pallas_call,
)
from pallas_kernels.triton_sync import arrive, last_arrival, wait_for


def _split_gate_up_kernel(
    logits_ref,  # [1, E] float32 router logits of the one token
    x_ref,  # [1, D]
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    *rest,  # (sg_ref [E, F], su_ref [E, F] float32 when quantised), gu_ref out [k_splits * K * 2, F] float32;
    #         with merge: the counters (input, aliased) before gu_ref, then h_ref out [K, F] and the counters out
    top_k: int,
    norm_topk_prob: bool,
    block_f: int,
    block_k: int,
    quantized: bool,
    dequant: str = "bits",
    topk: str = "rounds",
    dot: bool = False,  # 16-row dots (`_dot_row_pass`) instead of GEMV
    w8a8: bool = False,  # (dot) x rounded to int8 here, int8 x int8 dots
    merge: bool = False,  # the last of an (expert, F tile)'s programs writes its h columns (TritonMoEConfig.merge)
    prefetch: int = 0,  # (GEMV) TritonMoEConfig.prefetch
    fold: bool = False,  # (GEMV) TritonMoEConfig.fold
    interpret: bool = False,
    ids=None,  # (k, j, s) where the caller assigns the work (one_launch), else the program ids
    h_written=None,  # (merge) called with k once this program has written h columns of choice k
):
    """fused_route="split", gate/up (see TritonMoEConfig): program (k, j, s) writes its expert's partial gate and up
    sums over D rows [s * D / k_splits, ...) for F columns [f0, f0 + block_f), rows 2 (s K + k) and +1 of gu."""
    if merge:
        *scales, _, gu_ref, h_ref, count_ref = rest
    else:
        *scales, gu_ref = rest
    k, j, s = ids if ids is not None else (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    h_written = h_written or (lambda k: None)
    S = gu_ref.shape[0] // (2 * top_k)  # k_splits
    f0 = pl.multiple_of(j * block_f, block_f)
    k_len = x_ref.shape[1] // S
    e, _ = _kth_choice(logits_ref, k, top_k, norm_topk_prob, topk)
    if dot:
        g, u = _dot_row_pass(x_ref, 0, (wg_ref, wu_ref), e, f0, block_c=block_f, block_k=block_k, k_lo=s * k_len,
                             k_len=k_len, quantize=w8a8)
    else:
        ((g, u),) = _gemv_pass(x_ref, (wg_ref, wu_ref), e, 0, 1, f0, rows=1, block_c=block_f, block_k=block_k,
                               one_token=True, k_lo=s * k_len, k_len=k_len, dequant=dequant, prefetch=prefetch,
                               fold=fold)
    if quantized:
        g, u = _scaled((g, u), scales, e, f0, block_f)
    if merge and S == 1:  # nothing to merge: h at once
        h_ref[k, pl.ds(f0, block_f)] = (_silu(g) * u).astype(h_ref.dtype)
        h_written(k)
        return
    _write_partials(gu_ref, k, s, f0, g, u, top_k=top_k, block_f=block_f)
    if not merge:
        return

    def merge_tile():  # every split's partials of this tile, then h as XLA would round it
        h_ref[k, pl.ds(f0, block_f)] = _h_from_partials(*_h_partials(gu_ref, k, top_k, f0, block_f), h_ref.dtype)
        h_written(k)

    last_arrival(count_ref, k * (h_ref.shape[1] // block_f) + j, S, merge_tile, interpret)


def _split_gate_up_persistent_kernel(
    table_ref,  # [2, K] float32 routing table (TritonMoEConfig.topk "kernel" or "xla")
    x_ref,  # [1, D]
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    *rest,  # (sg_ref [E, F], su_ref [E, F] float32 when quantised), gu_ref out [k_splits * K * 2, F] float32
    top_k: int,
    programs: int,
    block_f: int,
    block_k: int,
    quantized: bool,
    dequant: str,
    topk: str,
    prefetch: int,
    fold: bool,
):
    """TritonMoEConfig.persistent: program p of `programs` runs work units u = p, p + programs, ... of the
    `_split_gate_up_kernel` grid (u = (k * F / block_f + j) * k_splits + s for its program (k, j, s)) in one loop
    over their k-steps, loading `prefetch` steps ahead across the units' edges, and writes each unit's partial
    gate and up sums to rows 2 (s K + k) and +1 of gu, as that unit's own program would."""
    *scales, gu_ref = rest
    S = gu_ref.shape[0] // (2 * top_k)  # k_splits
    n_f = gu_ref.shape[1] // block_f
    k_len = x_ref.shape[1] // S
    steps = k_len // block_k  # a unit's k-steps
    p = pl.program_id(0)
    n_units = lax.div(top_k * n_f * S - 1 - p, programs) + 1  # programs <= units: every program has one
    last = n_units * steps - 1  # the program's last k-step
    height = _acc_rows(block_k, 2 * block_f, fold)
    acc2d = height > 0
    height = height or block_k

    def unit(i):  # the program's i-th unit: (choice k, its expert e, F offset, D range s)
        u = p + i * programs
        k, j, s = lax.div(u, n_f * S), lax.rem(lax.div(u, S), n_f), lax.rem(u, S)
        e, _ = _kth_choice(table_ref, k, top_k, True, topk)  # a table read (routed: norm_topk_prob unused)
        return k, e, pl.multiple_of(j * block_f, block_f), s

    def load(g):  # the program's g-th k-step's tiles and x slices
        _, e, f0, s = unit(lax.div(g, steps))
        k0 = pl.multiple_of(s * k_len + lax.rem(g, steps) * block_k, block_k)
        return _gemv_load(x_ref, (wg_ref, wu_ref), e, k0, f0, block_k=block_k, height=height, block_c=block_f,
                          with_x=True)

    def step(loaded, acc):
        return _gemv_fma([[_to_f32(w, dequant) for w in tiles] for tiles in loaded[0]], loaded[1], acc, acc2d)

    def run_unit(i, ahead):
        def k_step(t, carry):
            ahead, acc = carry
            if not prefetch:
                return ahead, step(load(i * steps + t), acc)
            return (*ahead[1:], load(jnp.minimum(i * steps + t + prefetch, last))), step(ahead[0], acc)

        zero = jnp.zeros((height, block_f) if acc2d else (block_f,), jnp.float32)
        ahead, (g, u) = lax.fori_loop(0, steps, k_step, (ahead, (zero, zero)))
        if acc2d:
            g, u = jnp.sum(g, axis=0), jnp.sum(u, axis=0)
        k, e, f0, s = unit(i)
        if quantized:
            g, u = _scaled((g, u), scales, e, f0, block_f)
        _write_partials(gu_ref, k, s, f0, g, u, top_k=top_k, block_f=block_f)
        return ahead

    first = tuple(load(jnp.minimum(jnp.int32(g), last)) for g in range(prefetch))
    lax.fori_loop(0, n_units, run_unit, first)


def _write_partials(gu_ref, k, s, f0, g, u, *, top_k: int, block_f: int):
    """Choice k's partial gate and up sums over the s-th D range, columns [f0, f0 + block_f): rows 2 (s K + k) and
    +1 of gu (where `_h_partials` reads them)."""
    row = 2 * (s * top_k + k)
    gu_ref[row, pl.ds(f0, block_f)] = g
    gu_ref[row + 1, pl.ds(f0, block_f)] = u


def _h_partials(gu_ref, k, top_k: int, c0, width: int):
    """The k_splits partial gate and up sums ([k_splits, width] float32 each) of choice k's h columns
    [c0, c0 + width), from the split gate/up kernel's output gu [k_splits * K * 2, F]."""
    S = gu_ref.shape[0] // (2 * top_k)
    rows = 2 * (jnp.arange(S, dtype=jnp.int32)[:, None] * top_k + k)  # [S, 1]
    cols = c0 + jnp.arange(width, dtype=jnp.int32)[None, :]
    return pltriton.load(gu_ref.at[(rows, cols)]), pltriton.load(gu_ref.at[(rows + 1, cols)])


def _h_from_partials(g_parts, u_parts, dtype):
    """h from `_h_partials` as the XLA pass makes it: the partials summed, SiLU(g) * u, rounded to dtype."""
    return (_silu(jnp.sum(g_parts, axis=0)) * jnp.sum(u_parts, axis=0)).astype(dtype)


def _split_down_kernel(
    logits_ref,  # [1, E] float32
    h_ref,  # [K, F] h of each choice (x's dtype; int8 with w8a8)
    wd_ref,  # [E, F, D] (int8 when quantised)
    *rest,  # (sd_ref [E, D] float32 when quantised), (hs_ref [K] float32 h row scales with w8a8),
    #         o_ref out [f_splits * K, D] float32; with merge: the counters (input, aliased) before o_ref, then
    #         out_ref [1, D] in x's dtype and the counters out
    top_k: int,
    norm_topk_prob: bool,
    block_d: int,
    block_kf: int,
    quantized: bool,
    dequant: str = "bits",
    topk: str = "rounds",
    dot: bool = False,  # 16-row dots (`_dot_row_pass`) instead of GEMV
    w8a8: bool = False,  # (dot) h comes as int8 rows with a scale each: int8 x int8 dots
    merge: bool = False,  # the last of a D tile's programs writes out's columns (TritonMoEConfig.merge)
    count_base: int = 0,  # (merge) the first of the D tiles' counters
    prefetch: int = 0,  # (GEMV) TritonMoEConfig.prefetch
    h_dtype=None,  # (GEMV) TritonMoEConfig.h_in_down: x's dtype; h_ref is then gu, the gate/up kernel's partials
    fold: bool = False,  # (GEMV) TritonMoEConfig.fold
    interpret: bool = False,
    ids=None,  # (k, i, r) where the caller assigns the work (one_launch), else the program ids
):
    """fused_route="split", down: program (k, i, r) writes o[r K + k, i-th D tile] = w_k * (h_k[range r] @
    Wd[e_k, range r, tile]) over the r-th of f_splits F ranges."""
    if merge:
        *ins, _, o_ref, out_ref, count_ref = rest
    else:
        *ins, o_ref = rest
    k, i, r = ids if ids is not None else (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    f_len = wd_ref.shape[1] // (o_ref.shape[0] // top_k)  # o holds f_splits * K rows
    d0 = pl.multiple_of(i * block_d, block_d)
    e, w = _kth_choice(logits_ref, k, top_k, norm_topk_prob, topk)
    if dot:
        # w8a8 takes h as int8 rows with their scales (XLA's pass), or with merge as the gate/up kernel wrote it
        # (x's dtype), rounded here: the row's max |h| over all of F (from L2) / 127, as the gate/up kernel rounds x
        quantize = w8a8 and h_ref.dtype != jnp.int8
        (o,) = _dot_row_pass(h_ref, k, (wd_ref,), e, d0, block_c=block_d, block_k=block_kf, k_lo=r * f_len,
                             k_len=f_len, quantize=quantize)
        o = o * (w * ins[1][k] if w8a8 and not quantize else w)
    else:
        height = _acc_rows(block_kf, block_d, fold)  # reduce over F once after the loop (see _gemv_pass)
        acc2d = height > 0
        height = height or block_kf

        def load(n):  # the step's h slices (with h_dtype: their gate/up partials) and weight tiles, by piece
            offs = _pieces(pl.multiple_of(r * f_len + n * block_kf, block_kf), block_kf, height)
            hs = tuple(h_ref[k, pl.ds(o, height)] if h_dtype is None else _h_partials(h_ref, k, top_k, o, height)
                       for o in offs)
            return hs, tuple(wd_ref[e, pl.ds(o, height), pl.ds(d0, block_d)] for o in offs)

        def step(n, loaded, acc):
            for h, wt in zip(*loaded, strict=True):
                h = h if h_dtype is None else _h_from_partials(*h, h_dtype)
                y = h.astype(jnp.float32)[:, None] * _to_f32(wt, dequant)  # [height, BD]
                acc = acc + (y if acc2d else jnp.sum(y, axis=0))
            return acc

        acc = _k_loop(f_len // block_kf, load, step,
                      jnp.zeros((height, block_d) if acc2d else (block_d,), jnp.float32), prefetch)
        o = (jnp.sum(acc, axis=0) if acc2d else acc) * w
    if quantized:
        o = o * ins[0][e, pl.ds(d0, block_d)]
    o_ref[r * top_k + k, pl.ds(d0, block_d)] = o
    if not merge:
        return
    KR = o_ref.shape[0]

    def merge_tile():  # the tile's f_splits * K rows summed in row order, cast as XLA's sum would be
        P = _next_pow2(KR)
        rows = jnp.arange(P, dtype=jnp.int32)[:, None]
        cols = d0 + jnp.arange(block_d, dtype=jnp.int32)[None, :]
        part = pltriton.load(o_ref.at[(rows, cols)], mask=jnp.broadcast_to(rows < KR, (P, block_d)), other=0)
        out_ref[0, pl.ds(d0, block_d)] = jnp.sum(part, axis=0).astype(out_ref.dtype)

    last_arrival(count_ref, count_base + i, KR, merge_tile, interpret)


def _split_one_launch_kernel(
    logits_ref,  # [1, E] float32
    x_ref,  # [1, D]
    wg_ref,  # [E, D, F] (int8 when quantised)
    wu_ref,  # [E, D, F]
    wd_ref,  # [E, F, D]
    *rest,  # (sg_ref, su_ref [E, F], sd_ref [E, D] float32 when quantised), the counters (input, aliased), then
    #         out: gu_ref [k_splits * K * 2, F] f32, h_ref [K, F], o_ref [f_splits * K, D] f32, out_ref [1, D] in
    #         x's dtype, the counters [K * F / block_f (h tiles) + D / block_d (out tiles) + K (h ready) + 1 (ticket)]
    top_k: int,
    block_f: int,
    block_d: int,
    k_splits: int,
    quantized: bool,
    interpret: bool,
    gate_up: dict,  # the rest of `_split_gate_up_kernel`'s and `_split_down_kernel`'s keyword arguments
    down: dict,
):
    """fused_route="split" with one_launch (see TritonMoEConfig): the program's ticket picks gate/up work (k, j, s)
    or, past the K * nF * k_splits gate/up tickets, down work (k, i, r) once choice k's h is whole."""
    *scales, _, gu_ref, h_ref, o_ref, out_ref, count_ref = rest
    F, D = h_ref.shape[1], out_ref.shape[1]
    nF, nD, S = F // block_f, D // block_d, k_splits
    R = o_ref.shape[0] // top_k
    ready = top_k * nF + nD  # K counters of h tiles written, then the ticket counter
    t = arrive(count_ref, ready + top_k, interpret)
    n_gate_up = top_k * nF * S

    @pl.when(t < n_gate_up)
    def _():
        _split_gate_up_kernel(logits_ref, x_ref, wg_ref, wu_ref, *scales[:2 if quantized else 0], None, gu_ref, h_ref,
                              count_ref, top_k=top_k, block_f=block_f, quantized=quantized, merge=True,
                              interpret=interpret, ids=(t // (nF * S), t // S % nF, t % S),
                              h_written=lambda k: arrive(count_ref, ready + k, interpret), **gate_up)

    @pl.when(t >= n_gate_up)
    def _():
        u = t - n_gate_up
        k = u // (nD * R)
        wait_for(count_ref, ready + k, nF, interpret)
        _split_down_kernel(logits_ref, h_ref, wd_ref, *scales[2:], None, o_ref, out_ref, count_ref, top_k=top_k,
                           block_d=block_d, quantized=quantized, merge=True, count_base=top_k * nF,
                           interpret=interpret, ids=(k, u // R % nD, u % R), **down)


def route_table(x, router, *, top_k, norm_topk_prob, topk, interpret):
    """One token's [2, K] float32 routing table (row 0 the weights, row 1 the expert ids) for TritonMoEConfig.topk
    "kernel" (XLA's logits, then `_route_kernel` in one program of ROUTE_TABLE_WARPS warps) or "xla"
    (`reference.route`)."""
    if topk == "xla":
        weights, experts = route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)  # [1, K] each
        return jnp.concatenate([weights, experts.astype(jnp.float32)], axis=0)
    logits = router_logits(x, router)  # [1, E]
    spec = lambda shape: pl.BlockSpec(shape, lambda t: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_route_kernel, top_k=top_k, norm_topk_prob=norm_topk_prob, block_k=0, table=True),
        grid=(1,),
        in_specs=[spec(logits.shape)],
        out_specs=spec((2, top_k)),
        out_shape=jax.ShapeDtypeStruct((2, top_k), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=ROUTE_TABLE_WARPS, num_stages=1),
        interpret=interpret,
        name="moe_route_table",
    )(logits)


def moe_split(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob, plan, interpret):
    """fused_route="split": the one-token MoE as XLA's logits, `_split_gate_up_kernel`, `_split_down_kernel` and
    XLA's sum over the K experts' rows."""
    _, D = x.shape
    E, _, F = w_gate.shape
    bf, bk, bd, bkf, S, R = plan.block_f, plan.block_k, plan.block_d, plan.block_kf, plan.k_splits, plan.f_splits
    quantized = isinstance(w_gate, QuantizedWeight)
    mode = dict(dequant=plan.dequant, topk=plan.topk, dot=not plan.gemv, w8a8=plan.w8a8, prefetch=plan.prefetch,
                fold=plan.fold)
    tag = ("_w8a8" if plan.w8a8 else "_dot") if not plan.gemv else (f"_pf{plan.prefetch}" if plan.prefetch else "")
    tag += "_fold" if plan.fold else ""
    ws = [w.values if quantized else w for w in (w_gate, w_up, w_down)]
    km = k_major_values(w_gate, w_up, w_down)
    if plan.topk in ROUTED_TOPKS:  # the kernels read their choices from the table in the logits' place
        logits = route_table(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob, topk=plan.topk,
                             interpret=interpret)
    else:
        logits = router_logits(x, router)  # [1, E]
    params = pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)

    def full(shape):  # whole arrays: the kernels index them themselves
        return pl.BlockSpec(shape, lambda *ids: (0,) * len(shape))

    merge, h_in_down = plan.merge, plan.h_in_down
    merge_gate_up = merge and not h_in_down  # h_in_down: the down kernel makes h from the partials
    nF, nD = F // bf, D // bd
    # merge: one counter per (expert, F tile) for the gate/up kernel (unless h_in_down), one per D tile for the
    # down kernel, and with one_launch one per choice (its h is ready) and the ticket
    n_counts = (0 if h_in_down else top_k * nF) + nD + (top_k + 1 if plan.one_launch else 0)
    counts = [jnp.zeros((n_counts,), jnp.int32)] if merge else []
    count_shape = jax.ShapeDtypeStruct((n_counts,), jnp.int32)
    gu_shape = jax.ShapeDtypeStruct((S * top_k * 2, F), jnp.float32)  # partial gate/up sums
    h_shape = jax.ShapeDtypeStruct((top_k, F), x.dtype)
    o_shape = jax.ShapeDtypeStruct((R * top_k, D), jnp.float32)  # partial down rows
    out_shape = jax.ShapeDtypeStruct((1, D), x.dtype)
    if plan.one_launch:
        args = (logits, x, *ws, *([w_gate.scale, w_up.scale, w_down.scale] if quantized else []), *counts)
        shapes = [gu_shape, h_shape, o_shape, out_shape, count_shape]
        kw = dict(mode, norm_topk_prob=norm_topk_prob)
        out = pallas_call(
            functools.partial(_split_one_launch_kernel, top_k=top_k, block_f=bf, block_d=bd, k_splits=S,
                              quantized=quantized, interpret=interpret, gate_up=dict(kw, block_k=bk),
                              down=dict(kw, block_kf=bkf)),
            grid=(top_k * nF * S + top_k * nD * R,),
            in_specs=[full(a.shape) for a in args],
            out_specs=[full(o.shape) for o in shapes],
            out_shape=shapes,
            input_output_aliases={len(args) - 1: len(shapes) - 1},
            compiler_params=params,
            interpret=interpret,
            name=f"moe_split_one{tag}_bf{bf}_bk{bk}_s{S}_bd{bd}_bkf{bkf}_r{R}",
            k_major=km,
        )(*args)
        return out[3]
    args = (logits, x, ws[0], ws[1], *([w_gate.scale, w_up.scale] if quantized else []),
            *(counts if merge_gate_up else []))
    P = plan.gate_up_programs  # TritonMoEConfig.persistent: P programs over the K * nF * S units
    if P:
        kernel = functools.partial(_split_gate_up_persistent_kernel, top_k=top_k, programs=P, block_f=bf,
                                   block_k=bk, quantized=quantized, dequant=plan.dequant, topk=plan.topk,
                                   prefetch=plan.prefetch, fold=plan.fold)
    else:
        kernel = functools.partial(_split_gate_up_kernel, top_k=top_k, norm_topk_prob=norm_topk_prob, block_f=bf,
                                   block_k=bk, quantized=quantized, merge=merge_gate_up, interpret=interpret, **mode)
    gu = pallas_call(
        kernel,
        grid=(P,) if P else (top_k, nF, S),
        in_specs=[full(a.shape) for a in args],
        out_specs=([full(o.shape) for o in (gu_shape, h_shape, count_shape)] if merge_gate_up
                   else full(gu_shape.shape)),
        out_shape=[gu_shape, h_shape, count_shape] if merge_gate_up else gu_shape,
        input_output_aliases={len(args) - 1: 2} if merge_gate_up else {},
        compiler_params=params,
        interpret=interpret,
        name=f"moe_split_gate_up{f'_p{P}' if P else ''}{tag}_bf{bf}_bk{bk}_s{S}{'_merge' if merge_gate_up else ''}",
        k_major=km,
    )(*args)
    count, h_scale = (counts[0] if merge else None), None
    if merge_gate_up:
        _, h, count = gu
    elif h_in_down:  # the down kernel sums the partials itself
        h = gu
    else:
        # h once, in XLA (a few KB). h_in_down has every down program read the k_splits partials of its F range
        # and apply SiLU itself: with the first H200 profile's narrow down tiles that re-read as many bytes from L2
        # as the weight tile (22.5 of 41 us), with a 256-column int8 tile a quarter
        g, u = jnp.sum(gu.reshape(S, top_k, 2, F), axis=0).transpose(1, 0, 2)
        h = jax.nn.silu(g) * u
        # [K, F], rounded as the reference's h; with w8a8 to int8, a scale per row
        h, h_scale = _quantize_rows(h) if plan.w8a8 else (h.astype(x.dtype), None)
    args = (logits, h, ws[2], *([w_down.scale] if quantized else []), *([h_scale] if h_scale is not None else []),
            *([count] if merge else []))
    out = pallas_call(
        functools.partial(_split_down_kernel, top_k=top_k, norm_topk_prob=norm_topk_prob, block_d=bd,
                          block_kf=bkf, quantized=quantized, merge=merge, count_base=n_counts - nD,
                          h_dtype=x.dtype if h_in_down else None, interpret=interpret, **mode),
        grid=(top_k, nD, R),
        in_specs=[full(a.shape) for a in args],
        out_specs=[full(o.shape) for o in (o_shape, out_shape, count_shape)] if merge else full(o_shape.shape),
        out_shape=[o_shape, out_shape, count_shape] if merge else o_shape,
        input_output_aliases={len(args) - 1: 2} if merge else {},
        compiler_params=params,
        interpret=interpret,
        name=f"moe_split_down{tag}{'_hd' if h_in_down else ''}_bd{bd}_bkf{bkf}_r{R}{'_merge' if merge else ''}",
        k_major=km,
    )(*args)
    if merge:
        return out[1]
    return jnp.sum(out, axis=0, keepdims=True).astype(x.dtype)
