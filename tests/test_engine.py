"""The paged-KV engine against a cache-free recomputation, plus its bookkeeping: verify/rollback, stop tokens,
seeded sampling, page accounting, and no compilation in steady-state decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model

CFG = ModelConfig(model_type="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, qkv_bias=True, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16, moe_layers=(True, False))


@pytest.fixture(scope="module")
def model():
    # larger weights than the default init so greedy decoding is far from ties
    m = init_model(CFG, dtype=jnp.float32, seed=1)
    m.embed_tokens.weight.set_value(m.embed_tokens.weight.get_value() * 50)
    return m


@pytest.fixture(scope="module")
def naive_engine(model):
    # one engine for every naive_greedy call (a fresh engine per step compiled its verify again, ~60 times a test)
    return Engine(model, EngineConfig(max_slots=1, page_size=64, max_seq_len=64, prefill_chunk=64))


def naive_greedy(eng, prompt, n):
    """Greedy decoding that recomputes the whole sequence every step from an empty cache (no cache reuse): each
    step releases the slot and writes every token's KV afresh into its one page before attending to them."""
    seq = list(prompt)
    for _ in range(n):
        eng.cache.release(0)
        eng.cache.reserve(0, len(seq))
        logits = eng.verify(np.array([seq + [0] * (64 - len(seq))]), np.array([len(seq)]))
        seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    eng.cache.release(0)
    return seq[len(prompt):]


@pytest.mark.parametrize("page_size,chunk,steps,slots", [(4, 16, 3, 2), (8, 8, 1, 3), (16, 32, 8, 1)])
def test_generate_matches_recomputation(model, naive_engine, rng, page_size, chunk, steps, slots):
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (1, 5, 16, 17, 30)]
    eng = Engine(model, EngineConfig(max_slots=slots, page_size=page_size, max_seq_len=64, prefill_chunk=chunk,
                                     decode_steps=steps))
    out = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    for p, r in zip(prompts, out, strict=True):
        assert r.tokens == naive_greedy(naive_engine, p, 12)
        assert r.finish_reason == "length" and r.prompt_tokens == len(p)
    assert eng.cache.num_free_pages == eng.cfg.pages - 1  # every page back (page 0 is scratch)
    assert not eng.cache.lengths.any()


def test_verify_equals_sequential_and_rolls_back_by_length(model, rng):
    eng = Engine(model, EngineConfig(max_slots=2, page_size=4, max_seq_len=64, prefill_chunk=16))
    prompt = list(rng.integers(0, CFG.vocab_size, 9))
    draft = rng.integers(0, CFG.vocab_size, (2, 6))
    for s in (0, 1):
        eng.cache.reserve(s, 9 + 6)
        eng.prefill(s, prompt)
    q_lens = np.array([6, 3])  # rows accept different lengths
    multi = np.asarray(eng.verify(draft, q_lens))
    assert list(eng.cache.lengths) == [15, 12]
    # one token at a time from the same prefix gives the same logits
    eng.cache.lengths[:] = 9
    for t in range(6):
        single = np.asarray(eng.verify(draft[:, t : t + 1], (t < q_lens).astype(np.int32)))
        for b in (0, 1):
            if t < q_lens[b]:
                np.testing.assert_allclose(single[b, 0], multi[b, t], rtol=1e-5, atol=1e-5)
    # rollback: drop row 0's last 4 tokens by length and verify other tokens in their place
    eng.cache.lengths[:] = [11, 12]
    other = rng.integers(0, CFG.vocab_size, (2, 4))
    after = np.asarray(eng.verify(other, np.array([4, 0])))
    fresh = Engine(model, EngineConfig(max_slots=1, page_size=4, max_seq_len=64, prefill_chunk=32))
    fresh.cache.reserve(0, 15)
    seq = prompt + list(draft[0, :2]) + list(other[0])
    ref = np.asarray(fresh.verify(np.array([seq + [0] * (32 - 15)]), np.array([15])))
    np.testing.assert_allclose(after[0], ref[0, 11:15], rtol=1e-5, atol=1e-5)


