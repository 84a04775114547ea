"""Decode tokens/s of our engine vs Hugging Face `generate(cache_implementation="static")`, same shapes, same run.

A randomly initialised model with Qwen2.5-Coder-1.5B's shapes (28 layers, hidden 1536, 12/2 heads, vocab 151,936,
tied embeddings; 3.09 GB in bf16), greedy, batch 1 and 8, a random prompt and 256 new tokens. Both sides are timed
the same way: wall time of a whole `generate` call after a warm-up call, new tokens per sequence / time. The
weight-streaming roofline is weight bytes / the copy bandwidth measured in the same run (torch clone of 4 GiB).

Run on the GPU machine:  python benchmarks/decode.py            (CPU: --tiny, a smoke test of the script)
HF runs in a subprocess (`--hf-only`) so torch and JAX do not share the GPU's memory.

--moe: a randomly initialised Qwen3-30B-A3B instead (48 layers, hidden 2048, 32/4 heads, 128 experts top-8, expert
FFN 768; ~61 GB in bf16), no HF baseline; the same engine runs once with the MoE layers on `moe_reference`
(ragged_dot) and once on what the MoE dispatcher picks for the device (the fused kernel on NVIDIA GPUs): before
and after, in one process, one model. Writes decode_moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402

QWEN25_CODER_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, head_dim=128, tie_word_embeddings=True, qkv_bias=True,
                         max_position_embeddings=32768)
QWEN25_CODER_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, tie_word_embeddings=False, qkv_bias=True,
                       max_position_embeddings=32768)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=4096)


QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                     num_kv_heads=4, head_dim=128, qk_norm=True, num_experts=128, num_experts_per_tok=8,
                     moe_intermediate_size=768, norm_topk_prob=True, max_position_embeddings=40960,
                     moe_layers=(True,) * 48)
TINY_MOE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                norm_topk_prob=True, max_position_embeddings=4096, moe_layers=(True,) * 2)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def hf_only(args) -> None:
    """Runs in the subprocess: HF generate tok/s and the torch copy ceiling, printed as one JSON line."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = TINY if args.tiny else QWEN25_CODER_1_5B
    cfg = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=shape["max_position_embeddings"], tie_word_embeddings=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    out = {"torch": torch.__version__, "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for batch in args.batch:
        ids = torch.randint(0, shape["vocab_size"] - 100, (batch, args.prompt_len), device=dev)
        kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kw)  # warm-up (compiles the static cache)
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out[f"hf_static_b{batch}_tok_s"] = (res.shape[1] - args.prompt_len) / dt
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
        x = torch.empty(1 << 30, dtype=torch.float32, device=dev)  # 4 GiB
        for _ in range(3):
            y = x.clone()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            y = x.clone()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        del y
        out["copy_GBps"] = 2 * x.numel() * 4 / sorted(times)[len(times) // 2] / 1e9
    print("HF_RESULT " + json.dumps(out), flush=True)


def model_config(args):
    from codegen_jax import ModelConfig

    if args.moe:
        return ModelConfig(model_type="qwen3_moe", rms_norm_eps=1e-6, **(TINY_MOE if args.tiny else QWEN3_30B_A3B))
    return ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **(TINY if args.tiny else QWEN25_CODER_1_5B))


