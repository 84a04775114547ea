"""Remote tier: KV pages shared between serving processes (and boxes) through a key-value store over TCP.

The store interface is three batched calls (`exists` returns how many keys, from the first, are present in a
row; `get`; `set`). `InProcessStore` is the embedded default, `RedisStore` talks to a real redis-server.

A page's key is SHA-256 chained over the token pages of the prefix up to and including it, salted with the model
id, dtype and KV layout, so equal keys mean equal KV. Each value carries a CRC-32 over key and payload: it catches
torn, truncated or corrupted values (the key, not the checksum, names the content) and runs ~2.6x faster than
SHA-256 on the fetch's path. A page that fails it, is missing, times out, or comes from a dead store is a miss, and
a miss is recomputed.
Nothing here raises into the scheduler; a dead store is retried after `retry_s`, so it is used again when it
comes back.

A fetch of many pages is split into chunks that worker threads get over their own connections and verify as they
arrive: socket reads and CRC-32 over large buffers release the GIL, so network, checksums and the server's sends
overlap, and a page is a numpy view of the bytes received (no copy until the scheduler stacks the pages).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

log = logging.getLogger("codegen_jax.serve.remote")

_MAGIC = b"CGJKV\x00\x00\x02"  # 2: CRC-32 checksums (1 had SHA-256)
_DIGEST = 4


def salt(model_id: str, dtype: str, layout: tuple[int, ...], page_size: int) -> bytes:
    """Root of the key chain: pages of different models, dtypes or layouts never share keys."""
    text = f"codegen-jax/kv/v1|{model_id}|{dtype}|layout={'x'.join(map(str, layout))}|page={page_size}|tp=1"
    return hashlib.sha256(text.encode()).digest()


def chain(parent: bytes, page_tokens) -> bytes:
    """Digest of a page given its parent's digest (the root: `salt(...)`)."""
    return hashlib.sha256(parent + np.asarray(page_tokens, "<i4").tobytes()).digest()


def page_digests(parent: bytes, tokens, page_size: int) -> list[bytes]:
    """Chained digests of every full page of `tokens`, continuing from `parent`."""
    out = []
    for lo in range(0, len(tokens) - page_size + 1, page_size):
        parent = chain(parent, tokens[lo : lo + page_size])
        out.append(parent)
    return out


def key(digest: bytes) -> str:
    return "cgj:kv:" + digest.hex()


def _checksum(k: str, payload) -> bytes:
    # chained over key then payload, no concatenation: a page is checked where it lies (and without the GIL)
    return zlib.crc32(payload, zlib.crc32(k.encode())).to_bytes(_DIGEST, "little")


def encode(k: str, page: np.ndarray) -> bytes:
    """magic + the page's bytes + CRC-32(key + page bytes)."""
    payload = np.ascontiguousarray(page).reshape(-1).view(np.uint8)  # bytes of any dtype (bfloat16 too), no copy
    return b"".join((_MAGIC, payload, _checksum(k, payload)))


