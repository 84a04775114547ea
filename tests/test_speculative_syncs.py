"""The speculative step's host work: one device->host transfer and one jitted dispatch per step, for every drafter,
greedy and sampled, and no step program compiled after `warmup`. On a GPU each transfer costs the whole pipeline's
latency, so a second one per step (the draft, or accepted lengths and tokens fetched apart) shows up here first.

On the CPU `jax.transfer_guard` sees no transfer (the arrays already live in host memory) and `np.asarray` reads
them through the buffer protocol, so transfers are counted where they happen: numpy conversions of jax arrays in
the step's modules and `jax.Array._value` (int(), .tolist(), device_get). Dispatches are counted with jit's C++
fast path off (every call then goes through Python).

Also a script: `python tests/test_speculative_syncs.py` times the step per drafter on a tiny model (host time
dominates there) and prints its transfers and dispatches.
"""

import contextlib
import importlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array
from jax._src import pjit as jax_pjit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_speculative import make_drafter as shared_make_drafter  # noqa: E402

from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model  # noqa: E402
from drafters.apply_speculator import ApplySpeculator  # noqa: E402
from drafters.speculative import SpeculativeDecoder  # noqa: E402

MODULES = ("drafters.speculative", "drafters.neural", "drafters.verify", "drafters.base", "codegen_jax.engine")
KINDS = ["apply", "suffix", "block", "eagle3"]


class _CountingNumpy:
    """Stands in for `np` in a module: conversions of jax arrays are logged as transfers."""

    def __init__(self, work):
        self._work = work

    def __getattr__(self, name):
        f = getattr(np, name)
        if name not in ("asarray", "array", "asanyarray", "ascontiguousarray"):
            return f

        def convert(a, *args, **kwargs):
            if isinstance(a, jax.Array):
                self._work._add(("fetch", a.shape))
            return f(a, *args, **kwargs)

        return convert


class HostWork:
    """Inside `counting()`, each wrapped step's log: ("fetch", shape) per device->host transfer and ("jit", name)
    per dispatched program. Programs must compile inside `counting()` (warm up there): entries cached before it
    keep jit's fast path, and tracing a program runs small ops of its own."""

    def __init__(self):
        self.steps: list[list] = []
        self._log: list | None = None  # the step being run, if any

    def _add(self, entry) -> None:
        if self._log is not None:
            self._log.append(entry)

    @contextlib.contextmanager
    def counting(self):
        modules = [importlib.import_module(m) for m in MODULES]
        value, run, fast = jax_array.ArrayImpl._value, jax_pjit._run_python_pjit, jax_pjit._get_fastpath_data

        def fetch(array):
            self._add(("fetch", array.shape))
            return value.fget(array)

        def dispatch(p, *args, **kwargs):
            self._add(("jit", p.params["name"]))
            return run(p, *args, **kwargs)

        jax_array.ArrayImpl._value = property(fetch)
        jax_pjit._run_python_pjit, jax_pjit._get_fastpath_data = dispatch, lambda *a, **k: None
        jax.clear_caches()  # cached entries would keep their fast path
        for m in modules:
            m.np = _CountingNumpy(self)
        try:
            yield self
        finally:
            for m in modules:
                m.np = np
            jax_array.ArrayImpl._value = value
            jax_pjit._run_python_pjit, jax_pjit._get_fastpath_data = run, fast
            jax.clear_caches()  # entries made while counting have no fast path

    def wrap(self, spec: SpeculativeDecoder) -> None:
        step = spec.step

        def logged(*args, **kwargs):
            self._log = []
            try:
                return step(*args, **kwargs)
            finally:
                self.steps.append(self._log)
                self._log = None

        spec.step = logged


def make_drafter(kind: str, target, slots: int, *, max_draft: int = 7, context: int = 16):
    return shared_make_drafter(kind, slots, max_draft, target, start_draft=2, head_dim=16, context=context,
                               draft_vocab=3 / 4, seed=0)


def timed_steps(spec: SpeculativeDecoder, times: list) -> None:
    """Wraps spec.step: each step's wall time into `times`."""
    step = spec.step

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = step(*args, **kwargs)
        times.append(time.perf_counter() - t)
        return out

    spec.step = timed


