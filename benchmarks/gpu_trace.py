"""GPU kernel timelines from JAX's profiler: which kernels a call runs, for how long, and what runs beside what.

`profiled(run)` calls `run` under `jax.profiler` and returns the GPU kernel events of the trace (the xplane
file's device planes, one line per CUDA stream). From those:
  - `breakdown`: time per kernel name per call, busy time (the sum of kernel durations) against the span (first
    start to last end) per call, so the launch gaps show as span - busy;
  - `overlap`: per device, the time communication kernels (NCCL) ran, the time compute kernels ran, and how much
    of the communication ran while compute was running too: the part an overlapped collective actually hid.
A trace whose timeline is flat (CPU, no CUPTI) gives no events, and both return zeros.
"""

from __future__ import annotations

import glob
import tempfile
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple


class Event(NamedTuple):
    device: str  # the plane, e.g. "/device:GPU:0"
    stream: str  # the line, e.g. "Stream #13(...)"
    name: str
    start_ns: float
    dur_ns: float


def is_comm(name: str) -> bool:
    """NCCL's kernels (send/recv, all-gather, reduce-scatter, all-reduce), by name."""
    return "nccl" in name.lower()


def events_from(trace_dir: str) -> list[Event]:
    """The kernel events of every GPU's stream lines in the newest xplane file under trace_dir (memcpy lines
    left out: they are copies, not kernels)."""
    from jax.profiler import ProfileData

    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        return []
    out = []
    for plane in ProfileData.from_file(paths[-1]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            low = line.name.lower()
            if "stream" not in low or "memcpy" in low:
                continue
            out += [Event(plane.name, line.name, ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
    return out


def profiled(run: Callable[[], object], *, runs: int = 3, keep: str | None = None,
             warmup_s: float | None = None) -> list[Event]:
    """Kernel events of `runs` calls of `run` (compiled beforehand by the caller), traced after
    `tuning.warm_up(warmup_s)`. keep: a directory to leave the trace in (for the trace viewer); else a temporary
    one."""
    import jax

    from pallas_kernels.tuning import warm_up

    warm_up([run], warmup_s)
    with tempfile.TemporaryDirectory() as tmp:
        d = keep or tmp
        jax.profiler.start_trace(d)
        try:
            for _ in range(runs):
                run()
        finally:
            jax.profiler.stop_trace()
        return events_from(d)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def breakdown(events: list[Event], calls: int, *, top: int = 30) -> dict:
    """Per call, over all devices: busy time (sum of kernel durations), span (first start to last end, per
    device, the longest), kernel count, and the `top` kernel names by time."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans = defaultdict(lambda: [float("inf"), 0.0])
    busy = 0.0
    for ev in events:
        per_name[ev.name][0] += ev.dur_ns
        per_name[ev.name][1] += 1
        busy += ev.dur_ns
        s = spans[ev.device]
        s[0], s[1] = min(s[0], ev.start_ns), max(s[1], ev.start_ns + ev.dur_ns)
    devices = max(1, len(spans))
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_busy_us_per_call": busy / 1e3 / calls / devices,
        "gpu_span_us_per_call": max((b - a for a, b in spans.values()), default=0.0) / 1e3 / calls,
        "kernels_per_call": len(events) / calls / devices,
        "top": [{"name": n[:100], "us_per_call": t / 1e3 / calls / devices, "count_per_call": c / calls / devices}
                for n, (t, c) in ranked],
    }


def overlap(events: list[Event], calls: int, comm: Callable[[str], bool] = is_comm) -> dict:
    """Per device, per call (us): comm (union of communication kernels' time), compute (union of the others'),
    both (communication that ran while a compute kernel ran), span; and hidden = both / comm (None without
    communication)."""
    out = {}
    for dev in sorted({ev.device for ev in events}):
        mine = [ev for ev in events if ev.device == dev]
        c = _union([(e.start_ns, e.start_ns + e.dur_ns) for e in mine if comm(e.name)])
        k = _union([(e.start_ns, e.start_ns + e.dur_ns) for e in mine if not comm(e.name)])
        both = _intersection(c, k)
        span = max(e.start_ns + e.dur_ns for e in mine) - min(e.start_ns for e in mine)
        out[dev] = {"comm_us": _length(c) / 1e3 / calls, "compute_us": _length(k) / 1e3 / calls,
                    "both_us": both / 1e3 / calls, "span_us": span / 1e3 / calls,
                    "hidden": round(both / _length(c), 3) if c else None}
    return out


def profile_call(fn: Callable, inputs, *, max_calls: int, top: int = 8) -> tuple[dict, str]:
    """Where one call of `fn` goes, kernel by kernel: `breakdown` of 3 traced chains (`tuning.chain`) of up to
    max_calls calls over the rotating input sets, and a one-line summary of it for a log."""
    from pallas_kernels import tuning

    run, calls = tuning.chain(fn, inputs, target_ms=0.0, max_calls=max_calls)
    b = breakdown(profiled(run, runs=3), 3 * calls, top=top)
    line = (f"busy {b['gpu_busy_us_per_call']:.1f} us, span {b['gpu_span_us_per_call']:.1f} us, "
            f"{b['kernels_per_call']:.1f} kernels per call: "
            + "; ".join(f"{k['us_per_call']:.1f} us x{k['count_per_call']:.0f} {k['name'][:60]}" for k in b["top"]))
    return b, line
