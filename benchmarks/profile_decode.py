"""Where a decode step's time goes: ms/step of the engine's fused decode loop under XLA flag variants, and a
per-kernel breakdown from the profiler (GPU busy time against wall time shows launch gaps).

Run on the GPU machine:  python benchmarks/profile_decode.py [--variants default cmdbuf_while ...]
Each variant runs in its own process (XLA flags are read once per process). CPU: --tiny, a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402
from benchmarks.decode import QWEN25_CODER_1_5B, TINY  # noqa: E402
from benchmarks.gpu_trace import breakdown, events_from  # noqa: E402

_ALL_CMDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
# name -> (XLA_FLAGS, attention implementation, profile?)
VARIANTS = {
    "default": ("", None, True),
    "cmdbuf_off": ("--xla_gpu_enable_command_buffer=", None, False),
    "cmdbuf_while": (f"--xla_gpu_enable_command_buffer={_ALL_CMDS},WHILE,CONDITIONAL", None, False),
    "cmdbuf_while_profiled": (f"--xla_gpu_enable_command_buffer={_ALL_CMDS},WHILE,CONDITIONAL "
                              "--xla_enable_command_buffers_during_profiling=true", None, True),
    "graph_min_1": ("--xla_gpu_graph_min_graph_size=1", None, False),
    "no_attention": ("", "zeros", False),
}


def kernel_breakdown(trace_dir: str, steps: int) -> dict:
    """GPU kernel time per decode step, by kernel name, from the profiler's xplane file (`gpu_trace.breakdown`)."""
    b = breakdown(events_from(trace_dir), steps)
    return {"gpu_busy_ms_per_step": b["gpu_busy_us_per_call"] / 1e3,
            "gpu_span_ms_per_step": b["gpu_span_us_per_call"] / 1e3,
            "kernels_per_step": b["kernels_per_call"],
            "top": [{"name": k["name"][:90], "us_per_step": k["us_per_call"], "count_per_step": k["count_per_call"]}
                    for k in b["top"]]}


def measure(model, cfg, batch: int, args) -> dict:
    """ms/step of the raw fused decode call and of engine.generate, for one batch size."""
    import jax
    import numpy as np

    from codegen_jax import Engine, EngineConfig, SamplingParams

    n = args.decode_steps
    engine = Engine(model, EngineConfig(max_slots=batch, max_seq_len=args.prompt_len + args.new_tokens + 16,
                                        decode_steps=n,
                                        prefill_chunk=1 << (args.prompt_len - 1).bit_length(),
                                        attn_impl=args.attn))
    engine.generate([[1] * 16] * batch, SamplingParams(max_new_tokens=2 * n))  # compiles the decode loop
    cache = engine.cache
    for s in range(batch):
        cache.reserve(s, args.prompt_len + 2 * n)
    cache.lengths[:] = args.prompt_len  # the cached K/V are whatever the pool holds: timing only
    last = np.ones(batch, np.int32)
    active = np.ones(batch, bool)
    sp = (np.zeros(batch, np.uint32), np.zeros(batch, np.float32), np.zeros(batch, np.int32),
          np.ones(batch, np.float32))

    def call():
        cache.pages, toks = engine._decode(engine.params, cache.pages, last, cache.page_table, cache.lengths,
                                           active, *sp, n_steps=n, greedy=True)
        return toks

    call().block_until_ready()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        call().block_until_ready()
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1e3 / n
    res = {"ms_per_step": ms, "tok_s_per_seq": 1e3 / ms}
    if args.profile:
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            for _ in range(3):
                call().block_until_ready()
            jax.profiler.stop_trace()
            res.update(kernel_breakdown(d, 3 * n))
    for s in range(batch):
        cache.release(s)
    # the whole engine.generate, as benchmarks/decode.py times it: host gaps between fused decode calls show
    # up as the difference from ms_per_step above
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size - 100, args.prompt_len)) for _ in range(batch)]
    gen = SamplingParams(max_new_tokens=args.new_tokens)
    engine.generate(prompts, gen)
    t = time.perf_counter()
    done = engine.generate(prompts, gen)
    dt = time.perf_counter() - t
    ttft = max(r.time_to_first_token_s for r in done)
    res["generate_decode_only_tok_s"] = (args.new_tokens - 1) / (dt - ttft)
    res["generate_ms_per_step"] = (dt - ttft) * 1e3 / (args.new_tokens - 1)
    if args.profile:
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            engine.generate(prompts, gen)
            jax.profiler.stop_trace()
            bd = kernel_breakdown(d, args.new_tokens)
            res["generate_gpu_busy_ms_per_step"] = bd["gpu_busy_ms_per_step"]
            res["generate_gpu_span_ms_per_step"] = bd["gpu_span_ms_per_step"]
    return res


def child(args) -> None:
    import jax.numpy as jnp

    from codegen_jax import ModelConfig, init_model
    from pallas_kernels.attention import dispatch

    dispatch.register("zeros", lambda q, *a, **k: jnp.zeros_like(q))
    shape = TINY if args.tiny else QWEN25_CODER_1_5B
    cfg = ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **shape)
    model = init_model(cfg, dtype=jnp.bfloat16)
    out = {f"b{batch}": measure(model, cfg, batch, args) for batch in args.batch}
    print("PROFILE_RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--attn", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results, rows = {}, []
    for name in args.variants:
        flags, attn, prof = VARIANTS[name]
        cmd = [sys.executable, __file__, "--child", "--batch", *map(str, args.batch), "--prompt-len",
               str(args.prompt_len), "--decode-steps", str(args.decode_steps), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
        cmd += (["--tiny"] if args.tiny else []) + (["--attn", attn] if attn else []) + (["--profile"] if prof else [])
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        line = [x for x in proc.stdout.splitlines() if x.startswith("PROFILE_RESULT ")]
        if proc.returncode or not line:
            results[name] = {"error": proc.stderr[-1500:]}
            print(f"{name}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[-1].removeprefix("PROFILE_RESULT "))
        print(f"{name}: done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        for b, r in results[name].items():
            rows.append({"variant": name, "batch": b, "ms/step": round(r["ms_per_step"], 3),
                         "tok/s/seq": round(r["tok_s_per_seq"], 1),
                         "gpu busy ms/step": round(r.get("gpu_busy_ms_per_step", float("nan")), 3),
                         "kernels/step": round(r.get("kernels_per_step", float("nan")), 1),
                         "generate ms/step": round(r["generate_ms_per_step"], 3),
                         "generate tok/s": round(r["generate_decode_only_tok_s"], 1)})
    for name, r in results.items():
        for b, rb in r.items():
            if isinstance(rb, dict) and "top" in rb:
                print(f"\n{name} {b}: top kernels (us/step, count/step)")
                for k in rb["top"][:20]:
                    print(f"  {k['us_per_step']:9.1f}  {k['count_per_step']:5.1f}  {k['name']}")
    print()
    print(table(rows, list(rows[0])) if rows else "no results")
    write_result("profile_decode_tiny" if args.tiny else "profile_decode", {
        "device": device(), "versions": versions("jax", "jaxlib", "flax"), "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps, "variants": {k: VARIANTS[k][0] for k in args.variants},
        "results": results, "table": rows})


if __name__ == "__main__":
    main()
