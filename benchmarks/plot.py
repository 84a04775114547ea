"""Draws the kernel benchmarks' result JSON as PNGs beside them: GB/s per implementation and shape.

    python benchmarks/plot.py                    # every result below that it knows (attention, moe)
    python benchmarks/plot.py benchmarks/results/moe.json

attention.json: one panel per (T new tokens, page size), GB/s against B x S for each implementation.
moe.json: one panel per model shape, touched-expert GB/s against T for each implementation.
Figures come from the files only; the title names the file's device and commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _natural(x) -> list:
    """Sort key reading the digit runs of str(x) as numbers: B8 S2048 before B8 S8192 before B8 S32768."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(x))]


def _panels(rows: list[dict], panel_key, x_key, x_label: str, title: str, meta: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = defaultdict(lambda: defaultdict(list))  # panel -> impl -> [(x, GB/s)]
    for r in rows:
        if r.get("GB/s") is not None:
            panels[panel_key(r)][r["impl"]].append((x_key(r), r["GB/s"]))
    if not panels:
        raise ValueError(f"{out.stem}: no row with a GB/s figure")
    keys = sorted(panels)
    impls = sorted({impl for p in panels.values() for impl in p})
    color = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}  # one colour per implementation in every panel
    cols = min(3, len(keys))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs = sorted({x for series in panels[key].values() for x, _ in series}, key=_natural)
        for impl, series in sorted(panels[key].items()):
            pts = dict(series)
            ax.plot([xs.index(x) for x in xs if x in pts], [pts[x] for x in xs if x in pts], marker="o", label=impl,
                    color=color[impl])
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30)
        ax.set_title(key)
        ax.set_xlabel(x_label)
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color[i], marker="o", label=i) for i in impls]
    fig.legend(handles=handles, loc="lower center", ncol=len(impls), fontsize=8)
    fig.suptitle(f"{title} — {meta.get('device', '?')}, commit {str(meta.get('commit', '?'))[:7]}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(path: Path) -> Path:
    """Draws one result file; returns the PNG's path."""
    d = json.loads(path.read_text())
    kind = d.get("benchmark", path.stem)
    out = path.with_suffix(".png")
    if kind == "attention":
        return _panels(d["rows"], lambda r: f"T={r['T']}, page {r['page']}", lambda r: f"B{r['B']} S{r['L']}",
                       "batch x context", "Paged attention, K+V bytes read per second", d, out)
    if kind == "moe":
        return _panels(d["rows"], lambda r: r["shape"], lambda r: r["T"], "tokens T",
                       "MoE layer, touched-expert bytes per second", d, out)
    raise ValueError(f"{path}: no plot for benchmark {kind!r} (attention, moe)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help="result JSON files (default: attention.json and moe.json)")
    args = p.parse_args(argv)
    files = args.files or [f for f in (RESULTS / "attention.json", RESULTS / "moe.json") if f.exists()]
    for f in files:
        try:
            print(f"wrote {plot(f)}")
        except (OSError, ValueError, KeyError) as e:
            print(f"plot: {f}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