def test_stop_tokens_and_max_tokens(model, rng):
    prompt = list(rng.integers(0, CFG.vocab_size, 7))
    eng = Engine(model, EngineConfig(max_slots=2, page_size=8, max_seq_len=64, prefill_chunk=16, decode_steps=4))
    free = eng.generate([prompt], SamplingParams(max_new_tokens=10))[0].tokens
    stop = free[5]
    first = free.index(stop)
    out = eng.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert out.tokens == free[: first + 1] and out.finish_reason == "stop"
    out = eng.generate([prompt], SamplingParams(max_new_tokens=3))[0]
    assert out.tokens == free[:3] and out.finish_reason == "length"


def test_seeded_sampling_ignores_batch_neighbours(model, rng):
    a, b = list(rng.integers(0, CFG.vocab_size, 5)), list(rng.integers(0, CFG.vocab_size, 11))
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=123, max_new_tokens=12)
    alone = Engine(model, EngineConfig(max_slots=1, max_seq_len=64, prefill_chunk=16, decode_steps=5))
    batched = Engine(model, EngineConfig(max_slots=3, max_seq_len=64, prefill_chunk=16, decode_steps=2))
    ref = alone.generate([a], sp)[0].tokens
    out = batched.generate([b, a, b], [SamplingParams(temperature=0.5, seed=7, max_new_tokens=12), sp,
                                       SamplingParams(max_new_tokens=12)])
    assert out[1].tokens == ref
    other_seed = alone.generate([a], SamplingParams(temperature=1.0, top_p=0.95, seed=124, max_new_tokens=12))
    assert other_seed[0].tokens != ref


def test_no_compilation_in_steady_state(model, rng):
    eng = Engine(model, EngineConfig(max_slots=2, page_size=8, max_seq_len=96, prefill_chunk=32, decode_steps=4))
    sp = [SamplingParams(max_new_tokens=9), SamplingParams(temperature=0.8, top_k=5, seed=1, max_new_tokens=6)]
    # warm-up touches every prefill bucket (16, 32) and the decode loop
    eng.generate([list(rng.integers(0, 97, n)) for n in (3, 20, 40)], sp + sp[:1])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    out = eng.generate([list(rng.integers(0, 97, n)) for n in (7, 29, 50, 2)], sp * 2)
    assert all(r.tokens for r in out)
    assert compiles == []


@pytest.mark.parametrize("cores", [2, 16])  # 16: the classes compile side by side in threads first
def test_warmup_prefill_compiles_every_bucket_and_changes_nothing(model, rng, monkeypatch, cores):
    """After `warmup_prefill`, prefilling prompts of any length (one slot or a batch of rows) compiles nothing; the
    warm-up itself compiles each (rows, bucket) class once and leaves the cached pages (the scratch page aside)
    and lengths as they were."""
    monkeypatch.setattr("codegen_jax.engine.os.cpu_count", lambda: cores)
    eng = Engine(model, EngineConfig(max_slots=2, page_size=8, max_seq_len=128, prefill_chunk=64))
    eng.cache.reserve(0, 32)
    eng.prefill(0, list(rng.integers(0, 97, 20)))
    pages, lengths = jax.tree.map(np.asarray, eng.cache.pages), eng.cache.lengths.copy()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    assert eng.warmup_prefill(rows=2) == [16, 32, 64]
    assert len(compiles) <= 2 * 3, f"{len(compiles)} compiles for 2 row classes x 3 buckets (one was compiled twice)"
    assert (eng.cache.lengths == lengths).all()
    for before, after in zip(jax.tree.leaves(pages), jax.tree.leaves(eng.cache.pages), strict=True):
        np.testing.assert_array_equal(np.asarray(after)[:, 1:], before[:, 1:])  # [K, P, S, D]: page 0 is scratch
    compiled = eng._prefill._cache_size()
    eng.cache.reserve(1, 127)
    for n in (1, 17, 33, 63, 65, 97, 127):  # last chunks of 1, 17, 33, 63, 1, 33, 63 tokens
        eng.prefill(1, list(rng.integers(0, 97, n)))
    eng.prefill_rows([0, 1], [[1] * 5, [2] * 40], [20, 0])
    assert eng._prefill._cache_size() == compiled, "a prefill bucket compiled after warm-up"


