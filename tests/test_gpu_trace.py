"""benchmarks/gpu_trace.py: the busy/span/overlap arithmetic on hand-made kernel timelines."""

import pytest

from benchmarks.gpu_trace import Event, breakdown, overlap


def ev(device, stream, name, start_us, dur_us):
    return Event(device, stream, name, start_us * 1e3, dur_us * 1e3)


def test_overlap_counts_only_communication_that_ran_beside_compute():
    g0, g1 = "/device:GPU:0", "/device:GPU:1"
    events = [
        # GPU 0: a GEMM 0-100 and another 150-200 on the compute stream; NCCL 50-170 on its own stream, plus a
        # second GEMM stream overlapping the first (compute union 0-120, 150-200)
        ev(g0, "Stream #1", "sm90_gemm_a", 0, 100), ev(g0, "Stream #1", "sm90_gemm_b", 150, 50),
        ev(g0, "Stream #3", "fusion_1", 80, 40),
        ev(g0, "Stream #2", "ncclDevKernel_SendRecv", 50, 120),
        # GPU 1: communication alone, nothing beside it
        ev(g1, "Stream #2", "ncclDevKernel_SendRecv", 0, 30), ev(g1, "Stream #1", "gemm", 40, 10),
    ]
    o = overlap(events, calls=1)
    # GPU 0: comm 50-170 (120 us); compute union 0-120 and 150-200; both = 50-120 + 150-170 = 90 us
    assert o[g0]["comm_us"] == pytest.approx(120)
    assert o[g0]["compute_us"] == pytest.approx(170)
    assert o[g0]["both_us"] == pytest.approx(90)
    assert o[g0]["span_us"] == pytest.approx(200)
    assert o[g0]["hidden"] == pytest.approx(0.75)
    assert o[g1]["both_us"] == 0 and o[g1]["hidden"] == 0
    # per call: two calls' worth of the same events halve every time
    assert overlap(events, calls=2)[g0]["comm_us"] == pytest.approx(60)


def test_overlap_without_communication_says_none():
    o = overlap([ev("/device:GPU:0", "Stream #1", "gemm", 0, 10)], calls=1)
    assert o["/device:GPU:0"]["hidden"] is None and o["/device:GPU:0"]["comm_us"] == 0


def test_breakdown_per_call_and_gaps():
    events = [ev("/device:GPU:0", "Stream #1", "a", 0, 10), ev("/device:GPU:0", "Stream #1", "b", 15, 5),
              ev("/device:GPU:0", "Stream #1", "a", 30, 10)]
    b = breakdown(events, calls=2)
    assert b["gpu_busy_us_per_call"] == pytest.approx(12.5)
    assert b["gpu_span_us_per_call"] == pytest.approx(20)  # 0..40 over 2 calls: the gaps show as span - busy
    assert b["kernels_per_call"] == pytest.approx(1.5)
    assert [k["name"] for k in b["top"]] == ["a", "b"]
    assert b["top"][0]["us_per_call"] == pytest.approx(10) and b["top"][0]["count_per_call"] == pytest.approx(1)
    assert breakdown([], calls=1)["gpu_busy_us_per_call"] == 0


def test_profile_call_summarises_three_traced_chains(monkeypatch):
    import jax.numpy as jnp

    from benchmarks import gpu_trace

    # the trace itself needs a GPU: three chains of one call each, as a GPU trace would list them (0..210 us)
    events = [ev("/device:GPU:0", "Stream #1", name, 100 * i + start, dur)
              for i in range(3) for name, start, dur in (("kernel", 0, 6), ("fusion", 8, 2))]
    monkeypatch.setattr(gpu_trace, "profiled", lambda run, runs: events if runs == 3 else [])
    b, line = gpu_trace.profile_call(lambda x: x * 2, (jnp.ones(4),), max_calls=2)
    assert b["gpu_busy_us_per_call"] == pytest.approx(8) and b["kernels_per_call"] == pytest.approx(2)
    assert line.startswith("busy 8.0 us, span 70.0 us, 2.0 kernels per call: 6.0 us x1 kernel; 2.0 us x1 fusion")
