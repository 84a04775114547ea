"""Checks the benchmarks' clock: a call's time from `tuning.time_interleaved` against the profiler's kernel timeline.

Every benchmark here times an op as a jitted chain of n calls (`tuning.chain`). Each run of a chain also pays a
fixed cost once: dispatching the executable, the GPU starting on it, the host waiting for the result. For each
case this script reports, in the same process:
  plain_us   t(n) / n                    the fixed cost spread over the n calls
  slope_us   (t(2n) - t(n)) / n          the fixed cost cancels (what `time_interleaved` reports on a GPU)
  span_us    the profiler's timeline of one chain of n calls, first kernel start to last kernel end, / n
  busy_us    the sum of the kernels' durations / n (span - busy: the GPU idle between kernels)
and the largest gaps between consecutive kernels. slope_us should sit at span_us; plain_us above it by the
run's fixed cost / n. Cases: paged attention (ours and JAX's Pallas kernel) at B=1, L=2k and B=8, L=8k, the verify
shape (T=64), an empty chain (the link alone) and a 4k x 4k bf16 matmul.

Run on the GPU machine:  python benchmarks/timing_check.py     (XLA_FLAGS apply: try
  --xla_gpu_enable_command_buffer= to see each launch's gap without CUDA graphs)
CPU: --tiny (a smoke test: tiny shapes, no kernel timeline). Writes benchmarks/results/timing_check.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402

ATTENTION = [((1, 2048, 16, 1), ("ours", "jax_paged")), ((8, 8192, 64, 1), ("ours", "jax_paged")),
             ((8, 8192, 64, 64), ("ours",))]
TINY = [((2, 128, 16, 1), ("ours",))]


def measure(name: str, fn, sets, *, repeats: int, target_ms: float, max_calls: int) -> dict:
    import jax

    from benchmarks import gpu_trace
    from pallas_kernels import tuning

    # both figures from the same runs: each repeat times the chain of n calls and the one of 2n
    t = tuning.time_interleaved({name: (fn, sets)}, repeats=repeats, target_ms=target_ms, max_calls=max_calls,
                                slope=True)[name]
    plain, slope = t["plain_us"], t["us"]
    run, n = tuning.chain(fn, sets, target_ms, max_calls)
    events = sorted(gpu_trace.profiled(run, runs=1), key=lambda e: e.start_ns)
    row = {"case": name, "calls": n, "plain_us": round(plain, 2), "slope_us": round(slope, 2)}
    if events:
        span = (events[-1].start_ns + events[-1].dur_ns - events[0].start_ns) / 1e3 / n
        gaps = sorted(((b.start_ns - a.start_ns - a.dur_ns) / 1e3, b.name[:40]) for a, b in itertools.pairwise(events))
        row |= {"span_us": round(span, 2), "busy_us": round(sum(e.dur_ns for e in events) / 1e3 / n, 2),
                "kernels_per_call": round(len(events) / n, 1),
                "top_gaps": [(round(g, 2), k) for g, k in reversed(gaps[-4:])]}
    jax.clear_caches()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, interpret mode")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from benchmarks.attention import copies_for, implementations, make_sets

    timing = {"repeats": 3 if args.tiny else args.repeats, "target_ms": 4.0, "max_calls": 4 if args.tiny else 64}
    Hq, Hkv, Dh = (4, 2, 64) if args.tiny else (32, 8, 128)
    rows = []
    t0 = time.perf_counter()
    for (B, L, S, T), names in TINY if args.tiny else ATTENTION:
        sets = make_sets(B, L, S, T, Hq, Hkv, Dh, copies=1 if args.tiny else copies_for(B, L, S))
        impls = implementations(T, S, L // S, Dh**-0.5, interpret=args.tiny)
        for name in names:
            rows.append(measure(f"attention {name} B{B} L{L} p{S} T{T}", impls[name], sets, **timing))
            print(f"[{time.perf_counter() - t0:6.1f}s] {rows[-1]}", file=sys.stderr, flush=True)
        rows.append(measure(f"empty chain B{B} L{L} p{S} T{T}", lambda q, *_: q, sets, **timing))
    n = 64 if args.tiny else 4096
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    rows.append(measure(f"matmul {n}", lambda x, y: x @ y, [(a, a)], **timing))
    cols = ["case", "calls", "plain_us", "slope_us", "span_us", "busy_us", "kernels_per_call"]
    print(table(rows, cols))
    if args.tiny:
        assert all(r["plain_us"] > 0 and r["slope_us"] == r["slope_us"] for r in rows), rows
        return
    path = write_result("timing_check", {"device": device(), "versions": versions("jax", "jaxlib"),
                                         "xla_flags": os.environ.get("XLA_FLAGS", ""), "timing": timing,
                                         "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