def decode(k: str, value: bytes | None, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """The page under key k (a read-only view of `value`), or None when it is missing, truncated, of another
    format or fails its checksum."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if value is None or len(value) != len(_MAGIC) + nbytes + _DIGEST or not value.startswith(_MAGIC):
        return None
    payload = memoryview(value)[len(_MAGIC) : -_DIGEST]
    if _checksum(k, payload) != value[-_DIGEST:]:
        return None
    return np.frombuffer(payload, dtype).reshape(shape)


class RemoteStore(Protocol):
    def exists(self, keys: list[str]) -> int:
        """How many keys, from the first, are present in a row."""
        ...

    def get(self, keys: list[str]) -> list[bytes | None]: ...

    def set(self, keys: list[str], values: list[bytes]) -> None: ...


class InProcessStore:
    """A dict behind a lock, LRU-bounded: the embedded default, and the test double of a remote store."""

    def __init__(self, max_items: int = 1 << 16):
        self.items: OrderedDict[str, bytes] = OrderedDict()
        self.max_items = max_items
        self.lock = threading.Lock()

    def exists(self, keys: list[str]) -> int:
        with self.lock:
            n = 0
            while n < len(keys) and keys[n] in self.items:
                n += 1
            return n

    def get(self, keys: list[str]) -> list[bytes | None]:
        with self.lock:
            out = [self.items.get(k) for k in keys]
            for k in keys:
                if k in self.items:
                    self.items.move_to_end(k)
            return out

    def set(self, keys: list[str], values: list[bytes]) -> None:
        with self.lock:
            for k, v in zip(keys, values, strict=True):
                self.items[k] = v
                self.items.move_to_end(k)
            while len(self.items) > self.max_items:
                self.items.popitem(last=False)


class RedisStore:
    """Redis over TCP. Every call is bounded by `timeout_s`; after a failure the store counts as down for
    `retry_s` (calls answer "nothing there" at once), then the next call tries again. Thread-safe: concurrent
    calls each take a connection of the client's pool."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_s: float = 1.0, ttl_s: int | None = None):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url, self.retry_s, self.ttl_s = url, retry_s, ttl_s
        # no client-side retries: a failure is a miss now, the store is tried again after retry_s
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.errors = 0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._errors = (redis.exceptions.RedisError, OSError)

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn, default):
        if not self.up:
            return default
        try:
            return fn()
        except self._errors as e:
            with self._lock:  # concurrent chunks fail together: one warning per outage
                was_up = self.up
                self.errors += 1
                self._down_until = time.monotonic() + self.retry_s
            if was_up:
                log.warning("remote store %s unavailable for %.1fs: %s", self.url, self.retry_s, e)
            return default

    def exists(self, keys: list[str]) -> int:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            n = 0
            for present in pipe.execute():
                if not present:
                    break
                n += 1
            return n

        return self._call(run, 0) if keys else 0

    def get(self, keys: list[str]) -> list[bytes | None]:
        return self._call(lambda: self.client.mget(keys), [None] * len(keys)) if keys else []

    def set(self, keys: list[str], values: list[bytes]) -> None:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for k, v in zip(keys, values, strict=True):
                pipe.set(k, v, ex=self.ttl_s)
            pipe.execute()

        if keys:
            self._call(run, None)


