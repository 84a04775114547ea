"""Compile, check and time the Triton paged attention kernel natively on an NVIDIA GPU (any recent one).

The shapes are those of benchmarks/mosaic_attention_check.py (GQA 32/8, head_dim 128, bf16; decode at B in
{1, 8, 32} x KV length {2k, 8k, 32k} x page {16, 64}, verify with T = 16 and 64 new tokens at B=8, 8k), so
the two kernels compare row by row. For each shape it
  1. checks the kernel against `paged_attention_reference` on ragged lengths in a pool whose unused pages
     and slots are NaN (L2 relative error, max abs error relative to the output's max, NaN-free);
  2. times it with every row at the full length: median over repeats of back-to-back calls after warm-up,
     rotating over pool copies that together exceed L2, `jax.block_until_ready` around each repeat;
  3. reports effective GB/s = K + V bytes read / time, and the Mosaic kernel's time at the same shape from
     benchmarks/results/mosaic_attention.json when that file is from the same device.
Each shape runs in its own subprocess with a timeout, so a crash, hang or poisoned CUDA context stays with
its shape; failures are recorded, never fatal.

Run on the GPU machine:  python3 benchmarks/triton_attention_check.py           (~3-5 min)
  --sweep       also time alternative configs per shape (pages_per_block, warps, stages, splits, block_q)
  --only "8,8192,16,1;8,8192,16,64"   just these shapes (B, KV length, page, T); --decode / --verify: one set
  --inprocess   no subprocesses (faster, less robust); --tiny: CPU smoke test of this script (interpreter)
Writes benchmarks/results/triton_attention.json (and $OUT/triton_attention.json when OUT is set); --tiny
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, device, table, versions, write_result  # noqa: E402

HQ, HKV, D = 32, 8, 128
DECODE = [(B, L, S, 1) for B in (1, 8, 32) for L in (2048, 8192, 32768) for S in (16, 64)]
VERIFY = [(8, 8192, S, T) for T in (16, 64) for S in (16, 64)]
TINY = [(2, 192, 16, 1), (2, 192, 64, 3)]
L2_BYTES = 50 * 2**20
TOL = 2e-2

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sweep_configs(S: int, T: int) -> list[dict]:
    configs = [{}, {"num_warps": 8}, {"num_stages": 3}, {"num_stages": 1}, {"split_factor": 2},
               {"split_factor": 0.5}]
    configs += [{"pages_per_block": n} for n in (1, 2, 4, 8) if 16 <= n * S <= 256 and n * S != max(64, S)]
    if T > 1:
        configs += [{"block_q": 16}, {"block_q": 32}, {"block_q": 128, "num_warps": 8}]
    return configs


def run_shape(B: int, L: int, S: int, T: int, config_kws: list[dict], tiny: bool) -> list[dict]:
    """One shape, every config: correctness on ragged lengths, then timing at full length."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.attention.reference import paged_attention_reference
    from pallas_kernels.attention.triton_paged import TritonAttentionConfig, paged_attention_triton, plan

    interpret = tiny
    Hq, Hkv, Dh = (4, 2, 64) if tiny else (HQ, HKV, D)
    N = L // S
    P = B * N + 8  # page 0 is the scratch page, 7 spare pages stay NaN
    kv_bytes = 2 * B * L * Hkv * Dh * 2
    pool_bytes = 2 * Hkv * P * S * Dh * 2
    copies = 1 if tiny else max(1, min(8, math.ceil(2 * L2_BYTES / pool_bytes)))
    rng = np.random.default_rng(0)

    # ragged case for the check: row 0 full, row 1 ends one past a page boundary, the rest random
    kv_ragged = rng.integers(T, L + 1, B)
    kv_ragged[0] = L
    if B > 1:
        kv_ragged[1] = min(L, max(T, S + 1))
    perm = rng.permutation(np.arange(8, P))  # pages 1..7 never used: NaN spares
    page_table = perm[: B * N].reshape(B, N).astype(np.int32)
    valid = np.zeros(P, np.int32)  # tokens each page really holds in the ragged case
    for b in range(B):
        need = -(-int(kv_ragged[b]) // S)
        valid[page_table[b, :need]] = S
        valid[page_table[b, need - 1]] = int(kv_ragged[b]) - (need - 1) * S
        page_table[b, need:] = rng.integers(0, 8, N - need)  # past the sequence: scratch or NaN pages

    keys = jax.random.split(jax.random.key(1), 2 * copies + 1)
    q = jax.random.normal(keys[0], (B, T, Hq, Dh), jnp.bfloat16)
    pools = [(jax.random.normal(keys[2 * i + 1], (Hkv, P, S, Dh), jnp.bfloat16),
              jax.random.normal(keys[2 * i + 2], (Hkv, P, S, Dh), jnp.bfloat16)) for i in range(copies)]
    slot_ok = jnp.asarray(np.arange(S)[None, :] < valid[:, None])[None, :, :, None]  # [1, P, S, 1]
    k0, v0 = (jnp.where(slot_ok, x, jnp.nan).astype(jnp.bfloat16) for x in pools[0])  # poisoned for the check
    pt = jnp.asarray(page_table)
    pt_full = jnp.asarray(perm[: B * N].reshape(B, N).astype(np.int32))
    q_lens = jnp.full((B,), T, jnp.int32)
    kv_r, kv_full = jnp.asarray(kv_ragged, jnp.int32), jnp.full((B,), L, jnp.int32)
    scale = Dh ** -0.5

    ref = jax.jit(lambda *a: paged_attention_reference(*a, scale=scale))
    want = np.asarray(ref(q, k0, v0, pt, kv_r, q_lens).astype(jnp.float32), np.float64)
    assert np.isfinite(want).all(), "reference produced NaN on the poisoned pool"

    rows = []
    for kw in config_kws:
        kw = dict(kw)
        row = {"B": B, "L": L, "page": S, "T": T, "config": dict(kw)}
        try:
            factor = kw.pop("split_factor", None)
            config = TritonAttentionConfig(**kw)
            if factor is not None:
                base = plan(q.shape, (Hkv, P, S, Dh), N, config).num_splits
                config = TritonAttentionConfig(**kw, num_splits=max(1, int(base * factor)))
            row["plan"] = plan(q.shape, (Hkv, P, S, Dh), N, config)._asdict()
            fn = jax.jit(lambda *a, c=config: paged_attention_triton(*a, scale=scale, config=c, interpret=interpret))
            t = time.perf_counter()
            got = fn(q, k0, v0, pt, kv_r, q_lens).block_until_ready()
            row["compile_s"] = round(time.perf_counter() - t, 2)
            got = np.asarray(got.astype(jnp.float32), np.float64)
            row["nan_free"] = bool(np.isfinite(got).all())
            row["rel_err"] = float(np.linalg.norm(np.nan_to_num(got - want, nan=1e9)) / np.linalg.norm(want))
            row["max_abs_err_rel"] = float(np.nanmax(np.abs(got - want)) / np.abs(want).max())
            row["ok"] = row["nan_free"] and row["rel_err"] <= TOL
            if tiny:
                row["us"], row["gbps"] = None, None
            else:
                args = [(q, k, v, pt_full, kv_full, q_lens) for k, v in pools]
                for a in args:  # warm-up on every copy
                    fn(*a).block_until_ready()
                n = max(len(args), 20)
                times = []
                for _ in range(7):
                    t = time.perf_counter()
                    outs = [fn(*args[i % len(args)]) for i in range(n)]
                    jax.block_until_ready(outs)
                    times.append((time.perf_counter() - t) / n)
                sec = float(np.median(times))
                row["us"] = round(sec * 1e6, 2)
                row["gbps"] = round(kv_bytes / sec / 1e9, 1)
        except Exception as e:  # noqa: BLE001 (recorded, not fatal)
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            row["traceback"] = traceback.format_exc()[-4000:]
        log(f"B={B} L={L} page={S} T={T} {row['config']}: ok={row.get('ok')} rel_err={row.get('rel_err')} "
            f"us={row.get('us')} GB/s={row.get('gbps')} {row.get('error', '')[:300]}")
        rows.append(row)
    return rows


def run_in_subprocess(shape, args) -> list[dict]:
    B, L, S, T = shape
    cmd = [sys.executable, __file__, "--one", json.dumps([B, L, S, T])] + (["--sweep"] if args.sweep else []) + \
        (["--tiny"] if args.tiny else [])
    base = {"B": B, "L": L, "page": S, "T": T, "ok": False}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"")[-2000:]
        return [{**base, "error": f"timeout after {args.timeout}s", "stderr": str(err)}]
    sys.stderr.write(p.stderr[-6000:])
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return [{**base, "error": f"subprocess exited {p.returncode} without a result", "stderr": p.stderr[-4000:]}]


