"""What every benchmark records beside its figures: the command, commit, device and versions."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    if os.environ.get("CODEGEN_JAX_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["CODEGEN_JAX_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(*modules: str) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for m in modules:
        try:
            out[m] = getattr(importlib.import_module(m), "__version__", "?")
        except ImportError:
            out[m] = "missing"
    return out


def device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')} x{jax.device_count()}"


def write_result(name: str, payload: dict) -> Path:
    """Writes benchmarks/results/<name>.json (and a copy under $OUT when set, for the device machine)."""
    payload = {
        "benchmark": name,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    text = json.dumps(payload, indent=2, default=str)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text + "\n")
    if os.environ.get("OUT"):  # made if missing: a run that measured everything should not die saving it
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(text + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([r.get(c, "") for c in columns])
                                                                          for r in rows])


WORKER_MARK = "RESULT "  # the line a benchmark's worker subprocess prints its JSON result on


def run_worker(module: str, args: list[str], env_extra: dict, *, tiny: bool, timeout: int,
               xla_flags: str = "") -> tuple[dict | None, str]:
    """`python -m <module> --worker <args>` in a fresh process (NCCL and XLA read their environment when JAX
    starts) with `env_extra` set, on 2 simulated CPU devices when `tiny` (the GPU flags are unknown to the CPU
    backend; the caller's other XLA flags are kept); `xla_flags` go after either's XLA_FLAGS. (its JSON result,
    "") or (None, why it gave none)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, **env_extra, "PYTHONPATH": str(root)}
    if tiny:  # the caller's XLA flags stay (the test suite's compile-speed flag), but not its device count
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*kept, "--xla_force_host_platform_device_count=2"]))
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    cmd = [sys.executable, "-m", module, "--worker", *args] + (["--tiny"] if tiny else [])
    try:
        p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(WORKER_MARK)]
    if p.returncode or not lines:
        return None, f"rc {p.returncode}: {p.stderr[-1500:]}"
    return json.loads(lines[-1][len(WORKER_MARK):]), ""
