"""Remote KV tier throughput: MGET of encoded KV pages from a real redis-server over loopback TCP, and the decode
(format check + SHA-256 checksum) that follows, in MB/s. Runs on any machine (no GPU): the serving host's CPU
side of a remote-tier hit, which must beat recomputing the prefix for fetching to pay.

Page shape: Qwen2.5-Coder-1.5B's KV for one 16-token page (28 layers, K and V, 2 KV heads, 128 dims, 2 bytes),
~458 KB. Reports whether redis-py's C parser (hiredis) is in use.

Run:  python benchmarks/redis_fetch.py [--pages 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, versions, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import numpy as np
    import redis

    from serve import remote_tier as rt
    from serve.redis_process import RedisProcess

    page = np.random.default_rng(0).standard_normal((28, 2, 2, 16, 128)).astype(np.float16)
    keys = [f"page{i}" for i in range(args.pages)]
    with RedisProcess() as server:
        client = redis.Redis.from_url(server.url)
        values = [rt.encode(k, page) for k in keys]
        client.mset(dict(zip(keys, values, strict=True)))
        mb = sum(map(len, values)) / 1e6
        get, dec = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            got = client.mget(keys)
            get.append(time.perf_counter() - t)
            t = time.perf_counter()
            pages = [rt.decode(k, v, page.shape, page.dtype) for k, v in zip(keys, got, strict=True)]
            dec.append(time.perf_counter() - t)
            assert all(x is not None for x in pages)
    row = {"pages": args.pages, "MB": round(mb, 1), "hiredis": redis.utils.HIREDIS_AVAILABLE,
           "mget_MB_s": round(mb / float(np.median(get)), 1), "decode_MB_s": round(mb / float(np.median(dec)), 1),
           "fetch_MB_s": round(mb / (float(np.median(get)) + float(np.median(dec))), 1)}
    print(table([row], list(row)))
    path = write_result("redis_fetch", {"device": "cpu (host side of the remote tier)",
                                        "versions": versions("redis", "numpy"), **row})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
