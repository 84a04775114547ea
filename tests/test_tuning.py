import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tuning


def _ref(x):
    return jnp.tanh(x) * 2.0


def test_search_keeps_only_verified_candidates_and_picks_the_fastest(rng):
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)

    def broken(x):
        raise RuntimeError("does not lower")

    candidates = [
        tuning.Candidate("exact", {"block": 1}, _ref),
        tuning.Candidate("wrong", {"block": 2}, lambda x: jnp.tanh(x) * 2.1),
        tuning.Candidate("nan", {"block": 3}, lambda x: _ref(x).at[3, 4].set(jnp.nan)),
        tuning.Candidate("raises", {"block": 4}, broken),
    ]
    lines = []
    best, trials = tuning.search(candidates, _ref, (x,), tol=1e-6, repeats=3, progress=lines.append)
    assert best is not None and best.impl == "exact" and best.config == {"block": 1}
    # a line per candidate as it is verified (a run cut by its time limit shows how far it got), then the timing
    assert [line.split(":")[0] for line in lines[:4]] == [f"verified {i}/4" for i in (1, 2, 3, 4)], lines
    assert "exact {'block': 1} max_rel_err=0" in lines[0] and "does not lower" in lines[3]
    assert lines[4:] == ["timing the 1 verified candidates"], lines
    by_impl = {t.impl: t for t in trials}
    assert by_impl["exact"].ok and by_impl["exact"].max_rel_err == 0.0 and np.isfinite(by_impl["exact"].us)
    assert not by_impl["wrong"].ok and 0.04 < by_impl["wrong"].max_rel_err < 0.06
    assert not by_impl["nan"].ok and by_impl["nan"].max_rel_err == float("inf")
    assert not by_impl["raises"].ok and "does not lower" in by_impl["raises"].error


def test_search_with_no_passing_candidate_returns_none(rng):
    x = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    best, trials = tuning.search([tuning.Candidate("wrong", None, lambda x: x)], _ref, (x,), tol=1e-3, repeats=1)
    assert best is None and len(trials) == 1 and not trials[0].ok


def test_trial_line_names_config_time_and_error():
    # the tunes log each trial on its own line: a run cut short by its time limit writes no JSON
    line = tuning.Trial("triton", {"splits": 4}, True, 1e-3, 12.345, rerun_us=11.9).line()
    assert line == "  triton {'splits': 4}: ok=True us=12.35 rerun=11.90"
    line = tuning.Trial("mosaic", {}, False, float("inf"), float("inf"), "ValueError: " + "x" * 300).line()
    assert line.startswith("  mosaic {}: ok=False us=inf ValueError: x") and len(line) < 170


def test_record_and_lookup_round_trip(tmp_path):
    trial = tuning.Trial("triton", {"splits": 4}, True, 1e-3, 12.5)
    tuning.record("attn", "B8-T1", trial, kind="GPU-X", directory=tmp_path)
    tuning.record("attn", "B1-T1", tuning.Trial("mosaic", {"stages": 2}, True, 2e-3, 7.0), kind="GPU-X",
                  directory=tmp_path)
    assert tuning.lookup("attn", "B8-T1", kind="GPU-X", directory=tmp_path)["config"] == {"splits": 4}
    assert tuning.lookup("attn", "B1-T1", kind="GPU-X", directory=tmp_path)["impl"] == "mosaic"
    assert tuning.lookup("attn", "B1-T1", kind="GPU-Y", directory=tmp_path) is None
    assert tuning.lookup("attn", "B64-T1", kind="GPU-X", directory=tmp_path) is None
    assert tuning.lookup("other", "B8-T1", kind="GPU-X", directory=tmp_path) is None


def test_time_us_chain_keeps_every_call(rng, monkeypatch):
    # XLA merges identical calls (CSE) even through optimization barriers; the chain's data dependency keeps all
    x = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)

    def f(x, w):
        return jnp.tanh(x @ w)[:, :64]

    def chain(x, w, link):
        out = f(x, w)
        for _ in range(2):
            out = f(*link((x, w), out))
        return out

    def barrier(args, out):
        return jax.lax.optimization_barrier((args, out))[0]

    def count(link):
        return jax.jit(lambda x, w: chain(x, w, link)).lower(x, w).compile().as_text().count(" dot(")

    assert count(barrier) == 1  # what went wrong before: three calls timed as one
    assert count(tuning._depend) == 3
    # every argument past the small-array limit (a collective matmul's inputs): the smallest is linked
    monkeypatch.setattr(tuning, "LINK_BYTES", 0)
    assert count(tuning._depend) == 3
    assert np.isfinite(tuning.time_us(f, (x, w), repeats=2, max_calls=4))


