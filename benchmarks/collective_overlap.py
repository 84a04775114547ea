"""Does a transfer run beside compute? A 32 MB psum and ppermute per device on 2 GPUs, a matmul, and the two
together, under NCCL and XLA settings (each setting in a fresh subprocess: NCCL and XLA read their environment when
JAX starts).

Inside one `shard_map` over 2 devices, each figure is a `fori_loop` of 10 bodies timed from the host (median of 5
runs, per body):
  - psum / ppermute: a [2048, 8192] bf16 shard (32 MB) reduced / swapped with the other device;
  - matmul: the shard times an [8192, 8192] weight (one GEMM);
  - matmul4: the same product as 4 column pieces, 4 GEMMs that each end;
  - matmul+ppermute, matmul4+ppermute: the ppermute and the matmul(s), independent of each other, in one body.
With full overlap the pair takes max(ppermute, matmul); with none, their sum. `hidden_us` is how much of the
compute ran under the transfer: ppermute + matmul - pair.

    python -m benchmarks.collective_overlap                      # 2 GPUs, every setting but *_ce* (~25 s each)
    python -m benchmarks.collective_overlap --settings p2p_disabled,p2p_disabled_lhs
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import WORKER_MARK, device, run_worker, table, versions, write_result

HOST_STAGED = {"NCCL_P2P_DISABLE": "1"}  # our PCIe stand-in: NCCL's transfers go through host memory
LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"
TRITON_GEMM = " --xla_gpu_cublas_fallback=false"  # every matmul a Triton GEMM fusion
HIGH_PRIORITY = " --xla_gpu_enable_highest_priority_async_stream=true"
COPY_ENGINE = {"NCCL_SHM_USE_CUDA_MEMCPY": "1"}  # NCCL's SHM copies by cudaMemcpy from its proxy thread
SETTINGS = {
    "p2p_disabled": HOST_STAGED,
    "p2p_disabled_lhs": {**HOST_STAGED, "XLA_FLAGS": LHS},
    "p2p_disabled_nocmdbuf": {**HOST_STAGED, "XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    "p2p_disabled_lhs_nocmdbuf": {**HOST_STAGED, "XLA_FLAGS": LHS + " --xla_gpu_enable_command_buffer="},
    "p2p_disabled_lhs_ch1": {**HOST_STAGED, "XLA_FLAGS": LHS, "NCCL_MAX_NCHANNELS": "1"},
    "p2p_disabled_lhs_conn32": {**HOST_STAGED, "XLA_FLAGS": LHS, "CUDA_DEVICE_MAX_CONNECTIONS": "32"},
    "p2p_disabled_lhs_tritongemm": {**HOST_STAGED, "XLA_FLAGS": LHS + TRITON_GEMM},
    "p2p_disabled_lhs_tritongemm_hp": {**HOST_STAGED, "XLA_FLAGS": LHS + TRITON_GEMM + HIGH_PRIORITY},
    "p2p_disabled_lhs_noprio": {**HOST_STAGED,
                                "XLA_FLAGS": LHS + " --xla_gpu_enable_highest_priority_async_stream=false"},
    # copy engines on the sending side (1), the receiving side (2) or both (3): on our 2 H200s the ppermute took
    # 1.5-2.2x longer this way (nccl_ce_probe_h200x2_5b424a2.log), and later runs never finished (past 80 s, and
    # the sharding benchmark's first collective stuck): named with --settings only, not in the default run
    **{f"p2p_disabled_ce{mode}": {**HOST_STAGED, **COPY_ENGINE, "NCCL_SHM_MEMCPY_MODE": mode} for mode in "123"},
    "nvlink_lhs": {"XLA_FLAGS": LHS},
}
DEFAULT = [name for name in SETTINGS if "_ce" not in name]
CALLS = 10  # bodies per timed loop


def worker(tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows, d = (64, 64) if tiny else (2048, 8192)
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    dtype = jnp.float32 if tiny else jnp.bfloat16
    x = jax.device_put(jnp.ones((2 * rows, d), dtype), NamedSharding(mesh, P("tp")))
    w = jax.device_put(jnp.full((2 * d, d), 1e-3, dtype), NamedSharding(mesh, P("tp")))
    perm = [(0, 1), (1, 0)]
    piece = d // 4

    # the product added times 0, so the loop carries it and c stays as it was
    def matmul(c, w):
        return c @ w

    def matmul4(c, w):
        return jnp.concatenate([c @ w[:, i * piece:(i + 1) * piece] for i in range(4)], axis=1)

    bodies = {
        "psum": lambda c, w: jax.lax.psum(c, "tp") * 0.5,
        "ppermute": lambda c, w: jax.lax.ppermute(c, "tp", perm),
        "matmul": lambda c, w: c + matmul(c, w) * 0,
        "matmul4": lambda c, w: c + matmul4(c, w) * 0,
        "matmul+ppermute": lambda c, w: jax.lax.ppermute(c, "tp", perm) + matmul(c, w) * 0,
        "matmul4+ppermute": lambda c, w: jax.lax.ppermute(c, "tp", perm) + matmul4(c, w) * 0,
    }
    out = {}
    for name, body in bodies.items():
        def loop(c, w, body=body):
            return jax.lax.fori_loop(0, CALLS, lambda i, a: body(a, w), c)

        f = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(P("tp"), P("tp")), out_specs=P("tp"), check_vma=False))
        f(x, w).block_until_ready()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f(x, w).block_until_ready()
            times.append((time.perf_counter() - t) / CALLS * 1e6)
        out[name] = round(sorted(times)[len(times) // 2], 1)
    return out


def summarize(us: dict) -> dict:
    s = {}
    for m in ("matmul", "matmul4"):
        s[f"{m}_hidden_us"] = round(us["ppermute"] + us[m] - us[f"{m}+ppermute"], 1)
        s[f"{m}_hidden_share"] = round(s[f"{m}_hidden_us"] / us[m], 3)
    return s


def run_setting(name: str, tiny: bool, timeout: int) -> dict:
    us, error = run_worker("benchmarks.collective_overlap", [], SETTINGS[name], tiny=tiny, timeout=timeout)
    return {"setting": name, "error": error} if error else {"setting": name, "us": us, **summarize(us)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(DEFAULT), help="comma-separated subset of " + ",".join(SETTINGS)
                    + " (default: all but the copy-engine ones)")
    ap.add_argument("--timeout", type=int, default=90, help="seconds per setting")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with 2 simulated devices")
    ap.add_argument("--no-write", action="store_true", help="print only (tests)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(WORKER_MARK + json.dumps(worker(args.tiny)), flush=True)
        return
    names = args.settings.split(",")
    for name in names:
        if name not in SETTINGS:
            ap.error(f"unknown setting {name!r}; pick from {', '.join(SETTINGS)}")
    results = []
    for name in names:
        results.append(run_setting(name, args.tiny, args.timeout))
        r = results[-1]
        print(f"== {name}: " + (r.get("error") or json.dumps({**r["us"], **summarize(r["us"])})), flush=True)
    ok = [r for r in results if "us" in r]
    if ok:
        cols = list(ok[0]["us"])
        print(table([{"setting": r["setting"], **r["us"], "hidden (1 GEMM)": r["matmul_hidden_us"],
                      "hidden (4 GEMMs)": r["matmul4_hidden_us"]} for r in ok],
                    ["setting", *cols, "hidden (1 GEMM)", "hidden (4 GEMMs)"]), flush=True)
    if args.no_write:
        return
    path = write_result("collective_overlap_tiny" if args.tiny else "collective_overlap",
                        {"device": device(), "settings": {n: SETTINGS[n] for n in names}, "results": results,
                         "versions": versions("jax")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
