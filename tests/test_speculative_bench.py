"""benchmarks/speculative.py --tiny runs on the CPU and reports every drafter against plain decoding."""

import sys
import tempfile
from pathlib import Path

from conftest import ROOT, xla_flags


def background_commands(items) -> dict:
    """benchmarks/speculative.py --tiny, started by conftest when collection ends (it runs beside the suite)."""
    if not items:
        return {}
    home = Path(tempfile.mkdtemp(prefix="codegen-jax-speculative-"))
    # a compilation cache of its own (empty at the start): the script warms each drafter on one decoder and times
    # a second, which compiles the very same programs again; its compiles_while_timed counts traces, not these
    env = {"JAX_PLATFORMS": "cpu", "HOME": str(home), "PATH": "/usr/bin:/bin", "XLA_FLAGS": xla_flags(),
           "JAX_COMPILATION_CACHE_DIR": str(home / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return {"speculative-benchmark": ([sys.executable, str(ROOT / "benchmarks/speculative.py"), "--tiny",
                                       "--no-write"], env, home)}


def test_speculative_benchmark_tiny(background):
    rc, stdout, stderr = background["speculative-benchmark"].wait(timeout=900)
    assert rc == 0, stderr[-3000:]
    lines = stdout.splitlines()
    assert "tokens_per_forward" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"apply", "suffix", "block", "eagle3"}
    assert float(rows["apply"][-4]) > 10  # edit-merge: many tokens per target forward
    # the warm-up compiled every program a timed run uses (the two apply prompts end in chunks of other buckets)
    assert all(line.split()[-1] == "0" for line in lines[2:]), "compiles_while_timed"
