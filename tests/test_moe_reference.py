"""moe_reference against a naive float64 per-token loop (softmax router, top-k, SwiGLU experts, weighted sum)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels.moe import moe, moe_reference

TOL = 1e-5
# well-separated top-k: tokens whose k-th and (k+1)-th router logits are closer than this are redrawn, so
# float32 rounding cannot flip which experts are chosen (that would be a tie, not a bug)
MIN_GAP = 1e-3


@functools.partial(jax.jit, static_argnames=("top_k", "norm_topk_prob"))
def _ref(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob):
    return moe_reference(x, router, w_gate, w_up, w_down, top_k=top_k, norm_topk_prob=norm_topk_prob)


def naive_routing(x, router, top_k, norm_topk_prob):
    """[T, K] expert ids and weights, float64."""
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64).T
    experts, weights = [], []
    for row in logits:
        p = np.exp(row - row.max())
        p /= p.sum()
        chosen = np.argsort(-row, kind="stable")[:top_k]
        w = p[chosen]
        if norm_topk_prob:
            w = w / w.sum()
        experts.append(chosen)
        weights.append(w)
    return np.array(experts), np.array(weights), logits


def naive_moe(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob):
    x64 = np.asarray(x, np.float64)
    wg, wu, wd = (np.asarray(w, np.float64) for w in (w_gate, w_up, w_down))
    experts, weights, _ = naive_routing(x, router, top_k, norm_topk_prob)
    out = np.zeros_like(x64)
    for t in range(x64.shape[0]):
        for e, w in zip(experts[t], weights[t], strict=True):
            g = x64[t] @ wg[e]
            u = x64[t] @ wu[e]
            h = g / (1 + np.exp(-g)) * u  # silu(g) * u
            out[t] += w * (h @ wd[e])
    return out


def near_ties(x, router, top_k):
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64).T
    srt = -np.sort(-logits, axis=-1)
    return np.abs(srt[:, top_k - 1] - srt[:, top_k]) < MIN_GAP


def make_inputs(rng, T, E, D, F, top_k, router_fn=None):
    router = rng.standard_normal((E, D)) / np.sqrt(D)
    x = rng.standard_normal((T, D))
    if router_fn is not None:
        x, router = router_fn(x, router)
    x, router = x.astype(np.float32), router.astype(np.float32)
    for _ in range(100):
        bad = near_ties(x, router, top_k)
        if not bad.any():
            break
        fresh = rng.standard_normal((int(bad.sum()), D))
        if router_fn is not None:
            fresh, _ = router_fn(fresh, router.astype(np.float64).copy())
        x[bad] = fresh.astype(np.float32)
    assert not near_ties(x, router, top_k).any()
    w_gate = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float32)
    w_up = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float32)
    w_down = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float32)
    return x, router, w_gate, w_up, w_down


def check(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob):
    want = naive_moe(x, router, w_gate, w_up, w_down, top_k=top_k, norm_topk_prob=norm_topk_prob)
    got = _ref(*map(jnp.asarray, (x, router, w_gate, w_up, w_down)), top_k=top_k, norm_topk_prob=norm_topk_prob)
    assert got.shape == x.shape and got.dtype == jnp.float32
    got = np.asarray(got)
    assert np.isfinite(got).all()
    assert np.isfinite(want).all()
    err = rel_err(got, want)
    assert err <= TOL, f"rel err {err:.3g}"
    return got, want


# (E, top_k): Qwen3-30B-A3B and a small config; small D/F keep the naive loop fast
CONFIGS = [(128, 8, 64, 32), (8, 2, 32, 16)]


@pytest.mark.parametrize("T", [1, 7, 64, 256])
@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_naive(rng, T, E, top_k, D, F, norm_topk_prob):
    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k)
    check(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_some_experts_chosen_by_no_token(rng, norm_topk_prob):
    # experts 0, 3, 5 get a hugely negative logit for every token: empty groups in the grouped matmul,
    # including the first and adjacent ones
    E, top_k, D, F, T = 8, 2, 32, 16, 64
    dead = [0, 3, 5]

    def bias(x, router):
        x = x.copy()
        x[:, 0] = 1.0
        router = router.copy()
        router[:, 0] = 0.0
        router[dead, 0] = -30.0
        return x, router

    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k, bias)
    experts, _, _ = naive_routing(x, router, top_k, norm_topk_prob)
    assert not np.isin(experts, dead).any()
    # (no NaN poisoning of the dead experts' weights here: jax.lax.ragged_dot's CPU lowering multiplies every
    # row by every expert's weights under a 0/1 mask, so NaN in an unused expert reaches every output)
    check(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=norm_topk_prob)


def test_most_experts_unused_qwen3_config(rng):
    # 3 tokens x 8 of 128 experts: at least 104 experts are empty groups; the last expert is forced in
    E, top_k, D, F, T = 128, 8, 64, 32, 3

    def bias(x, router):
        x = x.copy()
        x[:, 0] = 1.0
        router = router.copy()
        router[:, 0] = 0.0
        router[E - 1, 0] = 10.0
        return x, router

    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k, bias)
    experts, _, _ = naive_routing(x, router, top_k, True)
    assert (experts == E - 1).any(axis=1).all()
    check(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=True)


@pytest.mark.parametrize("E,top_k,D,F", CONFIGS, ids=["qwen3-30b-a3b", "small"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_one_expert_chosen_by_every_token(rng, E, top_k, D, F, norm_topk_prob):
    # expert `hot` gets a logit ~12 above the rest for every token: one group of size T, the rest share the
    # remaining T * (top_k - 1) slots
    T = 64
    hot = int(rng.integers(E))

    def bias(x, router):
        x = x.copy()
        x[:, 0] = 1.0
        router = router.copy()
        router[:, 0] = 0.0
        router[hot, 0] = 12.0
        return x, router

    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k, bias)
    experts, weights, _ = naive_routing(x, router, top_k, norm_topk_prob)
    assert (experts[:, 0] == hot).all()
    assert (weights[:, 0] > 0.9).all()
    check(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=norm_topk_prob)


def test_top_k_equals_num_experts(rng):
    # every token uses every expert: dense SwiGLU mixture; with renormalisation the weights are the full softmax
    E, D, F, T = 8, 32, 16, 7
    x, router, wg, wu, wd = make_inputs(rng, T, E, D, F, top_k=E - 1)
    check(x, router, wg, wu, wd, top_k=E, norm_topk_prob=True)
    check(x, router, wg, wu, wd, top_k=E, norm_topk_prob=False)


def test_norm_topk_prob_matters(rng):
    # guard against both sides ignoring the flag
    x, router, wg, wu, wd = make_inputs(rng, 16, 128, 64, 32, 8)
    args = tuple(map(jnp.asarray, (x, router, wg, wu, wd)))
    a = _ref(*args, top_k=8, norm_topk_prob=True)
    b = _ref(*args, top_k=8, norm_topk_prob=False)
    assert rel_err(b, a) > 0.05


def test_tokens_independent(rng):
    # each token's output depends only on itself: a batch equals its rows computed one at a time
    x, router, wg, wu, wd = make_inputs(rng, 7, 8, 32, 16, 2)
    full = np.asarray(_ref(*map(jnp.asarray, (x, router, wg, wu, wd)), top_k=2, norm_topk_prob=True))
    for t in range(7):
        one = np.asarray(_ref(*map(jnp.asarray, (x[t: t + 1], router, wg, wu, wd)), top_k=2, norm_topk_prob=True))
        np.testing.assert_allclose(one[0], full[t], rtol=1e-5, atol=1e-6)


def test_moe_alias_equals_reference(rng):
    x, router, wg, wu, wd = make_inputs(rng, 7, 8, 32, 16, 2)
    args = tuple(map(jnp.asarray, (x, router, wg, wu, wd)))
    np.testing.assert_array_equal(np.asarray(moe(*args, top_k=2, norm_topk_prob=True)),
                                  np.asarray(moe_reference(*args, top_k=2, norm_topk_prob=True)))


def hot_expert(hot):
    """A make_inputs router_fn that makes every token choose expert `hot` first: one slot holds all T pairs."""

    def bias(x, router):
        x, router = x.copy(), router.copy()
        x[:, 0], router[:, 0] = 1.0, 0.0
        router[hot, 0] = 12.0
        return x, router

    return bias
