"""benchmarks/agent_trace.py with wall-clock timers around the serving methods that run on the engine thread (and
the host tier's), counted during the fetch-vs-recompute probe only: where a remote hit's time goes beyond the
fetch itself. Prints one `TIMER name total_ms calls` line per method, most time first; the totals are over every
server of the process (the probe's requests go to all three).

Run on the GPU machine:  python benchmarks/trace_timers.py --model-shape 7b [agent_trace.py's flags]
(the 2026-11-30 run: `--max-prefill-rows 2 --sessions 2 --turns 2`, logs/agent_trace_7b_probe_timers_h200_499ee4c.log)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchmarks.agent_trace as agent_trace  # noqa: E402
from codegen_jax.kv_cache import PagedKVCache  # noqa: E402
from serve.host_tier import HostTier  # noqa: E402
from serve.radix_cache import RadixCache  # noqa: E402
from serve.scheduler import Scheduler  # noqa: E402

TIMED = {
    Scheduler: ("step", "_drain_inbox", "_intake", "_start_fetch", "_iteration", "_admit", "_place", "_fetch_staged",
                "_install_fetched", "_dispatch_prefill", "_dispatch_decode", "_prefill_done", "_finish", "_release"),
    RadixCache: ("match", "insert", "load", "lock", "unlock", "evict", "_make_host_room"),
    PagedKVCache: ("read_pages", "write_pages"),
    HostTier: ("store", "materialize", "load"),
}
totals: dict[str, list[float]] = {}  # name -> [seconds, calls]
counting = False
# the Redis hit's timeline: (start s, end s, method, object id, request id or "") of these methods while counting
EVENTS = {("Scheduler", n) for n in ("_intake", "_fetch_staged", "_place", "_install_fetched", "_prefill_done",
                                     "_dispatch_prefill")} | {("RadixCache", "evict"), ("HostTier", "store")}
events: list[tuple[float, float, str, int, str]] = []


def timed(cls, name: str) -> None:
    method, key = getattr(cls, name), f"{cls.__name__}.{name}"

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            if counting:
                end = time.perf_counter()
                entry = totals.setdefault(key, [0.0, 0])
                entry[0] += end - t
                entry[1] += 1
                if (cls.__name__, name) in EVENTS:
                    req = next((a for a in args[1:] if hasattr(a, "id") and hasattr(a, "prompt")), None)
                    rid = "" if req is None else str(req.id)
                    events.append((t, end, key, id(args[0]), rid))
                    if key == "Scheduler._intake":  # time.monotonic(): the same clock as perf_counter on Linux
                        events.append((req.arrival, req.arrival, "Request.arrival", id(args[0]), rid))

    setattr(cls, name, wrapper)


def print_timeline() -> None:
    """One `EVENT` line per timed call, in start order, for the stretches from each fetched request's arrival to
    its first token: milliseconds from that arrival, start and duration (of the last 60 requests, those of a
    server that fetched)."""
    starts = sorted((e[0], e[4]) for e in events if e[2] == "Request.arrival")
    ends = {e[4]: e[1] for e in events if e[2] == "Scheduler._prefill_done"}
    fetch_objs = {e[3] for e in events if e[2] == "Scheduler._fetch_staged"}
    for t0, rid in starts[-60:]:
        if rid not in ends or not any(e[3] in fetch_objs and e[4] == rid for e in events):
            continue
        t1 = ends[rid]
        print(f"EVENT ---- request {rid} ({(t1 - t0) * 1e3:.1f} ms arrival to first token)")
        for s, e, key, _, r in sorted(events):
            if t0 <= s <= t1:
                print(f"EVENT {(s - t0) * 1e3:9.1f} {(e - s) * 1e3:8.1f}  {key} {r}")


def main(argv: list[str] | None = None) -> None:
    for cls, names in TIMED.items():
        for name in names:
            timed(cls, name)
    crossover = agent_trace.crossover

    def counted_crossover(*args, **kwargs):
        global counting
        totals.clear()
        counting = True
        try:
            return crossover(*args, **kwargs)
        finally:
            counting = False
            for key, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
                print(f"TIMER {key:40s} {seconds * 1e3:10.1f} ms {calls:7d} calls", flush=True)
            print_timeline()

    agent_trace.crossover = counted_crossover
    agent_trace.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
