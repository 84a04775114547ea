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
arrive, each page straight into its row of the caller's buffer: `RedisStore.get_into` speaks RESP on a raw socket
and `recv_into`s every value where it goes (redis-py builds a fresh ~1 MB bytes object per page, which the
scheduler then copied into its staging buffer). Socket reads and CRC-32 over large buffers release the GIL, so
network, checksums and the server's sends overlap.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import socket
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Protocol

import numpy as np

from codegen_jax.kv_cache import to_host

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
    if value is None or len(value) != len(_MAGIC) + nbytes + _DIGEST:
        return None
    payload = memoryview(value)[len(_MAGIC) : -_DIGEST]
    if not _intact(k, value[: len(_MAGIC)], payload, value[-_DIGEST:]):
        return None
    return np.frombuffer(payload, dtype).reshape(shape)


def _intact(k: str, magic: bytes, payload, digest: bytes) -> bool:
    """A value's parts (as `encode` framed them) are of this format and pass the checksum for key k."""
    return magic == _MAGIC and _checksum(k, payload) == digest


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


Sink = Callable[[int, int], "list[memoryview] | None"]


class RespError(Exception):
    """An error reply from the server, or a reply that is not what RESP allows here."""


class RespConnection:
    """One raw RESP connection that reads MGET replies straight into the caller's buffers (`mget_into`). The
    framing (`*n`, `$len`, `$-1`, `-ERR`) is parsed from a small buffer; a value's bytes go by `recv_into`
    to where the sink says, so a page is never a Python object of its own."""

    def __init__(self, host: str, port: int, *, timeout_s: float, password: str | None = None,
                 username: str | None = None, db: int = 0):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # blocking at the OS level with the timeout in the kernel (a Python timeout makes the socket non-blocking,
        # and MSG_WAITALL then returns what is there): a value then arrives in one recv with one wait for the GIL
        self.sock.settimeout(None)
        tv = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._buf = bytearray(1 << 16)
        self._lo = self._hi = 0
        try:
            if password:
                self._simple(["AUTH", *([username] if username else []), password])
            if db:
                self._simple(["SELECT", str(db)])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _send(self, args: list[str]) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))

    def _recv(self) -> None:
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif self._hi == len(self._buf):  # a line longer than what is left: move it to the front
            n = self._hi - self._lo
            self._buf[:n] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, n
        got = self.sock.recv_into(memoryview(self._buf)[self._hi :])
        if not got:
            raise ConnectionError("redis closed the connection")
        self._hi += got

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._lo, self._hi)
            if end >= 0:
                line = bytes(self._buf[self._lo : end])
                self._lo = end + 2
                if line.startswith(b"-"):
                    raise RespError(line[1:].decode(errors="replace"))
                return line
            if self._hi - self._lo > 4096:
                raise RespError("reply line too long")
            self._recv()

    def _read(self, *views: memoryview) -> None:
        """Fills views in order: first from what the line reads buffered, then straight from the socket, all that is
        left in one recvmsg_into(MSG_WAITALL) (again after a signal or the kernel's timeout cut it short: a
        timeout with nothing read raises)."""
        rest = []
        for view in views:
            n = min(self._hi - self._lo, len(view))
            view[:n] = self._buf[self._lo : self._lo + n]
            self._lo += n
            if n < len(view):
                rest.append(view[n:])
        while rest:
            got = self.sock.recvmsg_into(rest, 0, socket.MSG_WAITALL)[0]
            if not got:
                raise ConnectionError("redis closed the connection")
            while got:
                k = min(got, len(rest[0]))
                got -= k
                rest[0] = rest[0][k:]
                if not len(rest[0]):
                    rest.pop(0)

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 16)))
        while n:
            k = min(n, len(scratch))
            self._read(scratch[:k])
            n -= k

    def _simple(self, args: list[str]) -> bytes:
        self._send(args)
        return self._line()

    def exists_run(self, keys: list[str]) -> int:
        """How many keys, from the first, exist: one EXISTS per key, all sent at once (a multi-key EXISTS only
        counts them)."""
        self.sock.sendall(b"".join(b"*2\r\n$6\r\nEXISTS\r\n$%d\r\n%s\r\n" % (len(k), k.encode()) for k in keys))
        replies = [self._line() for _ in keys]  # every reply read, so the connection stays in step
        bad = next((r for r in replies if r not in (b":0", b":1")), None)
        if bad is not None:
            raise RespError(f"unexpected EXISTS reply {bad[:40]!r}")
        return next((i for i, r in enumerate(replies) if r == b":0"), len(keys))

    def mget_into(self, keys: list[str], sink: Sink) -> list[bool]:
        """MGET keys; value i (of `length` bytes) is read into the views sink(i, length) gives, whose sizes add up
        to it, or skipped when it gives None. Returns which keys had a value."""
        self._send(["MGET", *keys])
        head = self._line()
        if not head.startswith(b"*") or int(head[1:]) != len(keys):
            raise RespError(f"unexpected MGET reply {head[:40]!r}")
        present = []
        crlf = memoryview(bytearray(2))
        for i in range(len(keys)):
            head = self._line()
            if not head.startswith(b"$"):
                raise RespError(f"unexpected MGET value {head[:40]!r}")
            length = int(head[1:])
            present.append(length >= 0)
            if length < 0:
                continue
            views = sink(i, length)
            if views is None or sum(len(v) for v in views) != length:
                self._skip(length)
                self._read(crlf)
            else:
                self._read(*views, crlf)
        return present


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
        self._errors = (redis.exceptions.RedisError, OSError, RespError, ValueError)
        # get_into's raw connections (one per thread) for plain TCP; TLS and unix sockets read through redis-py
        pool = self.client.connection_pool
        kw = pool.connection_kwargs
        self._raw_args = (dict(host=kw["host"], port=kw["port"], timeout_s=timeout_s, password=kw.get("password"),
                               username=kw.get("username"), db=int(kw.get("db") or 0))
                          if pool.connection_class is redis.connection.Connection else None)
        self._local = threading.local()

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
            if self._raw_args is not None:  # ~10x faster than redis-py's pipeline for the ~800 keys of 12k tokens
                return self._raw(lambda conn: conn.exists_run(keys))
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

    def get_into(self, keys: list[str], sink: Sink) -> list[bool]:
        """`get`, each value read into the views sink(i, length) gives (see RespConnection.mget_into); which keys
        had a value (none when the store is down)."""
        def run():
            if self._raw_args is None:
                return [_copy_into(sink, i, v) for i, v in enumerate(self.client.mget(keys))]
            return self._raw(lambda conn: conn.mget_into(keys, sink))

        return self._call(run, [False] * len(keys)) if keys else []

    def _raw(self, fn):
        """fn(this thread's raw connection); a connection that fails mid-reply is in an unknown state: dropped. A
        kept one may have died with a server that came back since: its failure is retried once on a new one (the
        reads are idempotent)."""
        conn, self._local.conn = getattr(self._local, "conn", None), None
        for fresh in ((False, True) if conn is not None else (True,)):
            conn = RespConnection(**self._raw_args) if fresh else conn
            try:
                out = fn(conn)
            except ConnectionError:  # closed or reset (a timeout is not retried: the store is slow, not gone)
                conn.close()
                if fresh:
                    raise
                continue
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            return out

    def set(self, keys: list[str], values: list[bytes]) -> None:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for k, v in zip(keys, values, strict=True):
                pipe.set(k, v, ex=self.ttl_s)
            pipe.execute()

        if keys:
            self._call(run, None)


