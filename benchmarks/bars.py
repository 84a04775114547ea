"""Where the kernel issues' bars stand, read from the committed result files only (benchmarks/results/*.json).

For every bar and shape: the newest run (by the file's `date`) on the device asked for in which the figures the
bar compares were timed in the same process. Each line names that file and its commit, so a figure taken before
a later kernel change shows as such; a run whose JSON was never written (a step cut by its time limit) is not
seen here, only in its log.

  paged attention (benchmarks/attention.py): ours / jax_paged >= 1.8 on every decode shape of the grid; ours
  >= 2,000 GB/s at B=8 L=8k (page 16 and 64) and B=1 L=32k; verify with 64 new tokens <= 1.3x the time of one
  at B=8 L=8k.
  MoE (benchmarks/moe.py): bf16 ours >= 1,800 GB/s of touched-expert bytes at T=1 and T=8 and >= 2,000 at
  T=64 (Qwen3-30B shapes), never slower than the faster of ragged_dot and gather+einsum; int8 >= 1.6x bf16 at T=1.

    python benchmarks/bars.py [--device H200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.attention import DECODE  # noqa: E402
from benchmarks.common import table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTN_GBPS = [(8, 8192, 16), (8, 8192, 64), (1, 32768, 16), (1, 32768, 64)]  # (B, L, page) at T=1
VERIFY = [(8, 8192, 16), (8, 8192, 64)]
XLA_MOE = ("ragged_dot", "gather_einsum")  # the MoE op's XLA baselines
INT8_MOE = ("ours_int8", "ours_int8k")


def runs(prefix: str, device: str, key, directory: Path = RESULTS) -> list[tuple[dict, str, dict]]:
    """(shape key -> impl -> row, file name, file's JSON) of every `prefix`*.json run on a device whose name holds
    `device`, newest first; only rows that verified and were timed, grouped by `key(row)` once per file."""
    out = []
    for path in directory.glob(f"{prefix}*.json"):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and device in str(d.get("device", "")) and isinstance(d.get("rows"), list):
            timed: dict = {}
            for r in d["rows"]:
                if (isinstance(r, dict) and r.get("ok") is not False and isinstance(r.get("us"), (int, float))
                        and r["us"] > 0):
                    timed.setdefault(key(r), {})[r["impl"]] = r
            out.append((timed, path.name, d))
    return sorted(out, key=lambda x: str(x[2].get("date", "")), reverse=True)


def newest(found: list[tuple[dict, str, dict]], shape, need: tuple[str, ...], any_of: tuple[str, ...] = ()):
    """(impl -> row, file name, JSON) of the newest run holding every impl of `need` (and one of `any_of`, where
    given) for `shape`, else None."""
    for timed, name, d in found:
        impls = timed.get(shape, {})
        if all(n in impls for n in need) and (not any_of or any(n in impls for n in any_of)):
            return impls, name, d
    return None


def _line(bar: str, shape: str, value, need: str, met: bool | None, hit=None) -> dict:
    line = {"bar": bar, "shape": shape, "figure": value, "need": need,
            "met": "n/a" if met is None else ("yes" if met else "NO")}
    if hit:
        line.update({"file": hit[1], "commit": str(hit[2].get("commit", ""))[:7], "date": str(hit[2].get("date"))[:10]})
    return line


def attention_bars(device: str, directory: Path = RESULTS) -> list[dict]:
    found = runs("attention", device, lambda r: (r.get("B"), r.get("L"), r.get("page"), r.get("T")), directory)

    lines = []
    for B, L, S, T in DECODE:
        name = f"B={B} L={L} page {S}"
        hit = newest(found, (B, L, S, T), ("ours", "jax_paged"))
        if hit is None:
            lines.append(_line("attn ours/jax_paged", name, "no run", ">= 1.8", None))
            continue
        ratio = round(hit[0]["jax_paged"]["us"] / hit[0]["ours"]["us"], 2)
        lines.append(_line("attn ours/jax_paged", name, ratio, ">= 1.8", ratio >= 1.8, hit))
    for B, L, S in ATTN_GBPS:
        name = f"B={B} L={L} page {S}"
        hit = newest(found, (B, L, S, 1), ("ours",))
        gbps = hit and hit[0]["ours"].get("GB/s")
        lines.append(_line("attn GB/s", name, gbps or "no run", ">= 2000", None if not gbps else gbps >= 2000, hit))
    for B, L, S in VERIFY:  # T=64 and T=1 of the same run
        name = f"B={B} L={L} page {S}"
        hit = None
        for t, fname, d in found:
            if "ours" in t.get((B, L, S, 64), {}) and "ours" in t.get((B, L, S, 1), {}):
                hit = ({"64": t[(B, L, S, 64)]["ours"], "1": t[(B, L, S, 1)]["ours"]}, fname, d)
                break
        ratio = hit and round(hit[0]["64"]["us"] / hit[0]["1"]["us"], 2)
        lines.append(_line("attn verify k=64 / k=1", name, ratio or "no run", "<= 1.3",
                           None if not ratio else ratio <= 1.3, hit))
    return lines


def moe_bars(device: str, directory: Path = RESULTS) -> list[dict]:
    found = runs("moe", device, lambda r: (r.get("shape"), r.get("T")), directory)

    lines = []
    for T, floor in ((1, 1800), (8, 1800), (64, 2000)):
        hit = newest(found, ("30b", T), ("ours",))
        gbps = hit and hit[0]["ours"].get("GB/s")
        lines.append(_line("moe bf16 GB/s", f"30b T={T}", gbps or "no run", f">= {floor}",
                           None if not gbps else gbps >= floor, hit))
    for shape in ("30b", "235b"):
        for T in (1, 8, 64, 256):
            # the faster of the baselines that ran (gather+einsum does not at 235B, T=256: its gathered weights)
            hit = newest(found, (shape, T), ("ours",), any_of=XLA_MOE)
            if hit is None:
                lines.append(_line("moe bf16 / best XLA", f"{shape} T={T}", "no run", ">= 1.0", None))
                continue
            ratio = round(min(hit[0][n]["us"] for n in XLA_MOE if n in hit[0]) / hit[0]["ours"]["us"], 2)
            lines.append(_line("moe bf16 / best XLA", f"{shape} T={T}", ratio, ">= 1.0", ratio >= 1.0, hit))
        # the faster of the int8 layouts that ran ([E, In, Out] and k-major: one format, stored two ways)
        hit = newest(found, (shape, 1), ("ours",), any_of=INT8_MOE)
        ratio = hit and round(hit[0]["ours"]["us"] / min(hit[0][n]["us"] for n in INT8_MOE if n in hit[0]), 2)
        lines.append(_line("moe int8 speedup", f"{shape} T=1", ratio or "no run", ">= 1.6",
                           None if not ratio else ratio >= 1.6, hit))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="H200", help="a part of the device name the runs recorded (default: H200)")
    args = p.parse_args(argv)
    lines = attention_bars(args.device) + moe_bars(args.device)
    if all(line["met"] == "n/a" for line in lines):
        print(f"bars.py: --device: no attention or MoE result on a device named like {args.device!r}",
              file=sys.stderr)
        return 2
    cols = ["bar", "shape", "figure", "need", "met", "file", "commit", "date"]
    print(table([{c: line.get(c, "") for c in cols} for line in lines], cols))
    short = [line for line in lines if line["met"] == "NO"]
    print(f"{len(lines) - len(short) - sum(line['met'] == 'n/a' for line in lines)} met, {len(short)} not met, "
          f"{sum(line['met'] == 'n/a' for line in lines)} without a run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