def ours(args, attn: str, model=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codegen_jax import Engine, EngineConfig, SamplingParams, init_model

    cfg = model_config(args)
    if model is None:
        model = init_model(cfg, dtype=jnp.bfloat16)
        log("ours: model initialised")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model))
    out = {"weight_bytes": weight_bytes}
    rng = np.random.default_rng(0)
    for batch in args.batch:
        engine = Engine(model, EngineConfig(max_slots=batch, page_size=args.page_size,
                                            max_seq_len=args.prompt_len + args.new_tokens + 16,
                                            prefill_chunk=1 << (args.prompt_len - 1).bit_length(),
                                            decode_steps=args.decode_steps,
                                            attn_impl=None if attn == "auto" else attn))
        prompts = [list(rng.integers(0, cfg.vocab_size - 100, args.prompt_len)) for _ in range(batch)]
        sp = SamplingParams(max_new_tokens=args.new_tokens)  # no stop tokens: exactly new_tokens each
        engine.generate(prompts, sp)  # warm-up: compiles prefill buckets and the decode loop
        log(f"ours: batch {batch} warmed up")
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = engine.generate(prompts, sp)
            times.append(time.perf_counter() - t)
            ttft = max(r.time_to_first_token_s for r in res)
        dt = sorted(times)[len(times) // 2]
        assert all(len(r.tokens) == args.new_tokens for r in res)
        out[f"ours_b{batch}_tok_s"] = args.new_tokens / dt
        out[f"ours_b{batch}_decode_only_tok_s"] = (args.new_tokens - 1) / (dt - ttft)
        out[f"ours_b{batch}_prefill_s"] = ttft
        log(f"ours ({attn}): batch {batch}: {out[f'ours_b{batch}_tok_s']:.1f} tok/s per sequence")
        del engine
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps fused per device call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke test of this script")
    p.add_argument("--attn", nargs="+", default=None,
                   help="attention implementations to run, 'auto' for the dispatcher's pick per call (default: "
                        "reference auto)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--moe", action="store_true", help="Qwen3-30B-A3B, MoE reference vs the dispatcher's MoE kernel")
    args = p.parse_args()
    if args.hf_only:
        return hf_only(args)
    if args.moe:
        return moe_main(args)

    hf = {}
    if not args.skip_hf:
        cmd = [sys.executable, __file__, "--hf-only", "--batch", *map(str, args.batch), "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens)] + (["--tiny"] if args.tiny else [])
        log("HF baseline (subprocess)")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_MODULE_LOADING": "LAZY"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("HF_RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"HF baseline failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        hf = json.loads(line[-1].removeprefix("HF_RESULT "))
        log(f"HF done: {hf}")
    import jax

    impls = args.attn or ["reference", "auto"]
    runs = {impl: ours(args, impl) for impl in impls}
    rows = []
    for impl, us in runs.items():
        for b in args.batch:
            row = {"attention": impl, "batch": b, "ours tok/s": round(us[f"ours_b{b}_tok_s"], 1),
                   "ours decode-only tok/s": round(us[f"ours_b{b}_decode_only_tok_s"], 1)}
            if hf:
                row["HF static tok/s"] = round(hf[f"hf_static_b{b}_tok_s"], 1)
                row["ours / HF"] = round(us[f"ours_b{b}_tok_s"] / hf[f"hf_static_b{b}_tok_s"], 2)
            if "copy_GBps" in hf:
                roof = hf["copy_GBps"] * 1e9 / us["weight_bytes"]
                row["roofline tok/s"] = round(roof, 1)
                row["ours / roofline"] = round(us[f"ours_b{b}_decode_only_tok_s"] / roof, 2)
            rows.append(row)
    cols = list(rows[0])
    print(table(rows, cols))

    path = write_result("decode_tiny" if args.tiny else "decode", {
        "device": device(),
        "versions": {**versions("jax", "jaxlib", "flax", "transformers"), "torch": hf.get("torch", "not run")},
        "shapes": "tiny" if args.tiny else "Qwen2.5-Coder-1.5B",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "page_size": args.page_size,
        "decode_steps": args.decode_steps, "backend": jax.default_backend(), "ours": runs, "hf": hf,
        "table": rows,
    })
    print(f"wrote {path}")


def moe_main(args) -> None:
    """Before/after of the MoE op in the decode loop: the MoE reference, then the dispatcher's pick."""
    import jax
    import jax.numpy as jnp

    from codegen_jax import init_model
    from pallas_kernels.moe import dispatch as moe_dispatch

    attn = (args.attn or ["auto"])[0]
    model = init_model(model_config(args), dtype=jnp.bfloat16)
    log("ours: MoE model initialised")
    after = moe_dispatch.choose()
    runs = {}
    for moe_impl in dict.fromkeys(["reference", after]):
        # the model calls `pallas_kernels.moe` without an impl: hide the kernels (and their tuned entries) for
        # the "before" run; every Engine jits afresh, so each run traces with its own pick
        hidden = {k: v for k, v in moe_dispatch.IMPLEMENTATIONS.items() if k != "reference"}
        if moe_impl == "reference":
            for k in hidden:
                del moe_dispatch.IMPLEMENTATIONS[k]
        try:
            runs[moe_impl] = ours(args, attn, model)
        finally:
            moe_dispatch.IMPLEMENTATIONS.update(hidden)
        log(f"moe={moe_impl}: {runs[moe_impl]}")
    rows = []
    for impl, us in runs.items():
        for b in args.batch:
            row = {"moe": impl, "attention": attn, "batch": b, "tok/s": round(us[f"ours_b{b}_tok_s"], 1),
                   "decode-only tok/s": round(us[f"ours_b{b}_decode_only_tok_s"], 1)}
            if impl != "reference" and "reference" in runs:
                row["speed-up"] = round(us[f"ours_b{b}_decode_only_tok_s"]
                                        / runs["reference"][f"ours_b{b}_decode_only_tok_s"], 2)
            rows.append(row)
    print(table(rows, list(dict.fromkeys(c for r in rows for c in r))))
    path = write_result("decode_moe_tiny" if args.tiny else "decode_moe", {
        "device": device(), "versions": versions("jax", "jaxlib", "flax"),
        "shapes": "tiny-moe" if args.tiny else "Qwen3-30B-A3B (random weights)",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "page_size": args.page_size,
        "decode_steps": args.decode_steps, "backend": jax.default_backend(), "ours": runs, "table": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
