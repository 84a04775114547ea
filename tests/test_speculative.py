"""The speculative loop and the lossless accept rule: greedy output token-identical to `Engine.generate`, the
sampled output distributed as the target's, per-row accepted lengths, stop tokens and max tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model
from codegen_jax.sampling import filter_logits
from drafters.apply_speculator import ApplySpeculator
from drafters.base import Draft, Drafter
from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
from drafters.eagle3 import Eagle3Config, Eagle3Drafter
from drafters.neural import NeuralDrafter
from drafters.speculative import SpeculativeDecoder
from drafters.suffix_tree import SuffixTreeSpeculator
from drafters.verify import verify_tokens

CFG = ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


@pytest.fixture(scope="module")
def model():
    # larger embeddings than the default init so greedy decoding is far from ties (as in test_engine)
    m = init_model(CFG, dtype=jnp.float32, seed=1)
    m.embed_tokens.weight.set_value(m.embed_tokens.weight.get_value() * 50)
    return m


_ENGINES = {}


def engine(model, slots, seq_len=96):
    """One engine per (model, slots, seq_len) for the module: each test leaves its cache empty (a fresh engine per
    call compiled its prefill and decode programs again in every test)."""
    key = (id(model), slots, seq_len)
    eng = _ENGINES.get(key, (None, None))[1]
    if eng is None or eng.cache.lengths.any() or eng.cache.num_free_pages != eng.cfg.pages - 1:  # or a test failed
        eng = Engine(model, EngineConfig(max_slots=slots, page_size=8, max_seq_len=seq_len, prefill_chunk=32,
                                         decode_steps=4))
        _ENGINES[key] = model, eng  # the model kept alive: its id stays its own
    return eng


class OracleDrafter(Drafter):
    """Knows each request's greedy output; drafts it with a planted error after `good[slot]` tokens, so rows of
    a batch accept different, known lengths."""

    def __init__(self, slots, truth: dict[tuple, list[int]], good, max_draft):
        self.slots, self.truth, self.good, self.max_draft = slots, truth, good, max_draft
        self.log = []  # (slot, drafted, accepted) per step

    def propose(self, seqs, max_lens):
        drafts = {}
        for s in seqs:
            ref = self.truth[tuple(s.tokens[: s.prompt_len])]
            done = len(s.tokens) - s.prompt_len
            k = min(self.max_draft, max_lens[s.slot])
            d = list(ref[done : done + k])
            g = self.good[s.slot]
            if g < len(d):
                d[g] = (d[g] + 1) % CFG.vocab_size
            drafts[s.slot] = d
        return Draft.from_lists(self.slots, drafts)

    def observe(self, seqs, draft, accepted, new_tokens, features=None):
        for s in seqs:
            self.log.append((s.slot, int(draft.lengths[s.slot]), int(accepted[s.slot])))


def make_drafter(kind, slots, max_draft, target, *, start_draft=1, head_dim=8, context=16, draft_vocab=2 / 3,
                 seed=None):
    """Every drafter, the neural ones randomly initialised (they accept little, but must stay exact)."""
    cfg = target.cfg
    if kind == "apply":
        return ApplySpeculator(slots, max_draft=max_draft, start_draft=start_draft, min_match=1)
    if kind == "suffix":
        return SuffixTreeSpeculator(slots, max_draft=max_draft, min_prob=0.0)
    layers = (0, cfg.num_layers - 1)
    small = dict(head_dim=head_dim, intermediate_size=64, context=context)
    rngs = nnx.Rngs(max_draft if seed is None else seed)
    if kind == "block":
        model = BlockDrafter(BlockDrafterConfig(cfg.hidden_size, layers, block_size=max_draft + 1, **small), rngs=rngs)
    else:
        model = Eagle3Drafter(Eagle3Config(cfg.hidden_size, layers, cfg.vocab_size, int(cfg.vocab_size * draft_vocab),
                                           draft_len=max_draft, **small), rngs=rngs)
    return NeuralDrafter(model, target, slots)


def check_greedy_matches_engine(model, rng, spec):
    # prompts with repeats, so the host speculators find continuations to draft
    base = [list(rng.integers(0, CFG.vocab_size, n)) for n in (1, 4, 9, 17, 23, 30)]
    prompts = [b + b[: len(b) // 2] + b for b in base]
    sp = SamplingParams(max_new_tokens=14)
    ref = engine(model, 2).generate(prompts, sp)
    out = spec.generate(prompts, sp)
    for r, o in zip(ref, out, strict=True):
        assert o.tokens == r.tokens and o.finish_reason == "length"
        assert o.forwards <= len(o.tokens) and len(o.tokens) == o.forwards + o.accepted
    assert spec.engine.cache.num_free_pages == spec.engine.cfg.pages - 1
    assert not spec.engine.cache.lengths.any()


# (slots, max_draft) = (4, 7) runs in test_warmup_compiles_every_width_and_changes_nothing, on the decoder it warmed
# up (the same programs: compiling them twice per drafter cost ~10 s a drafter)
@pytest.mark.parametrize("kind", ["apply", "suffix", "block", "eagle3"])
@pytest.mark.parametrize("slots,max_draft", [(1, 1), (3, 4)])
def test_greedy_matches_engine(model, rng, kind, slots, max_draft):
    check_greedy_matches_engine(model, rng, SpeculativeDecoder(engine(model, slots),
                                                               make_drafter(kind, slots, max_draft, model)))


@pytest.mark.parametrize("kind", ["apply", "suffix", "block", "eagle3"])
def test_warmup_compiles_every_width_and_changes_nothing(model, rng, kind):
    """After warm-up, a generation compiles no verify step; the warm-up itself leaves the cache as it was (pages
    but the scratch page, lengths) while a request is in flight. Then test_greedy_matches_engine's check at 4 slots
    and 7 draft tokens on the warmed-up decoder."""
    slots, max_draft = 4, 7
    eng = engine(model, slots)
    spec = SpeculativeDecoder(eng, make_drafter(kind, slots, max_draft, model))
    prompt = list(rng.integers(0, CFG.vocab_size, 20))
    eng.cache.reserve(1, 40)
    eng.prefill(1, prompt)
    pages = [np.array(p) for p in jax.tree.leaves(eng.cache.pages)]
    lengths = eng.cache.lengths.copy()
    widths = spec.warmup()
    assert widths == ([2, 4, 8, 16] if spec.drafter.capture else [2, 4, 8])  # 16: the capture of a prompt tail
    for before, after in zip(pages, jax.tree.leaves(eng.cache.pages), strict=True):
        np.testing.assert_array_equal(np.asarray(after)[:, 1:], before[:, 1:])  # [Hkv, P, S, D]: page 0 is scratch
    np.testing.assert_array_equal(eng.cache.lengths, lengths)
    eng.cache.release(1)
    step = eng._verify_capture if spec.drafter.capture else eng._verify
    programs = lambda: (step._cache_size(), spec._host_step._cache_size() + spec._device_step._cache_size())
    compiled = programs()
    base = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 11)]
    out = spec.generate([b + b + b for b in base], SamplingParams(max_new_tokens=20))
    assert programs() == compiled, "a verify width compiled after warm-up"
    ref = engine(model, 2).generate([b + b + b for b in base], SamplingParams(max_new_tokens=20))
    assert [o.tokens for o in out] == [r.tokens for r in ref]
    check_greedy_matches_engine(model, rng, spec)
    assert programs() == compiled, "a verify width compiled after warm-up"

@pytest.mark.parametrize("slots,max_draft", [(1, 5), (4, 6), (5, 16)])
def test_rows_accept_different_lengths(model, rng, slots, max_draft):
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 8, 12, 19, 26)]
    sp = SamplingParams(max_new_tokens=20)
    ref = engine(model, 2).generate(prompts, sp)
    truth = {tuple(p): r.tokens for p, r in zip(prompts, ref, strict=True)}
    good = {s: int(rng.integers(0, max_draft + 2)) for s in range(slots)}
    good[0] = int(rng.integers(1, max_draft + 2))  # some row accepts under every seed (0 for all failed 1 in 7)
    drafter = OracleDrafter(slots, truth, good, max_draft)
    out = SpeculativeDecoder(engine(model, slots), drafter).generate(prompts, sp)
    assert [o.tokens for o in out] == [r.tokens for r in ref]
    for slot, drafted, accepted in drafter.log:
        assert accepted == min(good[slot], drafted)  # exactly the correct prefix, per row
    # every token but the bonus of each forward came from the draft
    assert all(o.accepted == len(o.tokens) - o.forwards for o in out)
    assert sum(o.accepted for o in out) > 0


def test_stop_tokens_and_max_tokens(model, rng):
    prompt = list(rng.integers(0, CFG.vocab_size, 7))
    free = engine(model, 1).generate([prompt], SamplingParams(max_new_tokens=16))[0].tokens
    truth = {tuple(prompt): free}
    stop = free[6]
    drafter = OracleDrafter(1, truth, {0: 100}, 8)  # drafts run past the stop token
    out = SpeculativeDecoder(engine(model, 1), drafter).generate(
        [prompt], SamplingParams(max_new_tokens=16, stop_token_ids=(stop,)))[0]
    assert out.tokens == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    out = SpeculativeDecoder(engine(model, 1), drafter).generate([prompt], SamplingParams(max_new_tokens=5))[0]
    assert out.tokens == free[:5] and out.finish_reason == "length"


# ---- sampling: the output distribution equals the target's ---------------------------------------------------

V = 8
SMALL = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)


class BadDrafter(Drafter):
    """Draws each draft token from a fresh random distribution q (Dirichlet) and reports q; with
    `with_probs=False` it drafts random tokens and reports nothing (verification treats them as one-hot)."""

    def __init__(self, slots, k, seed, with_probs=True):
        self.slots, self.max_draft, self.with_probs = slots, k, with_probs
        self.rng = np.random.default_rng(seed)

    def propose(self, seqs, max_lens):
        K = self.max_draft
        q = self.rng.dirichlet(np.full(V, 0.3), size=(self.slots, K)).astype(np.float32)  # [S, K, V]
        tokens = np.zeros((self.slots, K), np.int32)
        for s in range(self.slots):
            for j in range(K):
                tokens[s, j] = self.rng.choice(V, p=q[s, j] / q[s, j].sum())
        lengths = np.zeros(self.slots, np.int32)
        for s in seqs:
            lengths[s.slot] = min(K, max_lens[s.slot])
        return Draft(tokens, lengths, jnp.asarray(q) if self.with_probs else None)


@pytest.fixture(scope="module")
def small_model():
    model = init_model(SMALL, dtype=jnp.float32, seed=3)
    model.embed_tokens.weight.set_value(model.embed_tokens.weight.get_value() * 60)  # a peaked, uneven p
    return model


def exact_two_token(model, prompt, temperature, top_k, top_p) -> np.ndarray:
    """P(t1, t2) [V, V] of the target's own sampling, from its logits."""
    key = (id(model), "exact")
    if key not in _ENGINES:
        _ENGINES[key] = model, Engine(model, EngineConfig(max_slots=V, page_size=8, max_seq_len=32, prefill_chunk=16))
    eng = _ENGINES[key][1]
    n = len(prompt)
    ids = np.zeros((V, 16), np.int32)
    assert n < 16
    ids[:, :n] = prompt
    ids[:, n] = np.arange(V)
    for s in range(V):
        eng.cache.release(s)  # empty: the rows start at position 0
        eng.cache.reserve(s, n + 1)
    logits = np.asarray(eng.verify(ids, np.full(V, n + 1)))  # [V, 16, V]
    probs = lambda lg: np.asarray(jax.nn.softmax(filter_logits(
        jnp.asarray(lg), jnp.full(len(lg), temperature), jnp.full(len(lg), top_k, jnp.int32),
        jnp.full(len(lg), top_p)), axis=-1), np.float64)
    p1 = probs(logits[:1, n - 1])[0]
    p2 = probs(logits[:, n])  # row t1: P(t2 | t1)
    return p1[:, None] * p2


