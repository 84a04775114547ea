"""Paged attention: effective GB/s (K + V bytes read / time) of ours beside XLA and JAX's own Pallas kernels.

Every implementation runs on the same inputs in the same process: GQA 32/8, head_dim 128, bf16, every row at the
full KV length, page ids shuffled over the pool.
  ours          what the engine gets: `pallas_kernels.paged_attention` (the tuned table's winner for the device
                and shape, else the default kernel for the device)
  mosaic        our Mosaic GPU kernel with its default plan (what untuned verify and prefill shapes get on Hopper)
  triton        our Triton kernel with its default plan (what untuned decode shapes get, Hopper's included)
  xla_reference `paged_attention_reference` compiled by XLA (gather the pages, then attend)
  jax_paged     `jax.experimental.pallas.ops.gpu.paged_attention` (Triton; decode only)
  jax_gqa       `jax.experimental.pallas.ops.gpu.decode_attention.gqa` over a contiguous cache (decode only)
Timing (pallas_kernels.tuning.time_interleaved): many calls (~4 ms) inside one jitted function over rotating
input sets that together exceed L2, median of 25 runs, the runs going round-robin over the implementations of a
shape (so a drift of the device lands on all alike); each run times a chain of n calls and one of 2n, and a call is
their difference / n (a run's fixed cost cancels): device time per call, as the op runs inside the decode loop.
Each output is checked against the XLA reference (L2 relative error <= 2e-2, NaN-free) before it is timed.

--tune runs the search loop first on the shapes of --tune-shapes (default: the issue's bar shapes): every
Mosaic and Triton candidate config (--tune-impls: one kernel's only) is verified and timed beside the table's
current entry, and the winner per shape goes into pallas_kernels/tuned/ (and $OUT), which `ours` then uses; a
shape's trials are logged as its search ends. --tune-only stops there (the trials go to attention_tune.json).
--tune-configs '[["triton", {"combine_kernel": true}], ...]' proposes exactly those configs instead (a few
targeted trials in a short device call; the table's entry is still timed beside them).

Run on the GPU machine:  python benchmarks/attention.py [--tune] [--quick]      (CPU: --tiny, a smoke test)
Writes benchmarks/results/attention.json; `python benchmarks/plot.py` draws it (attention.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402

HQ, HKV, D = 32, 8, 128
DECODE = [(B, L, S, 1) for B in (1, 8, 32, 64) for L in (2048, 8192, 32768) for S in (16, 64)]
VERIFY = [(8, 8192, S, T) for S in (16, 64) for T in (16, 64)]
BAR = [(8, 8192, 16, 1), (8, 8192, 64, 1), (1, 32768, 16, 1), (1, 32768, 64, 1)] + VERIFY
QUICK = BAR + [(32, 8192, 16, 1), (64, 2048, 16, 1), (1, 2048, 16, 1)]
TINY = [(2, 128, 16, 1), (2, 128, 16, 4)]
L2_BYTES = 50 * 2**20
# on the H200 one config timed as a median of 7 chains of 2 ms spread up to 1.4x within one tuning run:
# longer chains, and the median of more of them
TIMING = {"repeats": 25, "target_ms": 4.0, "max_calls": 64}
TOL = 2e-2
PROFILED = ("ours", "triton", "jax_paged")  # --profile traces these
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def make_sets(B, L, S, T, Hq, Hkv, Dh, *, copies: int, seed: int = 0):
    """`copies` argument tuples (q, k_pages, v_pages, page_table, kv_lens, q_lens) with different data and page
    orders; unused pool pages hold random data too (the kernels must not read them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    N = L // S
    P = B * N + 1
    rng = np.random.default_rng(seed)
    sets = []
    for c in range(copies):
        kq, kk, kv = jax.random.split(jax.random.key(seed * 1000 + c), 3)
        table_ = (1 + rng.permutation(B * N)).reshape(B, N).astype(np.int32)
        sets.append((jax.random.normal(kq, (B, T, Hq, Dh), jnp.bfloat16),
                     jax.random.normal(kk, (Hkv, P, S, Dh), jnp.bfloat16),
                     jax.random.normal(kv, (Hkv, P, S, Dh), jnp.bfloat16),
                     jnp.asarray(table_), jnp.full((B,), L, jnp.int32), jnp.full((B,), T, jnp.int32)))
    return sets


def implementations(T: int, S: int, N: int, scale: float, interpret: bool) -> dict:
    """name -> (fn over a standard argument tuple, or None when the name does not apply to this shape)."""
    from jax.experimental.pallas.ops.gpu import decode_attention
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    import pallas_kernels
    from pallas_kernels.attention import IMPLEMENTATIONS, paged_attention_mosaic, paged_attention_reference

    def ours(q, k, v, pt, kl, ql):
        return pallas_kernels.paged_attention(q, k, v, pt, kl, ql, scale=scale)

    def mosaic(q, k, v, pt, kl, ql):
        return paged_attention_mosaic(q, k, v, pt, kl, ql, scale=scale, interpret=interpret)

    def reference(q, k, v, pt, kl, ql):
        return paged_attention_reference(q, k, v, pt, kl, ql, scale=scale)

    def jpaged(q, k, v, pt, kl, ql):
        # JAX's kernel applies no softmax scale; its default 8 pages per block overflows SMEM at page 64
        ppcb = max(1, min(8 if S <= 16 else 128 // S, N // 16))
        o = jax_paged.paged_attention(q[:, 0] * scale, k, v, pt, kl, pages_per_compute_block=ppcb,
                                      k_splits=min(16, N), interpret=interpret)
        return o[:, None]

    def gqa(q, k, v, pt, kl, ql):
        # a contiguous cache [B, L, Hkv, D] built from the pages; only the kernel is timed (see `timed_gqa`)
        return decode_attention.gqa(q[:, 0], k, v, kv_seq_len=kl, sm_scale=scale, interpret=interpret)[:, None]

    impls = {"ours": ours, "mosaic": mosaic, "xla_reference": reference}
    if "triton" in IMPLEMENTATIONS:
        tri = IMPLEMENTATIONS["triton"][0]
        impls["triton"] = lambda q, k, v, pt, kl, ql: tri(q, k, v, pt, kl, ql, scale=scale, interpret=interpret)
    if T == 1:
        impls["jax_paged"] = jpaged
        impls["jax_gqa"] = gqa
    return impls


def contiguous(args):
    """(q, k, v, pt, kl, ql) -> the same cache laid out [B, L, Hkv, D] for decode_attention.gqa."""
    q, k, v, pt, kl, ql = args
    B, N = pt.shape
    Hkv, _, S, Dh = k.shape

    def lay(x):
        return x[:, pt].reshape(Hkv, B, N * S, Dh).transpose(1, 2, 0, 3)

    return q, lay(k), lay(v), pt, kl, ql


def mosaic_candidates(shape, N: int) -> list[dict]:
    """The search loop's proposals for one shape: block sizes, pipeline depth, splits and the query layout."""
    from pallas_kernels.attention.mosaic_paged import MosaicAttentionConfig, plan

    B, L, S, T = shape
    base = plan((B, T, HQ, D), (HKV, B * N + 1, S, D), N, 2, MosaicAttentionConfig()).num_splits
    splits = sorted({max(1, base // 2), base, base * 2})
    out = [{}]
    if T * HQ // HKV <= 32:
        for bkv, st in ((64, 2), (64, 4), (128, 2), (128, 3)):
            out.append({"block_kv": bkv, "num_stages": st})
    else:
        for wg in (0, 1, 2, 4):
            out.append({"q_warpgroups": wg})
        out += [{"q_warpgroups": 4, "num_stages": 2}, {"q_warpgroups": 2, "num_stages": 4},
                {"q_warpgroups": 2, "num_stages": 5}, {"q_warpgroups": 2, "block_kv": 128, "num_stages": 2}]
        wide = {"q_warpgroups": 2, "block_kv": 128, "num_stages": 2}
        out += [wide | {"release_k": True}, wide | {"fence_softmax": True},
                wide | {"release_k": True, "fence_softmax": True}, {"release_k": True, "fence_softmax": True}]
    out += [{"num_splits": s} for s in splits if s != base]
    return out


TRITON_CANDIDATES = [{}, {"num_warps": 8}, {"num_stages": 3}, {"num_warps": 4, "num_stages": 3}]


# the in-kernel merge's split counts, as multiples of the default: the H200's winners at B=8 L=8k and B=1 L=32k were
# 1.2-2x it (attn_splits_h200_7d60785.log), each trimmed to the fewest splits for its longest split (`trim_splits`)
MERGE_SPLIT_FACTORS = (0.25, 0.5, 1, 1.25, 1.5, 2)


def triton_candidates(shape, N: int) -> list[dict]:
    """TRITON_CANDIDATES, and for decode the split count halved and doubled, the in-kernel merge at
    MERGE_SPLIT_FACTORS of the default splits (and twice it with 3 stages), 128-token KV blocks, and V loaded
    beside K (early_v) alone and with the merge at 1, 1/2 and 1/4 of the default splits, and the splits merged by
    a second kernel (combine_kernel) at 1 and 1/2 of them, with early_v at 1, 1/2 and 1/4, and at 2 and 4 times them
    (where the KV has that many blocks) with and without early_v."""
    from pallas_kernels.attention.triton_paged import TritonAttentionConfig, plan, trim_splits

    B, L, S, T = shape
    out = list(TRITON_CANDIDATES)
    if T == 1:
        base = plan((B, T, HQ, D), (HKV, B * N + 1, S, D), N, TritonAttentionConfig())
        for splits in sorted({max(1, base.num_splits // 2), base.num_splits * 2} - {base.num_splits}):
            out += [{"num_splits": splits}, {"num_splits": splits, "num_stages": 3}]
        blocks = -(-N * S // base.block_kv)
        merge = sorted({trim_splits(blocks, round(base.num_splits * f)) for f in MERGE_SPLIT_FACTORS})
        out += [{"combine_in_kernel": True, **({"num_splits": n} if n != base.num_splits else {})} for n in merge]
        out += [{"combine_in_kernel": True, "num_splits": merge[-1], "num_stages": 3}]
        if 128 // S >= 1 and 128 % S == 0:
            out += [{"pages_per_block": 128 // S, "num_warps": 8}, {"pages_per_block": 128 // S, "num_stages": 3}]
        # V loaded beside K (TritonAttentionConfig.early_v): the default, and the merge at the default's splits,
        # half of them and a quarter (fewer, longer programs, whose steps wait on their loads)
        half = trim_splits(blocks, max(1, base.num_splits // 2))
        quarter = trim_splits(blocks, max(1, round(base.num_splits / 4)))
        out += [{"early_v": True}] + [
            {"early_v": True, "combine_in_kernel": True, **({"num_splits": n} if n != base.num_splits else {})}
            for n in sorted({base.num_splits, half, quarter})]
        # the splits merged by a second kernel (TritonAttentionConfig.combine_kernel), with and without early_v,
        # at the default splits, half of them and (early_v) a quarter
        out += [{"combine_kernel": True}, {"combine_kernel": True, "early_v": True},
                {"combine_kernel": True, "num_splits": half}]
        out += [{"combine_kernel": True, "early_v": True, "num_splits": n} for n in sorted({half, quarter})]
        # and at twice and four times them, where the KV has the blocks: at B=1 L=8k twice the default splits
        # with XLA's merge beat the default by 10% (attn_tune_b1_8k_h200_dbc28b3.log); the second kernel's merge is
        # one launch whatever the count, and more programs fill the SMs when B x KV heads is small
        more = sorted({trim_splits(blocks, min(blocks, base.num_splits * f)) for f in (2, 4)} - {base.num_splits})
        out += [{"combine_kernel": True, "early_v": True, "num_splits": n} for n in more]
        out += [{"combine_kernel": True, "num_splits": n} for n in more]
        # (not proposed: the second-kernel merge with one stage, no software pipeline, at these split counts; it lost
        # each time at B=1, 20.3-25.7 us at L=8k against 19.4-19.6 with two, attn_t_b1_8k_p16_h200_212111c.log)
    return out


def candidate(impl: str, config: dict, scale: float):
    """The search loop's candidate running `impl` ("mosaic" or "triton") with `config` (a dict of its config
    class's fields; {} the defaults) at softmax scale `scale`."""
    from pallas_kernels import tuning
    from pallas_kernels.attention.mosaic_paged import MosaicAttentionConfig, paged_attention_mosaic
    from pallas_kernels.attention.triton_paged import TritonAttentionConfig, paged_attention_triton

    cls, fn = {"mosaic": (MosaicAttentionConfig, paged_attention_mosaic),
               "triton": (TritonAttentionConfig, paged_attention_triton)}[impl]
    cls(**config)  # a config its kernel no longer takes fails here, not in the search
    return tuning.Candidate(impl, config, lambda *a: fn(*a, scale=scale, config=config or None))


def tune(shapes, args) -> list[dict]:
    import jax
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: F401 (fail early if unavailable)

    from pallas_kernels import tuning
    from pallas_kernels.attention.dispatch import DISPATCH, shape_key
    from pallas_kernels.attention.reference import paged_attention_reference

    scale = D**-0.5
    rows = []
    for shape in shapes:
        B, L, S, T = shape
        N = L // S
        sets = make_sets(B, L, S, T, HQ, HKV, D, copies=copies_for(B, L, S), seed=7)
        proposals = {"mosaic": mosaic_candidates, "triton": triton_candidates}
        configs = args.tune_configs or [(impl, cfg) for impl in args.tune_impls for cfg in proposals[impl](shape, N)]
        cands = [candidate(impl, cfg, scale) for impl, cfg in configs]
        key = shape_key(sets[0][0].shape, sets[0][1].shape, N, sets[0][0].dtype)
        # the table's current entry timed beside the candidates: they cannot replace it with a slower winner
        cands = tuning.with_incumbent(cands, DISPATCH.tuned(key), lambda impl, cfg: candidate(impl, cfg, scale))
        best, trials = tuning.search(cands, lambda *a: paged_attention_reference(*a, scale=scale), sets, tol=TOL,
                                     progress=log, **TIMING)
        for t in trials:  # each trial in the log too: a run cut short by its time limit writes no JSON
            log(t.line())
            rows.append({"shape": key, "config": t.config, "ok": t.ok, "max_rel_err": t.max_rel_err,
                         "us": round(t.us, 2), "rerun_us": t.rerun_us and round(t.rerun_us, 2),
                         "error": t.error[:200]})
        if best is not None:
            path = DISPATCH.record(key, best)
            log(f"tune {key}: best {best.config} {best.us:.1f} us of {len(trials)} ({path})")
        del sets
        jax.clear_caches()
    return rows


def copies_for(B, L, S) -> int:
    pool = 2 * HKV * (B * (L // S) + 1) * S * D * 2
    return max(1, min(8, math.ceil(2 * L2_BYTES / pool)))


def run_shape(shape, args) -> list[dict]:
    import jax
    import numpy as np

    from benchmarks import gpu_trace
    from pallas_kernels import tuning

    B, L, S, T = shape
    Hq, Hkv, Dh = (4, 2, 64) if args.tiny else (HQ, HKV, D)
    N = L // S
    sets = make_sets(B, L, S, T, Hq, Hkv, Dh, copies=1 if args.tiny else copies_for(B, L, S))
    kv_bytes = 2 * B * L * Hkv * Dh * 2
    scale = Dh**-0.5
    impls = implementations(T, S, N, scale, interpret=args.tiny)
    want = None
    rows, timed = [], {}  # every implementation checked first; those that pass are then timed round-robin
    for name, fn in impls.items():
        row = {"B": B, "L": L, "page": S, "T": T, "impl": name}
        try:
            my_sets = [contiguous(a) for a in sets] if name == "jax_gqa" else sets
            got = np.asarray(jax.jit(fn)(*my_sets[0]), np.float32)
            if want is None:
                want = np.asarray(jax.jit(impls["xla_reference"])(*sets[0]), np.float32)
            err = float(np.linalg.norm(np.nan_to_num(got - want, nan=1e9)) / np.linalg.norm(want))
            row["rel_err"] = err
            row["ok"] = bool(np.isfinite(got).all() and err <= TOL)
            if row["ok"] and not args.tiny:
                timed[name] = (fn, my_sets)
        except Exception as e:  # noqa: BLE001 (recorded, not fatal: e.g. a baseline that cannot lower)
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
    errors: dict[str, str] = {}
    cases = dict(timed)
    if args.profile and timed:  # the chain's own cost per call (the link between calls, see tuning._depend)
        cases["chain_floor"] = (lambda q, *_: q, sets)
    times = tuning.time_interleaved(cases, errors=errors, **TIMING) if cases else {}
    for row in rows:
        name = row["impl"]
        if name in times:
            us = times[name]["us"]
            row["us"], row["GB/s"] = round(us, 2), round(kv_bytes / us / 1e3, 1)
        elif name in errors:
            row["ok"], row["error"] = False, errors[name]
        log(f"{shape} {name}: ok={row.get('ok')} us={row.get('us')} GB/s={row.get('GB/s')} {row.get('error', '')}")
        if args.profile and name in PROFILED and name in times:  # where one call's time goes, by kernel
            row["profile"], line = gpu_trace.profile_call(*timed[name], max_calls=TIMING["max_calls"])
            log(f"  {line}")
    if "chain_floor" in times:
        rows.append({"B": B, "L": L, "page": S, "T": T, "impl": "chain_floor",
                     "us": round(times["chain_floor"]["us"], 2)})
        log(f"{shape} chain_floor: us={rows[-1]['us']}")
    del sets, timed
    jax.clear_caches()
    return rows


STALE = 0.97  # ours / our kernels' default plans below this: the tuned entry has gone stale (see summarize)


def summarize(rows: list[dict]) -> list[dict]:
    """One line per shape: GB/s of each implementation, ours over the best baseline and over jax_paged, ours over
    the faster of our two kernels with their default plans ("ours/default": below 1, the tuned table's entry for
    the shape lost to a plan it should have beaten, as when a kernel changes under an entry), and for verify
    shapes the time over the T=1 time of the same (B, L, page)."""
    by_shape: dict[tuple, dict] = {}
    for r in rows:
        by_shape.setdefault((r["B"], r["L"], r["page"], r["T"]), {})[r["impl"]] = r
    t1 = {k[:3]: v["ours"].get("us") for k, v in by_shape.items() if k[3] == 1 and "ours" in v}
    out = []
    for (B, L, S, T), impls in by_shape.items():
        line = {"B": B, "L": L, "page": S, "T": T}
        for name, r in impls.items():
            if name == "chain_floor":  # --profile: a call's share of the chain itself, in us
                line["chain_floor us"] = r["us"]
                continue
            line[name] = r.get("GB/s") if r.get("ok") else ("FAIL" if "error" not in r else "error")
        ours = impls.get("ours", {}).get("us")
        base = [impls[n]["us"] for n in ("xla_reference", "jax_paged", "jax_gqa") if impls.get(n, {}).get("us")]
        if ours and base:
            line["ours/best baseline"] = round(min(base) / ours, 2)
        if ours and impls.get("jax_paged", {}).get("us"):
            line["ours/jax_paged"] = round(impls["jax_paged"]["us"] / ours, 2)
        own = [impls[n]["us"] for n in ("triton", "mosaic") if impls.get(n, {}).get("ok") and impls[n].get("us")]
        if ours and own:
            line["ours/default"] = round(min(own) / ours, 2)
        if ours and T > 1 and t1.get((B, L, S)):
            line["time vs T=1"] = round(ours / t1[(B, L, S)], 3)
        out.append(line)
    return out


def stale(summary: list[dict]) -> list[str]:
    """A line for each shape whose "ours/default" is below STALE."""
    return [f"stale: B={line['B']} L={line['L']} page={line['page']} T={line['T']}: ours (the tuned table's pick) "
            f"ran at {line['ours/default']}x our kernels' faster default plan; retune the shape"
            for line in summary if line.get("ours/default", 1) < STALE]


def parse_shapes(text: str) -> list[tuple]:
    return [tuple(int(x) for x in part.split(",")) for part in text.split(";") if part.strip()]


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """--tune-configs: a JSON list of [impl, config] pairs, each config one its kernel's config class takes."""
    try:
        pairs = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and p[0] in ("mosaic", "triton") and isinstance(p[1], dict)
            for p in pairs):
        raise argparse.ArgumentTypeError('want a non-empty list of ["mosaic" or "triton", {config}] pairs')
    for impl, cfg in pairs:
        try:
            candidate(impl, cfg, 1.0)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{impl} {json.dumps(cfg)}: {str(e).splitlines()[0]}") from None
    return [(impl, cfg) for impl, cfg in pairs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the issue's bar shapes and a few more, not the whole grid")
    p.add_argument("--only", type=parse_shapes, default=None, help='shapes "B,L,page,T;..."')
    p.add_argument("--tune", action="store_true", help="run the search loop first and record winners")
    p.add_argument("--tune-shapes", type=parse_shapes, default=None, help='shapes to tune (default: the bar shapes)')
    p.add_argument("--tune-impls", default="mosaic,triton",
                   help="kernels whose candidates --tune proposes, comma-separated (default: mosaic,triton); the "
                        "table's current entry is timed beside them whatever its kernel")
    p.add_argument("--tune-only", action="store_true", help="with --tune: no benchmark after the search")
    p.add_argument("--tune-configs", type=parse_configs, default=None,
                   help='with --tune: the configs to try, as JSON [["mosaic" or "triton", {config}], ...], instead '
                        "of the search's proposals (--tune-impls is then not used)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode (no timing)")
    p.add_argument("--profile", action="store_true",
                   help="also time the chain's own cost (chain_floor) and profile ours, triton and jax_paged: "
                        "time per kernel, busy vs span")
    args = p.parse_args()
    args.tune_impls = tuple(i for i in args.tune_impls.split(",") if i)
    if not args.tune_impls or set(args.tune_impls) - {"mosaic", "triton"}:
        p.error(f"--tune-impls: comma-separated names among mosaic, triton, got {','.join(args.tune_impls)!r}")
    if args.tune_only and not args.tune:
        p.error("--tune-only needs --tune")
    if args.tune_configs and not args.tune:
        p.error("--tune-configs needs --tune")
    import jax

    shapes = TINY if args.tiny else args.only or (QUICK if args.quick else DECODE + VERIFY)
    tuning_rows = tune(args.tune_shapes or BAR, args) if args.tune and not args.tiny else []
    if tuning_rows and os.environ.get("OUT"):
        from pallas_kernels.tuning import TUNED_DIR

        shutil.copy(TUNED_DIR / "paged_attention.json", Path(os.environ["OUT"], "tuned_paged_attention.json"))
    if args.tune_only:
        path = write_result("attention_tune", {"device": device(), "versions": versions("jax", "jaxlib"),
                                               "tuning": tuning_rows})
        print(f"wrote {path}")
        return
    def save(rows):
        return write_result("attention", {
            "device": device(), "versions": versions("jax", "jaxlib"), "backend": jax.default_backend(),
            "heads": {"q": HQ, "kv": HKV, "head_dim": D}, "dtype": "bfloat16",
            "timing": "tuning.time_interleaved: in-jit, rotating inputs > L2, (t(2n) - t(n)) / n, median of 25, "
                      "round-robin over the implementations",
            "summary": summarize(rows), "rows": rows, "tuning": tuning_rows})

    rows = []
    for shape in shapes:  # the JSON rewritten after each shape: a run cut off by a time limit keeps what it measured
        rows += run_shape(shape, args)
        if not args.tiny:
            save(rows)
    summary = summarize(rows)
    cols = list(dict.fromkeys(c for line in summary for c in line))
    print(table([{c: line.get(c, "") for c in cols} for line in summary], cols))
    for message in stale(summary):
        print(message)
    if args.tiny:
        assert all(r["ok"] for r in rows if r["impl"] in ("ours", "mosaic", "xla_reference")), rows
        return
    print(f"wrote {save(rows)}")


if __name__ == "__main__":
    main()
