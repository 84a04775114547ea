"""Drafter training throughput: training tokens/s of the block drafter's full step (the frozen target's online
forward for features, the drafter's loss, backward and AdamW update) as `python -m train.drafter` runs it.

A randomly initialised target with Qwen2.5-Coder-1.5B's shapes (bf16), a block drafter of one layer reading
target layers 1, 14, 26, random packed rows (a quarter prompt, the rest response). Training tokens are the rows'
tokens (batch x seq_len) through the whole step; drafted positions are anchors x (block_size - 1) scored by the loss.
Timed over --steps steps after two warm-up steps (compile), waiting for the last step's metrics.

Run on the GPU machine:  python benchmarks/train_throughput.py     (CPU: --tiny, a smoke test of the script)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, versions, write_result  # noqa: E402
from benchmarks.decode import QWEN25_CODER_1_5B, TINY  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, float32, few steps: a CPU smoke test")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step (all devices)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    p.add_argument("--num-blocks", type=int, default=16, help="anchors per row and step")
    p.add_argument("--block-size", type=int, default=16, help="block drafter's block (drafts block_size - 1)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--no-write", action="store_true", help="print the result, write nothing under results/")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from codegen_jax import ModelConfig, init_model
    from train.config import TrainConfig
    from train.drafter import Trainer, build_drafter

    shape = TINY if args.tiny else QWEN25_CODER_1_5B
    if args.tiny:
        args.batch_size, args.seq_len, args.num_blocks, args.steps = 2, 64, 4, 3
    dtype = "float32" if args.tiny else "bfloat16"
    tcfg = ModelConfig(model_type="qwen2", **shape)
    target = init_model(tcfg, dtype=jnp.dtype(dtype), seed=0)
    L = tcfg.num_layers
    drafter_shape = (dict(num_heads=2, head_dim=16, intermediate_size=128, context=16) if args.tiny else
                     dict(num_heads=16, head_dim=128, intermediate_size=8960, context=256))
    cfg = TrainConfig(target="random", data="random", out="unused", drafter="block", block_size=args.block_size,
                      num_layers=1, target_layers=",".join(map(str, sorted({1, L // 2, L - 2}))),
                      batch_size=args.batch_size, seq_len=args.seq_len, num_blocks=args.num_blocks,
                      compute_dtype=dtype, target_dtype=dtype, steps=1000, **drafter_shape)
    model = build_drafter(cfg, tcfg, [], "float32")
    trainer = Trainer(cfg, model, target)
    B, T = args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    loss = np.zeros((B, T), np.int32)
    loss[:, T // 4 :] = 1
    batches = [{"tokens": rng.integers(0, tcfg.vocab_size, (B, T)).astype(np.int32),
                "segments": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T, dtype=np.int32),
                                                                                     (B, T)).copy(),
                "loss": loss} for _ in range(2)]
    for i in range(2):  # warm-up: compiles
        jax.block_until_ready(trainer.step(batches[i % 2]))
    t = time.perf_counter()
    for i in range(args.steps):
        metrics = trainer.step(batches[i % 2])
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t
    result = {
        "device": device(), "shapes": "tiny" if args.tiny else "Qwen2.5-Coder-1.5B (random init)", "dtype": dtype,
        "versions": versions("jax", "flax", "optax"), "batch_size": B, "seq_len": T, "num_blocks": args.num_blocks,
        "block_size": args.block_size, "drafter": {k: v for k, v in drafter_shape.items()},
        "target_layers": cfg.target_layers, "steps": args.steps, "step_ms": round(1e3 * dt / args.steps, 2),
        "train_tokens_per_s": round(B * T * args.steps / dt, 1),
        "drafted_positions_per_s": round(B * args.num_blocks * (args.block_size - 1) * args.steps / dt, 1),
        "final_loss": float(metrics["loss"]),
    }
    if not args.no_write:
        print(f"wrote {write_result('train_throughput_tiny' if args.tiny else 'train_throughput', result)}",
              file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