CFG = ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, dtype=jnp.float32, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_one_transfer_and_one_dispatch_per_step_and_no_compile_after_warmup(model, kind):
    """Greedy, then sampled requests on one warmed-up decoder: each step makes one device->host transfer and one
    dispatch, and every step program came from `warmup` (a sampled request needs the draft's probabilities, a
    different program for an on-device drafter). One warm-up serves both temperatures and both checks: they were
    three tests per drafter that compiled the same programs three times."""
    slots = 2
    rng = np.random.default_rng(0)
    base = [list(rng.integers(0, CFG.vocab_size, n)) for n in (6, 11, 9)]
    work = HostWork()
    with work.counting():
        eng = Engine(model, EngineConfig(max_slots=slots, page_size=8, max_seq_len=96, prefill_chunk=32))
        spec = SpeculativeDecoder(eng, make_drafter(kind, model, slots))
        spec.warmup()
        programs = lambda: spec._host_step._cache_size() + spec._device_step._cache_size()
        compiled = programs()
        work.wrap(spec)
        for temperature in (0.0, 0.8):
            sp = [SamplingParams(max_new_tokens=n, temperature=temperature, seed=i)
                  for i, n in enumerate((20, 24, 16))]
            before = len(work.steps)
            spec.generate([b + b + b for b in base], sp)  # three requests on two slots: rows join and leave
            assert len(work.steps) - before >= 3, temperature
        assert programs() == compiled, "a step program compiled after warm-up"  # (the caches clear on leaving)
    for log in work.steps:
        fetches = [e for e in log if e[0] == "fetch"]
        jits = [e for e in log if e[0] == "jit"]
        assert len(fetches) == 1 and fetches[0][1][0] == slots, log  # [accepted | new tokens], all rows at once
        assert len(jits) == 1, log


# ---- the script: host time per step ---------------------------------------------------------------------------


def main() -> None:
    """ms per step per drafter on a tiny model (benchmarks' TINY shapes), batch 1, greedy and sampled, with the
    step's transfers and dispatches (counted on a separate run: counting turns jit's fast path off)."""
    cfg = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, qkv_bias=True)
    target = init_model(cfg, dtype=jnp.float32, seed=0)
    base = list(np.random.default_rng(0).integers(0, 256, 200))
    prompt = base + base  # repeats, for the host drafters
    eng = Engine(target, EngineConfig(max_slots=1, page_size=16, max_seq_len=1024, prefill_chunk=64, decode_steps=16))
    eng.warmup_prefill()
    drafts = {"suffix": 16, "block": 15, "eagle3": 8}  # the benchmark's drafters
    for kind in sys.argv[1:] or KINDS:
        for temperature in (0.0, 0.8):
            sp = SamplingParams(max_new_tokens=200, temperature=temperature, seed=1)
            fresh = lambda kind=kind: (ApplySpeculator(1) if kind == "apply" else
                                        make_drafter(kind, target, 1, max_draft=drafts[kind], context=32))
            spec = SpeculativeDecoder(eng, fresh())
            spec.warmup()
            spec.generate([prompt], sp)  # anything warmup misses compiles here, not in the timed run
            if kind == "suffix":
                spec.drafter = fresh()  # its session tree now holds this output: start afresh (others keep no state)
            times = []
            timed_steps(spec, times)
            out = spec.generate([prompt], sp)[0]
            work = HostWork()
            with work.counting():
                counted = SpeculativeDecoder(eng, fresh())
                counted.warmup()
                work.wrap(counted)
                counted.generate([prompt], SamplingParams(max_new_tokens=8, temperature=temperature, seed=1))
            log = work.steps[len(work.steps) // 2]
            fetches = [e[1] for e in log if e[0] == "fetch"]
            jits = [e[1] for e in log if e[0] == "jit"]
            print(f"{kind:7s} T={temperature}: {np.median(times) * 1e3:6.2f} ms/step median "
                  f"({np.mean(times) * 1e3:6.2f} mean, {len(times)} steps, {len(out.tokens) / len(times):.2f} "
                  f"tokens/step); per step {len(fetches)} transfers {fetches}, {len(jits)} dispatches {jits}",
                  flush=True)


if __name__ == "__main__":
    main()
