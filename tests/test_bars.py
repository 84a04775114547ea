"""benchmarks/bars.py: the bars' standing, read from result files (here small ones written for the test)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, as tests/test_plot.py
from benchmarks import bars  # noqa: E402

H200 = "gpu:NVIDIA H200 x1"


def _write(directory: Path, name: str, date: str, rows: list[dict], device: str = H200) -> None:
    (directory / name).write_text(json.dumps({"commit": name[-12:-5], "date": date, "device": device, "rows": rows}))


def _attn(B, L, S, T, impl, us, ok=True):
    return {"B": B, "L": L, "page": S, "T": T, "impl": impl, "us": us, "ok": ok, "GB/s": round(1e5 / us, 1)}


def _by_shape(lines, bar):
    return {line["shape"]: line for line in lines if line["bar"] == bar}


def test_attention_takes_the_newest_run_holding_both_figures(tmp_path):
    _write(tmp_path, "attention_old_aaaaaaa.json", "2026-12-01T10:00:00+0000", [
        _attn(8, 8192, 16, 1, "ours", 70.0), _attn(8, 8192, 16, 1, "jax_paged", 133.0),
        _attn(8, 2048, 16, 1, "ours", 27.0), _attn(8, 2048, 16, 1, "jax_paged", 50.0),
        _attn(8, 8192, 16, 64, "ours", 140.0)])
    _write(tmp_path, "attention_new_bbbbbbb.json", "2026-12-02T10:00:00+0000", [
        _attn(8, 8192, 16, 1, "ours", 80.0), _attn(8, 8192, 16, 1, "jax_paged", 132.0),
        _attn(8, 2048, 16, 1, "ours", 20.0),  # no jax_paged in this run: the older pair stands
        _attn(1, 2048, 16, 1, "ours", 10.0), _attn(1, 2048, 16, 1, "jax_paged", 30.0, ok=False)])
    _write(tmp_path, "attention_cpu_ccccccc.json", "2026-12-03T10:00:00+0000", [
        _attn(8, 8192, 16, 1, "ours", 1.0), _attn(8, 8192, 16, 1, "jax_paged", 100.0)], device="cpu:cpu x1")
    lines = bars.attention_bars("H200", tmp_path)
    ratio = _by_shape(lines, "attn ours/jax_paged")
    new = ratio["B=8 L=8192 page 16"]
    assert (new["figure"], new["met"], new["commit"], new["file"]) == (1.65, "NO", "bbbbbbb",
                                                                        "attention_new_bbbbbbb.json")
    old = ratio["B=8 L=2048 page 16"]
    assert (old["figure"], old["met"], old["commit"]) == (1.85, "yes", "aaaaaaa")
    # a baseline that failed its check is no figure; a shape no run holds says so
    assert ratio["B=1 L=2048 page 16"]["met"] == "n/a" and ratio["B=64 L=32768 page 64"]["figure"] == "no run"
    assert _by_shape(lines, "attn GB/s")["B=8 L=8192 page 16"]["figure"] == 1250.0
    # verify: k=64 over k=1 of the same run only (the newer run has no k=64 row)
    verify = _by_shape(lines, "attn verify k=64 / k=1")["B=8 L=8192 page 16"]
    assert (verify["figure"], verify["met"], verify["commit"]) == (2.0, "NO", "aaaaaaa")


def test_moe_int8_speedup_and_the_xla_baselines(tmp_path):
    rows = [{"shape": "30b", "T": 1, "impl": n, "us": us, "GB/s": g, "ok": None}
            for n, us, g in (("ours", 36.0, 2100.0), ("ours_int8", 22.0, 1700.0), ("ragged_dot", 300.0, 200.0),
                             ("gather_einsum", 80.0, 900.0), ("chain_floor", -2.0, None))]
    # at 235B T=256 gather+einsum does not run (its gathered weights): the one baseline that ran is the best
    rows += [{"shape": "235b", "T": 256, "impl": "ours", "us": 1400.0, "GB/s": 3000.0, "ok": None},
             {"shape": "235b", "T": 256, "impl": "ragged_dot", "us": 13400.0, "GB/s": 300.0, "ok": None},
             {"shape": "235b", "T": 256, "impl": "gather_einsum", "us": None, "ok": False, "error": "skipped"}]
    # at 235B T=1 both int8 layouts ran: the faster counts
    rows += [{"shape": "235b", "T": 1, "impl": n, "us": us, "GB/s": 1.0, "ok": None}
             for n, us in (("ours", 90.0), ("ours_int8", 60.0), ("ours_int8k", 50.0))]
    _write(tmp_path, "moe_t1_ddddddd.json", "2026-12-02T10:00:00+0000", rows)
    lines = bars.moe_bars("H200", tmp_path)
    speed = _by_shape(lines, "moe int8 speedup")
    assert (speed["30b T=1"]["figure"], speed["30b T=1"]["met"]) == (1.64, "yes")
    assert (speed["235b T=1"]["figure"], speed["235b T=1"]["met"]) == (1.8, "yes")
    xla = _by_shape(lines, "moe bf16 / best XLA")
    assert xla["30b T=1"]["figure"] == 2.22 and (xla["235b T=256"]["figure"], xla["235b T=256"]["met"]) == (9.57, "yes")
    assert xla["30b T=8"]["figure"] == "no run"
    assert _by_shape(lines, "moe bf16 GB/s")["30b T=1"]["met"] == "yes"


def test_cli_prints_the_table_or_names_the_device_it_found_nothing_for(capsys):
    assert bars.main(["--device", "no such GPU"]) == 2
    assert "--device" in capsys.readouterr().err.strip()
    assert bars.main([]) == 0  # the committed H200 results
    out = capsys.readouterr().out
    assert "attn ours/jax_paged" in out and "moe int8 speedup" in out and " met, " in out
