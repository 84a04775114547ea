"""Sharded == single-device, on 8 simulated CPU devices. Runs only in a process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_sharding.py launches two, each with part of the
tests); skipped otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from jax.sharding import PartitionSpec as P

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model, load_model
from codegen_jax.model import Transformer
from codegen_jax.parallel import sharded_engine
from pallas_kernels.moe import moe_reference
from sharding import tensor_parallel as TP
from sharding.mesh import make_mesh
from sharding.rules import kv_sharding, path_str
from train.config import TrainConfig
from train.drafter import Trainer, build_drafter

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
    for chunks in (2, 3, 64):  # pieces per shard on the ring; 3 does not divide the shard, 64 exceeds it
        q, k = jax.jit(lambda *a, c=chunks: TP.column_parallel(a[0], a[1:], mesh, "ring", chunks=c))(x, wq, wk)
        y = jax.jit(lambda h, w, c=chunks: TP.row_parallel(h, w, mesh, "ring", chunks=c))(h, wd)
        assert close(q, x @ wq.T) < 1e-6 and close(k, x @ wk.T) < 1e-6, chunks
        assert close(y, h @ wd.T) < 1e-6, chunks


@pytest.mark.parametrize("tp", [2, 8])
def test_collective_matmuls_in_bf16_match_each_other_and_the_plain_matmul(rng, tp):
    """bf16 activations: the rings and their plain twins send partials in bf16 (as GSPMD does), sum in float32."""
    mesh = mesh_of(tp, 1)
    h, wd = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in ((32, 64), (24, 64)))
    ref = np.asarray(h, np.float64) @ np.asarray(wd, np.float64).T
    ys = {s: jax.jit(lambda h, w, s=s: TP.row_parallel(h, w, mesh, s))(h, wd) for s in ("ring", "bidi", "sp")}
    for s, y in ys.items():
        assert y.dtype == jnp.bfloat16 and close(y, ref) < 2e-2, s
    assert close(ys["ring"], ys["sp"]) < 2e-2


def test_tp_attention_attends_each_devices_own_heads(monkeypatch):
    """Under tp the paged attention runs per device on H/tp query and K/tp KV heads (a shard_map): a Pallas kernel
    is opaque to GSPMD, which would gather every head's pages to every device."""
    import codegen_jax.model as M

    seen, inner = [], M.paged_attention

    def spy(q, k_pages, *a, **kw):
        seen.append((q.shape[2], k_pages.shape[0]))
        return inner(q, k_pages, *a, **kw)

    monkeypatch.setattr(M, "paged_attention", spy)
    engine = sharded_engine(model_for("wide"), ECFG, mesh_of(4, 1), strategy="ring")
    engine.cache.reserve(0, 16)
    engine.verify(np.zeros((2, 16), np.int32), np.array([16, 0], np.int32))
    assert seen and set(seen) == {(WIDE.num_heads // 4, WIDE.num_kv_heads // 4)}


def test_pages_of_a_tp_engine_come_to_the_host_whole(rng):
    """The tiers' copy off the device through pinned host memory takes every device's heads of a tp-sharded pool:
    the same bytes as np.asarray of the gathered pages."""
    from codegen_jax.kv_cache import via_pinned_host

    engine = sharded_engine(model_for("wide"), ECFG, mesh_of(4, 1), strategy="ring")
    kv = engine.cache
    shape = (3, WIDE.num_layers, 2, WIDE.num_kv_heads, ECFG.page_size, WIDE.head_dim)
    kv.write_pages([4, 1, 7], rng.standard_normal(shape).astype(np.float32))
    pages = kv.read_pages([4, 1, 7])
    assert len(pages.sharding.device_set) > 1
    got, want = via_pinned_host(pages), np.asarray(pages)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


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


def inputs(name):
    """(ids [2, 16], a prompt of 11 of them) for `run`."""
    vocab = WIDE.vocab_size if name == "wide" else 512
    ids = np.random.default_rng(7).integers(0, vocab, (2, 16)).astype(np.int32)
    return ids, [int(t) for t in ids[0, :11]]


def single_device(name):
    """`run` of a one-device engine on `inputs(name)`, once per model for the module."""
    if name not in SINGLE:
        SINGLE[name] = run(Engine(model_for(name), ECFG), *inputs(name))
    return SINGLE[name]


# Every strategy, tp in {2, 4, 8}, ep for MoE; prefill (T=16 splits over every ring) and decode (B=2 does not:
# 'auto' and the rings fall back to the all-reduce blocks there).
CASES = [
    ("llama", 2, 1, "xla"), ("llama", 2, 1, "bidi"), ("llama", 4, 1, "sp"), ("llama", 8, 1, "allreduce_overlap"),
    ("qwen3_moe", 2, 4, "ring"), ("qwen3_moe", 4, 1, "xla"),
    ("wide", 8, 1, "auto"), ("wide", 4, 2, "allreduce"),
]


@pytest.mark.parametrize("name,tp,strategy", [("llama", 2, "xla"), ("llama", 4, "bidi"), ("wide", 8, "allreduce")])
def test_microbatched_sharded_engine_equals_single_device(rng, name, tp, strategy, monkeypatch):
    # two micro-batches interleaved layer by layer (the prefill's 16 tokens as 2 x 8; decode's B=2 stays whole)
    from codegen_jax import model as model_module

    monkeypatch.setattr(Transformer, "microbatch_min_tokens", 8)
    splits = []
    real = model_module.split_batch
    monkeypatch.setattr(model_module, "split_batch", lambda b, cuts: splits.append(cuts) or real(b, cuts))
    ids, prompt = inputs(name)
    engine = sharded_engine(model_for(name), ECFG, mesh_of(tp, 1), strategy=strategy, microbatches=2)
    prefill, decode, tokens = run(engine, ids, prompt)
    assert splits and set(splits) == {(0, 8, 16)}  # the 16-token steps went as two pieces
    ref_prefill, ref_decode, ref_tokens = single_device(name)
    assert close(prefill, ref_prefill) < 1e-5
    assert close(decode, ref_decode) < 1e-5
    assert tokens == ref_tokens


@pytest.mark.parametrize("tp,pieces", [(2, 4), (4, 2), (8, 4)])
def test_pieced_projections_equal_plain_matmuls(rng, tp, pieces):
    """GSPMD's projections as `pieces` matmuls each (`parallel._pieced`): column-parallel pieces of every shard,
    row-parallel pieces of the output; a split that does not divide falls back to the one matmul."""
    from codegen_jax.parallel import _pieced

    mesh = mesh_of(tp, 1)
    xc, xr = (jnp.asarray(rng.normal(size=(2, 5, d)), jnp.float32) for d in (24, 48))
    wc = jax.device_put(jnp.asarray(rng.normal(size=(48, 24)), jnp.float32), jax.NamedSharding(mesh, P("tp")))
    wr = jax.device_put(jnp.asarray(rng.normal(size=(24, 48)), jnp.float32), jax.NamedSharding(mesh, P(None, "tp")))
    for x, w, column in ((xc, wc, True), (xr, wr, False)):
        bias = jnp.asarray(rng.normal(size=(w.shape[0],)), jnp.float32)
        lin = _Lin(w, bias)
        fn = jax.jit(lambda x, lin=lin, column=column: _pieced(x, lin, mesh, pieces, column))
        assert close(fn(x), x @ np.asarray(w).T + np.asarray(bias)) < 1e-6, (tp, pieces, column)
        n_out = w.shape[0]
        split = n_out % (tp * pieces if column else pieces) == 0
        dots = fn.lower(x).as_text().count("dot_general")
        assert dots == (pieces if split else 1), (tp, pieces, column, dots)


class _Lin:
    """A Linear's interface (weight[...], bias[...], a call) over given arrays."""

    class _Ref:
        def __init__(self, a):
            self.a = a

        def __getitem__(self, _):
            return self.a

    def __init__(self, w, b):
        self.weight, self.bias = self._Ref(w), self._Ref(b)

    def __call__(self, x):
        return x @ self.weight[...].T + self.bias[...]


@pytest.mark.parametrize("name,tp,pieces,stagger", [("llama", 2, 4, False), ("llama", 2, 4, True),
                                                    ("llama", 4, 1, True)])
def test_pieced_microbatched_engine_equals_single_device(rng, name, tp, pieces, stagger, monkeypatch):
    """GSPMD's blocks with every projection as `pieces` matmuls, two micro-batches, their sublayers as ordered
    stages or not (`Transformer.microbatch_stagger`, whose output projections are `parallel._row_staged`): the
    single-device outputs (the pieces themselves, biases included, are checked on every tp above)."""
    from codegen_jax import parallel
    from codegen_jax.parallel import parallelize, shard_cache, shard_model

    monkeypatch.setattr(Transformer, "microbatch_min_tokens", 8)
    staged = []
    real = parallel._row_staged
    monkeypatch.setattr(parallel, "_row_staged", lambda *a: staged.append(a[3]) or real(*a))
    mesh = mesh_of(tp, 1)
    model = shard_model(model_for(name), mesh)
    parallelize(model, mesh, "xla", microbatches=2)
    model.microbatch_stagger = stagger
    for layer in model.layers:
        layer.self_attn.chunks = pieces
        if hasattr(layer.mlp, "chunks"):
            layer.mlp.chunks = pieces
    engine = Engine(model, ECFG)
    shard_cache(engine.cache, mesh)
    ids, prompt = inputs(name)
    prefill, decode, tokens = run(engine, ids, prompt)
    ref_prefill, ref_decode, ref_tokens = single_device(name)
    assert close(prefill, ref_prefill) < 1e-5
    assert close(decode, ref_decode) < 1e-5
    assert tokens == ref_tokens
    # staged: every layer's two output projections per piece, in the prefill's traces only (decode stays whole)
    assert (len(staged) > 0) == stagger and set(staged) <= {pieces}
    assert len(staged) % (2 * 2 * len(model.layers)) == 0


@pytest.mark.parametrize("name,tp,ep,strategy", CASES)
def test_sharded_engine_equals_single_device(rng, name, tp, ep, strategy):
    ids, prompt = inputs(name)
    mesh = mesh_of(tp, ep)
    engine = sharded_engine(model_for(name), ECFG, mesh, strategy=strategy)
    placed = engine.cache.pages[0][0].sharding
    assert placed == kv_sharding(mesh, engine.cache.pages[0][0].shape)
    prefill, decode, tokens = run(engine, ids, prompt)
    ref_prefill, ref_decode, ref_tokens = single_device(name)
    assert close(prefill, ref_prefill) < 1e-5
    assert close(decode, ref_decode) < 1e-5
    assert tokens == ref_tokens
    # donated steps hand the pool back in the layout it was placed in, so the next step does not recompile
    assert engine.cache.pages[0][0].sharding.is_equivalent_to(placed, 4)


@pytest.mark.parametrize("name,tp,ep", [("llama", 2, 1), ("qwen3_moe", 2, 2)])
def test_load_model_on_a_mesh_places_each_shard_as_it_reads(name, tp, ep):
    """load_model(mesh=...): every parameter arrives with its rule's sharding (each device holds 1/tp of a q_proj,
    1/(ep*tp) of the experts) and the values equal a one-device load; the replica's engine equals one device."""
    from codegen_jax.parallel import replica_engine, replica_mesh
    from sharding.rules import ShardingRules, logical_axes

    mesh = replica_mesh(tp, ep)
    assert mesh.devices.size == tp * ep and set(mesh.devices.flat) <= set(jax.local_devices())
    sharded = load_model(FIXTURES / name, dtype=jnp.float32, progress=False, mesh=mesh)
    plain = load_model(FIXTURES / name, dtype=jnp.float32, progress=False)
    from flax import nnx

    flat_plain = dict(nnx.to_flat_state(nnx.state(plain)))
    rules, checked = ShardingRules(), 0
    for path, var in nnx.to_flat_state(nnx.state(sharded)):
        value, key = var.get_value(), ".".join(map(str, path))
        assert value.sharding == rules.sharding(mesh, logical_axes(key, value.ndim), value.shape), key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_plain[path].get_value()), err_msg=key)
        checked += 1
    q = sharded.layers[0].self_attn.q_proj.weight[...]
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // tp
    assert checked == len(flat_plain)
    ref = single_device(name)  # the same one-device run the engine cases compare with (a plain load's engine)
    got = run(replica_engine(sharded, ECFG, mesh, "auto"), *inputs(name))
    assert close(got[0], ref[0]) < 1e-5 and close(got[1], ref[1]) < 1e-5 and got[2] == ref[2]


