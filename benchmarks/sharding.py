"""Tensor parallelism on 2 GPUs: the collective matmuls and a TP=2 decode and prefill step, overlapped vs not,
under NVLink and with NCCL_P2P_DISABLE=1 (host-staged transfers, our PCIe stand-in), plus XLA's own overlap flags.

Each scenario runs in a fresh subprocess (NCCL and XLA read their environment when JAX initialises). Inside one,
every figure is from `pallas_kernels.tuning.time_interleaved` (calls chained inside one jit: device time, dispatch
taken out; the variants compared with each other are timed round-robin, median with min/max under "spread_us"):
  - per layer, 70B-class shapes (hidden 8192, FFN 28672): the all-gather-matmul (gate+up) and matmul-reduce-scatter
    (down) at 2,048 tokens for 'nocomm' (the same compute, no communication), 'sp' (plain all_gather/psum_scatter),
    'ring' (also as 2 and 4 pieces per shard: 'ring2', 'ring4'), 'bidi'; the decode all-reduce (8 tokens) plain vs
    overlapped. Exposed communication = t(sp) -
    t(nocomm); hidden share = (t(sp) - t(best overlapped)) / exposed.
  - a 2-layer model of those shapes, prefill (1 x 2,048 tokens) and decode (8 slots, 1,024 cached tokens) steps per
    strategy; communication share of a step = (t(xla) - t(nocomm)) / t(xla). Prefill variants '<strategy>_mb2'
    run the 2,048 tokens as two 1,024-token micro-batches interleaved layer by layer (`Transformer.microbatches`):
    one's collectives can run under the other's matmuls ('xla_mb4': four of 512; a trailing 's', 'xla_mb2s': the
    pieces' sublayers as ordered stages, `Transformer.microbatch_stagger`; 'xla_mb3s': three of 704, 704 and 640,
    `model.microbatch_cuts`); 'nocomm_mb2' against 'nocomm' is what the split costs. 'nocomm' is not free of
    collectives: its token-split activations keep the vocab-split embedding's all-reduce and GSPMD's reshards (an
    all-gather; all-to-alls and collective-permutes once split), so the same variants under 'nvlink' are the
    closer compute floor.

    python -m benchmarks.sharding --scenarios p2p_disabled_ar_latency --timeout 300   # 2 GPUs (default: every
                                                                                    # scenario, ~2-4 min each)
    python -m benchmarks.sharding --tiny     # CPU smoke test with 2 simulated devices
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

from benchmarks.common import WORKER_MARK, run_worker, table, versions, write_result
from sharding.strategy import with_microbatch_flags

XLA_OVERLAP_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_threshold_for_windowed_einsum_mib=0 "
                     "--xla_gpu_multi_streamed_windowed_einsum=true")
LHS_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"
NO_COMBINE_FLAGS = f"{LHS_FLAG} --xla_gpu_collective_permute_combine_threshold_bytes=0"
# the micro-batch flags before the all-reduce latency profile (the scenarios below measured with them)
NOMERGE_FLAGS = f"--xla_gpu_dot_merger_threshold_mb=0 {LHS_FLAG}"
SCENARIOS = {  # the PCIe stand-in first: it carries the acceptance bars if the run is cut short
    # what --tp-microbatches sets (`sharding.strategy.MICROBATCH_XLA_FLAGS`): the dot merger off (see
    # p2p_disabled_nomerge), and every all-reduce given its host-staged latency through a profile for XLA's
    # profile-guided estimator (sharding/allreduce_latency.pbtxt); without it the scheduled HLO of xla_mb2s
    # (f5d5475) started each stage's all-reduce just before the next stage's last matmul, with or without the
    # costly-collective estimate
    "p2p_disabled_ar_latency": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": with_microbatch_flags("")},
    "p2p_disabled": {"NCCL_P2P_DISABLE": "1"},
    # every strategy again with XLA's latency-hiding scheduler, which may move a ring's async collective-permute
    # starts ahead of the matmul they overlap (whether the default schedule does is what the pair shows)
    "p2p_disabled_lhs": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": LHS_FLAG},
    "nvlink": {},
    "p2p_disabled_xla_flags": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": XLA_OVERLAP_FLAGS},
    # rings as they are meant to run: XLA combined a ring's independent piece transfers into one (the profile
    # showed one SendRecv kernel per all-gather ring of 4 pieces), so no piece's matmul could start before the
    # last piece landed; the latency-hiding scheduler (said explicitly) starts each transfer as early as it can
    "p2p_disabled_nocombine": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": NO_COMBINE_FLAGS},
    # NCCL's Simple protocol: with peer access off NCCL picks LL for these messages (the profiles' *_RING_LL
    # kernels), whose 8-byte flag-stamped stores carry half the bytes of a store; Simple moves whole chunks
    "p2p_disabled_simple": {"NCCL_P2P_DISABLE": "1", "NCCL_PROTO": "Simple"},
    # NCCL on 2 channels (CTAs): its kernels beside a matmul hold fewer SMs, which the matmul's last wave of tiles
    # waits for (the all-gather ring's matmuls ran ~22% longer beside NCCL's host-staged send/receive)
    "p2p_disabled_ch2": {"NCCL_P2P_DISABLE": "1", "NCCL_MAX_NCHANNELS": "2"},
    # micro-batches kept apart: XLA's dot merger joined the two pieces' matmuls that share a weight into one dot
    # (the scheduled HLO of prefill_xla_mb2, ea04058), so both pieces' all-reduces waited for it and ran back to
    # back with nothing beside them
    "p2p_disabled_nomerge": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": NOMERGE_FLAGS},
    # and cuBLAS for every matmul: with the dot merger off, XLA gave some 1,024-token projections to its Triton
    # GEMM fusions (the unsplit step's went to cuBLAS), one suspect for what the split costs (nocomm_mb2 1.15x)
    "p2p_disabled_nomerge_cublas": {"NCCL_P2P_DISABLE": "1",
                                    "XLA_FLAGS": f"{NOMERGE_FLAGS} --xla_gpu_enable_triton_gemm=false"},
    # the scheduler told that a large all-reduce is costly (XLA's approximate estimator: 5,000 units for any
    # collective, 1,000 per cuBLAS call, little for a fusion, so it sought about one projection's worth of work to
    # hide a host-staged all-reduce behind): with staggered micro-batches it started each stage's all-reduce after
    # the next stage's first matmuls rather than at the stage's end (scheduled HLO of xla_mb2s, 10d1f4e). The flag
    # left that schedule as it was (f5d5475): XLA did not use this estimator for these programs
    "p2p_disabled_costly": {"NCCL_P2P_DISABLE": "1",
                            "XLA_FLAGS": f"{NOMERGE_FLAGS} --xla_gpu_enable_approx_costly_collectives=true"},
    "p2p_disabled_costly_cublas": {
        "NCCL_P2P_DISABLE": "1",
        "XLA_FLAGS": f"{NOMERGE_FLAGS} --xla_gpu_enable_approx_costly_collectives=true "
                     "--xla_gpu_enable_triton_gemm=false"},
    # two collectives in flight: with one, a stage's all-reduce cannot start before the previous one is done (the
    # second piece's embedding all-reduce held back the first piece's first attention all-reduce)
    "p2p_disabled_limit2": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": f"{NOMERGE_FLAGS} "
                            "--xla_gpu_experimental_parallel_collective_overlap_limit=2"},
    # profile-guided latency estimates: the scheduler's analytical model does not know that the transfers are
    # host-staged (~0.6 ms for a 1,024-token all-reduce), so it gave each one a window of a kernel or none; with
    # PGLE the first call of every program is profiled and the program recompiled with the measured latencies
    "p2p_disabled_pgle": {"NCCL_P2P_DISABLE": "1", "XLA_FLAGS": NOMERGE_FLAGS, "JAX_ENABLE_PGLE": "true",
                          "JAX_PGLE_PROFILING_RUNS": "1"},
}
# per-layer variants: 'ringC' is the one-direction ring with each shard sent as C pieces
LAYER_STRATEGIES = ("nocomm", "sp", "ring", "ring2", "ring4", "bidi")
OVERLAPPED = ("ring", "ring2", "ring4", "bidi")


def split_chunks(name: str) -> tuple[str, int]:
    """'ring4' -> ('ring', 4), 'xla4' -> ('xla', 4) (each projection as 4 matmuls); any other strategy -> (it, 1)."""
    for base in ("ring", "xla"):
        if name.startswith(base) and name[len(base):].isdigit():
            return base, int(name[len(base):])
    return name, 1


def parse_variant(name: str) -> tuple[str, int, int, bool]:
    """A step variant -> (strategy, ring pieces, micro-batches, staggered): 'xla_mb2' -> ('xla', 1, 2, False),
    'ring4' -> ('ring', 4, 1, False), 'xla4_mb2s' -> ('xla', 4, 2, True). '_mbK': the prefill runs as K pieces
    interleaved layer by layer (`Transformer.microbatches`); a trailing 's': their sublayers as ordered stages
    (`Transformer.microbatch_stagger`)."""
    base, _, mb = name.partition("_mb")
    stagger = mb.endswith("s")
    return (*split_chunks(base), int(mb.rstrip("s")) if mb else 1, stagger)


# prefill variants that overlap communication with compute: rings inside each collective matmul, or two
# micro-batches whose collectives run under each other's matmuls
MICROBATCHED = ("xla_mb2", "allreduce_mb2", "sp_mb2", "xla_mb4", "xla4_mb2", "xla_mb2s", "xla4_mb2s", "xla_mb4s",
                "xla_mb3s")
OVERLAPPED_STEPS = ("xla4", "ring", "ring4", "bidi", *MICROBATCHED)


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=256, layers=2, prefill=64, slots=4,
                    context=32)
    return dict(hidden=8192, ffn=28672, heads=64, kv_heads=8, head_dim=128, vocab=32768, layers=2, prefill=2048,
                slots=8, context=1024)


# ---- one scenario (subprocess) ---------------------------------------------------------------------------------


# profiled with --profile: one call each under jax.profiler, for how much of the NCCL time ran beside compute
# (few: in 3fd908d's run of 13, the later traces lost most of their compute kernels)
PROFILED = ("ag_matmul_ring", "matmul_rs_ring4", "prefill_xla", "prefill_xla_mb2", "prefill_xla_mb2s",
            "prefill_nocomm_mb2")


def worker(scenario: str, tiny: bool, parts: str = "layer,step", profile: bool = False,
           only: tuple[str, ...] = ()) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from benchmarks import gpu_trace
    from codegen_jax import Engine, EngineConfig, ModelConfig, init_model
    from codegen_jax.parallel import parallelize, shard_cache, shard_model
    from pallas_kernels.tuning import chain, time_interleaved
    from sharding import strategy as S
    from sharding import tensor_parallel as TP
    from sharding.mesh import interconnect, make_mesh

    # chains of ~20 ms: a step or layer call lasts 1-15 ms, and at the default 2 ms a chain held one call, so its
    # time included the host's dispatch of a 2-device program (the decode step's `nocomm` read slower than `xla`)
    timing = dict(repeats=3, max_calls=2) if tiny else dict(repeats=9, target_ms=20.0)
    sh = shapes(tiny)
    D, F, N = sh["hidden"], sh["ffn"], sh["prefill"]
    mesh = make_mesh(tp=2, devices=jax.devices()[:2])
    dtype = jnp.float32 if tiny else jnp.bfloat16
    key = jax.random.key(0)

    def put(shape, spec, i):
        a = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32).astype(dtype) * 0.02
        return jax.device_put(a, NamedSharding(mesh, spec))

    only_xla = scenario.endswith("xla_flags")
    out: dict = {"scenario": scenario, "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                 "interconnect": interconnect(), "layer_us": {}, "step_us": {}, "spread_us": {}}

    def timed(group: str, cases: dict) -> None:  # one interleaved timing per group of compared variants
        # a layer call waits for all of the previous one's output, as the next layer does: linked through the
        # output's first element (on device 0), a call's last transfer ran under the next call's matmul (the
        # matmul-reduce-scatter ring of 4 pieces read 796 us in a chain, 743 us NCCL + 686 us matmul with nothing
        # overlapped in a profile of one call, ea04058)
        # a variant that fails to compile is reported (out["errors"]) and the others still timed
        for name, t in time_interleaved(cases, **timing, whole=group == "layer_us",
                                        errors=out.setdefault("errors", {})).items():
            out[group][name] = t["us"]
            out["spread_us"][name] = [round(t["lo"], 1), round(t["hi"], 1)]
        if profile:
            for name in (n for n in cases if n in PROFILED):
                run, calls = chain(*cases[name], target_ms=0.0, max_calls=1, whole=group == "layer_us")
                events = gpu_trace.profiled(run, runs=3)
                out.setdefault("profile", {})[name] = {
                    "overlap": gpu_trace.overlap(events, 3 * calls),
                    "top": gpu_trace.breakdown(events, 3 * calls, top=8)["top"]}

    # Per-layer collective matmuls.
    if not only_xla and "layer" in parts:
        wg, wu, wd = put((F, D), P("tp"), 1), put((F, D), P("tp"), 2), put((D, F), P(None, "tp"), 3)
        x_sp = put((N, D), P("tp"), 4)
        h = put((N, F), P(None, "tp"), 5)
        ag, rs = {}, {}
        for name in LAYER_STRATEGIES:
            s, c = split_chunks(name)
            ag[f"ag_matmul_{name}"] = (
                lambda x, a, b, s=s, c=c: TP.column_parallel(x, [a, b], mesh, s, chunks=c), (x_sp, wg, wu))
            rs[f"matmul_rs_{name}"] = (lambda x, w, s=s, c=c: TP.row_parallel(x, w, mesh, s, chunks=c), (h, wd))
        timed("layer_us", ag)
        timed("layer_us", rs)
        h_dec = put((sh["slots"], F), P(None, "tp"), 6)
        dec = {f"decode_matmul_ar_{s}": (lambda x, w, s=s: TP.row_parallel(x, w, mesh, s), (h_dec, wd))
               for s in ("allreduce", "allreduce_overlap")}
        dec["decode_matmul_ar_nocomm"] = (
            jax.shard_map(lambda x, w: jnp.einsum("nf,df->nd", x, w), mesh=mesh, in_specs=(P(None, "tp"),) * 2,
                          out_specs=P(None, "tp"), check_vma=False), (h_dec, wd))
        timed("layer_us", dec)
        del wg, wu, wd, x_sp, h, h_dec

    if "step" not in parts:
        return out
    # TP=2 model steps.
    cfg = ModelConfig(model_type="llama", vocab_size=sh["vocab"], hidden_size=D, intermediate_size=F,
                      num_layers=sh["layers"], num_heads=sh["heads"], num_kv_heads=sh["kv_heads"],
                      head_dim=sh["head_dim"])
    model = shard_model(init_model(cfg, dtype=dtype), mesh)
    parallelize(model, mesh, "xla")
    page = 16
    ecfg = EngineConfig(max_slots=sh["slots"], page_size=page, max_seq_len=max(N, sh["context"]) + page,
                        prefill_chunk=1 << (N - 1).bit_length(), decode_steps=1)
    rng = np.random.default_rng(0)
    n_pages = -(-N // page)
    prefill_in = (jnp.asarray(rng.integers(0, cfg.vocab_size, (1, N)), jnp.int32),
                  jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None], jnp.array([N], jnp.int32),
                  jnp.array([N], jnp.int32))
    B, L = sh["slots"], sh["context"]
    per = -(-(L + 1) // page)
    decode_in = (jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 1)), jnp.int32),
                 1 + jnp.arange(B * per, dtype=jnp.int32).reshape(B, per), jnp.full((B,), L + 1, jnp.int32),
                 jnp.ones((B,), jnp.int32))
    steps = {"prefill": ("xla",) if only_xla else ("xla", "xla4", "allreduce", "sp", "ring", "ring4", "bidi", "auto",
                                                   "nocomm", *MICROBATCHED, "nocomm_mb2", "nocomm_mb3", "nocomm_mb4"),
             "decode": ("xla",) if only_xla else ("xla", "allreduce", "allreduce_overlap", "auto", "nocomm")}
    for kind, strategies in steps.items():
        strategies = [v for v in strategies if not only or v in only]  # --only
        if not strategies:
            continue
        inputs = prefill_in if kind == "prefill" else decode_in
        cases = {}
        for name in strategies:
            s, c, mb, stagger = parse_variant(name)
            for layer in model.layers:
                layer.self_attn.strategy = layer.mlp.strategy = s
                layer.self_attn.chunks = layer.mlp.chunks = c
            # pieces of at least 256 tokens (the tiny shapes' 64-token prefill: 16)
            model.microbatches, model.microbatch_min_tokens = mb, 16 if tiny else 256
            model.microbatch_stagger = stagger
            engine = Engine(model, ecfg)  # its graph holds the strategy: one engine per variant
            shard_cache(engine.cache, mesh)
            cases[f"{kind}_{name}"] = (partial(engine._forward, last_only=True),
                                       (engine.params, engine.cache.pages, *inputs))
        timed("step_us", cases)
        del cases
    out["auto_picks"] = {"prefill": S.choose(interconnect(), N, D, 2), "decode": S.choose(interconnect(), B, D, 2)}
    return out


# ---- driver ------------------------------------------------------------------------------------------------------


def summarize(r: dict) -> dict:
    lay, st = r.get("layer_us", {}), r.get("step_us", {})
    s: dict = {}
    for op in ("ag_matmul", "matmul_rs"):
        if f"{op}_sp" in lay:
            exposed = lay[f"{op}_sp"] - lay[f"{op}_nocomm"]
            best = min(lay[f"{op}_{v}"] for v in OVERLAPPED)
            s[f"{op}_exposed_comm_us"] = round(exposed, 1)
            s[f"{op}_hidden_share"] = round((lay[f"{op}_sp"] - best) / exposed, 3) if exposed > 0 else None
    def put(key, num, den, *, share=False):  # a ratio of two timed variants, left out where --only dropped one
        if num in st and den in st:
            s[key] = round((st[num] - st[den]) / st[num] if share else st[num] / st[den], 3)

    def best_of(names):
        return min((st[f"prefill_{v}"] for v in names if f"prefill_{v}" in st), default=None)

    put("prefill_comm_share", "prefill_xla", "prefill_nocomm", share=True)
    if "prefill_xla" in st:
        base = st["prefill_xla"]
        best = best_of(OVERLAPPED_STEPS)
        if best:
            s["prefill_speedup_vs_xla"] = round(base / best, 3)
            s["prefill_speedup_vs_best_unoverlapped"] = round(best_of(("xla", "allreduce", "sp")) / best, 3)
        put("prefill_auto_speedup_vs_xla", "prefill_xla", "prefill_auto")
        if best_of(MICROBATCHED):
            s["prefill_mb2_speedup_vs_xla"] = round(base / best_of(MICROBATCHED), 3)
    put("prefill_mb2_compute_cost", "prefill_nocomm_mb2", "prefill_nocomm")
    put("prefill_mb2s_speedup_vs_xla", "prefill_xla", "prefill_xla_mb2s")
    # the share of XLA's exposed communication (t(xla) - t(nocomm)) that the staggered micro-batches hide, each
    # step against its own 'nocomm' floor; those floors still hold collectives (the module's docstring), so
    # `against_nvlink` is the measure to quote when an invocation also runs 'nvlink'
    if all(f"prefill_{v}" in st for v in ("xla", "nocomm", "xla_mb2s", "nocomm_mb2")):
        exposed = st["prefill_xla"] - st["prefill_nocomm"]
        left = st["prefill_xla_mb2s"] - st["prefill_nocomm_mb2"]
        s["prefill_mb2s_hidden_share"] = round(1 - left / exposed, 3) if exposed > 0 else None
    put("decode_comm_share", "decode_xla", "decode_nocomm", share=True)
    put("decode_auto_vs_xla", "decode_xla", "decode_auto")
    put("decode_overlap_vs_xla", "decode_xla", "decode_allreduce_overlap")
    return s


def against_nvlink(results: list[dict]) -> dict:
    """Each host-staged scenario's steps against the same programs under 'nvlink' in the same invocation, where
    their collectives cost little: exposed communication of a variant = t(scenario) - t(nvlink), and the share of
    XLA's that each overlapped prefill variant hides. Unlike the 'nocomm' floors, both sides run one program."""
    nv = next((r.get("step_us", {}) for r in results if r.get("scenario") == "nvlink"), {})
    out = {}
    for r in results:
        st = r.get("step_us", {})
        if r.get("scenario") == "nvlink" or "prefill_xla" not in st or "prefill_xla" not in nv:
            continue
        exposed = st["prefill_xla"] - nv["prefill_xla"]
        row = {"xla_exposed_us": round(exposed, 1)}
        for v in MICROBATCHED:
            k = f"prefill_{v}"
            if k in st and k in nv and exposed > 0:
                row[f"{v}_exposed_us"] = round(st[k] - nv[k], 1)
                row[f"{v}_hidden_share"] = round(1 - (st[k] - nv[k]) / exposed, 3)
        out[r["scenario"]] = row
    return out


