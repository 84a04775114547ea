"""paged_attention_reference against a naive float64 loop over contiguous K/V rebuilt from the page table.

Every case uses a NaN-poisoned page pool: the whole pool starts as NaN, only the slots a sequence really owns
get values, page tables are random permutations of the pool, and page-table entries past a sequence point at
NaN pages. Query rows past q_lens are NaN too. A correct implementation never lets any of that through.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err

import pallas_kernels
from pallas_kernels.attention import paged_attention_reference

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
NP_DTYPE = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap"))
def _ref(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None):
    return paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_lens, scale=scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap)


def make_case(rng, *, T, Hq, Hkv, D, S, kv_lens, q_lens, dtype="float32", q_scale=1.0, spare_pages=2,
              spare_entries=1):
    """Random inputs in a NaN-poisoned pool. Returns (q, k_pages, v_pages, page_table, kv_lens, q_lens, k, v)
    where k[b], v[b] are the true contiguous [Hkv, kv_lens[b], D] keys/values (already rounded to dtype)."""
    kv_lens = np.asarray(kv_lens, np.int32)
    q_lens = np.asarray(q_lens, np.int32)
    B = len(kv_lens)
    assert len(q_lens) == B and np.all(q_lens <= T) and np.all(q_lens <= kv_lens)
    npd = NP_DTYPE[dtype]
    need = [math.ceil(int(L) / S) for L in kv_lens]
    N = max(max(need), 1) + spare_entries
    P = sum(need) + spare_pages
    assert spare_pages >= 1  # there must be a NaN page for the unused entries to point at
    perm = rng.permutation(P)
    used, spare = perm[: sum(need)], perm[sum(need):]
    page_table = np.empty((B, N), np.int32)
    off = 0
    for b in range(B):
        page_table[b, : need[b]] = used[off: off + need[b]]
        page_table[b, need[b]:] = rng.choice(spare, N - need[b])  # poisoned: NaN pages
        off += need[b]

    k_pages = np.full((Hkv, P, S, D), np.nan, np.float32).astype(npd)
    v_pages = np.full((Hkv, P, S, D), np.nan, np.float32).astype(npd)
    ks, vs = [], []
    for b in range(B):
        L = int(kv_lens[b])
        k = rng.standard_normal((Hkv, L, D)).astype(npd)
        v = rng.standard_normal((Hkv, L, D)).astype(npd)
        for pos in range(L):
            k_pages[:, page_table[b, pos // S], pos % S] = k[:, pos]
            v_pages[:, page_table[b, pos // S], pos % S] = v[:, pos]
        ks.append(k)
        vs.append(v)

    q = (q_scale * rng.standard_normal((B, T, Hq, D))).astype(npd)
    for b in range(B):
        q[b, q_lens[b]:] = np.nan  # padding rows are garbage too
    return q, k_pages, v_pages, page_table, kv_lens, q_lens, ks, vs


def naive(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None):
    """float64 loops: rebuild each sequence's K/V by walking its page table, then softmax attention per head."""
    B, T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    out = np.zeros((B, T, Hq, D), np.float64)
    for b in range(B):
        L, n = int(kv_lens[b]), int(q_lens[b])
        k = np.stack([np.asarray(k_pages[:, page_table[b, p // S], p % S], np.float64) for p in range(L)], 1) \
            if L else np.zeros((Hkv, 0, D))
        v = np.stack([np.asarray(v_pages[:, page_table[b, p // S], p % S], np.float64) for p in range(L)], 1) \
            if L else np.zeros((Hkv, 0, D))
        for t in range(n):
            pos = L - n + t
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(Hq):
                kh = h // G
                s = k[kh, lo: pos + 1] @ np.asarray(q[b, t, h], np.float64) * scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[b, t, h] = w @ v[kh, lo: pos + 1]
    return out


def check(rng, *, T, Hq, Hkv, D, S, kv_lens, q_lens, dtype="float32", sliding_window=None, soft_cap=None,
          q_scale=1.0, **kw):
    q, kp, vp, pt, kvl, ql, ks, vs = make_case(rng, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens,
                                                q_lens=q_lens, dtype=dtype, q_scale=q_scale, **kw)
    scale = D ** -0.5
    want = naive(q, kp, vp, pt, kvl, ql, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    # harness sanity: walking the page table gives back the K/V we wrote, and nothing real is NaN
    for b in range(len(kvl)):
        for p in range(int(kvl[b])):
            np.testing.assert_array_equal(kp[:, pt[b, p // S], p % S], ks[b][:, p])
    assert np.isfinite(want).all()

    got = _ref(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(pt), jnp.asarray(kvl),
               jnp.asarray(ql), scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return assert_matches(got, want, q, ql, TOL[dtype]), want


def assert_matches(got, want, q, q_lens, tol: float) -> np.ndarray:
    """The verdict every backend gets: q's shape and dtype, no NaN/inf, padding rows t >= q_lens exactly 0, L2
    relative error within tol. Returns the output as float64."""
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.isfinite(got).all(), "NaN/inf leaked into the output"
    for b in range(len(q_lens)):
        assert np.all(got[b, q_lens[b]:] == 0), f"row {b}: padding rows t >= q_lens must be exactly 0"
    if np.any(want != 0):
        err = rel_err(got, want)
        assert err <= tol, f"rel err {err:.3g} > {tol}"
    return got


def check_unused_page_ids_out_of_range(kernel, rng) -> None:
    """Page-table entries past each sequence hold ids out of the pool (-1, P, P + 7, -5): a kernel must not read
    them (or must read something harmless); rows of empty slots and padding stay exactly 0."""
    q, kp, vp, pt, kvl, ql, _, _ = make_case(rng, T=2, Hq=4, Hkv=2, D=64, S=16, kv_lens=[17, 3, 0],
                                             q_lens=[2, 1, 0], spare_entries=2, dtype="bfloat16")
    P = kp.shape[1]
    pt2 = pt.copy()
    pt2[0, 2:] = [-1, P + 7]
    pt2[1, 1:] = P
    pt2[2, :] = -5
    want = naive(q, kp, vp, pt, kvl, ql, scale=0.125)
    got = kernel(*map(jnp.asarray, (q, kp, vp, pt2, kvl, ql)), scale=0.125)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.isfinite(got).all()
    assert rel_err(got, want) <= TOL["bfloat16"]
    assert np.all(got[2] == 0) and np.all(got[1, 1:] == 0)


def check_kernel(kernel, rng, *, T, Hq, Hkv, D, S, kv_lens, q_lens, tol: float, dtype="bfloat16",
                 sliding_window=None, soft_cap=None, q_scale=1.0, **case_kw) -> np.ndarray:
    """kernel(q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window, soft_cap) against the
    float64 loop on a fresh case whose unused pages are NaN; float16 cases reuse float32 values cast down."""
    case_dtype = "float32" if dtype == "float16" else dtype
    q, kp, vp, pt, kvl, ql, _, _ = make_case(rng, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=q_lens,
                                             dtype=case_dtype, q_scale=q_scale, **case_kw)
    if dtype == "float16":
        q, kp, vp = (x.astype(np.float16) for x in (q, kp, vp))
    scale = D ** -0.5
    want = naive(q, kp, vp, pt, kvl, ql, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    got = kernel(*map(jnp.asarray, (q, kp, vp, pt, kvl, ql)), scale=scale, sliding_window=sliding_window,
                 soft_cap=soft_cap)
    return assert_matches(got, want, q, ql, tol)


# (Hq, Hkv) covering GQA ratios 1, 2, 4, 8, 16
GQA = [(2, 2), (4, 2), (4, 1), (16, 2), (16, 1)]


# Decode: one new token per row. Combinations rotate through GQA ratio, head_dim, page size and dtype so that
# every value of each appears with both dtypes without a full cartesian product.
DECODE_CASES = [
    # Hq, Hkv, D, S, dtype
    (2, 2, 64, 16, "float32"),
    (4, 2, 128, 32, "float32"),
    (4, 1, 256, 64, "float32"),
    (16, 2, 64, 128, "float32"),
    (16, 1, 128, 16, "float32"),
    (8, 8, 256, 32, "float32"),
    (2, 2, 128, 64, "bfloat16"),
    (4, 2, 256, 128, "bfloat16"),
    (4, 1, 64, 32, "bfloat16"),
    (16, 2, 256, 16, "bfloat16"),
    (16, 1, 64, 64, "bfloat16"),
]


@pytest.mark.parametrize("Hq,Hkv,D,S,dtype", DECODE_CASES)
def test_decode_matches_naive(rng, Hq, Hkv, D, S, dtype):
    # ragged batch: one page minus/plus one, exact multiple, a single token, a random length
    kv_lens = [S - 1, 2 * S, 1, S + 1, int(rng.integers(1, 3 * S + 1))]
    check(rng, T=1, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=[1] * len(kv_lens), dtype=dtype)


VERIFY_CASES = [
    # Hq, Hkv, D, S, T, dtype
    (4, 2, 128, 16, 5, "float32"),
    (16, 1, 64, 32, 8, "float32"),
    (2, 2, 256, 64, 4, "float32"),
    (16, 2, 128, 128, 3, "bfloat16"),
    (4, 1, 64, 16, 8, "bfloat16"),
]


@pytest.mark.parametrize("Hq,Hkv,D,S,T,dtype", VERIFY_CASES)
def test_verify_matches_naive(rng, Hq, Hkv, D, S, T, dtype):
    # speculative verify: up to T draft tokens, a different count per row (including a full and an empty row)
    q_lens = [T, 1, int(rng.integers(1, T + 1)), 0, T - 1]
    kv_lens = [int(rng.integers(n, 3 * S + 1)) if n else int(rng.integers(0, 2 * S)) for n in q_lens]
    kv_lens[0] = 2 * S  # the newest token exactly ends a page
    kv_lens[1] = S + 1  # the newest token alone on a fresh page
    check(rng, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=q_lens, dtype=dtype)


@pytest.mark.parametrize("Hq,Hkv,D,S,dtype", [(4, 2, 64, 16, "float32"), (8, 1, 128, 32, "float32"),
                                              (16, 2, 64, 64, "bfloat16")])
def test_chunked_prefill_over_cached_prefix(rng, Hq, Hkv, D, S, dtype):
    # a chunk of C new tokens after a cached prefix that is not page aligned; one row is a first chunk
    # (no prefix), one a short last chunk, one a plain decode sharing the batch
    C = 24
    q_lens = [C, C, 7, 1]
    prefixes = [int(rng.integers(1, 3 * S)), 0, 2 * S - 3, S]
    kv_lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    check(rng, T=C, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=q_lens, dtype=dtype)


@pytest.mark.parametrize("S", [16, 32, 64, 128])
def test_page_boundaries(rng, S):
    # kv_lens on page boundaries and one either side, for decode rows and for 3-token verify rows
    kv_lens = [1, S - 1, S, S + 1, 2 * S - 1, 2 * S, 2 * S + 1, 3, S, S + 2]
    q_lens = [1, 1, 1, 1, 1, 1, 1, 3, 3, 3]
    check(rng, T=3, Hq=4, Hkv=2, D=64, S=S, kv_lens=kv_lens, q_lens=q_lens)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_length_one(rng, dtype):
    # the first token of a sequence: one key, in a pool whose every other slot is NaN
    check(rng, T=1, Hq=4, Hkv=2, D=64, S=16, kv_lens=[1, 1], q_lens=[1, 1], dtype=dtype)


def test_length_one_equals_value(rng):
    q, kp, vp, pt, kvl, ql, ks, vs = make_case(rng, T=1, Hq=8, Hkv=2, D=64, S=32, kv_lens=[1], q_lens=[1])
    got = np.asarray(_ref(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(pt), jnp.asarray(kvl),
                          jnp.asarray(ql), scale=0.125))
    for h in range(8):
        np.testing.assert_allclose(got[0, 0, h], vs[0][h // 4, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_empty_slots_are_exactly_zero(rng, dtype):
    # slot 1 and 3 are empty (q_lens 0, kv_lens 0, page-table row all NaN pages); slot 4 idles with a cache
    T = 4
    q_lens = [3, 0, 1, 0, 0]
    kv_lens = [40, 0, 17, 0, 25]
    got, _ = check(rng, T=T, Hq=8, Hkv=2, D=128, S=16, kv_lens=kv_lens, q_lens=q_lens, dtype=dtype)
    for b in (1, 3, 4):
        assert np.all(got[b] == 0)


def test_all_slots_empty(rng):
    got, _ = check(rng, T=2, Hq=4, Hkv=1, D=64, S=16, kv_lens=[0, 0, 0], q_lens=[0, 0, 0])
    assert np.all(got == 0)


@pytest.mark.parametrize("window", [1, 5, 16, 19, 40, 1000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sliding_window(rng, window, dtype):
    # windows of one token, inside a page, exactly a page, straddling pages, several pages, larger than all;
    # decode, verify and prefill rows together
    S = 16
    q_lens = [1, 4, 12, 1, 2]
    kv_lens = [70, 37, 12, 16, 33]
    check(rng, T=12, Hq=8, Hkv=2, D=64, S=S, kv_lens=kv_lens, q_lens=q_lens, dtype=dtype, sliding_window=window)


@pytest.mark.parametrize("soft_cap", [1.0, 5.0, 30.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_soft_cap(rng, soft_cap, dtype):
    # large queries push logits well past the cap so the tanh matters
    q_lens = [1, 3, 6]
    kv_lens = [50, 20, 6]
    check(rng, T=6, Hq=4, Hkv=1, D=128, S=32, kv_lens=kv_lens, q_lens=q_lens, dtype=dtype, soft_cap=soft_cap,
          q_scale=4.0)


def test_soft_cap_changes_result(rng):
    # guard against the naive and the reference both ignoring soft_cap
    args = make_case(rng, T=1, Hq=4, Hkv=1, D=64, S=16, kv_lens=[30], q_lens=[1], q_scale=4.0)[:6]
    a = _ref(*map(jnp.asarray, args), scale=0.125)
    b = _ref(*map(jnp.asarray, args), scale=0.125, soft_cap=1.0)
    assert rel_err(a, b) > 1e-2


def test_sliding_window_and_soft_cap(rng):
    check(rng, T=8, Hq=16, Hkv=2, D=64, S=32, kv_lens=[100, 8, 33], q_lens=[8, 8, 2], sliding_window=24,
          soft_cap=10.0, q_scale=3.0)


def test_unused_page_table_entries_out_of_range(rng):
    # entries past a sequence are ignored whatever they hold, even ids outside the pool
    q, kp, vp, pt, kvl, ql, _, _ = make_case(rng, T=2, Hq=4, Hkv=2, D=64, S=16, kv_lens=[17, 3, 0],
                                             q_lens=[2, 1, 0], spare_entries=2)
    P = kp.shape[1]
    pt2 = pt.copy()
    assert pt.shape[1] == 4  # row 0 uses 2 pages
    pt2[0, 2:] = [-1, P + 7]
    pt2[1, 1:] = P
    pt2[2, :] = -5
    want = naive(q, kp, vp, pt, kvl, ql, scale=0.125)
    got = np.asarray(_ref(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(pt2), jnp.asarray(kvl),
                          jnp.asarray(ql), scale=0.125))
    assert np.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5
    assert np.all(got[2] == 0) and np.all(got[1, 1:] == 0)


def test_dispatch_reference_impl_equals_reference(rng):
    q, kp, vp, pt, kvl, ql, _, _ = make_case(rng, T=3, Hq=8, Hkv=2, D=64, S=16, kv_lens=[20, 5, 0],
                                             q_lens=[3, 2, 0])
    args = tuple(map(jnp.asarray, (q, kp, vp, pt, kvl, ql)))
    for kw in ({}, {"sliding_window": 7}, {"soft_cap": 5.0}):
        want = paged_attention_reference(*args, scale=0.125, **kw)
        got = pallas_kernels.paged_attention(*args, scale=0.125, impl="reference", **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert np.isfinite(np.asarray(got)).all()
    # the default choice on this (CPU) backend is also the reference
    np.testing.assert_array_equal(np.asarray(pallas_kernels.paged_attention(*args, scale=0.125)),
                                  np.asarray(paged_attention_reference(*args, scale=0.125)))


def test_dispatch_unknown_impl_raises(rng):
    q, kp, vp, pt, kvl, ql, _, _ = make_case(rng, T=1, Hq=2, Hkv=1, D=64, S=16, kv_lens=[3], q_lens=[1])
    with pytest.raises(ValueError, match="no_such_kernel"):
        pallas_kernels.paged_attention(*map(jnp.asarray, (q, kp, vp, pt, kvl, ql)), scale=0.125,
                                       impl="no_such_kernel")
