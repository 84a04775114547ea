"""benchmarks/read_floor.py --tiny: its Triton read kernels (interpret mode) sum every block once, as XLA does,
and it prints a row per part, dtype and implementation and the two floor ratios."""

import math

from benchmarks import read_floor


def test_read_floor_tiny(capsys):
    assert read_floor.main(["--tiny", "--no-write"]) == 0  # asserts each kernel's sum against XLA's itself
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in ("gate_up", "down", "both")
            and "MiB" not in line]
    assert {(r[0], r[1], r[3]) for r in rows} == {(part, dtype, impl) for part in ("gate_up", "down", "both")
                                                  for dtype in ("bf16", "int8") for impl in ("xla", "triton")}
    assert all(float(r[-2]) > 0 for r in rows)  # us
    assert sum(line.startswith("two-kernel") for line in lines) == 2
    ratios = lines[-1].split("one read ")[1].replace("two dependent kernels ", "").replace("x", "").split(", ")
    assert lines[-1].startswith("floor ratio bf16/int8")
    assert all(math.isfinite(float(r)) and float(r) > 0 for r in ratios)