def run_scenario(name: str, tiny: bool, timeout: int, parts: str = "layer,step", profile: bool = False,
                 dump_hlo: str | None = None, only: str = "") -> dict:
    # the scheduled HLO of the model steps (jit_forward, numbered in the order the variants compile)
    dump = (f"--xla_dump_to={Path(dump_hlo) / name} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_forward"
            if dump_hlo else "")
    args = [name, "--parts", parts] + (["--profile"] if profile else []) + (["--only", only] if only else [])
    t = time.perf_counter()
    r, error = run_worker("benchmarks.sharding", args, SCENARIOS[name], tiny=tiny, timeout=timeout, xla_flags=dump)
    if error:
        return {"scenario": name, "error": error}
    r["wall_s"] = round(time.perf_counter() - t, 1)
    r["summary"] = summarize(r)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with 2 simulated devices")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--timeout", type=int, default=200, help="seconds per scenario")
    ap.add_argument("--parts", default="layer,step", help="layer (collective matmuls), step (TP=2 model steps)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call of the main variants: NCCL time, and how much of it ran beside compute")
    ap.add_argument("--dump-hlo", metavar="DIR", help="write each scenario's optimized HLO of the steps under DIR")
    ap.add_argument("--only", default="", help="comma-separated step variants to time (e.g. xla,xla_mb2; default all)")
    ap.add_argument("--no-write", action="store_true", help="print only (tests)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        only = tuple(v for v in args.only.split(",") if v)
        print(WORKER_MARK + json.dumps(worker(args.worker, args.tiny, args.parts, args.profile, only)), flush=True)
        return
    results = []
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            ap.error(f"unknown scenario {name!r}; pick from {', '.join(SCENARIOS)}")
        results.append(run_scenario(name, args.tiny, args.timeout, args.parts, args.profile, args.dump_hlo, args.only))
        r = results[-1]
        print(f"== {name}: " + (r.get("error") or json.dumps(r["summary"])), flush=True)
        for variant, err in r.get("errors", {}).items():
            print(f"   {variant} failed: {err}", flush=True)
        if "error" not in r:
            spread = r.get("spread_us", {})
            rows = [{"what": k, "us": round(v, 1), "min..max": "..".join(map(str, spread.get(k, [])))}
                    for k, v in {**r["layer_us"], **r["step_us"]}.items()]
            print(table(rows, ["what", "us", "min..max"]), flush=True)
            prof = [{"what": k, "device": d[-5:], **{c: round(v, 1) if isinstance(v, float) else v
                                                    for c, v in o.items()}}
                    for k, p in r.get("profile", {}).items() for d, o in p["overlap"].items()]
            if prof:
                print(table(prof, list(prof[0])), flush=True)
                for k, p in r["profile"].items():
                    print(f"{k}: " + "; ".join(f"{t['us_per_call']:.0f} us x{t['count_per_call']:.1f} {t['name'][:50]}"
                                               for t in p["top"][:6]), flush=True)
    cross = against_nvlink(results)
    for name, row in cross.items():
        print(f"== {name} against nvlink: {json.dumps(row)}", flush=True)
    if args.no_write:
        return
    path = write_result("sharding_tiny" if args.tiny else "sharding",
                        {"shapes": shapes(args.tiny), "scenarios": results, "against_nvlink": cross,
                         "versions": versions("jax", "flax")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