def test_alike_engines_that_share_programs_compile_each_shape_once(model, rng):
    """Engines with share_programs (same model structure, page size, attention) use one set of jitted programs: a
    second one's warm-up traces nothing and its outputs are its own (its cache, its slot count); engines without
    it keep programs of their own. (Shapes still key the programs: a pool of another size compiles anew.)"""
    cfg = EngineConfig(max_slots=2, page_size=8, max_seq_len=128, num_pages=40, prefill_chunk=32, share_programs=True)
    a, b = Engine(model, cfg), Engine(model, EngineConfig(**{**cfg.__dict__, "max_slots": 3}))
    own = Engine(model, EngineConfig(**{**cfg.__dict__, "share_programs": False}))
    assert a._prefill is b._prefill and a._decode is b._decode and own._prefill is not a._prefill
    a.warmup_prefill(rows=2)
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    b.warmup_prefill(rows=2)
    assert traces == [], "the second engine traced its prefill again"
    prompts = [list(rng.integers(0, 97, n)) for n in (5, 40)]
    sp = SamplingParams(max_new_tokens=6)
    assert [c.tokens for c in b.generate(prompts, sp)] == [c.tokens for c in own.generate(prompts, sp)]


def test_bad_requests_are_rejected(model):
    eng = Engine(model, EngineConfig(max_slots=1, max_seq_len=32, prefill_chunk=16))
    with pytest.raises(ValueError, match="max_seq_len 32"):
        eng.generate([[1] * 30], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[1, 97]], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingParams(max_new_tokens=5))
    with pytest.raises(ValueError, match="prefill_chunk"):
        EngineConfig(prefill_chunk=48)


