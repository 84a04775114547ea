"""The kernel search loop and the table of its winners.

For each op, device and shape, `search` runs every candidate (an implementation with one tuning config), checks
its output against the op's reference on the same random inputs (NaN never passes), times the ones that pass
(round-robin, so a drift of the device between candidates does not pick the winner) and keeps the fastest.
Winners live in `pallas_kernels/tuned/<op>.json`, keyed by the device kind (as JAX reports it) and a shape key the
op defines; dispatchers read them through `lookup`, and fall back to their defaults (and the reference on
platforms without kernels) for shapes the table does not hold.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TUNED_DIR = Path(__file__).parent / "tuned"
# a challenger replaces the table's entry only when it beats it by more than this in the finalists' round (`search`)
INCUMBENT_MARGIN = 0.03


@dataclass(frozen=True)
class Candidate:
    """One variant to try: `fn(*inputs)` runs implementation `impl` with `config` bound. incumbent: the table's
    current entry for the shape (`with_incumbent` marks it; see `search`)."""

    impl: str
    config: object
    fn: Callable
    incumbent: bool = field(default=False, compare=False)


@dataclass
class Trial:
    impl: str
    config: dict
    ok: bool
    max_rel_err: float
    us: float  # median microseconds (inf when it failed or did not pass)
    error: str = ""
    rerun_us: float | None = None  # the finalists' time in the confirming round (see `search`)

    def line(self) -> str:
        """One log line: a tune cut short by its time limit writes no JSON, so each trial goes to the log too."""
        rerun = "" if self.rerun_us is None else f" rerun={self.rerun_us:.2f}"
        return f"  {self.impl} {self.config}: ok={self.ok} us={self.us:.2f}{rerun} {self.error[:120]}".rstrip()


def device_kind() -> str:
    return jax.devices()[0].device_kind


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if is_dataclass(config):
        return asdict(config)
    return dict(config)


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| in float64; inf when out has a NaN/inf or the shapes differ."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape or not np.isfinite(out).all():
        return math.inf
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(out - ref).max() / scale)


LINK_BYTES = 1 << 20  # arguments up to this size are made to depend on the previous call (not the KV pools)


def _depend(args: tuple, out, whole: bool = False) -> tuple:
    """args with every small numeric array plus 0 * (a finite scalar of `out`): a real data dependency. XLA
    strips optimization barriers and would merge identical calls (CSE) or hoist work shared between them (the
    reference's page gather), timing one call for n; it does not fold float x * 0 (NaN semantics), so this holds.
    Costs one tiny fused kernel per call, the same for every implementation timed. Where every argument is
    large (a collective matmul's activations and weights), the smallest one is linked: one elementwise pass over
    it per call, but without a link the calls run concurrently (one call's transfer under another's matmul).
    whole: the scalar is the sum of the whole first output instead of its first element, so the next call waits
    for every part of it (a pass over the output and, when it is sharded, a scalar all-reduce). For outputs spread
    over devices: the first element lives on one device, and the next call could start before another device's
    part of the output (its last transfer) had landed."""
    leaf = jax.tree.leaves(out)[0]
    # its first element by index, not ravel()[0]: flattening an output sharded on a minor dimension made XLA
    # all-gather the whole output first (~1.7 ms a call for a [2048, 14336] bf16 shard under NCCL_P2P_DISABLE=1)
    x = jnp.sum(leaf, dtype=jnp.float32) if whole else leaf[(0,) * leaf.ndim].astype(jnp.float32)
    zero = jnp.where(jnp.isfinite(x), x, 0.0) * 0.0
    numeric = [i for i, a in enumerate(args) if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.number)]
    link = {i for i in numeric if args[i].nbytes <= LINK_BYTES} or {min(numeric, key=lambda i: args[i].nbytes)}
    return tuple(a + zero.astype(a.dtype) if i in link else a for i, a in enumerate(args))


def _seconds(run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def chain(fn: Callable, inputs: tuple | Sequence[tuple], target_ms: float, max_calls: int, whole: bool = False,
          calls: int | None = None):
    """(run, n): `run()` executes one jitted chain of n calls of `fn` over the rotating input sets (each call
    depending on the previous one, on all of its output with `whole`: see `_depend`) and waits for it; compiled
    and warmed up. n: `calls` where given (rounded up to whole rounds of the sets), else enough calls for about
    target_ms of one call's dispatch-bound time, at most max_calls."""
    sets = [inputs] if isinstance(inputs, tuple) else list(inputs)
    if calls is None:
        one = jax.jit(fn)

        def run_once():
            return jax.block_until_ready([one(*a) for a in sets])

        run_once()
        # a dispatch-bound upper bound of one call: the fastest of three runs, as one slow run (on the H200 the
        # first case's of a second time_interleaved in one process) gave a third of the calls, and a slope
        # (t(2n) - t(n)) / n a third off (21.9 us for a 29 us call; n 20-24 where the others had 64, session 18)
        single = max(min(_seconds(run_once) for _ in range(3)) / len(sets), 1e-6)
        calls = min(max_calls, math.ceil(target_ms * 1e-3 / single) * len(sets))
    n = -(-max(len(sets), calls) // len(sets)) * len(sets)

    def many(sets):
        out = None
        for i in range(n):
            args = sets[i % len(sets)]
            out = fn(*(args if out is None else _depend(args, out, whole)))
        return out

    many = jax.jit(many)
    jax.block_until_ready(many(sets))  # compile and warm up
    return (lambda: jax.block_until_ready(many(sets))), n


def time_us(fn: Callable, inputs: tuple | Sequence[tuple], *, repeats: int = 7, target_ms: float = 2.0,
            max_calls: int = 64, slope: bool | None = None) -> float:
    """Median device microseconds per call of `fn`, with host dispatch taken out.

    `inputs` is one argument tuple or a list of them (rotate sets that together exceed L2, so the timing is of
    HBM, not of the cache). One jitted function runs `fn` n times in a chain over the rotating sets (each call
    depends on the previous one, as layers do; see `_depend`), n chosen so a run lasts about `target_ms`; the
    median over `repeats` runs is the time of one call as it runs inside a larger jitted step (the engine's
    decode loop), not the time of a Python dispatch. On a GPU (slope, see `time_interleaved`) a chain of 2n calls
    runs beside it and the difference of the two is timed, so a run's fixed cost drops out.
    """
    return time_interleaved({"fn": (fn, inputs)}, repeats=repeats, target_ms=target_ms, max_calls=max_calls,
                            slope=slope)["fn"]["us"]


def time_interleaved(cases: dict[str, tuple[Callable, tuple | Sequence[tuple]]], *, repeats: int = 9,
                     target_ms: float = 2.0, max_calls: int = 64, warmup_s: float | None = None,
                     errors: dict[str, str] | None = None, whole: bool = False,
                     slope: bool | None = None) -> dict[str, dict[str, float]]:
    """`time_us` for several variants compared with each other: every chain is compiled first, then the repeats
    go round-robin over the variants, so a drift of the device (clocks, a neighbour's load) lands on all of them
    alike instead of on whichever ran last. Returns {name: {"us": median, "lo": min, "hi": max, "plain_us":
    median of t(n) / n}} per call (with slope off, plain_us is us).
    errors: where given, a variant whose chain fails to compile or run is left out and its error put here
    (else the failure raises). Before the timed runs the chains run round-robin for `warmup_s` seconds (default:
    0.3 on a GPU, none elsewhere): compiling leaves the GPU idle, and its clocks come back up from idle (345 MHz
    on the H200, against 1,980 under load) only after some time of load. whole: each call waits for all of the
    previous call's output (`_depend`).

    slope (default: on a GPU): every variant runs as a chain of n calls and one of 2n, and a call's time is
    (t(2n) - t(n)) / n of each repeat's pair: a run's own cost (dispatching the executable, waiting for it, the
    GPU's start on it) cancels. On the H200 that cost was ~200-350 us a run, which a chain of 7-14 long calls
    (the most a 4 ms target gives them) spread as 17-41 us onto each: the profiler's kernel timeline of such
    chains showed 74.9 us per call where the chain's time said 92.1 (paged attention, B=8, L=8k), 208 against
    252 (a 4k matmul). Without slope: t(n) / n."""
    if slope is None:
        slope = jax.default_backend() == "gpu"
    chains = {}
    for name, (fn, inputs) in cases.items():
        try:
            run, n = chain(fn, inputs, target_ms, max_calls, whole)
            chains[name] = [(run, n)]
            if slope:
                chains[name].append(chain(fn, inputs, target_ms, max_calls, whole, calls=2 * n))
        except Exception as e:
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    times: dict[str, list[float]] = {name: [] for name in chains}
    plain: dict[str, list[float]] = {name: [] for name in chains}
    warm_up([run for runs in chains.values() for run, _ in runs], warmup_s)
    for _ in range(repeats):
        for name, runs in chains.items():
            took = [_seconds(run) for run, _ in runs]
            plain[name].append(took[0] / runs[0][1] * 1e6)
            if slope:
                (_, n1), (_, n2) = runs
                times[name].append((took[1] - took[0]) / (n2 - n1) * 1e6)
            else:
                times[name].append(plain[name][-1])
    return {name: {"us": float(np.median(v)), "lo": float(min(v)), "hi": float(max(v)),
                   "plain_us": float(np.median(plain[name]))} for name, v in times.items()}


def warm_up(runs: Sequence[Callable[[], object]], seconds: float | None = None) -> None:
    """Calls `runs` round-robin for `seconds` (default 0.3 on a GPU, none elsewhere): after a compile the GPU's
    clocks sit at idle, and a run timed or traced then shows every kernel slow."""
    if seconds is None:
        seconds = 0.3 if jax.default_backend() == "gpu" else 0.0
    start = time.perf_counter()
    while runs and time.perf_counter() - start < seconds:
        for run in runs:
            run()


def search(candidates: Sequence[Candidate], reference: Callable, inputs: tuple | Sequence[tuple], *, tol: float,
           repeats: int = 7, target_ms: float = 2.0, max_calls: int = 64,
           finalists: int = 3, progress: Callable[[str], None] | None = None) -> tuple[Trial | None, list[Trial]]:
    """Verifies every candidate against `reference` on the first input set, times those within `tol` (over all
    sets, rotating; `time_interleaved`'s repeats, target_ms and max_calls), returns (best, all trials).

    The fastest `finalists` are then timed again in a round of their own, and the best of that round wins with
    that round's time (`rerun_us`; the winner's `us`). The minimum over one round of noisy times favours the
    luckiest candidate and records its luckiest figure: on the H200 a decode search's winner timed 66.6 us and
    75.0 in the benchmark right after it. An incumbent (the table's entry) among the finalists stays the winner
    unless that round's best beats it by more than INCUMBENT_MARGIN: on the H200 a tune replaced Qwen3-30B's int8
    entry on 27.12 against 27.80 us in that round, where the first round had the two 27.03 and 26.85 the other
    way (moe_tune_fold_30b_h200_18e8a40.log), and a table that follows such noise changes for nothing.

    progress: called with a line as each candidate is verified and as each timing round starts, so that a run
    its time limit ends mid-search still shows how far it got (the trials' times come only at the end)."""
    progress = progress or (lambda line: None)
    sets = [inputs] if isinstance(inputs, tuple) else list(inputs)
    ref = np.asarray(jax.block_until_ready(jax.jit(reference)(*sets[0])))
    trials, verified = [], {}
    for i, c in enumerate(candidates):
        try:
            err = max_rel_err(jax.block_until_ready(jax.jit(c.fn)(*sets[0])), ref)
            trials.append(Trial(c.impl, _config_dict(c.config), err <= tol, err, math.inf))
            if err <= tol:
                verified[i] = (c.fn, sets)
        except Exception as e:  # a candidate that fails to compile or run is recorded, not fatal
            trials.append(Trial(c.impl, _config_dict(c.config), False, math.inf, math.inf,
                                f"{type(e).__name__}: {str(e)[:300]}"))
        t = trials[-1]
        progress(f"verified {i + 1}/{len(candidates)}: {t.impl} {t.config} "
                 + (f"max_rel_err={t.max_rel_err:.2g}" if not t.error else t.error[:120]))
    # the verified ones timed round-robin: one timed after another, a drift of the device picked the winner
    errors: dict[int, str] = {}
    progress(f"timing the {len(verified)} verified candidates")
    for i, t in time_interleaved(verified, repeats=repeats, target_ms=target_ms, max_calls=max_calls,
                                 errors=errors).items():
        trials[i] = replace(trials[i], us=t["us"])
    for i, error in errors.items():
        trials[i] = replace(trials[i], ok=False, error=error)
    ranked = sorted((i for i, t in enumerate(trials) if t.ok), key=lambda i: trials[i].us)
    final = ranked[:finalists]
    if len(final) > 1:
        errors.clear()
        progress(f"timing the {len(final)} finalists again")
        for i, t in time_interleaved({i: verified[i] for i in final}, repeats=repeats, target_ms=target_ms,
                                     max_calls=max_calls, errors=errors).items():
            trials[i] = replace(trials[i], rerun_us=t["us"])
        for i, error in errors.items():  # a chain that ran once and then failed is not to be trusted
            trials[i] = replace(trials[i], ok=False, error=error)
        final = [i for i in final if i not in errors]
    if not final:
        return None, trials
    if len(final) == 1:
        return trials[final[0]], trials
    best = min(final, key=lambda i: trials[i].rerun_us)
    held = [i for i in final if candidates[i].incumbent]
    if held and trials[best].rerun_us > (1 - INCUMBENT_MARGIN) * trials[held[0]].rerun_us:
        best = held[0]
    return replace(trials[best], us=trials[best].rerun_us), trials


def with_incumbent(candidates: Sequence[Candidate], incumbent: dict | None,
                   make: Callable[[str, dict], Candidate]) -> list[Candidate]:
    """`candidates`, and last the table's current winner for the shape (`incumbent`: the entry `lookup` or a
    dispatcher's `tuned` gives, or None) as `make(impl, config)` makes it, unless a candidate already runs the same
    implementation with the same config. `record` stores whatever the search picked; with the incumbent timed
    in the same run, a search over a family it is not in cannot put a slower winner in its place. An entry the
    current config classes no longer accept (`make` raises TypeError or ValueError) is left out. The incumbent,
    added or found among the candidates, is marked (`Candidate.incumbent`) for `search`'s margin."""
    out = list(candidates)
    if incumbent is None:
        return out
    try:
        mine = make(incumbent["impl"], dict(incumbent["config"]))
    except (TypeError, ValueError):
        return out

    def key(c: Candidate) -> tuple[str, str]:
        return c.impl, json.dumps(_config_dict(c.config), sort_keys=True, default=str)

    keys = [key(c) for c in out]
    if key(mine) not in keys:
        return [*out, replace(mine, incumbent=True)]
    i = keys.index(key(mine))
    out[i] = replace(out[i], incumbent=True)
    return out


def _path(op: str, directory: Path | None) -> Path:
    return (directory or TUNED_DIR) / f"{op}.json"


@cache
def _load(op: str, directory: Path | None = None) -> dict:
    path = _path(op, directory)
    return json.loads(path.read_text()) if path.exists() else {}


def lookup(op: str, shape_key: str, kind: str | None = None, directory: Path | None = None) -> dict | None:
    """The stored winner {"impl", "config", "us", ...} for this op, device kind and shape, or None."""
    return _load(op, directory).get(kind or device_kind(), {}).get(shape_key)


def record(op: str, shape_key: str, best: Trial, kind: str | None = None, directory: Path | None = None,
           rev: int | None = None) -> Path:
    """Stores `best` as the winner for (device kind, shape) in the op's table file; rev: the revision of the
    winning kernel it was timed at (`registry.Dispatcher.register`), kept with it."""
    path = _path(op, directory)
    table = json.loads(path.read_text()) if path.exists() else {}
    entry = {"impl": best.impl, "config": best.config, "us": round(best.us, 2), "max_rel_err": best.max_rel_err}
    table.setdefault(kind or device_kind(), {})[shape_key] = entry | ({"rev": rev} if rev is not None else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
    return path
