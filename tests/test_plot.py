"""benchmarks/plot.py draws the committed kernel results, and refuses what it cannot draw with exit code 2."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.mark.parametrize("name", ["attention.json", "moe.json"])
def test_draws_committed_results(tmp_path, name):
    src = tmp_path / name
    shutil.copy(RESULTS / name, src)
    assert plot.main([str(src)]) == 0
    png = src.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_refuses_other_results_and_empty_rows(tmp_path, capsys):
    other = tmp_path / "decode.json"
    other.write_text(json.dumps({"benchmark": "decode", "rows": []}))
    assert plot.main([str(other)]) == 2
    empty = tmp_path / "moe.json"
    empty.write_text(json.dumps({"benchmark": "moe", "rows": [{"impl": "ours", "shape": "30b", "T": 1}]}))
    assert plot.main([str(empty)]) == 2
    assert plot.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "no plot for benchmark 'decode'" in err and "no row with a GB/s figure" in err


def test_shapes_in_numeric_order():
    shapes = ["B8 S32768", "B64 S2048", "B8 S2048", "B8 S8192", "B1 S2048"]
    assert sorted(shapes, key=plot._natural) == ["B1 S2048", "B8 S2048", "B8 S8192", "B8 S32768", "B64 S2048"]
    assert sorted([64, 8, 256, 1], key=plot._natural) == [1, 8, 64, 256]


def test_write_result_makes_the_out_folder(tmp_path, monkeypatch):
    # the device machine's $OUT/<step> may not exist yet: the result still lands there and in benchmarks/results
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("OUT", str(tmp_path / "out" / "step"))
    path = common.write_result("probe", {"rows": [1]})
    copy = tmp_path / "out" / "step" / "probe.json"
    assert json.loads(path.read_text())["rows"] == [1] and copy.read_text() == path.read_text()
