"""KV page copies between the device and the host, and what they cost the other Python threads of the process.

The serving process copies pages off the device on its host-tier lander and remote-writer threads and onto it on
its fetcher threads, while the engine thread dispatches the model. A copy that holds the GIL stops the engine
thread for its whole length. Each row copies `--pages` pages of Qwen2.5-Coder-7B's KV (16-token pages: 28 layers,
K and V, 4 KV heads, 128 dims, bf16; 768 pages = 12,288 tokens = 704 MB) on a worker thread, `--repeats` times,
while the main thread runs short pieces of Python and records its longest stall.

Rows: device to host by np.asarray (what the tiers did) and by `codegen_jax.kv_cache.to_host` (through pinned host
memory); host to device by jax.device_put of a numpy array, in the fetch's 64-page pieces and whole, and through
pinned host memory.

Run on the GPU machine:  python benchmarks/host_copy.py [--pages 768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402

PAGE = (28, 2, 4, 16, 128)  # one 16-token page of every layer of the 7B's KV
PIECE = 64  # pages per host-to-device copy of a remote fetch (serve.scheduler.FETCH_PIECE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--switch-interval-ms", type=float, default=None, help="default: ServeConfig's")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from codegen_jax.kv_cache import to_host
    from serve.scheduler import FETCH_PIECE
    from serve.server import ServeConfig

    assert FETCH_PIECE == PIECE, "keep PIECE in step with the scheduler"
    sys.setswitchinterval((args.switch_interval_ms or ServeConfig.switch_interval_ms) / 1e3)
    shape = (args.pages, *PAGE)
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    host = np.asarray(x)
    nbytes = host.nbytes
    dev = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(dev)
    pinned = on_device.with_memory_kind("pinned_host")
    fresh: dict = {}

    def new_device_array():  # np.asarray keeps the host copy on the array: each run copies a new one
        fresh["x"] = x + 0
        fresh["x"].block_until_ready()

    def pieces(put):
        out = [put(host[i : i + PIECE]) for i in range(0, args.pages, PIECE)]
        for a in out:
            a.block_until_ready()
        return out

    paths = {
        "d2h np.asarray": (new_device_array, lambda: np.asarray(fresh["x"]), lambda r: r),
        "d2h to_host": (new_device_array, lambda: to_host(fresh["x"]), lambda r: r),
        "h2d device_put, 64-page pieces": (None, lambda: pieces(jax.device_put), None),
        "h2d device_put, whole": (None, lambda: jax.device_put(host).block_until_ready(), None),
        "h2d via pinned, 64-page pieces": (
            None, lambda: pieces(lambda a: jax.device_put(jax.device_put(a, pinned), on_device)), None),
    }

    def timed(prep, fn) -> tuple[float, float, int]:
        """(copy seconds, longest stall of the main thread in seconds, main thread's pieces of work done)."""
        if prep:
            prep()
        done, out = threading.Event(), {}

        def worker():
            t = time.perf_counter()
            out["r"] = fn()
            out["s"] = time.perf_counter() - t
            done.set()

        th = threading.Thread(target=worker)
        last, longest, ticks = time.perf_counter(), 0.0, 0
        th.start()
        while not done.is_set():
            sum(range(100))  # a few microseconds of bytecode, as the engine thread runs between device calls
            now = time.perf_counter()
            longest, last, ticks = max(longest, now - last), now, ticks + 1
        th.join()
        fresh["r"] = out["r"]
        return out["s"], longest, ticks

    rows = []
    for name, (prep, fn, result) in paths.items():
        timed(prep, fn)  # warm-up: compiles, opens the pinned pool
        if result is not None:  # the copy is exact
            assert np.array_equal(np.asarray(result(fresh["r"])).view(np.uint16), np.asarray(fresh["x"]).view(
                np.uint16)), name
        runs = [timed(prep, fn) for _ in range(args.repeats)]
        s = float(np.median([r[0] for r in runs]))
        rows.append({"path": name, "ms": round(s * 1e3, 1), "GB_s": round(nbytes / s / 1e9, 2),
                     "main_thread_longest_stall_ms": round(max(r[1] for r in runs) * 1e3, 1),
                     "main_thread_work_per_ms": round(float(np.median([r[2] / r[0] for r in runs])) / 1e3, 1)})
        print(f"{name}: {rows[-1]}", flush=True)
    cols = ["path", "ms", "GB_s", "main_thread_longest_stall_ms", "main_thread_work_per_ms"]
    print(table(rows, cols))
    d2h = {r["path"]: r for r in rows}
    print(f"to_host vs np.asarray: {d2h['d2h np.asarray']['ms'] / d2h['d2h to_host']['ms']:.1f}x faster, "
          f"longest stall {d2h['d2h np.asarray']['main_thread_longest_stall_ms']} -> "
          f"{d2h['d2h to_host']['main_thread_longest_stall_ms']} ms")
    path = write_result("host_copy", {
        "device": device(), "versions": versions("jax", "jaxlib", "numpy"), "pages": args.pages,
        "page_shape": PAGE, "MB": round(nbytes / 1e6, 1), "repeats": args.repeats,
        "switch_interval_ms": sys.getswitchinterval() * 1e3, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