def mosaic_times(dev: str) -> dict[tuple, float]:
    """Best Mosaic kernel time per (B, L, page, T) from its results file, if measured on this device."""
    path = RESULTS / "mosaic_attention.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("device") != dev:
        return {}
    return {(r["B"], r["L"], r["page"], r["T"]): r["us"] for r in data.get("best", []) if r.get("us")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time alternative configs per shape")
    ap.add_argument("--only", help="shapes as B,L,page,T separated by ';'")
    ap.add_argument("--decode", action="store_true", help="only the T=1 shapes")
    ap.add_argument("--verify", action="store_true", help="only the T>1 shapes")
    ap.add_argument("--inprocess", action="store_true", help="run every shape in this process")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test in the interpreter")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per shape subprocess")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.tiny:  # before any child or this process imports jax
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.one:  # child: one shape, result as one JSON line
        B, L, S, T = json.loads(args.one)
        configs = sweep_configs(S, T) if args.sweep else [{}]
        print("RESULT " + json.dumps(run_shape(B, L, S, T, configs, args.tiny), default=str), flush=True)
        return

    shapes = TINY if args.tiny else (DECODE if args.decode else []) + (VERIFY if args.verify else [])
    shapes = shapes or DECODE + VERIFY
    if args.only:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.only.split(";") if s.strip()]
    rows = []
    for shape in shapes:
        log(f"shape B,L,page,T = {shape}")
        if args.inprocess:
            try:
                rows += run_shape(*shape, sweep_configs(shape[2], shape[3]) if args.sweep else [{}], args.tiny)
            except Exception as e:  # noqa: BLE001 (setup failures are recorded too)
                rows.append({"B": shape[0], "L": shape[1], "page": shape[2], "T": shape[3], "ok": False,
                             "error": f"{type(e).__name__}: {str(e)[:2000]}"})
        else:
            rows += run_in_subprocess(shape, args)

    # best config per shape; verify cost relative to T=1 at the same B, L, page; Mosaic's time beside it
    dev = device()
    mosaic = mosaic_times(dev)
    best = {}
    for r in rows:
        key = (r["B"], r["L"], r["page"], r["T"])
        if r.get("ok") and r.get("us") and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    for key, r in best.items():
        B, L, S, T = key
        if T > 1 and (B, L, S, 1) in best:
            r["time_vs_T1"] = round(r["us"] / best[(B, L, S, 1)]["us"], 3)
        if key in mosaic:
            r["mosaic_us"] = mosaic[key]
            r["vs_mosaic"] = round(r["us"] / mosaic[key], 3)
    cols = ["B", "L", "page", "T", "config", "ok", "rel_err", "us", "gbps", "time_vs_T1", "mosaic_us", "vs_mosaic",
            "error"]
    printable = [{**r, "config": json.dumps(r.get("config", {})), "error": str(r.get("error", ""))[:60],
                  "rel_err": f"{r['rel_err']:.2e}" if isinstance(r.get("rel_err"), float) else ""} for r in rows]
    print(table(printable, cols))
    n_fail = sum(not r.get("ok") for r in rows)
    print(f"{len(rows) - n_fail}/{len(rows)} runs ok")

    if args.tiny:
        return
    import jax

    path = write_result("triton_attention", {
        "device": dev, "versions": versions("jax", "jaxlib"), "backend": jax.default_backend(),
        "shapes": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16"}, "tiny": args.tiny,
        "gbps_definition": "K+V bytes of all rows at full length / median time per call",
        "results": rows,
        "best": [{"B": k[0], "L": k[1], "page": k[2], "T": k[3], "config": r["config"], "us": r["us"],
                  "gbps": r["gbps"], "time_vs_T1": r.get("time_vs_T1"), "vs_mosaic": r.get("vs_mosaic")}
                 for k, r in best.items()],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
