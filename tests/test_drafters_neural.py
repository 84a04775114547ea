"""The neural drafters' plumbing: checkpoints round-trip, configs reject bad values, the engine's captured
features, and the device-side feature window."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model
from drafters.base import Sequence
from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
from drafters.checkpoint import load_drafter, save_drafter
from drafters.eagle3 import Eagle3Config, Eagle3Drafter
from drafters.neural import NeuralDrafter, _append

CFG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def target():
    return init_model(CFG, dtype=jnp.float32, seed=0)


def drafters():
    yield BlockDrafter(BlockDrafterConfig(32, (0, 2), block_size=6, head_dim=8, intermediate_size=48, context=8),
                       rngs=nnx.Rngs(1))
    e = Eagle3Drafter(Eagle3Config(32, (0, 1, 2), 61, 40, draft_len=4, head_dim=8, intermediate_size=48, context=8),
                      rngs=nnx.Rngs(2))
    e.d2t.set_value(jnp.arange(60, 20, -1, dtype=jnp.int32))  # a non-trivial draft vocabulary survives the trip
    yield e


@pytest.mark.parametrize("model", list(drafters()), ids=["block", "eagle3"])
def test_checkpoint_round_trip_is_exact(model, target, tmp_path):
    save_drafter(model, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d")
    a = dict(nnx.to_flat_state(nnx.state(model)))
    b = dict(nnx.to_flat_state(nnx.state(loaded)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))
    feats = jnp.ones((3, len(model.cfg.target_layers) * 32))
    seq = Sequence(1, [3, 4, 5, 6], 4, SamplingParams(temperature=0.7, seed=9))
    drafts = []
    for m in (model, loaded):
        d = NeuralDrafter(m, target, 2)
        d.begin(seq, feats)
        dr = d.propose([seq], {1: 10})
        drafts.append((dr.tokens[1].tolist(), np.asarray(dr.probs[1])))
    assert drafts[0][0] == drafts[1][0]
    np.testing.assert_array_equal(drafts[0][1], drafts[1][1])
    # the draft distributions are distributions over the target vocabulary, zero outside the draft vocabulary
    np.testing.assert_allclose(drafts[0][1].sum(-1), 1, rtol=1e-5)
    if isinstance(model, Eagle3Drafter):
        outside = np.setdiff1d(np.arange(61), np.asarray(model.d2t.get_value()))
        assert not drafts[0][1][:, outside].any() and set(drafts[0][0]) <= set(model.d2t.get_value().tolist())


def test_bad_checkpoints_and_configs(tmp_path, target):
    with pytest.raises(ValueError, match="not a drafter checkpoint"):
        load_drafter(tmp_path)
    (tmp_path / "config.json").write_text('{"kind": "medusa"}')
    with pytest.raises(ValueError, match="kind must be one of"):
        load_drafter(tmp_path)
    with pytest.raises(ValueError, match="sorted and distinct"):
        BlockDrafterConfig(32, (2, 0))
    with pytest.raises(ValueError, match="block_size"):
        BlockDrafterConfig(32, (0,), block_size=1)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3Config(32, (0, 1, 2), 61, 62)
    wrong = BlockDrafter(BlockDrafterConfig(32, (0, 5), head_dim=8, context=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="target has 3"):
        NeuralDrafter(wrong, target, 1)


def test_verify_features_are_the_captured_layers(target, rng):
    eng = Engine(target, EngineConfig(max_slots=2, page_size=4, max_seq_len=32, prefill_chunk=16))
    toks = rng.integers(0, 61, (2, 6))
    for s in (0, 1):
        eng.cache.reserve(s, 6)
    logits, feats = eng.verify_features(toks, np.array([6, 4]), (0, 2))
    assert feats.shape == (2, 6, 64) and list(eng.cache.lengths) == [6, 4]
    eng.cache.lengths[:] = 0
    plain = eng.verify(toks, np.array([6, 4]))
    np.testing.assert_array_equal(np.asarray(logits)[0], np.asarray(plain)[0])
    # the last captured layer is the final residual stream: the final norm and LM head of it give the logits
    h = target.norm(feats[:, :, 32:])
    np.testing.assert_allclose(np.asarray(target.logits(h))[0], np.asarray(logits)[0], rtol=1e-4, atol=1e-4)


def test_feature_window_keeps_the_newest_right_aligned():
    W, F = 4, 2
    ctx, nxt, n_ctx = jnp.zeros((2, W, F)), jnp.zeros((2, W), jnp.int32), jnp.array([0, 3])
    feats = jnp.arange(2 * 3 * F, dtype=jnp.float32).reshape(2, 3, F) + 1
    toks = jnp.arange(6, dtype=jnp.int32).reshape(2, 3) + 1
    ctx, nxt, n_ctx = _append(ctx, nxt, n_ctx, feats, toks, jnp.array([2, 3]))
    assert n_ctx.tolist() == [2, 4]
    assert nxt.tolist() == [[0, 0, 1, 2], [0, 4, 5, 6]]
    np.testing.assert_array_equal(np.asarray(ctx[0, 2:]), np.asarray(feats[0, :2]))
