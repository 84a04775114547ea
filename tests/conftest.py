import gc
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe"]

# The suite runs on the CPU unless a test is marked gpu; tests compare exact tokens, so keep matmuls in f32.
jax.config.update("jax_default_matmul_precision", "highest")
# The CLI, the server and the benchmarks cache compiled programs (codegen_jax/jit_cache.py): the suite's own cache,
# empty at the start, which its subprocesses inherit, rather than the user's ~/.cache (whose entries from earlier
# runs, or runs beside this one, the suite would otherwise read)
os.environ.setdefault("CODEGEN_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="codegen-jax-jit-cache-"))


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a subprocess that sets its own: `flags` after the suite's compile-speed flags
    (scripts/test.sh's `--xla_backend_optimization_level`, where set), without the rest of this process's."""
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level")]
    return " ".join([*keep, *flags])


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)


class Launched:
    """A subprocess, started by `start()`, writing its stdout and stderr to files (pipes left unread while it runs
    beside the suite could fill and stall it). Niced, so that it yields the CPU to the test process."""

    def __init__(self, cmd: list[str], env: dict, out: Path, cwd: Path = ROOT):
        self.stdout_path, self.stderr_path = out / "stdout", out / "stderr"
        # nice(1), not a preexec_fn: Python code between fork and exec can deadlock a multithreaded parent
        self.cmd, self.env, self.cwd = ["nice", "-n", "10", *cmd], env, cwd
        self.proc: subprocess.Popen | None = None
        self.started = threading.Event()

    def start(self) -> None:
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=stdout, stderr=stderr)
        self.started.set()

    def wait(self, timeout: float, start_timeout: float = 3600) -> tuple[int, str, str]:
        """(return code, stdout, stderr) once it exits, killed if that takes longer than `timeout` s after it
        started (which may be up to `start_timeout` s from now)."""
        assert self.started.wait(start_timeout), f"{self.cmd} never started"
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode, self.stdout_path.read_text(), self.stderr_path.read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# Long subprocesses of the selected tests, run one after another beside the rest of the suite from the end of
# collection (the suite's one process leaves a core idle much of the time; a 2-core CI box ran them all at once in
# 2026-12-01's first try, and the sharding benchmark's 600 s ran out), instead of while their tests wait. A test
# module lists them in `background_commands(items) -> {name: (cmd, env, cwd)}`, given its selected items, in the
# order its tests need them; its tests get them from the `background` fixture by name.
BACKGROUND: dict[str, Launched] = {}
_STOP, _STARTING = threading.Event(), threading.Lock()


def _run_in_turn(jobs: list[Launched]) -> None:
    for job in jobs:
        with _STARTING:  # none starts once the session has ended
            if _STOP.is_set():
                return
            job.start()
        job.proc.wait()


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    modules = {}
    for item in session.items:
        modules.setdefault(item.module, []).append(item)
    for module, items in modules.items():
        for name, (cmd, env, cwd) in getattr(module, "background_commands", lambda items: {})(items).items():
            out = Path(tempfile.mkdtemp(prefix=f"codegen-jax-{name}-"))
            BACKGROUND[name] = Launched(cmd, env, out, cwd=cwd or ROOT)
    if BACKGROUND:
        threading.Thread(target=_run_in_turn, args=(list(BACKGROUND.values()),), name="background",
                         daemon=True).start()


def pytest_sessionfinish(session):
    with _STARTING:
        _STOP.set()
    for job in BACKGROUND.values():  # a failed test's siblings still running
        job.kill()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each module, drops JAX's caches of compiled programs. Every XLA:CPU executable keeps its code and data
    mapped (~3 memory mappings each), and the suite's one process held ~28,000 mappings a quarter of the way
    through (2026-12-02). Past the kernel's vm.max_map_count (65,530 here) an mmap fails, and the JIT's next
    compile or cache load crashed the process: CI died of a segfault near the end of the suite three times, in
    a compile and in a persistent-cache read. Clearing the caches after tests/test_attention_triton.py took its
    mappings from 5,221 back to 543."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def background():
    return BACKGROUND


@pytest.fixture
def rng(request):
    # fresh random inputs every run, reproducible from the printed seed on failure
    seed = int(os.environ.get("TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (L2 over all elements)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tuned_entries(op: str) -> list[dict]:
    """Every entry (all device kinds) of the committed tuned table pallas_kernels/tuned/<op>.json."""
    import json

    from pallas_kernels import tuning

    table = json.loads((Path(tuning.TUNED_DIR) / f"{op}.json").read_text())
    entries = [e for kind in table.values() for e in kind.values()]
    assert entries, f"the committed {op} table is empty"
    return entries
