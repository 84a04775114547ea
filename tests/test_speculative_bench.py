"""benchmarks/speculative.py --tiny runs on the CPU and reports every drafter against plain decoding."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speculative_benchmark_tiny(tmp_path):
    # a compilation cache of its own (empty at the start): the script warms each drafter on one decoder and times
    # a second, which compiles the very same programs again; its compiles_while_timed counts traces, not these
    env = {"JAX_PLATFORMS": "cpu", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/speculative.py"), "--tiny", "--no-write"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "tokens_per_forward" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"apply", "suffix", "block", "eagle3"}
    assert float(rows["apply"][-4]) > 10  # edit-merge: many tokens per target forward
    # the warm-up compiled every program a timed run uses (the two apply prompts end in chunks of other buckets)
    assert all(line.split()[-1] == "0" for line in lines[2:]), "compiles_while_timed"
