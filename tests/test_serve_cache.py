"""The serving cache without a model: the page allocator, the radix tree with its host tier (on a fake KV pool
whose page contents are a function of the prefix, so every hit can be checked), and the remote tier's keys,
checksums and stores, including a real redis-server that dies and comes back."""

import time
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from serve.host_tier import HostTier
from serve.page_allocator import PageAllocator
from serve.radix_cache import RadixCache
from serve.redis_process import RedisProcess, redis_server_binary
from serve.remote_tier import (
    InProcessStore,
    RedisStore,
    RemoteTier,
    RespConnection,
    chain,
    decode,
    encode,
    key,
    page_digests,
    salt,
)

W = 4  # floats per fake page


def content(digest: bytes) -> np.ndarray:
    """What a page must hold: a function of its prefix (its chained digest)."""
    return np.frombuffer(digest[: 4 * W], np.uint32).astype(np.float32)


class FakeKV:
    """The two calls the cache makes on the engine's PagedKVCache, over numpy pages [P, W]."""

    def __init__(self, num_pages):
        self.data = np.full((num_pages, W), np.nan, np.float32)

    def read_pages(self, ids):  # -> [n, L=1, 2=1, K=1, S=1, W]
        return jnp.asarray(self.data[list(ids)][:, None, None, None, None, :])

    def write_pages(self, ids, data):
        self.data[list(ids)] = np.asarray(data)[:, 0, 0, 0, 0, :]


def test_allocator_random_operations_keep_counts_exact(rng):
    alloc = PageAllocator(40)
    holders = Counter()  # page -> holders, kept independently
    held: list[list[int]] = []  # each "holder" owns a list of page references
    for _ in range(5000):
        op = rng.integers(3)
        if op == 0 and alloc.num_free:
            pages = alloc.allocate(int(rng.integers(1, alloc.num_free + 1)))
            held.append(pages)
            holders.update(pages)
        elif op == 1 and held:
            src = held[rng.integers(len(held))]
            share = [p for p in src if rng.random() < 0.5]
            alloc.incref(share)
            held.append(share)
            holders.update(share)
        elif held:
            pages = held.pop(rng.integers(len(held)))
            alloc.decref(pages)
            holders.subtract(pages)
        alloc.check(+holders)
    for pages in held:
        alloc.decref(pages)
    alloc.check(Counter())
    assert alloc.num_free == alloc.capacity
    with pytest.raises(AssertionError):
        alloc.decref([1])  # a double free is caught