def _copy_into(sink: Sink, i: int, value: bytes | None) -> bool:
    """A got value into the views sink(i, len(value)) gives: `get_into` for a store that only has `get`."""
    if value is not None:
        views, at = sink(i, len(value)) or [], 0
        if sum(len(v) for v in views) == len(value):
            for v in views:
                v[:] = memoryview(value)[at : at + len(v)]
                at += len(v)
    return value is not None


def default_fetch_threads() -> int:
    """4, whatever the cores: on the H200 box (16 cores, redis-server with 4 I/O threads) 4 connections of 8-page
    chunks fetched fastest, 8 slower (they contend for the GIL between their reads; redis_fetch_7b_h200.json)."""
    return 4


class RemoteTier:
    """Pages in and out of a RemoteStore: `fetch_into` (blocking; the scheduler calls it from a worker thread) and
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

    def _read_chunk(self, keys: list[str], out: np.ndarray, frames: np.ndarray) -> int:
        """Reads the pages under `keys` into the rows of out [n, page bytes] (uint8), each value's magic and checksum
        into frames [n, 12]; returns how many pages, from the first, arrived intact."""
        size = len(_MAGIC) + out.shape[1] + _DIGEST

        def sink(i: int, length: int) -> list[memoryview] | None:
            if length != size:  # truncated or of another format: skipped, and rejected below
                return None
            return [memoryview(frames[i, : len(_MAGIC)]), memoryview(out[i]), memoryview(frames[i, len(_MAGIC) :])]

        frames[:] = 0  # a skipped value leaves no magic behind
        get_into = getattr(self.store, "get_into", None)
        if get_into is not None:
            present = get_into(keys, sink)
        else:  # a store with only `get`: the values are copied in
            present = [_copy_into(sink, i, v) for i, v in enumerate(self.store.get(keys))]
        for i, k in enumerate(keys):
            frame = frames[i].tobytes()
            if not (present[i] and _intact(k, frame[: len(_MAGIC)], out[i], frame[len(_MAGIC) :])):
                if present[i]:
                    self._count("pages_rejected", 1)
                    log.warning("remote page %s failed its checksum; recomputing", k)
                return i
        return len(keys)

    def present(self, digests: list[bytes]) -> int:
        """How many of `digests`, from the first, the store holds (0 when it cannot say)."""
        try:
            return self.store.exists([key(d) for d in digests])
        except Exception:  # a remote problem is a miss
            log.exception("remote exists failed; recomputing")
            return 0

    def fetch_into(self, digests: list[bytes], out: np.ndarray, *, counted: bool = False,
                   landed: Callable[[int], None] | None = None) -> int:
        """Reads the leading run of `digests` that the store holds intact into out [>= len(digests), L, 2, Hkv,
        S, D] (C-contiguous, of the tier's dtype) and returns its length n. landed(k) is called (on this thread,
        k growing) each time the first k pages are in place, so a caller can start copying them on. No reader
        writes into `out` once this returns. counted: `present` said the store holds all of them, so no EXISTS
        first (a page gone since then is a miss, as any)."""
        futures = []
        try:
            keys = [key(d) for d in digests]
            n = len(keys) if counted else self.store.exists(keys)
            if n == 0:
                return 0
            rows = out.reshape(out.shape[0], -1).view(np.uint8)  # a page's bytes, whatever the dtype
            frames = np.empty((n, len(_MAGIC) + _DIGEST), np.uint8)
            # chunks small enough that every worker gets one, and that a chunk's checksums overlap the next's reads
            step = max(1, min(self.chunk_pages, -(-n // self.fetch_threads)))
            spans = [(lo, min(n, lo + step)) for lo in range(0, n, step)]

            def read(span):
                lo, hi = span
                return self._read_chunk(keys[lo:hi], rows[lo:hi], frames[lo:hi])

            if self._getters is not None and len(spans) > 1:
                results = self._windowed(read, spans, futures)
            else:
                results = map(read, spans)  # serially, lazily: the first miss stops the reading
            got = 0
            for (lo, hi), k in zip(spans, results, strict=False):
                got += k
                if landed is not None and k:
                    landed(got)
                if lo + k < hi:  # a miss ends the usable prefix: the pages after it are not needed
                    break
            self._count("pages_fetched", got)
            return got
        except Exception:  # a remote problem is a cache miss, never a failed request
            log.exception("remote fetch failed; recomputing")
            return 0
        finally:
            for f in futures:  # those not started yet; the running ones finish (bounded by the store's timeout)
                f.cancel()
            wait(futures)

    def _windowed(self, read, spans: list[tuple[int, int]], futures: list):
        """read(span) of each span on the getter threads, yielded in order, with at most 2 x fetch_threads of this
        fetch's chunks queued or running at once: fetches running together take turns in the pool, so a cached
        turn's few pages do not wait behind every chunk of a long prefix fetched before them. `futures` collects
        the submitted ones (the caller cancels what is left)."""
        pending = iter(spans)
        for span in itertools.islice(pending, 2 * self.fetch_threads):
            futures.append(self._getters.submit(read, span))
        for i in range(len(spans)):
            result = futures[i].result()
            span = next(pending, None)
            if span is not None:
                futures.append(self._getters.submit(read, span))
            yield result

    def fetch(self, digests: list[bytes], *, counted: bool = False) -> list[np.ndarray]:
        """Pages for the leading run of `digests` that the store holds intact, each [L, 2, Hkv, S, D]."""
        out = np.empty((len(digests), *self.page_shape), self.dtype)
        return list(out[: self.fetch_into(digests, out, counted=counted)])

    def put(self, digests: list[bytes], pages) -> bool:
        """Queues pages [m, L, 2, Hkv, S, D] (a device array, maybe still being computed; m >= n = len(digests),
        rows past n are padding) for writing under `digests`: the writer thread copies them to the host."""
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
                host = to_host(pages)
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
