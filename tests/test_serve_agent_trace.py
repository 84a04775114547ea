"""benchmarks/agent_trace.py --tiny as a smoke test: three servers, one redis-server, the agent workload, the
fetch-vs-recompute probe; the figures are noise on this CPU, but the hit rates are not."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_serve_cache import need_redis

ROOT = Path(__file__).resolve().parent.parent


def test_agent_trace_tiny(tmp_path):
    need_redis()
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "benchmarks/agent_trace.py", "--tiny", "--results-dir", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ttft_p50_ms" in p.stdout and "fetch_speedup" in p.stdout  # the printed tables
    result = json.loads((tmp_path / "agent_trace_tiny.json").read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert list(runs) == ["cache off", "cache on", "second server (redis)"]
    n = result["shape"]["sessions"] * result["shape"]["turns"]
    assert all(r["requests"] == n for r in runs.values())
    off, on, second = runs.values()
    assert off["hit_total"] == 0
    # turns after the first reuse the whole previous prompt; the system prompt is shared by every session
    # (how much of it spilled to host RAM first depends on the sessions' timing)
    assert on["hit_device"] > 0.3 and on["hit_device"] + on["hit_host"] > 0.5 and on["hit_remote"] == 0
    # the second server recomputes nothing the first one computed: the rest comes from Redis
    assert second["hit_remote"] > 0.2 and second["hit_total"] > 0.9
    assert result["remote"]["on"]["pages_written"] > 0 and result["remote"]["second"]["pages_fetched"] > 0
    # the warm-up compiled every shape: no measured request waited for a compile
    assert all(r["traced"] == 0 for r in runs.values()) and result["warm_up_traces"] > 0
    cached = result["cached_turns"]  # turns >= 2, against the same requests recomputed
    assert cached["requests"] == result["shape"]["sessions"] * (result["shape"]["turns"] - 1)
    assert {"cached_p50_ms", "cached_p50_reduction_pct", "first_p50_ms"} <= set(cached["cache on"])
    assert on["ttft_cached_p50_ms"] > 0 and on["ttft_first_p50_ms"] > 0
    probe = result["fetch_vs_recompute"]
    assert [r["prefix_tokens"] for r in probe] == [32, 64, 128, 256]
    assert all(r["recompute_ms"] > 0 and r["redis_fetch_ms"] > 0 and r["redis_MB_s"] > 0 for r in probe)
    assert result["kv_bytes_per_token"] == 768  # fixture: 3 layers x K, V x 2 KV heads x 16 dims x 4 bytes
    assert probe[-1]["kv_MB"] == round(256 * 768 / 1e6, 2)
    assert "redis_beats_recompute_above_tokens" in result and "overlap_beats_recompute_above_tokens" in result
    # the overlapped hit: a fetched tail (at least one page) after a recomputed head (possibly empty)
    assert all(r["overlap_ms"] > 0 and 0 < r["overlap_fetched_tokens"] <= r["prefix_tokens"] for r in probe)


def test_model_shapes_kv_bytes_per_token():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from benchmarks.agent_trace import MODEL_SHAPES, kv_bytes_per_token
    from codegen_jax import ModelConfig
    from codegen_jax.model import Transformer

    per_token = {"1.5b": 28672, "7b": 57344}  # 28 layers x K, V x (2 | 4) KV heads x 128 dims x 2 bytes
    for name, shape in MODEL_SHAPES.items():
        cfg = ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **shape)
        assert kv_bytes_per_token(cfg, "bfloat16") == per_token[name]
    # the 7B shapes build (without allocating): ~7.6B parameters, untied head
    cfg = ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **MODEL_SHAPES["7b"])
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    n = sum(x.size for x in jax.tree.leaves(state))
    assert 7.5e9 < n < 7.7e9, n


def test_trace_timers_count_only_while_counting():
    """benchmarks/trace_timers.py's wrapper: calls pass through unchanged, and are counted only during the probe."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import trace_timers

    class Thing:
        def work(self, x, scale=1):
            return x * scale

    trace_timers.timed(Thing, "work")
    assert Thing().work(3, scale=2) == 6 and "Thing.work" not in trace_timers.totals
    trace_timers.counting = True
    try:
        assert Thing().work(2) == 2 and Thing().work(5) == 5
    finally:
        trace_timers.counting = False
    seconds, calls = trace_timers.totals.pop("Thing.work")
    assert calls == 2 and seconds >= 0