def test_generate_and_serve_with_tp(tmp_path, monkeypatch):
    """`codegen-jax generate --tp 2` (a real process on 8 devices) prints the tokens of --tp 1; a server
    assembled with tp=2 answers as one on one device."""
    import json
    import os
    import subprocess
    import sys

    def generate(*extra):
        p = subprocess.run([sys.executable, "-m", "codegen_jax.cli", "generate", "--model", str(FIXTURES / "qwen2"),
                            "--prompt", "def add(a, b):", "--max-new-tokens", "10", "--dtype", "float32", "--json",
                            "--quiet", *extra], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HOME": str(tmp_path)})
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["tokens"]

    one_device = generate()  # once for both comparisons: a process start and a compile each
    assert generate("--tp", "2", "--tp-strategy", "allreduce") == one_device
    assert generate("--tp", "2", "--tp-strategy", "xla", "--tp-microbatches", "2") == one_device

    from codegen_jax import Tokenizer
    from serve.scheduler import Request
    from serve.server import ServeConfig, assemble

    def answer(tp, microbatches=1):
        cfg = ServeConfig(model=str(FIXTURES / "qwen2"), dtype="float32", max_seq_len=128, page_size=8, max_slots=2,
                          prefill_chunk=32, decode_steps=2, tp=tp, tp_microbatches=microbatches, warmup=False)
        from codegen_jax.parallel import replica_mesh

        model = load_model(FIXTURES / "qwen2", dtype=jnp.float32, progress=False, mesh=replica_mesh(tp))
        _, state = assemble(cfg, model, Tokenizer.from_dir(FIXTURES / "qwen2"), "fixture")
        sched, got = state.scheduler, []
        assert (tp == 1) == (sched.engine.cache.pages[0][0].sharding.num_devices == 1)
        for prompt in ([5, 6, 7, 8] * 5, [9, 10, 11]):
            sched.submit(Request(prompt, SamplingParams(max_new_tokens=6), lambda out: got.append(out.tokens)))
        sched.run_until_idle()
        sched.stop()
        return got

    one = answer(1)
    assert answer(2) == one
    # two micro-batches, pieces of any size (the server's 32-token prefill bucket as 2 x 16)
    from codegen_jax import model as model_module

    monkeypatch.setattr(Transformer, "microbatch_min_tokens", 1)
    splits, real = [], model_module.split_batch
    monkeypatch.setattr(model_module, "split_batch", lambda b, cuts: splits.append(cuts) or real(b, cuts))
    assert answer(2, microbatches=2) == one
    assert (0, 16, 32) in splits


def packed_rows(seed, B=8, T=32):
    """Training rows as train.data.pack lays them out: two sequences a row (positions restart, the first 3 tokens
    of each are prompt), a few padding tokens at the end."""
    r = np.random.default_rng(seed)
    out = {k: np.zeros((B, T), np.int32) for k in ("tokens", "segments", "positions", "loss")}
    for b in range(B):
        cut, end = int(r.integers(10, 20)), T - int(r.integers(0, 4))
        for s, (lo, hi) in enumerate(((0, cut), (cut, end)), 1):
            out["tokens"][b, lo:hi] = r.integers(0, WIDE.vocab_size, hi - lo)
            out["segments"][b, lo:hi] = s
            out["positions"][b, lo:hi] = np.arange(hi - lo)
            out["loss"][b, lo + 3 : hi] = 1
    return out


TRAINED = {}


def train_steps(kind, tp, ep, devices):
    """(losses, grad norms, float32 drafter parameters) after 3 steps on `devices` (the first step's lr is 0 in
    the warm-up, so 3 steps make the last loss read updated parameters), and the Trainer."""
    cfg = TrainConfig(target="random", data="random", out="unused", drafter=kind, tp=tp, ep=ep, batch_size=8,
                      seq_len=32, num_blocks=3, block_size=4, draft_len=3, draft_vocab_size=64, num_heads=2,
                      head_dim=8, intermediate_size=32, context=8, compute_dtype="float32", target_dtype="float32",
                      lr=1e-2, warmup_steps=1, steps=10, seed=5)
    batches = [packed_rows(s) for s in range(3)]
    responses = [b["tokens"][0].tolist() for b in batches]
    trainer = Trainer(cfg, build_drafter(cfg, WIDE, responses, "float32"), init_model(WIDE, dtype=jnp.float32, seed=3),
                      devices)
    metrics = [trainer.step(b) for b in batches]
    losses = np.array([float(m["loss"]) for m in metrics])
    norms = np.array([float(m["grad_norm"]) for m in metrics])
    return losses, norms, [np.asarray(x) for x in trainer.state["params"]], trainer


# (kind, dp, tp, ep): one layout per drafter kind (the target's split is the same code for both, and tp 2 and 4
# split it alike): data parallel only (one row a device, the target replicated), and the target's heads/MLP/vocab
# over tp with its experts over ep, beside dp (EAGLE-3's draft-vocabulary head next to the vocab-split target).
LAYOUTS = [("block", 8, 1, 1), ("eagle3", 2, 2, 2)]


@pytest.mark.parametrize("kind,dp,tp,ep", LAYOUTS)
def test_sharded_training_equals_one_device(kind, dp, tp, ep):
    """The training step with the frozen target split over tp (and ep) gives the one-device losses and updates."""
    if kind not in TRAINED:
        TRAINED[kind] = train_steps(kind, 1, 1, jax.devices()[:1])[:3]
    ref_losses, ref_norms, ref_params = TRAINED[kind]
    losses, norms, params, trainer = train_steps(kind, tp, ep, None)
    assert dict(trainer.mesh.shape) == {"dp": dp, "ep": ep, "tp": tp}
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    for got, ref in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the target really is split: each device holds 1/tp of a q_proj (1/ep of the experts, 1/tp of their columns)
    target = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(trainer.ttreedef, trainer.target_leaves))[0]}
    q = target["layers.0.self_attn.q_proj.weight"]
    assert q.sharding.spec == P("tp") and q.addressable_shards[0].data.shape == (WIDE.num_heads * WIDE.head_dim // tp,
                                                                                 WIDE.hidden_size)
    experts = target["layers.0.mlp.experts.gate_proj"]
    E, D, F = WIDE.num_experts, WIDE.hidden_size, WIDE.moe_intermediate_size
    assert experts.sharding.spec == P("ep", None, "tp")
    assert experts.addressable_shards[0].data.shape == (E // ep, D, F // tp)
    # the drafter's state stays replicated and the step compiled once
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(trainer.state))
    assert trainer._step._cache_size() == 1


def test_train_drafter_cli_with_tp(tmp_path):
    """`python -m train.drafter --tp 2` end to end on 8 devices: the regeneration and evaluation engine and the
    training step run on the target split over tp, the drafter is exported."""
    import json

    from train.drafter import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    assert main(["--target", str(FIXTURES / "qwen2"), "--data", str(data), "--out", str(out), "--tp", "2",
                 "--batch-size", "4", "--seq-len", "32", "--max-new-tokens", "8", "--eval-max-new-tokens", "8",
                 "--eval-prompts", "2", "--eval-every", "2", "--steps", "2", "--log-every", "1", "--block-size", "4",
                 "--context", "8", "--num-heads", "2", "--head-dim", "8", "--intermediate-size", "32",
                 "--compute-dtype", "float32", "--target-dtype", "float32", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "acceptance_length" in r] == [0, 2]
    assert (out / "drafter").is_dir()