def test_time_interleaved_times_every_variant_round_robin(rng):
    x = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    calls = []

    def variant(k):
        def f(x):
            calls.append(k)  # traced once per jit: the chain of n calls and the single call
            return jnp.tanh(x) * k
        return f

    out = tuning.time_interleaved({"a": (variant(1.0), (x,)), "b": (variant(2.0), (x,))}, repeats=3, max_calls=4)
    assert set(out) == {"a", "b"} and set(calls) == {1.0, 2.0}
    for t in out.values():
        assert 0 < t["lo"] <= t["us"] <= t["hi"] < float("inf")


def test_time_interleaved_warms_the_chains_up_before_timing(rng, monkeypatch):
    # the chains run round-robin for warmup_s before the timed runs (a GPU's clocks ramp up from idle)
    x = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    runs = []
    real_chain = tuning.chain

    def counting_chain(fn, inputs, target_ms, max_calls, *rest):
        run, n = real_chain(fn, inputs, target_ms, max_calls, *rest)
        return (lambda: runs.append(1) or run()), n

    monkeypatch.setattr(tuning, "chain", counting_chain)
    tuning.time_interleaved({"a": (jnp.tanh, (x,))}, repeats=3, max_calls=4, warmup_s=0.0)
    assert len(runs) == 3
    runs.clear()
    t = time.perf_counter()
    tuning.time_interleaved({"a": (jnp.tanh, (x,))}, repeats=3, max_calls=4, warmup_s=0.2)
    assert time.perf_counter() - t >= 0.2 and len(runs) > 3


def test_slope_timing_takes_a_runs_fixed_cost_out(rng, monkeypatch):
    """slope=True: a chain of n calls and one of 2n per variant, a call's time from their difference, so a cost
    each run pays once (dispatch, the wait for the result) drops out; without slope it is spread over the n
    calls. Fake chains whose runs take fixed + n * per_call seconds."""
    fixed, per_call = 0.012, 0.002
    built = []

    def fake_chain(fn, inputs, target_ms, max_calls, whole=False, calls=None):
        n = calls or 4
        built.append(n)
        return (lambda: time.sleep(fixed + n * per_call)), n

    monkeypatch.setattr(tuning, "chain", fake_chain)
    x = jnp.zeros((4,), jnp.float32)
    exact = tuning.time_interleaved({"a": (jnp.tanh, (x,))}, repeats=3, warmup_s=0.0, slope=True)["a"]
    assert built == [4, 8]
    assert exact["us"] == pytest.approx(per_call * 1e6, rel=0.15)
    assert exact["plain_us"] == pytest.approx((fixed / 4 + per_call) * 1e6, rel=0.15)  # the same runs' t(n) / n
    plain = tuning.time_interleaved({"a": (jnp.tanh, (x,))}, repeats=3, warmup_s=0.0, slope=False)["a"]
    assert plain["us"] == pytest.approx((fixed / 4 + per_call) * 1e6, rel=0.15) and plain["plain_us"] == plain["us"]
    assert tuning.time_us(jnp.tanh, (x,), repeats=3, slope=True) == pytest.approx(per_call * 1e6, rel=0.15)


def test_whole_link_waits_for_every_element_of_the_output(rng):
    """whole=True: the next call's link is computed from all of the previous output (a sum), not its first
    element, so a call cannot start before another device's part of a sharded output has landed."""
    x = jnp.asarray(rng.standard_normal((8,)), jnp.float32)
    out = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    first = str(jax.make_jaxpr(lambda o: tuning._depend((x,), o))(out))
    whole = str(jax.make_jaxpr(lambda o: tuning._depend((x,), o, whole=True))(out))
    assert "reduce_sum" in whole and "reduce_sum" not in first
    linked, = jax.jit(lambda o: tuning._depend((x,), o, whole=True))(out.at[3, 5].set(jnp.nan))
    assert np.array_equal(np.asarray(linked), np.asarray(x))  # a non-finite output still links as zero
    seen = []
    run, n = tuning.chain(lambda a: seen.append(1) or a * 2.0, (x,), target_ms=0.0, max_calls=3, whole=True)
    run()
    assert n >= 1 and seen  # traced and ran with the whole-output link


def test_chain_length_ignores_one_slow_run():
    """chain's n comes from the fastest of three timed runs of one call: one slow run (on the H200 the first case's
    of a second time_interleaved) made n 20-24 where the others had 64, and the slope a third off."""
    x = jnp.ones((8,), jnp.float32)
    runs = []

    def slow_once(v):  # the second run of the call (the first timed one) is slow
        runs.append(1)
        if len(runs) == 2:
            time.sleep(0.3)
        return v

    _, n = tuning.chain(lambda a: jax.pure_callback(slow_once, jax.ShapeDtypeStruct(a.shape, a.dtype), a) * 2.0,
                        (x,), target_ms=50.0, max_calls=16)
    assert len(runs) > 2 and n == 16  # one 0.3 s run would have given ceil(50 ms / 0.3 s) = 1 call