def default_fetch_threads() -> int:
    """Half the cores, 2 to 8: the fetch's reads and checks run in parallel without starving the engine thread."""
    return max(2, min(8, (os.cpu_count() or 1) // 2))


class RemoteTier:
    """Pages in and out of a RemoteStore: `fetch` (blocking; the scheduler calls it from a worker thread) and
    `put` (queued to a writer thread; a full queue drops the write, since the tier is only a cache).

    fetch_threads: workers that get and verify chunks of at most `chunk_pages` pages at once (each on its own
    connection of the store's pool; default: `default_fetch_threads()`); 1 gets and verifies in the calling thread."""

    def __init__(self, store: RemoteStore, page_shape: tuple[int, ...], dtype, *, max_queue: int = 64,
                 fetch_threads: int | None = None, chunk_pages: int = 8):
        fetch_threads = fetch_threads or default_fetch_threads()
        if fetch_threads < 1 or chunk_pages < 1:
            raise ValueError(f"fetch_threads and chunk_pages must be >= 1, got {fetch_threads} and {chunk_pages}")
        self.store, self.page_shape, self.dtype = store, tuple(page_shape), np.dtype(dtype)
        self.fetch_threads, self.chunk_pages = fetch_threads, chunk_pages
        self.stats = {"pages_written": 0, "pages_fetched": 0, "pages_rejected": 0, "writes_dropped": 0}
        self._stats_lock = threading.Lock()
        self._getters = (ThreadPoolExecutor(fetch_threads, thread_name_prefix="kv-remote-get")
                         if fetch_threads > 1 else None)
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._writer = threading.Thread(target=self._write_loop, name="kv-remote-writer", daemon=True)
        self._writer.start()

    def _count(self, name: str, n: int) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _get_chunk(self, keys: list[str]) -> list[np.ndarray | None]:
        """The pages under `keys`, verified; None for each one missing or rejected."""
        pages = []
        for k, value in zip(keys, self.store.get(keys), strict=True):
            page = decode(k, value, self.page_shape, self.dtype)
            if page is None and value is not None:
                self._count("pages_rejected", 1)
                log.warning("remote page %s failed its checksum; recomputing", k)
            pages.append(page)
        return pages

    def present(self, digests: list[bytes]) -> int:
        """How many of `digests`, from the first, the store holds (0 when it cannot say)."""
        try:
            return self.store.exists([key(d) for d in digests])
        except Exception:  # a remote problem is a miss
            log.exception("remote exists failed; recomputing")
            return 0

    def fetch(self, digests: list[bytes], *, counted: bool = False) -> list[np.ndarray]:
        """Pages for the leading run of `digests` that the store holds intact, each [L, 2, Hkv, S, D]
        (read-only views of the received bytes). counted: `present` said the store holds all of them, so no
        EXISTS first (a page gone since then is a miss, as any)."""
        try:
            keys = [key(d) for d in digests]
            n = len(keys) if counted else self.store.exists(keys)
            if n == 0:
                return []
            # chunks small enough that every worker gets one, and that a chunk's checksums overlap the next's reads
            step = max(1, min(self.chunk_pages, -(-n // self.fetch_threads)))
            chunks = [keys[lo : lo + step] for lo in range(0, n, step)]
            futures = [self._getters.submit(self._get_chunk, c) for c in chunks] if (
                self._getters is not None and len(chunks) > 1) else []
            # in order; serially, lazily: the first miss stops the getting
            results = (f.result() for f in futures) if futures else map(self._get_chunk, chunks)
            pages: list[np.ndarray] = []
            try:
                for chunk in results:
                    run = next((i for i, p in enumerate(chunk) if p is None), len(chunk))
                    pages.extend(chunk[:run])
                    if run < len(chunk):  # a miss ends the usable prefix: the pages after it are not needed
                        break
            finally:
                for f in futures:  # those not started yet
                    f.cancel()
            self._count("pages_fetched", len(pages))
            return pages
        except Exception:  # a remote problem is a cache miss, never a failed request
            log.exception("remote fetch failed; recomputing")
            return []

    def put(self, digests: list[bytes], pages) -> bool:
        """Queues pages [m, L, 2, Hkv, S, D] (device array, copy already started; m >= n = len(digests), rows past
        n are padding) for writing under `digests`."""
        try:
            self._queue.put_nowait((list(digests), pages))
            return True
        except queue.Full:
            self._count("writes_dropped", len(digests))
            return False

    def _write_loop(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                digests, pages = item
                host = np.asarray(pages)
                keys = [key(d) for d in digests]
                self.store.set(keys, [encode(k, host[i]) for i, k in enumerate(keys)])  # page i: contiguous
                self._count("pages_written", len(keys))
            except Exception:
                log.exception("remote write failed; the pages stay local only")
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Blocks until every queued write has been attempted."""
        self._queue.join()

    def close(self) -> None:
        self.drain()
        self._queue.put(None)
        self._writer.join(timeout=5)
        if self._getters is not None:
            self._getters.shutdown(wait=True, cancel_futures=True)


def open_store(url: str | None) -> RemoteStore | None:
    """'redis://HOST:PORT[/DB]' -> RedisStore, 'memory://' -> InProcessStore, None -> no remote tier."""
    if not url:
        return None
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    if url.startswith("memory://"):
        return InProcessStore()
    raise ValueError(f"remote store URL must start with redis:// or memory://, got {url!r}")
