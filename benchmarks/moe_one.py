"""One MoE configuration, called a few times: the program to put under a kernel profiler.

    XLA_PYTHON_CLIENT_MEM_FRACTION=.05 ncu --clock-control none -k regex:moe_ -c 2 --section SpeedOfLight \
        python benchmarks/moe_one.py --shape 30b --format int8 --config '{"fused_route": "split", "k_splits": 8}'

Keep the memory fraction small. Before its passes, ncu's kernel replay saves the device memory a kernel can reach,
and JAX otherwise holds 75% of the GPU for its pool. That is the likely reason one H200 run took over 110 s for
one kernel's five sections.

Runs `benchmarks/moe.py`'s inputs (the first token set) through `pallas_kernels.moe` with the tuned table's pick, or
through the Triton kernel with --config (a JSON object of TritonMoEConfig fields), --calls times after one call
that compiles; checks the output against the reference first. No timing: ncu and the profiler measure it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.moe import FORMATS, SHAPES, TOL, TOL_INT8, in_format, make_sets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="30b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--format", default="bf16", choices=list(FORMATS),
                   help="expert weights: bf16, int8 ([E, In, Out]) or int8k (int8 stored k-major)")
    p.add_argument("--config", default=None, help="TritonMoEConfig fields as JSON (default: the tuned pick)")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    import jax

    from pallas_kernels import moe, tuning
    from pallas_kernels.moe import TritonMoEConfig, moe_reference, moe_triton

    try:  # before any work: a bad config is one line and exit code 2
        config = json.loads(args.config) if args.config else None
        if config is not None and not isinstance(config, dict):
            raise ValueError("it must be a JSON object")
        cfg = TritonMoEConfig(**config) if config is not None else None
    except (TypeError, ValueError) as e:
        p.error(f"--config: {e}")

    D, F, E, K = SHAPES[args.shape]
    sets = make_sets(args.tokens, D, F, E, K)[:1]
    ref = jax.jit(functools.partial(moe_reference, top_k=K, norm_topk_prob=True))(*sets[0])
    x, router, *ws = in_format(sets, args.format)[0]
    if cfg is None:
        fn = functools.partial(moe, top_k=K, norm_topk_prob=True)
    else:
        fn = functools.partial(moe_triton, top_k=K, norm_topk_prob=True, config=cfg)
    fn = jax.jit(fn)
    err = tuning.max_rel_err(fn(x, router, *ws), ref)
    tol = TOL if args.format == "bf16" else TOL_INT8
    print(f"{args.shape} T={args.tokens} {args.format} config={config}: max rel err {err:.2e} (bound {tol})")
    if not err <= tol:
        print("output does not match the reference", file=sys.stderr)
        return 1
    for _ in range(args.calls):
        out = fn(x, router, *ws)
    out.block_until_ready()
    return 0


if __name__ == "__main__":
    sys.exit(main())
