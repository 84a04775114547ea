"""The Triton MoE kernel against a float64 per-token loop, in the Pallas interpreter (natively on a GPU).

Inputs are bf16 (the kernel's dtypes) with router logits at least MIN_GAP apart around the k-th expert after
rounding, so routing is unambiguous. Experts no token chose hold NaN weights: reading one would poison the
output. The interpreter fills every output buffer with NaN before the kernel runs, so a pair row a kernel fails
to write poisons the result; NaN never passes. `test_lowers_to_triton` lowers the benchmark's real shapes for a
CUDA target on the CPU (power-of-two blocks, dot shapes, supported ops), which the interpreter does not check.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err
from jax.experimental import pallas as pl
from test_moe_reference import hot_expert, make_inputs, naive_moe, naive_routing

from pallas_kernels import moe as moe_op
from pallas_kernels import tuning
from pallas_kernels.moe import (
    IMPLEMENTATIONS,
    QuantizedWeight,
    TritonMoEConfig,
    dispatch,
    moe_reference,
    moe_triton,
    quantize_int8,
    triton_available,
)
from pallas_kernels.moe.triton_moe import (
    DEQUANTS,
    IN_KERNEL_TOPKS,
    MAX_TOKENS,
    ROUTED_TOPKS,
    _kth_choice,
    _to_f32,
    group_by_expert,
    plan,
)
from pallas_kernels.moe.triton_split import route_table

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = 1e-2  # bf16 inputs, h and output rounded to bf16 as in the reference
TOL_INT8 = 3e-2  # int8 per-channel weights against the bf16 weights they were made from
TOL_W8A8 = 4e-2  # w8a8: token rows and h rounded to int8 too (per row, per row and F tile)
BF16 = ml_dtypes.bfloat16


def _round_bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def bf16_inputs(rng, T, E, D, F, top_k, bias=None):
    """make_inputs with x and router rounded to bf16 before the tie check, weights rounded after."""

    def router_fn(x, router):
        if bias is not None:
            x, router = bias(x, router)
        return _round_bf16(x), _round_bf16(router)

    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k, router_fn)
    return x, router, _round_bf16(wg), _round_bf16(wu), _round_bf16(wd)


def poison_unused(experts, *weights):
    """NaN in every expert no token chose."""
    unused = np.setdiff1d(np.arange(weights[0].shape[0]), experts)
    out = []
    for w in weights:
        w = w.copy()
        w[unused] = np.nan
        out.append(w)
    return out


def run(x, router, wg, wu, wd, *, top_k, norm_topk_prob=True, config=None):
    to = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    ws = [w if isinstance(w, QuantizedWeight) else to(w) for w in (wg, wu, wd)]
    got = moe_triton(to(x), to(router), *ws, top_k=top_k, norm_topk_prob=norm_topk_prob, config=config,
                     interpret=INTERPRET)
    assert got.shape == x.shape and got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.isfinite(got).all(), "NaN/inf leaked into the output"
    return got


def check(rng, T, E, D, F, top_k, *, norm_topk_prob=True, bias=None, config=None):
    x, router, wg, wu, wd = bf16_inputs(rng, T, E, D, F, top_k, bias)
    want = naive_moe(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=norm_topk_prob)
    experts, _, _ = naive_routing(x, router, top_k, norm_topk_prob)
    wg, wu, wd = poison_unused(experts, wg, wu, wd)
    got = run(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=norm_topk_prob, config=config)
    err = rel_err(got, want)
    assert err <= TOL, f"rel err {err:.3g} > {TOL}"
    return experts


# (E, top_k, D, F): Qwen3-30B-A3B's routing (128 experts, top-8) at reduced D/F, and a small config whose F is
# not a power of two (48 = 3 x 16, like 768 = 3 x 256)
CONFIGS = [(128, 8, 64, 32), (8, 2, 32, 48)]


@pytest.mark.parametrize("T", [1, 7, 64, 256])
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_matches_naive(rng, T, E, top_k, D, F):
    check(rng, T, E, D, F, top_k)


@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_no_renormalisation(rng, E, top_k, D, F):
    check(rng, 7, E, D, F, top_k, norm_topk_prob=False)


DEAD = [0, 3, 5]


def dead_experts_bias(x, router):
    """Experts DEAD never chosen (and NaN-poisoned by check): the first expert id and its neighbours."""
    x, router = x.copy(), router.copy()
    x[:, 0], router[:, 0] = 1.0, 0.0
    router[DEAD, 0] = -30.0
    return x, router


def test_some_experts_chosen_by_no_token(rng):
    dead = DEAD
    experts = check(rng, 64, 8, 32, 48, 2, bias=dead_experts_bias)
    assert not np.isin(experts, dead).any()


@pytest.mark.parametrize("E,top_k,D,F,T", [(128, 8, 64, 32, 256), (8, 2, 32, 48, 64)], ids=["qwen3-30b-a3b", "small"])
def test_one_expert_chosen_by_every_token(rng, E, top_k, D, F, T):
    # one slot with T pairs: several row tiles over the same expert weights
    hot = int(rng.integers(E))
    experts = check(rng, T, E, D, F, top_k, bias=hot_expert(hot))
    assert (experts[:, 0] == hot).all()


@pytest.mark.parametrize("config", [
    TritonMoEConfig(block_m=16, block_f=16, block_k=16, block_d=16, block_kf=16),
    TritonMoEConfig(block_m=32, block_f=32, block_k=32, block_d=32, block_kf=32, num_warps=8, num_stages=2),
])
def test_configs(rng, config):
    check(rng, 64, 128, 64, 32, 8, config=config)


def check_int8(rng, T, E, D, F, top_k, *, bias=None, config=None, tol_deq=TOL, tol=TOL_INT8, k_major=False):
    """The quantised format: against the dequantised weights it is the same computation (scale after the dot
    instead of before), against the bf16 weights it was made from the quantisation error is bounded. k_major: the
    values stored [E, Out, In] (QuantizedWeight.k_major)."""
    x, router, wg, wu, wd = bf16_inputs(rng, T, E, D, F, top_k, bias)
    want = naive_moe(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=True)
    experts, _, _ = naive_routing(x, router, top_k, True)
    q = [quantize_int8(jnp.asarray(w, jnp.bfloat16), k_major=k_major) for w in (wg, wu, wd)]
    for w, a in zip(q, (wg, wu, wd), strict=True):
        E_, n_in, n_out = a.shape
        assert w.shape == a.shape and w.values.shape == ((E_, n_out, n_in) if k_major else a.shape)
    deq = [np.asarray(w.io_values(), np.float64) * np.asarray(w.scale, np.float64)[:, None, :] for w in q]
    want_deq = naive_moe(x, router, *deq, top_k=top_k, norm_topk_prob=True)
    # the unused experts' scales are NaN: reading them would poison the output
    q = [QuantizedWeight(w.values, jnp.asarray(poison_unused(experts, np.asarray(w.scale))[0]), w.k_major)
         for w in q]
    got = run(x, router, *q, top_k=top_k, config=config)
    err_deq = rel_err(got, want_deq)
    assert err_deq <= tol_deq, f"int8 vs its dequantised weights: rel err {err_deq:.3g} > {tol_deq}"
    err = rel_err(got, want)
    assert err <= tol, f"int8 vs bf16 weights: rel err {err:.3g} > {tol}"
    return x, router, wg, wu, wd, want, experts


@pytest.mark.parametrize("T", [1, 64])
def test_int8_weights(rng, T):
    E, top_k, D, F = 128, 8, 64, 32
    x, router, wg, wu, wd, want, _ = check_int8(rng, T, E, D, F, top_k)
    # the reference takes the same format
    ref = moe_reference(*(jnp.asarray(a, jnp.bfloat16) for a in (x, router)),
                        *(quantize_int8(jnp.asarray(w, jnp.bfloat16)) for w in (wg, wu, wd)), top_k=top_k,
                        norm_topk_prob=True)
    assert rel_err(np.asarray(ref.astype(jnp.float32)), want) <= TOL_INT8


# GEMV mode (block_m < 16, no dot) at decode sizes, beside the dot mode (block_m=16) at the same sizes. For T > 1
# every token chooses one hot expert first, so that slot holds T rows: one pass over its weight tiles when
# block_m >= T (rows past the count skipped), several passes when block_m < T. block_m=1 runs several k-steps
# per program (block_k < D, block_kf < F); block_m=4 takes plan's blocks (one k-step at these D, F).
GEMV_CONFIGS = {
    1: TritonMoEConfig(block_m=1, block_f=16, block_d=16, block_k=32, block_kf=16),
    4: TritonMoEConfig(block_m=4),
    16: TritonMoEConfig(block_m=16),
}


# (block_m, T): T=1 in each mode (no gathers around the kernels); block_m=1 over several passes (T=7); block_m=4
# with one partial pass (T=2: rows past the count skipped) and a second partial pass (T=7); the dot at T=7. The
# int8 format takes the same passes with the scales applied (block_m=4 at T=1 adds nothing to block_m=1 at T=1).
GEMV_CASES = [(1, 1), (1, 7), (4, 1), (4, 2), (4, 7), (16, 1), (16, 7)]
GEMV_INT8_CASES = [(1, 1), (1, 7), (4, 2), (4, 7)]


@pytest.mark.parametrize("block_m,T", GEMV_CASES)
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_gemv_mode(rng, E, top_k, D, F, T, block_m):
    hot = int(rng.integers(E))
    experts = check(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T > 1 else None, config=GEMV_CONFIGS[block_m])
    assert T == 1 or (experts[:, 0] == hot).all()


# every case with the default int8 conversion ("bits"); sitofp ("convert") on one pass of one row and a partial
# pass of four; the byte permute ("prmt": "bits" in the interpreter, its PTX on a GPU) on the partial pass
@pytest.mark.parametrize("block_m,T,dequant", [(bm, T, "bits") for bm, T in GEMV_INT8_CASES]
                         + [(1, 1, "convert"), (4, 7, "convert"), (4, 7, "prmt")])
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_gemv_mode_int8(rng, E, top_k, D, F, T, block_m, dequant):
    hot = int(rng.integers(E))
    *_, experts = check_int8(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T > 1 else None,
                             config=dataclasses.replace(GEMV_CONFIGS[block_m], dequant=dequant))
    assert T == 1 or (experts[:, 0] == hot).all()


def test_dequant_bits_is_exact():
    # every int8 value through the integer add and float subtract comes out as sitofp gives it
    v = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    got = np.asarray(_to_f32(v, "bits"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.arange(-128, 128, dtype=np.float32).reshape(16, 16))
    bf = jnp.asarray(got, jnp.bfloat16)  # other dtypes are converted as before
    np.testing.assert_array_equal(np.asarray(_to_f32(bf, "bits")), got)


@pytest.mark.skipif(not ON_GPU, reason="PTX inline assembly: the interpreter runs dequant='bits' for it")
def test_dequant_prmt_is_exact_on_the_gpu():
    # every int8 value in every byte position of its word (a [64, 64] tile of shifted copies of -128 .. 127),
    # through the byte permute in a Triton kernel, as sitofp gives them
    want = (np.arange(64 * 64).reshape(64, 64) * 5 + np.arange(64)[:, None]) % 256 - 128

    def kernel(v_ref, o_ref):
        o_ref[...] = _to_f32(v_ref[...], "prmt")

    got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32))(jnp.asarray(want, jnp.int8))
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@pytest.mark.parametrize("topk", IN_KERNEL_TOPKS + ROUTED_TOPKS)
@pytest.mark.parametrize("norm", [True, False], ids=["renorm", "softmax"])
@pytest.mark.parametrize("E,top_k", [(128, 8), (8, 2)])
def test_kth_choice_matches_route_with_ties(rng, topk, norm, E, top_k):
    # logits with many exact ties (a few distinct values): lax.top_k takes the lowest index among equals, and so
    # must every program of the in-kernel routing, each finding its own k-th choice
    # (topk "kernel" and "xla": the routing table made before the kernels, from x = e_0 and the logits as router
    # column 0, each value exact in bf16; the programs read their choice from it)
    logits = rng.choice(np.float32([-1.5, 0.25, 0.5, 2.0]), size=(1, E)).astype(np.float32)
    logits[0, rng.integers(E)] = 3.0
    given = jnp.asarray(logits)
    if topk in ROUTED_TOPKS:
        x = jnp.zeros((1, 16), jnp.bfloat16).at[0, 0].set(1)
        router = jnp.zeros((E, 16), jnp.bfloat16).at[:, 0].set(jnp.asarray(logits[0], jnp.bfloat16))
        given = route_table(x, router, top_k=top_k, norm_topk_prob=norm, topk=topk, interpret=INTERPRET)
        assert given.shape == (2, top_k) and given.dtype == jnp.float32

    def kernel(l_ref, e_ref, w_ref):
        k = pl.program_id(0)
        e, w = _kth_choice(l_ref, k, top_k, norm, topk)
        e_ref[k] = e
        w_ref[k] = w

    e, w = pl.pallas_call(
        kernel, grid=(top_k,),
        in_specs=[pl.BlockSpec(given.shape, lambda k: (0, 0))],
        out_specs=[pl.BlockSpec((top_k,), lambda k: (0,))] * 2,
        out_shape=[jax.ShapeDtypeStruct((top_k,), jnp.int32), jax.ShapeDtypeStruct((top_k,), jnp.float32)],
        interpret=INTERPRET,
    )(given)
    probs = jax.nn.softmax(jnp.asarray(logits[0]))
    want_w, want_e = jax.lax.top_k(probs, top_k)
    if norm:
        want_w = want_w / want_w.sum()
    np.testing.assert_array_equal(np.asarray(e), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(w), np.asarray(want_w), rtol=1e-6)


# fused_combine: the down kernel sums each token's K experts and writes [T, D] once (no XLA combine), with each
# routing (XLA; XLA logits + Pallas top-k; all of it in Pallas), in the GEMV mode (block_m 1 with several
# (expert, F step) iterations per program and narrow D tiles; plan's rows) and the dot mode (block_m 16). The
# output [T, D] is NaN before the kernel runs (interpreter), so a tile no program writes fails the test.
FUSED_CONFIGS = {
    "gemv1-route_all": TritonMoEConfig(block_m=1, block_f=16, block_d=16, block_k=32, block_kf=16,
                                       fused_combine=True, fused_route="all"),
    "gemv-route_xla": TritonMoEConfig(fused_combine=True),
    "dot16-route_topk": TritonMoEConfig(block_m=16, fused_combine=True, fused_route="topk"),
    "gemv-bits": TritonMoEConfig(fused_combine=True, dequant="bits"),  # int8 only (bf16 ignores dequant)
}


# (config, T): T=1 in each (the gate/up kernel reads x itself; 'all' and 'topk' write the slot table) and T > 1 in
# each: gemv1 over several passes at an odd T; plan's GEMV rows at T=2 (block_m 2 at 128 experts) and its dot mode
# at T=7; the dot at T=8, the largest T the tuner offers fused_combine at.
FUSED_CASES = [("gemv1-route_all", 1), ("gemv1-route_all", 7), ("gemv-route_xla", 1), ("gemv-route_xla", 2),
               ("gemv-route_xla", 7), ("dot16-route_topk", 1), ("dot16-route_topk", 8)]
FUSED_INT8_CASES = [("gemv1-route_all", 1), ("gemv1-route_all", 7), ("dot16-route_topk", 1), ("dot16-route_topk", 8),
                    ("gemv-bits", 1), ("gemv-bits", 7)]


@pytest.mark.parametrize("config,T", FUSED_CASES)
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_fused_combine(rng, E, top_k, D, F, T, config):
    # T > 1: every token chooses one hot expert first (one slot of T rows, read for every token)
    hot = int(rng.integers(E))
    experts = check(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T > 1 else None, config=FUSED_CONFIGS[config])
    assert T == 1 or (experts[:, 0] == hot).all()


@pytest.mark.parametrize("config", ["gemv-route_xla", "dot16-route_topk"])
def test_fused_combine_no_renormalisation(rng, config):
    check(rng, 7, 128, 64, 32, 8, norm_topk_prob=False, config=FUSED_CONFIGS[config])


@pytest.mark.parametrize("config", list(FUSED_CONFIGS))
def test_fused_combine_experts_chosen_by_no_token(rng, config):
    dead = DEAD
    experts = check(rng, 8, 8, 32, 48, 2, bias=dead_experts_bias, config=FUSED_CONFIGS[config])
    assert not np.isin(experts, dead).any()


@pytest.mark.parametrize("config,T", FUSED_INT8_CASES)
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_fused_combine_int8(rng, E, top_k, D, F, T, config):
    hot = int(rng.integers(E))
    *_, experts = check_int8(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T > 1 else None,
                             config=FUSED_CONFIGS[config])
    assert T == 1 or (experts[:, 0] == hot).all()


# The one-token paths. fused_route="inline" (per-slot down): every gate/up program takes the softmax and top-k of the
# XLA logits itself and its first F tile writes the slot table and pair weight the down kernel reads; a row it
# failed to write leaves the down kernel a NaN weight or garbage expert id (interpreter), which fails the
# comparison. fused_route="single" (one kernel): each program routes, runs its expert's F tile through gate/up and
# adds its share of the down projection into the float32 output atomically; a program that added nothing, or
# twice, or read a dead expert fails the comparison or leaks NaN (down steps as wide as the column block and
# wider, gate/up k-steps of one and several per D). fused_route="split": partial gate/up sums over 2 or 4 D
# ranges (one and two k-steps each) that the down kernel adds up; a missing or doubled partial fails.
ONE_TOKEN_CONFIGS = {
    "inline-gemv1": TritonMoEConfig(block_m=1, block_f=16, block_d=16, block_k=32, block_kf=16, fused_route="inline"),
    "inline-dot16": TritonMoEConfig(block_m=16, fused_route="inline"),
    "single-bd16": TritonMoEConfig(block_f=16, block_d=16, block_k=32, fused_route="single"),
    "single-bd32": TritonMoEConfig(block_f=16, block_d=32, block_k=16, num_warps=8, fused_route="single"),
    "split-s2": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2, fused_route="split"),
    "split-s2-bd32": TritonMoEConfig(block_f=16, block_d=32, block_k=16, k_splits=2, num_warps=8,
                                     fused_route="split"),
    # the same paths with the rank routing and the int8 bit conversion (bf16 weights ignore dequant)
    "inline-gemv1-rank-bits": TritonMoEConfig(block_m=1, block_f=16, block_d=16, block_k=32, block_kf=16,
                                              fused_route="inline", topk="rank", dequant="bits"),
    "inline-dot16-rank": TritonMoEConfig(block_m=16, fused_route="inline", topk="rank"),
    "single-rank-bits": TritonMoEConfig(block_f=16, block_d=32, block_k=16, fused_route="single", topk="rank",
                                        dequant="bits"),
    "split-s2-rank-bits": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                          fused_route="split", topk="rank", dequant="bits"),
    # the split path on the tensor cores (the row in a 16-row tile; int8 weights converted for the dot)
    "split-dot16": TritonMoEConfig(block_m=16, block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                   fused_route="split", topk="rank"),
    # merge: the last program of each (expert, F tile) writes h from the k_splits partials, the last of each D
    # tile the output from the f_splits * K rows; a counter short or past its count leaves h or out unwritten
    # (garbage) or doubled. One D range (h straight from the one partial), two, and two on the tensor cores (F
    # ranges: test_split_over_four_d_ranges)
    "split-s1-merge": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, fused_route="split",
                                      merge=True),
    "split-s2-merge": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                      fused_route="split", topk="rank", dequant="bits", merge=True),
    # loads one and two k-steps ahead of the arithmetic: two k-steps a gate/up D range and a down F range (one at
    # D=32), so carried tiles feed a step, steps past the last re-load it, and two ahead at D=32 starts past the end
    "split-s2-prefetch": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                         fused_route="split", topk="rank", prefetch=1),
    "split-s2-prefetch2": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                          fused_route="split", topk="rank", prefetch=2),
    # the byte permute (PTX: "bits" in the interpreter), at one warp so each thread holds whole words
    "split-s2-merge-prmt": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                           num_warps=1, fused_route="split", topk="rank", dequant="prmt",
                                           merge=True),
    # the down kernel making h from the gate/up partials (no XLA pass between), loading one step ahead, and
    # merging its rows: the gate/up kernel then writes partials only
    "split-s2-hdown-merge": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                            fused_route="split", topk="rank", prefetch=1, h_in_down=True,
                                            merge=True),
    "split-dot16-merge": TritonMoEConfig(block_m=16, block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                         fused_route="split", topk="rank", merge=True),
    # routed once before the two kernels, which read their choices from a [2, K] table: by a one-program Triton
    # kernel (GEMV, loading ahead) and by XLA (merged dots); a choice read from the wrong column picks the wrong
    # expert or weight and fails the comparison
    "split-s2-prefetch-kernelroute": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                                     fused_route="split", topk="kernel", prefetch=1),
    "split-dot16-merge-xlaroute": TritonMoEConfig(block_m=16, block_f=16, block_d=16, block_k=16, block_kf=16,
                                                  k_splits=2, fused_route="split", topk="xla", merge=True),
    # and the kernel's table read by the down kernel that makes h from the partials and merges its rows
    "split-s2-hdown-merge-kernelroute": TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2,
                                                        fused_route="split", topk="kernel", prefetch=1,
                                                        h_in_down=True, merge=True),
}
# one_launch: both merged kernels in one launch, work by ticket, the down work after its expert's h tiles. A ticket
# decoded wrong leaves a tile unwritten or written twice; on the GPU a down program that did not wait for its h
# would read it unwritten (the interpreter runs tickets in order). One D range and two, both modes; the routing is
# the merged path's own, so one routing mode each. The merge configs above, in one launch (but for the byte
# permute's: the conversion is the same in both forms; and h_in_down's and the routed table's, which one launch does
# not take)
ONE_LAUNCH_CONFIGS = {name.replace("merge", "one"): dataclasses.replace(c, one_launch=True)
                      for name, c in ONE_TOKEN_CONFIGS.items()
                      if c.merge and c.dequant != "prmt" and not c.h_in_down and c.topk not in ROUTED_TOPKS}


@pytest.mark.parametrize("norm", [True, False], ids=["renorm", "softmax"])
# (bf16 weights: the byte permute's config is split-s2-merge's blocks at one warp, as dequant is int8's alone)
@pytest.mark.parametrize("config", [name for name, c in ONE_TOKEN_CONFIGS.items() if c.dequant != "prmt"])
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
def test_one_token_paths(rng, E, top_k, D, F, config, norm):
    check(rng, 1, E, D, F, top_k, norm_topk_prob=norm, config=ONE_TOKEN_CONFIGS[config])


@pytest.mark.parametrize("config", list(ONE_TOKEN_CONFIGS))
def test_one_token_paths_int8(rng, config):
    check_int8(rng, 1, 128, 64, 32, 8, config=ONE_TOKEN_CONFIGS[config])


@pytest.mark.parametrize("config,E,top_k,D,F,norm,int8", [
    ("split-s1-one", *CONFIGS[0], True, False), ("split-s2-one", *CONFIGS[1], False, False),
    ("split-dot16-one", *CONFIGS[0], True, False), ("split-s1-one", *CONFIGS[1], True, True),
    ("split-s2-one", *CONFIGS[0], True, True), ("split-dot16-one", *CONFIGS[1], True, True)])
def test_one_launch(rng, config, E, top_k, D, F, norm, int8):
    if int8:  # check_int8 renormalises
        check_int8(rng, 1, E, D, F, top_k, config=ONE_LAUNCH_CONFIGS[config])
    else:
        check(rng, 1, E, D, F, top_k, norm_topk_prob=norm, config=ONE_LAUNCH_CONFIGS[config])


def test_fold_accumulator_height():
    from pallas_kernels.moe.triton_moe import GEMV_ACC2D_MAX, _acc_rows

    # gate and up over 256 columns: 512 accumulator values a row; 32 rows fill GEMV_ACC2D_MAX
    assert GEMV_ACC2D_MAX == 16384
    assert _acc_rows(32, 512, False) == _acc_rows(32, 512, True) == 32  # the whole step fits: no pieces
    assert _acc_rows(64, 512, False) == 0  # reduced every step
    assert _acc_rows(64, 512, True) == _acc_rows(128, 512, True) == 32  # pieces of 32 rows
    assert _acc_rows(128, 256, True) == 64 and _acc_rows(16, 2**15, True) == 1


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("variant", [dict(), dict(prefetch=1, h_in_down=True), dict(prefetch=2, merge=True)],
                         ids=["plain", "prefetch-hdown", "prefetch2-merge"])
def test_fold_tall_k_steps(rng, monkeypatch, int8, variant):
    # TritonMoEConfig.fold with the accumulator capped at 128 values: gate/up (2 x 16 columns) loads each 16-row
    # k-step as 4 pieces of 4 rows, the down kernel (16 columns) as 2 of 8; a piece read at the wrong rows, or
    # one left out of the sum, fails the comparison
    from pallas_kernels.moe import triton_moe

    monkeypatch.setattr(triton_moe, "GEMV_ACC2D_MAX", 128)
    config = TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2, fused_route="split",
                             topk="kernel", fold=True, **variant)
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("variant", [dict(), dict(prefetch=1, h_in_down=True), dict(prefetch=2, fold=True),
                                     dict(persistent=4, prefetch=1)],
                         ids=["plain", "prefetch-hdown", "prefetch2-fold", "program-per-unit"])
def test_persistent_gate_up(rng, monkeypatch, int8, variant):
    # TritonMoEConfig.persistent on a 1-SM device: 3 programs over the 8 choices x 2 F tiles x 2 D ranges = 32
    # units (11, 11 and 10 each, two 16-row k-steps a unit), loading ahead across the units' edges; a unit left
    # out, written to another's rows or loaded from the wrong expert, rows or columns fails the comparison. With
    # fold the accumulator is capped at 64 values, so each k-step loads as 2 pieces of 8 rows. "program-per-unit":
    # 4 programs an SM on 132 SMs is more than the units, so there is one program per unit
    from pallas_kernels.moe import triton_moe

    sms = 132 if "persistent" in variant else 1  # the SMs the interpreter plans for
    monkeypatch.setattr(triton_moe, "DEFAULT_SMS", sms)
    monkeypatch.setattr(triton_moe, "GEMV_ACC2D_MAX", 256 if variant.get("fold") else triton_moe.GEMV_ACC2D_MAX)
    config = TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2, fused_route="split",
                             topk="kernel", **{"persistent": 3, **variant})
    assert triton_moe.plan(1, 64, 32, 128, 8, config, sms=sms).gate_up_programs == (32 if sms > 1 else 3)
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_split_over_four_d_ranges(rng, int8):
    # Qwen3-30B-A3B's E and top-k at D=64: four ranges of one 16-row k-step each, the down kernel summing all four
    config = TritonMoEConfig(block_f=16, block_d=32, block_k=16, k_splits=4, fused_route="split")
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)
    # and the down kernel over two F ranges of one 16-row step each
    config = TritonMoEConfig(block_f=16, block_d=16, block_k=16, block_kf=16, k_splits=2, f_splits=2,
                             fused_route="split")
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)
    # and each down program making its two 16-row h slices from the two gate/up partials
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=dataclasses.replace(config, h_in_down=True))
    # both on the tensor cores
    config = dataclasses.replace(config, block_m=16, k_splits=4)
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)
    # and merged in the kernels: 4 partials an h tile, 16 rows an output tile; and with top-3 of 8 experts, 6 rows
    # (the merge's load masked to a power of two)
    config = dataclasses.replace(config, merge=True)
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)
    (check_int8 if int8 else check)(rng, 1, 8, 64, 32, 3, config=config)
    # and in one launch, the down work taking 8 (expert, D tile, F range) tickets per choice
    config = dataclasses.replace(config, one_launch=True)
    (check_int8 if int8 else check)(rng, 1, 128, 64, 32, 8, config=config)


@pytest.mark.parametrize("config", ["inline-dot16", "single-bd16", "split-s2", "split-s2-rank-bits"])
def test_one_token_paths_skip_dead_experts(rng, config):
    experts = check(rng, 1, 8, 32, 48, 2, bias=dead_experts_bias, config=ONE_TOKEN_CONFIGS[config])
    assert not np.isin(experts, DEAD).any()


# w8a8 (int8 weights, the dot mode): token rows and h go to the dots as int8 too. Its own bound against both the
# dequantised and the bf16 weights; a hot expert (several row tiles of one slot at T=64) and dead experts
W8A8_CONFIGS = {
    "none": TritonMoEConfig(w8a8=True, block_f=32, block_k=32, block_d=32),
    "inline": TritonMoEConfig(w8a8=True, block_f=32, block_k=32, block_d=16, fused_route="inline"),
    # the split path: x rounded in the gate/up kernel, h per row in XLA; two D ranges
    "split": TritonMoEConfig(w8a8=True, block_f=32, block_k=32, block_d=32, block_kf=32, k_splits=2,
                             fused_route="split"),
    # merge: h merged by the gate/up kernel in bf16 and rounded to int8 by each down program over its whole row
    # (test_w8a8 also at F=96: the row loaded as the next power of two, masked), the down rows summed by the last
    # program of each D tile
    "split-merge": TritonMoEConfig(w8a8=True, block_f=32, block_k=32, block_d=32, block_kf=32, k_splits=2,
                                   fused_route="split", merge=True),
}


@pytest.mark.parametrize("config,T,D,F", [("none", 1, 64, 32), ("inline", 1, 64, 32), ("inline", 1, 96, 32),
                                          ("split", 1, 128, 32), ("split-merge", 1, 128, 32),
                                          ("split-merge", 1, 64, 96), ("none", 7, 64, 32), ("none", 64, 64, 32)])
def test_w8a8(rng, config, T, D, F):
    # inline at D=64: the gate/up kernel rounds the token's row itself; at D=96 (not a power of two) XLA does
    E, top_k = 128, 8
    hot = int(rng.integers(E))
    *_, experts = check_int8(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T == 64 else None,
                             config=W8A8_CONFIGS[config], tol_deq=TOL_W8A8, tol=TOL_W8A8)
    assert T != 64 or (experts[:, 0] == hot).all()


# k-major int8 weights ([E, Out, In], QuantizedWeight.k_major) through every path: each kernel reads them through
# the same [e, In rows, Out columns] indexing (triton_moe._KMajor), so a row/column mix-up in any of them reads the
# wrong weights. D != F so a transposed tile cannot line up by accident; a hot expert at T=7 and T=64.
K_MAJOR_CASES = {
    "default-t1": (None, 1), "default-t7": (None, 7), "default-t64": (None, 64),
    "gemv1-t1": (GEMV_CONFIGS[1], 1), "gemv4-t7": (GEMV_CONFIGS[4], 7),
    "fused-gemv1": (FUSED_CONFIGS["gemv1-route_all"], 1), "fused-dot16": (FUSED_CONFIGS["dot16-route_topk"], 7),
    "inline-gemv1": (ONE_TOKEN_CONFIGS["inline-gemv1"], 1), "inline-dot16": (ONE_TOKEN_CONFIGS["inline-dot16"], 1),
    "single": (ONE_TOKEN_CONFIGS["single-bd32"], 1), "split-s2": (ONE_TOKEN_CONFIGS["split-s2-prefetch"], 1),
    "split-dot16": (ONE_TOKEN_CONFIGS["split-dot16"], 1),
    "split-dot16-merge": (ONE_TOKEN_CONFIGS["split-dot16-merge"], 1),
    "split-dot16-one": (ONE_LAUNCH_CONFIGS["split-dot16-one"], 1),
    "w8a8-none-t7": (W8A8_CONFIGS["none"], 7), "w8a8-split": (W8A8_CONFIGS["split"], 1),
    "w8a8-split-merge": (W8A8_CONFIGS["split-merge"], 1),
}


@pytest.mark.parametrize("case", list(K_MAJOR_CASES))
def test_int8_k_major(rng, case):
    config, T = K_MAJOR_CASES[case]
    E, top_k, D, F = 128, 8, 128, 64
    hot = int(rng.integers(E))
    tol = TOL_W8A8 if config is not None and config.w8a8 else None
    tols = dict(tol_deq=tol, tol=tol) if tol else {}
    *_, experts = check_int8(rng, T, E, D, F, top_k, bias=hot_expert(hot) if T > 1 else None, config=config,
                             k_major=True, **tols)
    assert T == 1 or (experts[:, 0] == hot).all()


def test_k_major_defaults_to_the_dot_mode(monkeypatch):
    # plan's GEMV default would read k-major tiles transposed through registers: moe_triton asks for the dot
    from pallas_kernels.moe import triton_moe

    seen = []
    real = triton_moe.plan
    monkeypatch.setattr(triton_moe, "plan", lambda *a, **kw: seen.append(a[5]) or real(*a, **kw))
    x = jnp.zeros((1, 32), jnp.bfloat16)
    for k_major in (False, True):
        w = [quantize_int8(jnp.ones((8, a, b), jnp.bfloat16), k_major=k_major) for a, b in ((32, 16), (32, 16),
                                                                                           (16, 32))]
        moe_triton(x, jnp.ones((8, 32), jnp.bfloat16), *w, top_k=2, norm_topk_prob=True, interpret=True)
    assert [c.block_m for c in seen] == [None, 16]


def test_split_w8a8_over_f_ranges(rng):
    # the down kernel's two F ranges of two 32-row int8 steps each, summed in XLA; four D ranges of one step
    config = dataclasses.replace(W8A8_CONFIGS["split"], k_splits=4, f_splits=2)
    check_int8(rng, 1, 128, 128, 128, 8, config=config, tol_deq=TOL_W8A8, tol=TOL_W8A8)


def test_split_w8a8_needs_a_power_of_two_d():
    # its gate/up kernel takes the max of the token's whole row, one Triton block: D=96 goes to the fallback
    config = W8A8_CONFIGS["split"]
    plan(1, 128, 64, 128, 8, config, sms=132)
    with pytest.raises(NotImplementedError, match="power|D=96"):
        plan(1, 96, 64, 128, 8, config, sms=132)


def test_w8a8_skips_dead_experts(rng):
    # int8 in every expert, NaN in the scales of those no token chose (check_int8 poisons them)
    *_, experts = check_int8(rng, 8, 8, 32, 64, 2, bias=dead_experts_bias, config=W8A8_CONFIGS["none"],
                             tol_deq=TOL_W8A8, tol=TOL_W8A8)
    assert not np.isin(experts, DEAD).any()


def test_fused_combine_is_a_tuner_candidate():
    # benchmarks/moe.py --tune tries fused_combine (each routing, both modes) beside the other configs at decode
    # sizes, and every candidate plans at the Qwen3-30B-A3B shape (Triton block rules)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, as tests/test_plot.py
    from benchmarks.moe import FAMILIES, SHAPES, one_launch_configs, triton_configs, wide_configs

    D, F, E, K = SHAPES["30b"]
    for T in (1, 8):
        configs = triton_configs(T, E, K, F, quick=False)
        fused = [c for c in configs if c.fused_combine]
        assert {(c.fused_route, c.block_m < 16) for c in fused} == {(r, g) for r in ("none", "topk", "all")
                                                                    for g in (True, False)}
        for c in configs:
            plan(T, D, F, E, K, c, sms=132)
    assert not any(c.fused_combine for c in triton_configs(64, E, K, F, quick=False))
    # the inline routing at T=1 only, both modes
    inline = [c for c in triton_configs(1, E, K, F, quick=True) if c.fused_route == "inline"]
    assert {c.block_m < 16 for c in inline} == {True, False}
    assert not any(c.fused_route == "inline" for c in triton_configs(8, E, K, F, quick=False))
    # and the one-kernel path, at T=1 only
    assert any(c.fused_route == "single" for c in triton_configs(1, E, K, F, quick=True))
    assert not any(c.fused_route == "single" for c in triton_configs(8, E, K, F, quick=False))
    # and the split two-kernel path, at T=1 only, every candidate's blocks fitting the shape
    split = [c for c in triton_configs(1, E, K, F, quick=True) if c.fused_route == "split"]
    assert split and {c.k_splits for c in split} >= {2, 4, 8}
    for c in split:
        plan(1, 2048, F, E, K, c, sms=132)
    # h made in the down kernel, with and without the down kernel's merge (the "hdown" family, a default one)
    assert {c.merge for c in split if c.h_in_down} == {True, False}
    assert not any(c.fused_route == "split" for c in triton_configs(8, E, K, F, quick=False))
    # the split path in every in-kernel routing x int8 conversion, inline in both routings; routed once before
    # the kernels (the "routed" family), both ways, in both modes, with and without the kernels' merge
    in_kernel = [c for c in split if c.topk in IN_KERNEL_TOPKS]
    assert {(c.topk, c.dequant) for c in in_kernel} == {(t, d) for t in IN_KERNEL_TOPKS for d in DEQUANTS}
    assert {c.topk for c in inline} == set(IN_KERNEL_TOPKS)
    routed = [c for c in split if c.topk in ROUTED_TOPKS]
    assert {(c.topk, c.block_m, c.merge) for c in routed} == {
        (t, bm, m) for t in ROUTED_TOPKS for bm in (None, 16) for m in (False, True)} - {
        (t, 16, False) for t in ROUTED_TOPKS}
    # and routed by the kernel with h made in the down kernel, with and without its merge
    assert {c.merge for c in routed if c.h_in_down and c.topk == "kernel"} == {True, False}
    # and tall k-steps folded into the accumulator (the "fold" family), h made in XLA and in the down kernel
    fold = [c for c in split if c.fold]
    assert fold and {c.h_in_down for c in fold} == {True, False} and {c.block_k for c in fold} >= {64, 128}
    # and the deeper ones (FOLD_DEEP): 16 warps, two D ranges, one step ahead
    assert {c.prefetch for c in fold} == {0, 1} and 16 in {c.num_warps for c in fold}
    assert 2 in {c.k_splits for c in fold}
    # the gate/up kernel as 1 and 2 programs an SM over short units ("persist"), beside a program per unit, only
    # when asked for (it lost every trial on the H200)
    persist = triton_configs(1, E, K, F, quick=True, families=("persist",))
    assert {c.persistent for c in persist} == {0, 1, 2} and all(c.topk in ROUTED_TOPKS for c in persist)
    assert not any(c.persistent for c in split)
    assert not TritonMoEConfig().fused_combine  # the default stays unfused until the tuned table picks it
    # the "wide" family only when asked for (it lost every trial on the H200)
    wide = set(wide_configs(D, F))
    assert wide and wide <= set(triton_configs(1, E, K, F, quick=True, families=FAMILIES))
    assert not wide & set(triton_configs(1, E, K, F, quick=True))
    # and "one" (slower than two launches at Qwen3-30B with bf16 weights): the merge family in one launch
    one = set(one_launch_configs(D, F))
    assert one and all(c.one_launch and c.merge for c in one)
    assert one <= set(triton_configs(1, E, K, F, quick=True, families=FAMILIES))
    assert not one & set(triton_configs(1, E, K, F, quick=True))
    # the in-kernel merge at T=1, in both modes, both shapes' blocks fitting
    for shape in ("30b", "235b"):
        D, F, E, K = SHAPES[shape]
        merged = [c for c in triton_configs(1, E, K, F, quick=True, D=D) if c.merge]
        assert {c.block_m == 16 for c in merged} == {True, False}
        for c in merged:
            plan(1, D, F, E, K, c, sms=132)


def test_moe_one_refuses_a_bad_config(capsys):
    # the profiler's target program: a bad --config is one readable line and exit code 2, before any work
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import moe_one

    for bad, said in (("[1, 2]", "JSON object"), ("{not json", "--config"), ('{"block_q": 1}', "block_q"),
                      ('{"topk": "sort"}', "topk")):
        with pytest.raises(SystemExit) as e:
            moe_one.main(["--config", bad])
        assert e.value.code == 2
        assert said in capsys.readouterr().err


def test_moe_benchmark_refuses_a_bad_format(capsys, monkeypatch):
    # --formats names the weight formats --tune searches: anything else is exit code 2 naming the option
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import moe as moe_bench

    for bad in ("int4", "bf16,int8kk", ","):
        monkeypatch.setattr(sys, "argv", ["moe.py", "--tune", "--formats", bad])
        with pytest.raises(SystemExit) as e:
            moe_bench.main()
        assert e.value.code == 2 and "--formats" in capsys.readouterr().err


def test_group_by_expert():
    experts = jnp.array([[3, 1], [1, 0], [3, 2]], jnp.int32)  # pairs 0..5 -> experts 3 1 1 0 3 2
    order, meta = group_by_expert(experts, 8, 6)
    flat = np.asarray(experts).reshape(-1)
    assert list(flat[np.asarray(order)]) == [0, 1, 1, 2, 3, 3]
    assert np.asarray(meta).tolist() == [[0, 0, 1, 0], [1, 1, 2, 0], [2, 3, 1, 0], [3, 4, 2, 0],
                                         [0, 6, 0, 0], [0, 6, 0, 0]]


def test_group_by_expert_one_token():
    # one token: pair k is slot k, unsorted (its experts are distinct); every slot holds one pair
    order, meta = group_by_expert(jnp.array([[5, 2, 7]], jnp.int32), 8, 3)
    assert np.asarray(order).tolist() == [0, 1, 2]
    assert np.asarray(meta).tolist() == [[5, 0, 1, 0], [2, 1, 1, 0], [7, 2, 1, 0]]


def test_plan_defaults():
    # decode: 8 touched experts of one row each, GEMV mode with wide column blocks; T=2: one pass serves every
    # row a slot can hold; T=8 (~1.2 rows per touched expert) and T=64 (~4): the dot mode, narrow column blocks
    # for parallelism; T=256: wider row tiles
    p = plan(1, 2048, 768, 128, 8, TritonMoEConfig(), sms=132)
    assert p.gemv and (p.block_m, p.block_f, p.block_d, p.block_k, p.block_kf, p.num_slots) == (1, 64, 64, 128, 128, 8)
    p = plan(2, 2048, 768, 128, 8, TritonMoEConfig(), sms=132)
    assert p.gemv and p.block_m == 2
    for T in (8, 64):
        p = plan(T, 2048, 768, 128, 8, TritonMoEConfig(), sms=132)
        assert not p.gemv and (p.block_m, p.block_k, p.block_kf) == (16, 128, 128)
    assert plan(1, 2048, 768, 128, 8, TritonMoEConfig(block_m=16), sms=132).block_f == 32
    p = plan(256, 4096, 1536, 128, 8, TritonMoEConfig(), sms=132)
    assert (p.block_m, p.block_f, p.block_d, p.num_slots) == (32, 64, 64, 128)
    # fused_combine: T * D / block_d down programs, narrow enough to cover the SMs
    assert plan(1, 2048, 768, 128, 8, TritonMoEConfig(fused_combine=True), sms=132).block_d == 16
    assert plan(8, 2048, 768, 128, 8, TritonMoEConfig(fused_combine=True), sms=132).block_d == 64
    p = plan(1, 2048, 768, 128, 8, TritonMoEConfig(fused_combine=True, fused_route="all"), sms=132)
    assert p.fused_route == "all" and p.route_block_k == 128


@pytest.mark.parametrize("kw,x_dtype,quant", [
    (dict(T=MAX_TOKENS + 1), jnp.bfloat16, (False, False, False)),
    (dict(), jnp.float32, (False, False, False)),
    (dict(), jnp.bfloat16, (True, False, False)),
    (dict(D=40), jnp.bfloat16, (False, False, False)),
    (dict(config=TritonMoEConfig(block_f=64)), jnp.bfloat16, (False, False, False)),
    (dict(E=6, config=TritonMoEConfig(fused_combine=True, fused_route="topk")), jnp.bfloat16, (False,) * 3),
    (dict(config=TritonMoEConfig(fused_route="inline")), jnp.bfloat16, (False,) * 3),  # inline is T=1 only
    (dict(config=TritonMoEConfig(fused_route="single")), jnp.bfloat16, (False,) * 3),  # so is single
    (dict(config=TritonMoEConfig(w8a8=True)), jnp.bfloat16, (False,) * 3),  # w8a8 needs int8 weights
    (dict(config=TritonMoEConfig(w8a8=True, block_f=16)), jnp.bfloat16, (True,) * 3),  # int8 dots: K >= 32
])
def test_unsupported_raise_not_implemented(kw, x_dtype, quant):
    T, D, E, F = kw.get("T", 4), kw.get("D", 64), kw.get("E", 8), 48
    x = jnp.zeros((T, D), x_dtype)
    ws = [jnp.zeros(s, x_dtype) for s in ((E, D, F), (E, D, F), (E, F, D))]
    ws = [quantize_int8(w) if q else w for w, q in zip(ws, quant, strict=True)]
    with pytest.raises(NotImplementedError):
        moe_triton(x, jnp.zeros((E, D), x_dtype), *ws, top_k=2, norm_topk_prob=True, config=kw.get("config"),
                   interpret=True)
    # the dispatcher falls back to the reference for what the kernel declines, unless the kernel was forced
    if not kw.get("config"):
        dispatch.moe(x, jnp.zeros((E, D), x_dtype), *ws, top_k=2, norm_topk_prob=True)
        with pytest.raises(NotImplementedError):
            dispatch.moe(x, jnp.zeros((E, D), x_dtype), *ws, top_k=2, norm_topk_prob=True, impl="triton")


def test_config_validates_itself():
    for kw in (dict(block_m=24), dict(block_m=3), dict(block_m=0), dict(block_f=8), dict(block_m=256),
               dict(block_k=1024), dict(num_warps=3), dict(num_stages=0), dict(fused_route="all"),
               dict(fused_combine=True, fused_route="yes"), dict(fused_combine=True, fused_route="inline"),
               dict(fused_combine=True, fused_route="single"), dict(block_m=16, fused_route="single"),
               dict(w8a8=True, block_m=1), dict(w8a8=True, fused_combine=True), dict(w8a8=True, fused_route="single"),
               dict(k_splits=2), dict(k_splits=3, fused_route="split"), dict(block_m=32, fused_route="split"),
               dict(block_m=4, fused_route="split"), dict(w8a8=True, block_m=1, fused_route="split"),
               dict(fused_combine=True, fused_route="split"), dict(f_splits=2), dict(f_splits=3, fused_route="split"),
               dict(dequant="magic"), dict(topk="sort"), dict(merge=True), dict(merge=True, fused_route="inline"),
               dict(merge=True, w8a8=True, fused_route="split", one_launch=True),
               dict(one_launch=True, fused_route="split"), dict(prefetch=1), dict(prefetch=1, fused_route="inline"),
               dict(prefetch=1, block_m=16, fused_route="split"), dict(prefetch=3, fused_route="split"),
               dict(prefetch=-1, fused_route="split"), dict(h_in_down=True),
               dict(h_in_down=True, fused_route="inline"), dict(h_in_down=True, block_m=16, fused_route="split"),
               dict(h_in_down=True, one_launch=True, merge=True, fused_route="split"), dict(topk="kernel"),
               dict(topk="xla", fused_route="inline"), dict(topk="xla", fused_route="single"),
               dict(topk="kernel", fused_route="split", merge=True, one_launch=True), dict(fold=True),
               dict(fold=True, fused_route="inline"), dict(fold=True, block_m=16, fused_route="split"),
               dict(fold=True, w8a8=True, fused_route="split"), dict(persistent=1),
               dict(persistent=1, fused_route="split"), dict(persistent=1, fused_route="split", topk="rank"),
               dict(persistent=1, fused_route="split", topk="kernel", merge=True),
               dict(persistent=1, fused_route="split", topk="kernel", block_m=16),
               dict(persistent=5, fused_route="split", topk="kernel"),
               dict(persistent=-1, fused_route="split", topk="kernel")):
        with pytest.raises(ValueError):
            TritonMoEConfig(**kw)
    for bm in (1, 2, 4, 8, 16, 128):  # GEMV rows per pass, dot rows
        TritonMoEConfig(block_m=bm)


def test_registered_and_dispatched(rng, monkeypatch):
    fn, available = IMPLEMENTATIONS["triton"]
    assert fn is moe_triton and available is triton_available
    assert triton_available() is ON_GPU
    x, router, wg, wu, wd = (jnp.asarray(a, jnp.bfloat16) for a in bf16_inputs(rng, 7, 8, 32, 48, 2))
    ref = moe_reference(x, router, wg, wu, wd, top_k=2, norm_topk_prob=True)
    if not ON_GPU:  # the CPU gets the reference through the public op
        np.testing.assert_array_equal(np.asarray(moe_op(x, router, wg, wu, wd, top_k=2, norm_topk_prob=True)),
                                      np.asarray(ref))
    # a tuned-table entry picks the implementation and its config
    calls = []
    monkeypatch.setitem(IMPLEMENTATIONS, "triton", (lambda *a, config=None, **k: calls.append(config) or ref,
                                                    available))
    monkeypatch.setattr(tuning, "lookup", lambda op, key: {"impl": "triton", "config": {"block_m": 16}})
    dispatch.moe(x, router, wg, wu, wd, top_k=2, norm_topk_prob=True)
    assert calls == [{"block_m": 16}]
    assert dispatch.shape_key(x.shape, quantize_int8(wg), 2, x.dtype) == "T7-D32-F48-E8-K2-bfloat16-wint8"


# (T, D, F, E, top_k, int8): the benchmark's shapes, Qwen3-30B-A3B and Qwen3-235B-A22B
LOWERING = [
    (1, 2048, 768, 128, 8, False),
    (64, 2048, 768, 128, 8, False),
    (256, 2048, 768, 128, 8, True),
    (8, 4096, 1536, 128, 8, False),
    (256, 4096, 1536, 128, 8, False),
    (1, 4096, 1536, 128, 8, True),
    (1, 4096, 1536, 128, 8, "k_major"),  # every path reads [E, Out, In] weights through the same indexing
    (64, 2048, 768, 128, 8, "k_major"),
]


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles for real in the other tests")
@pytest.mark.parametrize("T,D,F,E,top_k,int8", LOWERING)
def test_lowers_to_triton(T, D, F, E, top_k, int8):
    # Pallas' Triton lowering runs on the CPU for a CUDA target given an abstract GPU; this catches what the
    # interpreter ignores (block sizes, dot shapes, unsupported ops)
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    sds = jax.ShapeDtypeStruct

    def w(a, b):
        if int8 == "k_major":
            return QuantizedWeight(sds((E, b, a), jnp.int8), sds((E, b), jnp.float32), True)
        if int8:
            return QuantizedWeight(sds((E, a, b), jnp.int8), sds((E, b), jnp.float32))
        return sds((E, a, b), jnp.bfloat16)

    args = (sds((T, D), jnp.bfloat16), sds((E, D), jnp.bfloat16), w(D, F), w(D, F), w(F, D))
    # default (GEMV at T=1 here, the dot beyond), the dot forced, GEMV forced with long k-steps; fused_combine in
    # both modes with each routing (a third kernel with the Pallas routing)
    configs = [None, TritonMoEConfig(block_m=64, block_f=64, block_d=128, block_k=64, block_kf=256, num_warps=8),
               TritonMoEConfig(block_m=2, block_f=16, block_d=64, block_k=512, block_kf=256, num_warps=8),
               TritonMoEConfig(fused_combine=True),
               TritonMoEConfig(block_m=16, block_d=32, block_kf=256, fused_combine=True, fused_route="topk"),
               TritonMoEConfig(block_m=1, fused_combine=True, fused_route="all", num_warps=8)]
    if T == 1:  # the gate/up kernel routes, both modes
        configs += [TritonMoEConfig(block_m=16, block_f=32, block_d=32, fused_route="inline"),
                    TritonMoEConfig(block_m=1, fused_route="inline"),
                    TritonMoEConfig(block_f=32, block_d=256, block_k=256, fused_route="single"),
                    TritonMoEConfig(block_f=32, block_d=32, block_k=128, k_splits=2, fused_route="split"),
                    TritonMoEConfig(block_f=128, block_d=64, block_k=64, k_splits=8, fused_route="split",
                                    topk="rank", dequant="bits"),
                    TritonMoEConfig(block_m=1, fused_route="inline", topk="rank", dequant="bits"),
                    TritonMoEConfig(block_m=16, block_f=128, block_d=128, block_k=64, block_kf=64, k_splits=8,
                                    f_splits=2, fused_route="split", topk="rank"),
                    TritonMoEConfig(block_f=128, block_d=64, block_k=64, k_splits=8, fused_route="split",
                                    topk="rank", dequant="bits", merge=True),
                    TritonMoEConfig(block_m=16, block_f=128, block_d=128, block_k=64, block_kf=64, k_splits=8,
                                    f_splits=2, fused_route="split", topk="rank", merge=True),
                    TritonMoEConfig(block_m=16, block_f=128, block_d=128, block_k=64, block_kf=64, k_splits=8,
                                    f_splits=2, fused_route="split", topk="rank", merge=True, one_launch=True),
                    # routed once before the kernels: by a third Triton kernel, and by XLA
                    TritonMoEConfig(block_f=256, block_d=256, block_k=32, block_kf=32, k_splits=8, f_splits=4,
                                    num_warps=8, fused_route="split", topk="kernel", dequant="prmt", prefetch=1),
                    TritonMoEConfig(block_m=16, block_f=128, block_d=128, block_k=64, block_kf=64, k_splits=8,
                                    f_splits=2, fused_route="split", topk="xla", merge=True),
                    # tall k-steps folded into one accumulator (two 32-row pieces a step), h made in the down kernel
                    TritonMoEConfig(block_f=256, block_d=256, block_k=64, block_kf=64, k_splits=8, f_splits=4,
                                    num_warps=8, fused_route="split", topk="kernel", dequant="prmt", prefetch=1,
                                    h_in_down=True, fold=True),
                    # the gate/up kernel as one program an SM over short units, two steps ahead, and none ahead
                    TritonMoEConfig(block_f=256, block_d=256, block_k=64, block_kf=64, k_splits=16, f_splits=4,
                                    num_warps=8, fused_route="split", topk="kernel", dequant="prmt", prefetch=2,
                                    fold=True, persistent=1),
                    TritonMoEConfig(block_f=128, block_d=256, block_k=32, block_kf=32, k_splits=16, f_splits=4,
                                    fused_route="split", topk="xla", persistent=2)]
    if int8:  # int8 x int8 dots, both routings at T=1
        configs += [TritonMoEConfig(w8a8=True)] + ([TritonMoEConfig(w8a8=True, block_f=64, block_d=64,
                                                                    fused_route="inline"),
                                                    TritonMoEConfig(w8a8=True, block_f=128, block_d=128, block_k=64,
                                                                    block_kf=64, k_splits=8, f_splits=2,
                                                                    fused_route="split", topk="rank"),
                                                    TritonMoEConfig(w8a8=True, block_f=128, block_d=128, block_k=128,
                                                                    block_kf=128, k_splits=4, f_splits=2,
                                                                    fused_route="split", topk="kernel", merge=True)]
                                                   if T == 1 else [])
    a100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA A100-SXM4-80GB", 108, "gpu"))
    with jax.sharding.use_abstract_mesh(a100):
        for config in configs:
            fn = jax.jit(lambda *a, c=config: moe_triton(*a, top_k=top_k, norm_topk_prob=True, config=c))
            text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            routed = config is not None and (config.fused_route in ("topk", "all") or config.topk == "kernel")
            single = config is not None and (config.fused_route == "single" or config.one_launch)
            assert text.count("__gpu$xla.gpu.triton") == (1 if single else 2 + routed)


def test_benchmark_ratios():
    # benchmarks/moe.py: each timed row's ratio to ours in the same run; a failed or skipped row has none
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.moe import add_ratios

    rows = add_ratios([{"impl": "ours", "us": 37.3}, {"impl": "ours_int8", "us": 27.0},
                       {"impl": "ragged_dot", "us": 315.3}, {"impl": "mosaic", "error": "skipped"},
                       {"impl": "chain_floor", "us": -1.3}, {"impl": "ours_int8k", "us": 20.0}])
    assert rows[1]["x bf16"] == 1.38 and rows[2]["ours x"] == 8.45 and rows[5]["x bf16"] == 1.86
    assert "ours x" not in rows[0] and "ours x" not in rows[3] and "ours x" not in rows[4]
    assert "ours x" not in rows[5]
    # without a time for ours nothing is compared
    assert "x bf16" not in add_ratios([{"impl": "ours", "error": "x"}, {"impl": "ours_int8", "us": 27.0}])[1]


def test_tuned_entries_are_candidates_of_the_search():
    # every entry of the committed MoE table still builds as the search loop's candidate (the tune times the
    # table's entry beside its families: tuning.with_incumbent), and an entry a family holds is not added twice
    import sys
    from pathlib import Path

    from conftest import tuned_entries

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, as tests/test_plot.py
    from benchmarks.moe import SHAPES, candidate, fold_configs, kmajor_configs, routed_configs

    for e in tuned_entries("moe"):
        c = candidate(e["impl"], e["config"], 8)
        assert c.impl == e["impl"] and c.fn.keywords["config"] == c.config
    # the H200's T=1 entries are in their families: Qwen3-30B's bf16 in "routed", its int8 and Qwen3-235B's int8
    # in "fold", both k-major int8 entries in "kmajor" or "kmerge"
    kmajor = lambda D, F: kmajor_configs(1, 128, 8, D, F, quick=True, families=("kmajor", "kmerge"))  # noqa: E731
    for shape, w, configs in (("30b", "bfloat16", routed_configs), ("30b", "int8", fold_configs),
                              ("235b", "int8", fold_configs), ("30b", "int8k", kmajor), ("235b", "int8k", kmajor)):
        D, F, E, K = SHAPES[shape]
        family = [candidate("triton", c, K) for c in configs(D, F)]
        e = tuning.lookup("moe", f"T1-D{D}-F{F}-E{E}-K{K}-bfloat16-w{w}", kind="NVIDIA H200")
        assert e is not None and e["config"]["topk"] == "kernel"
        assert tuning.with_incumbent(family, e, lambda i, cfg, K=K: candidate(i, cfg, K)) == family