@pytest.mark.parametrize("kind,temperature,top_k,top_p", [
    ("bad", 1.0, 0, 1.0), ("bad-no-probs", 0.8, 6, 0.9), ("apply", 1.0, 0, 0.95), ("suffix", 0.7, 0, 1.0),
    ("block", 1.0, 0, 1.0), ("eagle3", 0.9, 5, 1.0)])
def test_sampling_distribution_equals_target(small_model, kind, temperature, top_k, top_p):
    model = small_model
    prompt = [1, 5, 2, 1, 5, 3, 1, 5]  # repeats, for the host speculators to draft from
    exact = exact_two_token(model, prompt, temperature, top_k, top_p)
    N, slots = 3000, 32
    drafter = (BadDrafter(slots, 3, seed=0, with_probs=kind == "bad") if kind.startswith("bad")
               else make_drafter(kind, slots, 3, model))
    spec = SpeculativeDecoder(engine(model, slots, seq_len=16), drafter)
    out = spec.generate([prompt] * N, [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=i,
                                                      max_new_tokens=4) for i in range(N)])
    counts = np.zeros((V, V))
    for o in out:
        counts[o.tokens[0], o.tokens[1]] += 1
    if kind.startswith("bad"):
        assert sum(o.accepted for o in out) > N // 4  # drafts were accepted, and rejected
    tv = 0.5 * np.abs(counts / N - exact).sum()
    # chi-square over cells with expected count >= 5 (others pooled); 99.9% quantile, so flakes are rare
    mask = exact * N >= 5
    obs = np.append(counts[mask], counts[~mask].sum())
    exp = np.append(exact[mask] * N, exact[~mask].sum() * N)
    keep = exp > 0
    chi2 = (((obs - exp) ** 2)[keep] / exp[keep]).sum()
    dof = keep.sum() - 1
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, tv)
    assert counts[~(exact > 0)].sum() == 0  # nothing outside the target's top-k / top-p support
    # total variation against what sampling the exact distribution N times gives (99th percentile of 200 draws)
    null = [0.5 * np.abs(np.random.default_rng(i).multinomial(N, exact.ravel() / exact.sum()) / N - exact.ravel()).sum()
            for i in range(200)]
    assert tv < np.quantile(null, 0.99), (tv, np.quantile(null, 0.99))


