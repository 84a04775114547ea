"""benchmarks/read_floor.py --tiny (beside the suite): its Triton and Mosaic read kernels, in the interpreters, read
every byte (each is checked before it is timed), and it prints a row per part, dtype and kernel family and the
two floor ratios. The Mosaic kernel at Qwen3-30B-A3B's sizes lowers for CUDA."""

import math
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, xla_flags

from benchmarks import read_floor


def background_commands(items) -> dict:
    """benchmarks/read_floor.py --tiny, started by conftest when collection ends (it runs beside the suite)."""
    if not any(item.originalname == "test_read_floor_tiny" for item in items):
        return {}
    return {"read-floor": ([sys.executable, str(ROOT / "benchmarks/read_floor.py"), "--tiny", "--no-write"],
                           {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": xla_flags()}, None)}


def test_read_floor_tiny(background):
    rc, stdout, stderr = background["read-floor"].wait(timeout=600)
    assert rc == 0, stderr[-3000:]
    lines = stdout.splitlines()
    table = lines[lines.index("") + 2:-1]
    rows = [line.split() for line in table if line.split()[0] in ("gate_up", "down", "both")]
    assert {(r[0], r[1], r[3]) for r in rows} == {(part, dtype, impl) for part in ("gate_up", "down", "both")
                                                  for dtype in ("bf16", "int8") for impl in ("xla", "triton", "mosaic")}
    assert all(float(r[-2]) > 0 for r in rows)  # us
    two = sorted(line.split()[4] for line in table if line.startswith("two-kernel"))  # "... two-kernel <family> ..."
    assert two == ["mosaic"] * 2 + ["triton"] * 2
    assert lines[-1].startswith("floor ratio bf16/int8")
    ratios = lines[-1].split(": one read ")[1].replace("two dependent kernels ", "").replace("x", "").split(", ")
    assert len(ratios) == 2 and all(math.isfinite(float(r)) and float(r) > 0 for r in ratios)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU compiles for real in the benchmark")
@pytest.mark.parametrize("dtype,tile_cols", [(jnp.bfloat16, 128), (jnp.int8, 256)])
def test_mosaic_read_lowers_for_cuda(dtype, tile_cols):
    rows, cols = 2 * 768 * 8, 2048  # Qwen3-30B-A3B's gate/up bytes at T=1
    fn, _ = read_floor.mosaic_read(rows, cols, dtype, 64, tile_cols, 8, 192)
    jax.jit(fn).trace(jax.ShapeDtypeStruct((rows, cols), dtype)).lower(lowering_platforms=("cuda",))
    with pytest.raises(ValueError, match="do not divide"):
        read_floor.mosaic_read(rows, cols, dtype, 64, tile_cols, 8, 132)