@pytest.mark.parametrize("n", [1, 3, 4, 5])
def test_page_copies_round_trip_in_power_of_two_classes(rng, n):
    """write_pages then read_pages gives the pages back in order, page-major ([n, L, 2, Hkv, S, D]: page i is
    pool page ids[i] of every layer), padded to the next power of two with the scratch page; the copies compile
    once per class, not once per count."""
    from codegen_jax.kv_cache import PagedKVCache, _gather_pages

    kv = PagedKVCache(CFG, num_slots=1, page_size=4, num_pages=12, max_seq_len=32, dtype=jnp.float32)
    ids = list(rng.choice(np.arange(1, 12), n, replace=False))
    shape = (n, CFG.num_layers, 2, CFG.num_kv_heads, 4, CFG.head_dim)
    data = rng.standard_normal(shape).astype(np.float32)
    kv.write_pages(ids, data)
    for i, p in enumerate(ids):  # where the pool holds them: layer l's K (0) and V (1) at page p
        for layer, (k, v) in enumerate(kv.pages):
            np.testing.assert_array_equal(np.asarray(k[:, p]), data[i, layer, 0])
            np.testing.assert_array_equal(np.asarray(v[:, p]), data[i, layer, 1])
    out = np.asarray(kv.read_pages(ids))
    m = 1 << (n - 1).bit_length()
    assert out.shape == (m, *shape[1:])
    np.testing.assert_array_equal(out[:n], data)
    scratch = np.asarray(kv.read_pages([0]))[:1]
    np.testing.assert_array_equal(out[n:], np.broadcast_to(scratch, out[n:].shape))
    compiled = _gather_pages._cache_size()
    for k in range(m // 2 + 1, m + 1):  # every count of the class reuses the one program
        kv.read_pages(ids[:1] * k)
    assert _gather_pages._cache_size() == compiled


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pages_come_to_the_host_exactly_through_pinned_memory(rng, dtype):
    """to_host (the tiers' copy off the device) and its pinned-memory path, which the CPU skips: the same bytes as
    np.asarray, in a fresh array each call."""
    from codegen_jax.kv_cache import PagedKVCache, to_host, via_pinned_host

    kv = PagedKVCache(CFG, num_slots=1, page_size=4, num_pages=12, max_seq_len=32, dtype=dtype)
    data = rng.standard_normal((3, CFG.num_layers, 2, CFG.num_kv_heads, 4, CFG.head_dim)).astype(np.float32)
    kv.write_pages([5, 2, 9], data)
    want = np.asarray(kv.read_pages([5, 2, 9]))
    for copy in (to_host, via_pinned_host):
        got = copy(kv.read_pages([5, 2, 9]))
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_microbatch_cuts_cover_the_step_in_near_equal_pieces():
    from codegen_jax.model import microbatch_cuts

    assert microbatch_cuts(2048, 2) == (0, 1024, 2048)
    assert microbatch_cuts(2048, 3) == (0, 704, 1408, 2048)  # whole 64-token blocks where T allows
    assert microbatch_cuts(16, 3) == (0, 6, 11, 16)
    assert microbatch_cuts(5, 5) == (0, 1, 2, 3, 4, 5)
    for T in (1, 7, 63, 64, 200, 1000, 2048, 4096):
        for m in range(1, min(T, 9) + 1):
            cuts = microbatch_cuts(T, m)
            sizes = np.diff(cuts)
            assert cuts[0] == 0 and cuts[-1] == T and len(sizes) == m and (sizes > 0).all(), (T, m, cuts)
            unit = 64 if T >= 64 * m else 1
            assert sizes.max() - sizes.min() <= unit + T % unit, (T, m, cuts)
    for T, m in ((4, 5), (4, 0)):
        with pytest.raises(ValueError, match="pieces"):
            microbatch_cuts(T, m)


@pytest.mark.parametrize("m", [2, 3])
def test_microbatched_steps_equal_the_whole_step(rng, m, monkeypatch):
    # Transformer.microbatches: a step of >= microbatch_min_tokens tokens per piece runs as m pieces interleaved
    # layer by layer, each piece's K/V in the pages before the next piece's attention at that layer. Prefill (a
    # 16-token bucket) and a verify step with ragged rows (a full row, one whose valid tokens end inside the
    # second piece, one with a single token: later pieces hold only padding) must match the unsplit engine.
    def engine(pieces):
        mdl = init_model(CFG, dtype=jnp.float32, seed=1)
        mdl.embed_tokens.weight.set_value(mdl.embed_tokens.weight.get_value() * 50)
        mdl.microbatches, mdl.microbatch_min_tokens = pieces, 4
        return Engine(mdl, EngineConfig(max_slots=3, page_size=4, max_seq_len=64, prefill_chunk=16))

    from codegen_jax import model as model_module

    splits = []
    real = model_module.split_batch
    monkeypatch.setattr(model_module, "split_batch", lambda b, cuts: splits.append(cuts) or real(b, cuts))
    whole, split = engine(1), engine(m)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 11, 16)]
    tokens = rng.integers(0, CFG.vocab_size, (3, 16)).astype(np.int32)
    q_lens = np.array([16, 7, 1], np.int32)
    out = []
    for eng in (whole, split):
        last = []
        for s, p in enumerate(prompts):
            eng.cache.reserve(s, 48)
            last.append(np.asarray(eng.prefill(s, p)))
        step = np.asarray(eng.verify(tokens, q_lens))
        after = np.asarray(eng.verify(tokens[:, :1], np.ones(3, np.int32)))  # reads the pages the step wrote
        out.append((np.stack(last), step, after))
    (a_last, a_step, a_after), (b_last, b_step, b_after) = out
    scale = np.abs(a_step).max()
    assert np.abs(a_last - b_last).max() / scale < 1e-5
    for r, n in enumerate(q_lens):
        assert np.abs(a_step[r, :n] - b_step[r, :n]).max() / scale < 1e-5, r
    assert np.abs(a_after - b_after).max() / scale < 1e-5
    assert np.isfinite(b_step).all()
    # traced once for the prefill, once for the verify step; not for T=1. Three pieces of 16 are 6, 5 and 5 tokens:
    # the ragged row's 7 valid tokens end inside the second
    assert splits == [{2: (0, 8, 16), 3: (0, 6, 11, 16)}[m]] * 2


def test_after_keeps_the_value_and_the_dependence():
    """`model.after`: x unchanged whatever the tick holds (finite, infinite, NaN), and the tick's computation still
    in the optimized program, so the ordering it stands for reaches XLA's scheduler."""
    from codegen_jax.model import after

    x = jnp.asarray([[1.5, -2.0], [0.0, 3.25]], jnp.bfloat16)
    for t in (0.7, -1e30, jnp.inf, -jnp.inf, jnp.nan):
        got = jax.jit(after)(x, jnp.float32(t))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x, np.float32))
    assert after(x, None) is x

    def f(x, y):
        return after(x, jnp.sin(y).sum())

    hlo = jax.jit(f).lower(x, jnp.ones((7,), jnp.float32)).compile().as_text()
    assert "sine" in hlo