def test_accept_rule_marginal_with_many_rows():
    """The rule alone, 200k rows: the first output token is distributed as p whatever q is."""
    rng = np.random.default_rng(0)
    S, K = 200_000, 3
    p_logits = np.log(rng.dirichlet(np.full(V, 0.5), size=K + 1)).astype(np.float32)  # [T, V]
    q = rng.dirichlet(np.full(V, 0.5), size=K).astype(np.float32)  # [K, V]
    draft = np.stack([rng.choice(V, size=S, p=q[j] / q[j].sum()) for j in range(K)], 1).astype(np.int32)
    logits = jnp.broadcast_to(jnp.asarray(p_logits), (S, K + 1, V))
    probs = jnp.broadcast_to(jnp.asarray(q), (S, K, V))
    acc, out = verify_tokens(logits, draft, jnp.full(S, K, jnp.int32), probs, jnp.arange(S, dtype=jnp.uint32),
                             jnp.zeros(S, jnp.int32), jnp.ones(S), jnp.zeros(S, jnp.int32), jnp.ones(S), greedy=False)
    acc, out = np.asarray(acc), np.asarray(out)
    p0 = np.exp(p_logits[0]) / np.exp(p_logits[0]).sum()
    freq = np.bincount(out[:, 0], minlength=V) / S
    assert np.abs(freq - p0).max() < 4 * np.sqrt(p0 * (1 - p0) / S).max() + 1e-3
    # the acceptance rate of the first draft is sum_x min(p, q)
    assert abs((acc >= 1).mean() - np.minimum(p0, q[0] / q[0].sum()).sum()) < 0.01
    assert ((out[:, :K] == draft) | (np.arange(K)[None] >= acc[:, None])).all()