def test_search_times_the_verified_round_robin_and_records_a_chain_that_fails(rng, monkeypatch):
    """search times every verified candidate in one time_interleaved call (not one after another), and a
    candidate whose timing chain fails is recorded as failed, not fatal."""
    x = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    seen = []
    interleaved = tuning.time_interleaved

    def spy(cases, **kw):
        seen.append(sorted(cases))
        return interleaved(cases, **kw)

    monkeypatch.setattr(tuning, "time_interleaved", spy)
    chained = []

    def flaky(x):  # right once, then fails inside the timing chain (its second and later traces)
        chained.append(1)
        if len(chained) > 1:
            raise RuntimeError("chain does not lower")
        return _ref(x)

    candidates = [tuning.Candidate("a", None, _ref), tuning.Candidate("b", None, lambda x: _ref(x) + 0.0),
                  tuning.Candidate("flaky", None, flaky), tuning.Candidate("wrong", None, lambda x: x)]
    best, trials = tuning.search(candidates, _ref, (x,), tol=1e-6, repeats=2)
    # the verified three together, then the two that timed (flaky's chain failed) again in a round of their own
    assert seen == [[0, 1, 2], [0, 1]]
    assert best is not None and best.impl in ("a", "b") and np.isfinite(best.us) and best.us == best.rerun_us
    flaky_trial = trials[2]
    assert not flaky_trial.ok and "chain does not lower" in flaky_trial.error and flaky_trial.max_rel_err == 0.0
    assert not trials[3].ok and trials[3].us == float("inf")


