"""codegen_jax.sampling: greedy rows, top-k / top-p filters against a naive numpy version, per-row parameters,
reproducible per-(seed, position) keys, and chi-square checks of the sampled distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_jax.sampling import SamplingParams, filter_logits, sample, token_keys

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}

sample_jit = jax.jit(sample)
filter_jit = jax.jit(filter_logits)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def naive_keep(logits, temperature, top_k, top_p):
    """Boolean mask of the tokens one row keeps: the k largest tempered logits, then of those the smallest
    prefix (by decreasing probability, renormalised over the top-k) whose mass reaches top_p."""
    lg = np.asarray(logits, np.float64) / temperature
    V = lg.size
    order = np.argsort(-lg, kind="stable")
    k = V if top_k == 0 else min(top_k, V)
    kept = order[:k]
    p = softmax64(lg[kept])
    cum = np.cumsum(p)
    n = int(np.searchsorted(cum, top_p)) + 1 if top_p < 1 else k  # smallest n with cum[n-1] >= top_p
    n = max(1, min(n, k))
    mask = np.zeros(V, bool)
    mask[kept[:n]] = True
    return mask


def well_separated_logits(rng, B, V, scale=2.0):
    """Random logits with no two within 1e-4 of each other, so float32 rounding cannot reorder them."""
    out = []
    while len(out) < B:
        lg = scale * rng.standard_normal(V)
        s = np.sort(lg)
        if np.min(np.diff(s)) < 1e-4:
            continue
        out.append(lg)
    return np.array(out, np.float32)


def call_filter(logits, temperature, top_k, top_p):
    return np.asarray(filter_jit(jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32),
                                 jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))


def call_sample(logits, seeds, positions, temperature, top_k, top_p):
    return np.asarray(sample_jit(jnp.asarray(logits, jnp.float32), jnp.asarray(seeds, jnp.uint32),
                                 jnp.asarray(positions, jnp.int32), jnp.asarray(temperature, jnp.float32),
                                 jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))


def chi_square(counts, probs):
    """Pearson statistic over cells with nonzero probability; cells with zero probability must be empty."""
    counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
    assert counts[probs == 0].sum() == 0, f"drew filtered-out tokens: {counts[probs == 0]}"
    live = probs > 0
    expected = probs[live] * counts.sum()
    assert expected.min() >= 5  # the chi-square approximation needs it
    return float(((counts[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1


# --- greedy -------------------------------------------------------------------------------------------------

def test_temperature_zero_rows_are_argmax_in_a_sampling_batch(rng):
    B, V = 8, 1000
    logits = rng.standard_normal((B, V)).astype(np.float32)
    temperature = np.array([0, 1.0, 0, 0.7, 0, 1.5, 0, 0], np.float32)
    top_k = np.array([0, 0, 5, 0, 1, 50, 0, 3])  # filters on greedy rows must not matter either
    top_p = np.array([1, 1, 0.5, 0.9, 1, 0.3, 0.1, 1], np.float32)
    for pos in range(5):
        seeds = rng.integers(0, 2**32, B)
        tok = call_sample(logits, seeds, np.full(B, pos), temperature, top_k, top_p)
        assert tok.dtype == np.int32 and tok.shape == (B,)
        greedy = temperature == 0
        np.testing.assert_array_equal(tok[greedy], np.argmax(logits[greedy], -1))
        assert np.all((tok >= 0) & (tok < V))


def test_all_greedy_batch_is_argmax(rng):
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    tok = call_sample(logits, rng.integers(0, 2**32, 5), np.arange(5), np.zeros(5), np.zeros(5), np.ones(5))
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))


def test_top_k_one_is_argmax_at_any_temperature(rng):
    B, V = 16, 257
    logits = well_separated_logits(rng, B, V)
    tok = call_sample(logits, rng.integers(0, 2**32, B), rng.integers(0, 10**6, B),
                      rng.uniform(0.1, 3.0, B), np.ones(B), np.ones(B))
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))


# --- filter_logits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 10, 63, 64])
def test_top_k_keeps_exactly_the_k_largest(rng, k):
    B, V = 4, 64
    # moderate logits: every token's probability stays far above float32 resolution, so this tests top-k
    # alone (see test_top_p_one_disables_filter for what happens to tokens below it)
    logits = well_separated_logits(rng, B, V, scale=0.4)
    temperature = np.array([1.0, 0.5, 2.0, 1.3], np.float32)
    out = call_filter(logits, temperature, np.full(B, k), np.ones(B))
    for b in range(B):
        keep = np.zeros(V, bool)
        keep[np.argsort(-logits[b])[:k]] = True
        assert np.isfinite(out[b]).sum() == k
        np.testing.assert_array_equal(np.isfinite(out[b]), keep)
        assert np.all(out[b][~keep] == -np.inf)
        np.testing.assert_allclose(out[b][keep], logits[b][keep] / temperature[b], rtol=1e-6)


def test_top_k_zero_or_above_vocab_keeps_everything(rng):
    V = 50
    logits = well_separated_logits(rng, 3, V, scale=1.0)
    out = call_filter(logits, np.ones(3), np.array([0, V, 10 * V]), np.ones(3))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, logits, rtol=1e-6)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.99])
def test_top_p_keeps_smallest_prefix_reaching_p(rng, top_p):
    B, V = 6, 100
    logits = []
    while len(logits) < B:  # reject rows where some prefix mass is within 1e-4 of top_p (rounding ambiguity)
        lg = well_separated_logits(rng, 1, V, scale=2.0)[0]
        if np.min(np.abs(np.cumsum(np.sort(softmax64(lg))[::-1]) - top_p)) > 1e-4:
            logits.append(lg)
    logits = np.array(logits)
    out = call_filter(logits, np.ones(B), np.zeros(B), np.full(B, top_p))
    for b in range(B):
        want = naive_keep(logits[b], 1.0, 0, top_p)
        np.testing.assert_array_equal(np.isfinite(out[b]), want)
        # the kept set is the smallest prefix whose mass reaches top_p
        p = np.sort(softmax64(logits[b]))[::-1]
        n = want.sum()
        assert p[:n].sum() >= top_p and (n == 1 or p[: n - 1].sum() < top_p)


def test_top_p_always_keeps_at_least_one(rng):
    # a dominant token whose own mass exceeds top_p, and a tiny top_p on a flat distribution
    V = 32
    logits = np.zeros((3, V), np.float32)
    logits[0, 7] = 20.0
    logits[1] = rng.standard_normal(V)
    logits[2] = np.linspace(0, 1, V)  # distinct values, nearly flat
    out = call_filter(logits, np.ones(3), np.zeros(3), np.array([0.5, 1e-6, 1e-3], np.float32))
    assert (np.isfinite(out).sum(-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(logits, -1))


@pytest.mark.parametrize("top_k,top_p", [(5, 0.5), (20, 0.9), (3, 0.99), (50, 0.3), (1, 0.9)])
def test_top_k_and_top_p_combined(rng, top_k, top_p):
    # top-k first, then top-p over the top-k renormalised (Hugging Face's order)
    B, V = 4, 100
    rows = []
    while len(rows) < B:
        lg = well_separated_logits(rng, 1, V, scale=1.5)[0]
        p = np.sort(softmax64(np.sort(lg)[::-1][:top_k]))[::-1]
        if np.min(np.abs(np.cumsum(p) - top_p)) > 1e-4:
            rows.append(lg)
    logits = np.array(rows)
    out = call_filter(logits, np.ones(B), np.full(B, top_k), np.full(B, top_p))
    for b in range(B):
        want = naive_keep(logits[b], 1.0, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(out[b]), want)
        assert want.sum() <= top_k


def test_per_row_parameters_in_one_batch(rng):
    # every row's filter equals the same row filtered on its own
    V = 200
    temperature = np.array([1.0, 0.3, 2.0, 0.7, 1.0, 1.2], np.float32)
    top_k = np.array([0, 5, 0, 40, 1, 17])
    top_p = np.array([1.0, 1.0, 0.6, 0.85, 0.5, 0.95], np.float32)
    B = len(temperature)
    rows = []
    while len(rows) < B:
        b = len(rows)
        lg = well_separated_logits(rng, 1, V, scale=0.5)[0]
        tl = np.sort(lg / temperature[b])[::-1][: (top_k[b] or V)]
        if top_p[b] == 1 or np.min(np.abs(np.cumsum(softmax64(tl)) - top_p[b])) > 1e-4:
            rows.append(lg)
    logits = np.array(rows, np.float32)
    out = call_filter(logits, temperature, top_k, top_p)
    for b in range(B):
        want = naive_keep(logits[b], temperature[b], top_k[b], top_p[b])
        np.testing.assert_array_equal(np.isfinite(out[b]), want, err_msg=f"row {b}")
        np.testing.assert_allclose(out[b][want], logits[b][want] / temperature[b], rtol=1e-6)
        alone = call_filter(logits[b: b + 1], temperature[b: b + 1], top_k[b: b + 1], top_p[b: b + 1])
        np.testing.assert_array_equal(alone[0], out[b])


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_one_disables_filter(top_k):
    # probabilities ~[1, 4.5e-5, 2e-9, 3e-10]: cumsum reaches 1.0f after two tokens, so the last two go to -inf,
    # also with top_k=4 (= V), where top-k alone should keep all four
    logits = np.array([[10.0, 0.0, -10.0, -12.0]], np.float32)
    out = call_filter(logits, np.ones(1), np.full(1, top_k), np.ones(1))
    assert np.isfinite(out).all()


# --- keys and reproducibility ---------------------------------------------------------------------------------

def test_same_seed_and_position_same_token_regardless_of_batch(rng):
    V = 1000
    logits = rng.standard_normal(V).astype(np.float32)
    seed, pos = int(rng.integers(0, 2**32)), int(rng.integers(0, 10**6))
    alone = call_sample(logits[None], [seed], [pos], [1.0], [0], [1.0])[0]
    # same request as row 3 of a batch whose other rows differ in everything
    B = 6
    batch_logits = rng.standard_normal((B, V)).astype(np.float32)
    batch_logits[3] = logits
    seeds = rng.integers(0, 2**32, B)
    seeds[3] = seed
    positions = rng.integers(0, 10**6, B)
    positions[3] = pos
    temps = np.array([0.0, 0.5, 2.0, 1.0, 0.0, 1.0], np.float32)
    top_k = np.array([0, 3, 0, 0, 7, 20])
    top_p = np.array([1.0, 0.5, 0.9, 1.0, 1.0, 0.8], np.float32)
    for _ in range(2):
        tok = call_sample(batch_logits, seeds, positions, temps, top_k, top_p)
        assert tok[3] == alone
    # and token_keys itself is a pure function of (seed, position)
    k1 = jax.random.key_data(token_keys(jnp.asarray([seed], jnp.uint32), jnp.asarray([pos], jnp.int32)))
    k2 = jax.random.key_data(token_keys(jnp.asarray(seeds, jnp.uint32), jnp.asarray(positions, jnp.int32)))[3]
    np.testing.assert_array_equal(np.asarray(k1[0]), np.asarray(k2))


def test_different_positions_and_seeds_give_different_draws(rng):
    # flat distribution over 1000 tokens: 200 positions of one seed should give ~180 distinct tokens;
    # identical keys would give 1
    V, n = 1000, 200
    logits = np.zeros((n, V), np.float32)
    seed = int(rng.integers(0, 2**32))
    tok = call_sample(logits, np.full(n, seed), np.arange(n), np.ones(n), np.zeros(n), np.ones(n))
    assert len(np.unique(tok)) > 150
    tok2 = call_sample(logits, rng.integers(0, 2**32, n), np.zeros(n), np.ones(n), np.zeros(n), np.ones(n))
    assert len(np.unique(tok2)) > 150
    # and the same (seed, position) pairs again give exactly the same tokens
    np.testing.assert_array_equal(
        call_sample(logits, np.full(n, seed), np.arange(n), np.ones(n), np.zeros(n), np.ones(n)), tok)
    keys = jax.random.key_data(token_keys(jnp.full(n, seed, jnp.uint32), jnp.arange(n, dtype=jnp.int32)))
    assert len({tuple(k) for k in np.asarray(keys).tolist()}) == n


# --- distributions ---------------------------------------------------------------------------------------------

LOGITS8 = np.array([1.0, -0.5, 2.0, 0.3, -1.5, 1.4, 0.0, -0.2], np.float32)
N_DRAWS = 20000


def draw(rng, temperature, top_k, top_p):
    # one batched call: N_DRAWS rows of the same logits, one seed, distinct positions
    seed = int(rng.integers(0, 2**32))
    start = int(rng.integers(0, 2**30))
    n = N_DRAWS
    tok = call_sample(np.broadcast_to(LOGITS8, (n, 8)), np.full(n, seed), start + np.arange(n),
                      np.full(n, temperature), np.full(n, top_k), np.full(n, top_p))
    return np.bincount(tok, minlength=8)


def test_temperature_distribution_chi_square(rng):
    counts = draw(rng, 0.7, 0, 1.0)
    probs = softmax64(LOGITS8 / 0.7)
    stat, df = chi_square(counts, probs)
    assert df == 7
    assert stat < CHI2_CRIT_001[df], f"chi2={stat:.2f} counts={counts} expected={probs * N_DRAWS}"


def test_top_k_distribution_chi_square(rng):
    T = 0.7
    counts = draw(rng, T, 3, 1.0)
    top3 = np.argsort(-LOGITS8)[:3]
    probs = np.zeros(8)
    probs[top3] = softmax64(LOGITS8[top3] / T)
    stat, df = chi_square(counts, probs)
    assert df == 2
    assert stat < CHI2_CRIT_001[df], f"chi2={stat:.2f} counts={counts} expected={probs * N_DRAWS}"


def test_top_p_distribution_chi_square(rng):
    T = 0.7
    full = softmax64(LOGITS8 / T)
    order = np.argsort(-full)
    cum = np.cumsum(full[order])
    assert np.min(np.abs(cum - 0.8)) > 0.01  # the cut is unambiguous for these logits
    keep = order[: int(np.searchsorted(cum, 0.8)) + 1]
    probs = np.zeros(8)
    probs[keep] = full[keep] / full[keep].sum()
    counts = draw(rng, T, 0, 0.8)
    stat, df = chi_square(counts, probs)
    assert df == len(keep) - 1 >= 2
    assert stat < CHI2_CRIT_001[df], f"chi2={stat:.2f} counts={counts} expected={probs * N_DRAWS}"


def test_chi_square_detects_wrong_temperature(rng):
    # power check for the statistical tests: draws at temperature 0.7 are rejected against temperature 1.0
    counts = draw(rng, 0.7, 0, 1.0)
    stat, df = chi_square(counts, softmax64(LOGITS8 / 1.0))
    assert stat > CHI2_CRIT_001[df]


# --- SamplingParams --------------------------------------------------------------------------------------------

def test_sampling_params_defaults_and_boundaries_are_valid():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (0.0, 0, 1.0)
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=1)
    SamplingParams(temperature=2.5, top_k=50, top_p=1e-6, max_new_tokens=4096, seed=2**32 - 1)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", -1e-9), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", float("nan")),
    ("top_k", -1),
    ("max_new_tokens", 0), ("max_new_tokens", -3),
])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
