"""Sharded == single-device, on 8 simulated CPU devices. Runs only in a process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py launches one); skipped otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model, load_model
from codegen_jax.parallel import sharded_engine
from pallas_kernels.moe import moe_reference
from sharding import tensor_parallel as TP
from sharding.mesh import make_mesh
from sharding.rules import kv_sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run through test_sharding.py)")

ECFG = EngineConfig(max_slots=2, page_size=8, max_seq_len=64, prefill_chunk=32, decode_steps=3)
# Heads, KV heads and experts that split 8 ways (the fixtures' 2 KV heads do not).
WIDE = ModelConfig(model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2,
                   num_heads=8, num_kv_heads=8, head_dim=8, qk_norm=True, qkv_bias=True, num_experts=8,
                   num_experts_per_tok=2, moe_intermediate_size=16, moe_layers=(True, False))


def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def mesh_of(tp, ep):
    return make_mesh(dp=8 // (tp * ep), ep=ep, tp=tp)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_collective_matmuls_equal_plain_matmuls(rng, tp):
    mesh = mesh_of(tp, 1)
    x, wq, wk = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((32, 24), (16, 24), (8, 24)))
    h, wd = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((32, 16), (24, 16)))
    for strategy in ("ring", "bidi", "sp", "allreduce", "allreduce_overlap"):
        q, k = jax.jit(lambda *a, s=strategy: TP.column_parallel(a[0], a[1:], mesh, s))(x, wq, wk)
        y = jax.jit(lambda h, w, s=strategy: TP.row_parallel(h, w, mesh, s))(h, wd)
        assert close(q, x @ wq.T) < 1e-6 and close(k, x @ wk.T) < 1e-6, strategy
        assert close(y, h @ wd.T) < 1e-6, strategy


@pytest.mark.parametrize("ep,tokens", [(2, 13), (4, 1), (8, 32)])
def test_expert_parallel_moe_equals_reference(rng, ep, tokens):
    mesh = mesh_of(1, ep)
    E, D, F = 8, 16, 8
    x, router = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((tokens, D), (E, D)))
    g, u, d = (jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D)))
    out = jax.jit(lambda *a: TP.expert_parallel_moe(*a, mesh, top_k=2, norm_topk_prob=True))(x, router, g, u, d)
    assert close(out, moe_reference(x, router, g, u, d, top_k=2, norm_topk_prob=True)) < 1e-6


def run(engine, ids, prompt):
    """(prefill-shaped logits [B, T, V], decode-shaped logits [B, 1, V], greedy tokens of a generate)."""
    B, T = ids.shape
    for b in range(B):
        engine.cache.reserve(b, T + 1)
    prefill = np.asarray(engine.verify(ids, np.full(B, T)))
    decode = np.asarray(engine.verify(ids[:, :1], np.ones(B, np.int32)))
    for b in range(B):
        engine.cache.release(b)
    tokens = engine.generate([prompt], SamplingParams(max_new_tokens=4))[0].tokens
    return prefill, decode, tokens


SINGLE = {}


def model_for(name):
    if name == "wide":
        return init_model(WIDE, dtype=jnp.float32, seed=3)
    return load_model(FIXTURES / name, dtype=jnp.float32, progress=False)


# Every strategy, tp in {2, 4, 8}, ep for MoE; prefill (T=16 splits over every ring) and decode (B=2 does not:
# 'auto' and the rings fall back to the all-reduce blocks there).
CASES = [
    ("llama", 2, 1, "xla"), ("llama", 2, 1, "bidi"), ("llama", 4, 1, "sp"), ("llama", 8, 1, "allreduce_overlap"),
    ("qwen3_moe", 2, 4, "ring"), ("qwen3_moe", 4, 1, "xla"),
    ("wide", 8, 1, "auto"), ("wide", 4, 2, "allreduce"),
]


@pytest.mark.parametrize("name,tp,ep,strategy", CASES)
def test_sharded_engine_equals_single_device(rng, name, tp, ep, strategy):
    vocab = WIDE.vocab_size if name == "wide" else 512
    ids = np.random.default_rng(7).integers(0, vocab, (2, 16)).astype(np.int32)
    prompt = [int(t) for t in ids[0, :11]]
    if name not in SINGLE:
        SINGLE[name] = run(Engine(model_for(name), ECFG), ids, prompt)
    mesh = mesh_of(tp, ep)
    engine = sharded_engine(model_for(name), ECFG, mesh, strategy=strategy)
    placed = engine.cache.pages[0][0].sharding
    assert placed == kv_sharding(mesh, engine.cache.pages[0][0].shape)
    prefill, decode, tokens = run(engine, ids, prompt)
    ref_prefill, ref_decode, ref_tokens = SINGLE[name]
    assert close(prefill, ref_prefill) < 1e-5
    assert close(decode, ref_decode) < 1e-5
    assert tokens == ref_tokens
    # donated steps hand the pool back in the layout it was placed in, so the next step does not recompile
    assert engine.cache.pages[0][0].sharding.is_equivalent_to(placed, 4)