def simulate(rng, *, steps, num_pages, host_pages, page_size=4):
    """Random requests against a RadixCache: match, lock, load, check every hit's contents, compute the rest,
    insert on completion, evict, flush; invariants after every operation."""
    alloc, kv = PageAllocator(num_pages), FakeKV(num_pages)
    host = HostTier(host_pages, (1, 1, 1, 1, W), np.float32) if host_pages else None
    radix = RadixCache(alloc, page_size, salt("m", "f32", (1,), page_size), kv=kv, host=host)
    bases = [list(rng.integers(0, 5, n)) for n in (8, 13, 20)]
    running = []  # (tokens, pages, locked path)
    hits = Counter()

    def check():
        holders = radix.holders()
        for _, pages, _ in running:
            holders.update(pages)
        alloc.check(holders)
        radix.check()

    for _ in range(steps):
        op = rng.random()
        if op < 0.45:
            tokens = list(bases[rng.integers(3)]) + list(rng.integers(0, 3, rng.integers(1, 14)))
            path = radix.match(tokens)
            assert len(path) * page_size <= len(tokens) - 1  # the last token is always recomputed
            radix.lock(path)
            n_dev = sum(n.page is not None for n in path)
            total = -(-len(tokens) // page_size)
            need = total - n_dev
            if need > alloc.num_free:
                radix.evict(need - alloc.num_free)
            if need > alloc.num_free:
                radix.unlock(path)
                check()
                continue
            assert radix.load(path) == len(path)
            hits["device"] += n_dev
            hits["host"] += len(path) - n_dev
            digests = page_digests(radix.root.digest, tokens, page_size)
            for i, n in enumerate(path):  # every hit holds exactly what was computed for that prefix
                np.testing.assert_array_equal(kv.data[n.page], content(digests[i]))
            shared = [n.page for n in path]
            alloc.incref(shared)
            new = alloc.allocate(total - len(path))
            for i, p in enumerate(new, start=len(path)):  # "compute" the rest
                kv.data[p] = content(digests[i]) if i < len(digests) else np.nan
            running.append((tokens, shared + new, path))
        elif op < 0.85 and running:
            tokens, pages, path = running.pop(rng.integers(len(running)))
            full = len(tokens) // page_size
            radix.insert(tokens[: full * page_size], pages[:full])
            radix.unlock(path)
            alloc.decref(pages)
        elif op < 0.97:
            radix.evict(int(rng.integers(1, 6)))
        else:
            radix.flush()
        if host is not None and rng.random() < 0.3:
            host.materialize()
        check()
    while running:
        _, pages, path = running.pop()
        radix.unlock(path)
        alloc.decref(pages)
    radix.flush()
    check()
    assert alloc.num_free == alloc.capacity and radix.num_nodes == 0
    if host is not None:
        assert host.num_free == host.capacity
    return hits


@pytest.mark.parametrize("host_pages", [0, 12])
def test_radix_random_operations_keep_invariants_and_contents(rng, host_pages):
    hits = simulate(rng, steps=3000, num_pages=40, host_pages=host_pages)
    assert hits["device"] > 0
    if host_pages:
        assert hits["host"] > 0  # pages went to host RAM and came back intact


def test_full_prompt_hit_recomputes_last_token():
    alloc, kv = PageAllocator(10), FakeKV(10)
    radix = RadixCache(alloc, 4, b"r" * 32, kv=kv)
    tokens = list(range(8))
    pages = alloc.allocate(2)
    radix.insert(tokens, pages)
    assert len(radix.match(tokens)) == 1  # 8 tokens cached, but the 8th must be recomputed for its logits
    assert len(radix.match(tokens + [9])) == 2
    alloc.decref(pages)
    radix.check()


def test_keys_chain_and_salt():
    s = salt("qwen", "bfloat16", (28, 2, 128), 16)
    assert s != salt("qwen", "float32", (28, 2, 128), 16) != salt("llama", "bfloat16", (28, 2, 128), 16)
    assert s != salt("qwen", "bfloat16", (28, 4, 128), 16)
    d = page_digests(s, list(range(40)), 16)
    assert len(d) == 2 and d[1] == chain(d[0], list(range(16, 32)))
    # a page's key depends on everything before it
    assert page_digests(s, [1] + list(range(1, 32)), 16)[1] != d[1]


def test_page_codec_rejects_corruption():
    page = np.arange(24, dtype=np.float32).reshape(1, 2, 1, 3, 4)
    k = key(b"x" * 32)
    value = encode(k, page)
    np.testing.assert_array_equal(decode(k, value, page.shape, np.float32), page)
    flipped = bytearray(value)
    flipped[20] ^= 1
    assert decode(k, bytes(flipped), page.shape, np.float32) is None
    assert decode(k, value[:-5], page.shape, np.float32) is None  # a partial write
    assert decode(key(b"y" * 32), value, page.shape, np.float32) is None  # stored under another key
    assert decode(k, None, page.shape, np.float32) is None


def test_in_process_store_and_tier():
    store = InProcessStore()
    tier = RemoteTier(store, (1, 1, 1, 2, 2), np.float32)
    digests = [bytes([i]) * 32 for i in range(4)]
    pages = jnp.arange(4 * 4, dtype=jnp.float32).reshape(4, 1, 1, 1, 2, 2)
    tier.put(digests[:3], pages[:3])
    tier.drain()
    assert store.exists([key(d) for d in digests]) == 3
    assert store.exists([key(digests[1])]) == 1 and store.exists([key(digests[3]), key(digests[0])]) == 0
    got = tier.fetch(digests)
    assert len(got) == 3
    np.testing.assert_array_equal(got[2], np.asarray(pages[2]))
    store.items[key(digests[1])] = b"garbage"
    assert len(tier.fetch(digests)) == 1 and tier.stats["pages_rejected"] == 1
    tier.close()


def need_redis():
    # never a skip: scripts/bootstrap.sh installs redis-server, and a remote-tier test that does not run proves nothing
    assert redis_server_binary() is not None, "redis-server missing: run scripts/bootstrap.sh (installs it)"


def test_redis_store_survives_a_dead_server_and_reconnects():
    need_redis()
    with RedisProcess() as server:
        store = RedisStore(server.url, timeout_s=0.3, retry_s=0.3)
        keys = [f"k{i}" for i in range(5)]
        store.set(keys[:3], [b"a", b"b", b"c"])
        assert store.exists(keys) == 3
        assert store.get(keys[1:4]) == [b"b", b"c", None]
        server.kill()
        t = time.monotonic()
        assert store.exists(keys) == 0 and store.get(keys) == [None] * 5
        store.set(keys, [b"x"] * 5)  # dropped, no exception
        assert time.monotonic() - t < 2 and store.errors >= 1 and not store.up
        server.start()  # same port, empty
        time.sleep(0.35)
        store.set(keys[:2], [b"x", b"y"])
        assert store.exists(keys) == 2 and store.get(keys[:1]) == [b"x"]


# ---- the parallel fetch: chunks of pages got over several connections and verified as they arrive ------------

PAGE = (2, 2, 1, 4, 8)  # [L, 2, Hkv, S, D]


def stored_pages(store, n: int) -> tuple[list[bytes], list[np.ndarray]]:
    """n chained pages of distinct contents, written to `store`; returns their digests and contents."""
    digests = page_digests(salt("m", "float32", PAGE, 4), list(range(4 * n)), 4)
    pages = [np.random.default_rng(i).standard_normal(PAGE).astype(np.float32) for i in range(n)]
    store.set([key(d) for d in digests], [encode(key(d), p) for d, p in zip(digests, pages, strict=True)])
    return digests, pages


def assert_prefix(got: list[np.ndarray], pages: list[np.ndarray]) -> None:
    assert len(got) <= len(pages)
    for g, p in zip(got, pages, strict=False):
        np.testing.assert_array_equal(g, p)


def test_parallel_fetch_over_several_connections_gives_the_same_pages():
    need_redis()
    with RedisProcess() as server:
        store = RedisStore(server.url, timeout_s=2.0)
        digests, pages = stored_pages(store, 23)
        serial = RemoteTier(store, PAGE, np.float32, fetch_threads=1)
        parallel = RemoteTier(store, PAGE, np.float32, fetch_threads=4, chunk_pages=2)  # 12 chunks, 4 at once
        for tier in (serial, parallel):
            got = tier.fetch(digests)
            assert len(got) == 23
            assert_prefix(got, pages)
            assert tier.fetch(digests[:1])[0].shape == PAGE  # one page: one chunk
        assert parallel.stats["pages_fetched"] == 24 and parallel.stats["pages_rejected"] == 0
        clients = store.client.client_list()
        assert sum(c["cmd"] == "mget" for c in clients) >= 2  # the chunks went over several connections
        serial.close()
        parallel.close()


@pytest.mark.parametrize("bad", ["flipped", "truncated", "other key", "missing"])
def test_parallel_fetch_rejects_a_corrupted_page_alone(bad):
    store = InProcessStore()
    digests, pages = stored_pages(store, 20)
    tier = RemoteTier(store, PAGE, np.float32, fetch_threads=4, chunk_pages=3)
    k = key(digests[7])  # the second page of the third chunk
    value = store.items[k]
    if bad == "flipped":
        store.items[k] = value[:100] + bytes([value[100] ^ 1]) + value[101:]
    elif bad == "truncated":
        store.items[k] = value[:-1]
    elif bad == "other key":
        store.items[k] = store.items[key(digests[8])]
    else:
        store.items[k] = None  # present for `exists`, gone by the time it is got
    got = tier.fetch(digests)
    assert len(got) == 7  # the leading run before it; the pages after it are intact but follow a gap
    assert_prefix(got, pages)
    assert tier.stats["pages_rejected"] == (0 if bad == "missing" else 1)
    store.items[k] = value
    assert len(tier.fetch(digests)) == 20
    tier.close()


@pytest.mark.parametrize("failure", ["killed", "stalled"])
def test_parallel_fetch_from_a_store_that_fails_midway_gives_misses(failure):
    need_redis()
    import os
    import signal

    class FailingStore(RedisStore):
        """Kills (or stops) the server when the chunk starting at page `at` is got."""

        at: str | None = None

        def get_into(self, keys, sink):  # the tier's read (raw RESP into the caller's buffer)
            if keys and keys[0] == self.at:
                self.at = None
                if failure == "killed":
                    server.kill()
                else:
                    os.kill(server.proc.pid, signal.SIGSTOP)
            return super().get_into(keys, sink)

    with RedisProcess() as server:
        store = FailingStore(server.url, timeout_s=0.3, retry_s=0.3)
        digests, pages = stored_pages(store, 24)
        tier = RemoteTier(store, PAGE, np.float32, fetch_threads=4, chunk_pages=3)
        store.at = key(digests[9])
        t = time.monotonic()
        got = tier.fetch(digests)
        assert time.monotonic() - t < 2
        assert len(got) <= 9  # the failed chunk and everything after it are misses
        assert_prefix(got, pages)
        assert store.errors >= 1 and tier.fetch(digests) == []
        if failure == "killed":
            server.start()  # same port, empty
        else:
            os.kill(server.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5  # retry_s after the last chunk that failed, the store is used again
        while len(got) < 24 and time.monotonic() < deadline:
            time.sleep(0.1)
            if failure == "killed":
                stored_pages(store, 24)  # dropped while the store counts as down
            got = tier.fetch(digests)
        assert len(got) == 24
        assert_prefix(got, pages)
        tier.close()


# ---- the raw RESP read: values straight into the caller's buffers --------------------------------------------


def into_rows(rows: np.ndarray):
    """A sink that reads value i into rows[i] when it has that row's size (else skips it)."""
    return lambda i, length: [memoryview(rows[i])] if length == rows.shape[1] else None


def test_resp_mget_into_reads_values_of_every_size_where_they_go():
    need_redis()
    import redis

    rng = np.random.default_rng(1)
    with RedisProcess() as server:
        client = redis.Redis.from_url(server.url)
        sizes = [1, 7, 65_535, 65_536, 200_001, 3]  # around the 64 KB read buffer, and far past it
        values = {f"v{i}": rng.integers(0, 256, n, dtype=np.uint8).tobytes() for i, n in enumerate(sizes)}
        client.mset(values)
        conn = RespConnection("127.0.0.1", server.port, timeout_s=2.0)
        for size in sizes:  # one size class at a time: the others (and the missing key) are skipped in stride
            keys = [*values, "absent"]
            rows = np.full((len(keys), size), 0xAB, np.uint8)
            present = conn.mget_into(keys, into_rows(rows))
            assert present == [True] * len(sizes) + [False]
            for i, v in enumerate(values.values()):
                if len(v) == size:
                    assert rows[i].tobytes() == v
                else:
                    assert (rows[i] == 0xAB).all()  # skipped: nothing written
        many = [f"m{i}" for i in range(3000)]  # a reply whose framing alone spans many reads
        client.mset({k: k.encode() * 3 for k in many})
        got = {}
        conn.mget_into(many, lambda i, n: [memoryview(got.setdefault(i, bytearray(n)))])
        assert [bytes(got[i]) for i in range(len(many))] == [k.encode() * 3 for k in many]
        conn.close()


def test_redis_get_into_with_a_password_and_a_database_and_a_wrong_password():
    need_redis()
    import redis

    with RedisProcess() as server:
        admin = redis.Redis.from_url(server.url)
        redis.Redis.from_url(server.url + "/3").set("k", b"in db 3")
        admin.config_set("requirepass", "s3cret")
        base = f"redis://:s3cret@127.0.0.1:{server.port}"
        row = np.zeros((1, 7), np.uint8)
        assert RedisStore(base + "/3").get_into(["k"], into_rows(row)) == [True] and row.tobytes() == b"in db 3"
        assert RedisStore(base + "/0").get_into(["k"], into_rows(row)) == [False]
        assert RedisStore(base + "/3").exists(["k", "k", "j", "k"]) == 2 and RedisStore(base + "/0").exists(["k"]) == 0
        wrong = RedisStore(f"redis://:nope@127.0.0.1:{server.port}/3", retry_s=0.2)
        assert wrong.get_into(["k"], into_rows(row)) == [False] and wrong.errors == 1 and not wrong.up  # a miss
        time.sleep(0.25)
        assert wrong.exists(["k"]) == 0 and wrong.errors == 2


def test_redis_fetch_skips_a_truncated_page_and_the_connection_stays_in_step():
    """A value of the wrong length is read past (not into the page buffer) and rejected; the same connection then
    serves the next fetch correctly, so the reply framing stayed in step."""
    need_redis()
    with RedisProcess() as server:
        store = RedisStore(server.url, timeout_s=2.0)
        digests, pages = stored_pages(store, 6)
        k = key(digests[3])
        value = store.client.get(k)
        store.client.set(k, value[:-9])
        tier = RemoteTier(store, PAGE, np.float32, fetch_threads=1)
        got = tier.fetch(digests)
        assert len(got) == 3 and tier.stats["pages_rejected"] == 1
        assert_prefix(got, pages)
        store.client.set(k, value)
        got = tier.fetch(digests)
        assert len(got) == 6
        assert_prefix(got, pages)
        assert sum(c["cmd"] == "mget" for c in store.client.client_list()) == 1  # one raw connection, reused
        tier.close()


def test_concurrent_fetches_take_turns_in_the_getter_pool():
    """A short fetch started while a long one runs on the same tier finishes long before it: each fetch keeps at
    most 2 x fetch_threads chunks queued, so the short one's chunks do not wait behind all of the long one's."""
    import threading

    class SlowStore(InProcessStore):
        def get(self, keys):
            time.sleep(0.02)  # a round trip per chunk
            return super().get(keys)

    store = SlowStore()
    digests, pages = stored_pages(store, 64)
    tier = RemoteTier(store, PAGE, np.float32, fetch_threads=2, chunk_pages=1)  # 64 chunks, ~0.64 s on 2 threads
    done = {}

    def long_fetch():
        done["long_pages"] = tier.fetch(digests, counted=True)
        done["long"] = time.monotonic()

    t = threading.Thread(target=long_fetch)
    t.start()
    time.sleep(0.06)
    start = time.monotonic()
    short = tier.fetch(digests[:2], counted=True)
    done["short"] = time.monotonic()
    t.join()
    assert len(short) == 2 and len(done["long_pages"]) == 64
    assert_prefix(done["long_pages"], pages)
    assert done["short"] < done["long"] and done["short"] - start < 0.3, (done["short"] - start, done["long"] - start)
    tier.close()
