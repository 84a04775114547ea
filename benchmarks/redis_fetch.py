"""Remote KV tier throughput: pages fetched from a real redis-server over loopback TCP and verified (format check +
CRC-32 checksum), in MB/s. Runs on any machine (no GPU): the serving host's CPU side of a remote-tier hit, which
must beat recomputing the prefix for fetching to pay.

Rows: `serial`, one redis-py MGET of every page then the checks one by one in one thread (the tier before it
fetched in parallel; also split into its MGET and check rates); then `RemoteTier.fetch` itself (EXISTS, then chunks
of pages read by raw RESP connections straight into one buffer over `threads` connections and checked as they
arrive) for several thread counts and chunk sizes; last, the default fetch beside a Python thread that never blocks,
under CPython's GIL switch interval (5 ms) and the server's (`--switch-interval-ms`).

Page shape: one 16-token page of Qwen2.5-Coder-1.5B's KV (28 layers, K and V, 2 KV heads, 128 dims, 2 bytes),
~458 KB; --model-shape 7b: Qwen2.5-Coder-7B's (4 KV heads), ~918 KB. Reports whether redis-py's C parser
(hiredis) is in use and how many CPU cores the client had (the rates scale with them).

Run:  python benchmarks/redis_fetch.py [--pages 256] [--repeats 5] [--model-shape 1.5b] [--tag h200]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, versions, write_result  # noqa: E402

KV_HEADS = {"1.5b": 2, "7b": 4}
CONFIGS = [(1, 16), (2, 8), (2, 16), (2, 32), (4, 8), (4, 16), (8, 8), (8, 16)]  # (threads, chunk_pages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-shape", choices=list(KV_HEADS), default="1.5b")
    p.add_argument("--tag", default="", help="suffix of the result file's name (e.g. the machine: h200)")
    args = p.parse_args()
    import numpy as np
    import redis

    from serve import remote_tier as rt
    from serve.redis_process import RedisProcess
    from serve.server import ServeConfig

    page = np.random.default_rng(0).standard_normal((28, 2, KV_HEADS[args.model_shape], 16, 128)).astype(np.float16)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(args.pages)]
    keys = [rt.key(d) for d in digests]

    def median_s(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    rows = []
    with RedisProcess() as server:
        values = [rt.encode(k, page) for k in keys]
        mb = sum(map(len, values)) / 1e6
        client = redis.Redis.from_url(server.url)
        client.mset(dict(zip(keys, values, strict=True)))
        got = client.mget(keys)

        def check():
            assert all(rt.decode(k, v, page.shape, page.dtype) is not None for k, v in zip(keys, got, strict=True))

        mget_s, check_s = median_s(lambda: client.mget(keys)), median_s(check)
        rows.append({"path": "serial", "threads": 1, "chunk_pages": args.pages,
                     "fetch_MB_s": round(mb / (mget_s + check_s), 1), "mget_MB_s": round(mb / mget_s, 1),
                     "check_MB_s": round(mb / check_s, 1)})
        store = rt.RedisStore(server.url, timeout_s=5.0)
        for threads, chunk in CONFIGS:
            tier = rt.RemoteTier(store, page.shape, page.dtype, fetch_threads=threads, chunk_pages=chunk)

            def fetch(tier=tier):
                assert len(tier.fetch(digests)) == args.pages

            fetch()  # opens the connections
            rows.append({"path": "RemoteTier.fetch", "threads": threads, "chunk_pages": chunk,
                         "fetch_MB_s": round(mb / median_s(fetch), 1)})
            tier.close()
        # the same fetch beside a Python thread that never blocks (the engine thread between device calls, at
        # worst), under CPython's default GIL switch interval and under the server's (ServeConfig)
        default_tier = rt.RemoteTier(store, page.shape, page.dtype)
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                sum(range(1000))

        spinner = threading.Thread(target=busy, daemon=True)
        spinner.start()
        before = sys.getswitchinterval()
        try:
            for ms in (5.0, ServeConfig.switch_interval_ms):
                sys.setswitchinterval(ms / 1e3)
                rows.append({"path": f"fetch, busy thread, switch {ms:g} ms", "threads": default_tier.fetch_threads,
                             "chunk_pages": default_tier.chunk_pages,
                             "fetch_MB_s": round(mb / median_s(lambda: default_tier.fetch(digests)), 1)})
        finally:
            sys.setswitchinterval(before)
            stop.set()
            spinner.join()
            default_tier.close()
        assert store.errors == 0
    print(table(rows, ["path", "threads", "chunk_pages", "fetch_MB_s", "mget_MB_s", "check_MB_s"]))
    default_threads = rt.default_fetch_threads()
    default_chunk = inspect.signature(rt.RemoteTier).parameters["chunk_pages"].default
    default = next((r for r in rows if (r["threads"], r["chunk_pages"]) == (default_threads, default_chunk)
                    and r["path"] != "serial"), None)
    name = "redis_fetch" if args.model_shape == "1.5b" else f"redis_fetch_{args.model_shape}"
    path = write_result(name + (f"_{args.tag}" if args.tag else ""), {
        "device": "cpu (host side of the remote tier)", "cpu_cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other processes on a shared machine lower the rates
        "versions": versions("redis", "numpy"), "hiredis": redis.utils.HIREDIS_AVAILABLE,
        "model_shape": args.model_shape, "page_bytes": len(values[0]), "pages": args.pages, "MB": round(mb, 1),
        "redis_io_threads": server.io_threads, "default_fetch_threads": default_threads,
        "fetch_MB_s": default and default["fetch_MB_s"], "serial_fetch_MB_s": rows[0]["fetch_MB_s"], "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