def test_search_picks_the_winner_of_the_finalists_round(rng, monkeypatch):
    """The fastest `finalists` of the first round are timed again on their own; the best of that round wins,
    with that round's time (the first round's minimum is the luckiest figure of the luckiest candidate)."""
    x = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    rounds = [{0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, {0: 5.0, 1: 1.5, 2: 2.5}]
    seen = []

    def fake(cases, **kw):
        seen.append(sorted(cases))
        times = rounds[len(seen) - 1]
        return {i: {"us": times[i], "lo": times[i], "hi": times[i]} for i in cases}

    monkeypatch.setattr(tuning, "time_interleaved", fake)
    candidates = [tuning.Candidate(name, {"i": i}, _ref) for i, name in enumerate("abcd")]
    best, trials = tuning.search(candidates, _ref, (x,), tol=1e-6, finalists=3)
    assert seen == [[0, 1, 2, 3], [0, 1, 2]]
    assert best.impl == "b" and best.us == 1.5 and best.rerun_us == 1.5
    assert [t.us for t in trials] == [1.0, 2.0, 3.0, 4.0]  # the first round's figures stay in the record
    assert [t.rerun_us for t in trials] == [5.0, 1.5, 2.5, None]
    seen.clear()
    best, _ = tuning.search(candidates, _ref, (x,), tol=1e-6, finalists=1)  # no second round
    assert seen == [[0, 1, 2, 3]] and best.impl == "a" and best.us == 1.0 and best.rerun_us is None


@pytest.mark.parametrize("incumbent,rerun,winner", [(2, 1.52, "c"), (2, 1.6, "b"), (3, 1.5, "b"), (1, 1.5, "b")],
                         ids=["held-within-margin", "beaten-past-margin", "not-a-finalist", "incumbent-fastest"])
def test_search_keeps_the_incumbent_within_the_margin(rng, monkeypatch, incumbent, rerun, winner):
    # the table's entry (marked by with_incumbent) keeps its place unless the finalists' round has another
    # candidate faster by more than INCUMBENT_MARGIN (3%); an incumbent that is not a finalist has lost anyway
    x = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    rounds = [{0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, {0: 5.0, 1: 1.5, 2: rerun}]
    seen = []

    def fake(cases, **kw):
        seen.append(sorted(cases))
        return {i: {"us": rounds[len(seen) - 1][i], "lo": 0.0, "hi": 0.0} for i in cases}

    monkeypatch.setattr(tuning, "time_interleaved", fake)
    assert tuning.INCUMBENT_MARGIN == 0.03
    candidates = [tuning.Candidate(name, {"i": i}, _ref) for i, name in enumerate("abcd")]
    entry = {"impl": "abcd"[incumbent], "config": {"i": incumbent}}
    candidates = tuning.with_incumbent(candidates, entry, lambda impl, config: tuning.Candidate(impl, config, _ref))
    assert len(candidates) == 4 and [c.incumbent for c in candidates] == [i == incumbent for i in range(4)]
    best, _ = tuning.search(candidates, _ref, (x,), tol=1e-6, finalists=3)
    assert best.impl == winner and best.us == {"b": 1.5, "c": rerun}[winner]


def test_dispatcher_passes_over_entries_of_another_revision(tmp_path, monkeypatch):
    from pallas_kernels.registry import Dispatcher

    d = Dispatcher("op", lambda x: x)
    d.register("k2", lambda x: x, rev=2)
    d.register("k1", lambda x: x)  # revision 1
    for shape, impl, rev in (("k2-none", "k2", None), ("k2-1", "k2", 1), ("k2-2", "k2", 2), ("k1-none", "k1", None),
                             ("k1-1", "k1", 1), ("gone", "k3", None)):
        tuning.record("op", shape, tuning.Trial(impl, {}, True, 0.0, 1.0), kind="GPU-X", directory=tmp_path, rev=rev)
    lookup = tuning.lookup
    monkeypatch.setattr(tuning, "lookup", lambda op, key: lookup(op, key, kind="GPU-X", directory=tmp_path))
    assert "rev" not in tuning.lookup("op", "k2-none") and tuning.lookup("op", "k2-2")["rev"] == 2
    # an entry without a revision is revision 1: stale for k2 (raised to 2), current for k1
    assert d.tuned("k2-none") is None and d.tuned("k2-1") is None and d.tuned("k2-2")["impl"] == "k2"
    assert d.tuned("k1-none")["impl"] == "k1" and d.tuned("k1-1")["impl"] == "k1"
    assert d.tuned("gone") is None  # an implementation no longer registered
    # the search loop's winner, stored through the dispatcher, carries its kernel's revision
    record = tuning.record
    monkeypatch.setattr(tuning, "record", lambda op, key, best, rev=None: record(op, key, best, kind="GPU-X",
                                                                                directory=tmp_path, rev=rev))
    d.record("k2-new", tuning.Trial("k2", {"splits": 2}, True, 0.0, 1.0))
    assert d.tuned("k2-new")["rev"] == 2 and d.tuned("k2-new")["config"] == {"splits": 2}


def test_committed_tables_are_at_the_kernels_revisions():
    # raising a kernel's revision retires its entries: they leave the committed table with it
    import pallas_kernels.attention  # noqa: F401 (registers the kernels)
    import pallas_kernels.moe  # noqa: F401
    from pallas_kernels.attention.dispatch import DISPATCH as ATTENTION
    from pallas_kernels.moe.dispatch import DISPATCH as MOE

    for dispatcher in (ATTENTION, MOE):
        table = json.loads((tuning.TUNED_DIR / f"{dispatcher.op}.json").read_text())
        entries = [(kind, key, e) for kind, rows in table.items() for key, e in rows.items()]
        assert entries
        for kind, key, e in entries:
            assert e["impl"] in dispatcher.implementations, (kind, key)
            assert e.get("rev", 1) == dispatcher.revs[e["impl"]], (kind, key, e)


def test_with_incumbent_times_the_tables_entry_beside_the_candidates():
    made = []

    def make(impl, config):
        if config.get("bad"):
            raise TypeError("unexpected keyword argument 'bad'")
        made.append((impl, config))
        return tuning.Candidate(impl, dict(config), _ref)

    cands = [tuning.Candidate("k", {"block": 1}, _ref), tuning.Candidate("k", {"block": 2}, _ref)]
    # no entry, or one the current config classes no longer take: the candidates as they are
    assert tuning.with_incumbent(cands, None, make) == cands
    assert tuning.with_incumbent(cands, {"impl": "k", "config": {"bad": 1}}, make) == cands
    # an entry among them (same implementation and config, keys in any order) is not added twice
    assert tuning.with_incumbent(cands, {"impl": "k", "config": {"block": 2}, "us": 5.0}, make) == cands
    # one outside them goes last, made by `make`; the same config under another implementation is another one
    for entry in ({"impl": "k", "config": {"block": 3}}, {"impl": "other", "config": {"block": 1}}):
        out = tuning.with_incumbent(cands, entry, make)
        assert out[:2] == cands and len(out) == 3
        assert (out[2].impl, out[2].config) == (entry["impl"], entry["config"])
        assert [c.incumbent for c in out] == [False, False, True]  # marked for search's margin
    found = tuning.with_incumbent(cands, {"impl": "k", "config": {"block": 2}}, make)
    assert [c.incumbent for c in found] == [False, True] and not any(c.incumbent for c in cands)
