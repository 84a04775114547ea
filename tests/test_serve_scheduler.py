"""The scheduler on a fixture checkpoint: outputs token-identical to the engine and across every cache path
(off, on, after a flush, reloaded from host RAM, fetched from a real redis-server, with redis killed mid-run,
with corrupt remote pages), and no page leaked after hundreds of random requests, cancellations, evictions and
preemptions (allocator and radix invariants checked as it runs)."""

import time
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from test_serve_cache import need_redis

import serve.scheduler as scheduler_mod
from codegen_jax import Engine, EngineConfig, SamplingParams, load_model
from serve.redis_process import RedisProcess
from serve.remote_tier import InProcessStore, RedisStore
from serve.scheduler import Request, Scheduler, SchedulerConfig

# a small pool (47 usable pages of 8 tokens for 4 slots of up to 164 tokens) so eviction and preemption happen
ECFG = EngineConfig(max_slots=4, page_size=8, max_seq_len=160, num_pages=48, prefill_chunk=32, decode_steps=4)
VOCAB = 512


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "qwen2", dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, ECFG)  # shared: every Scheduler takes the pool over afresh


@pytest.fixture(scope="module")
def ref_engine(model):
    """The plain engine the scheduler's outputs are compared with (generate leaves its cache empty)."""
    return Engine(model, EngineConfig(max_slots=2, page_size=8, max_seq_len=160, prefill_chunk=32, decode_steps=4))


class Result:
    def __init__(self):
        self.tokens, self.finish, self.cached = [], None, 0

    def __call__(self, out):
        self.tokens.extend(out.tokens)
        if out.finish_reason:
            self.finish, self.cached = out.finish_reason, out.cached_tokens


def submit(sched, prompt, sp):
    res = Result()
    req = Request(list(map(int, prompt)), sp, res)
    sched.submit(req)
    return req, res


def run_batch(sched, prompts, sps, check_every=0):
    reqs = [submit(sched, p, sp) for p, sp in zip(prompts, sps, strict=True)]
    steps = 0
    while sched.has_work() or steps == 0:
        sched.step()
        steps += 1
        if check_every and steps % check_every == 0:
            sched.check()
    sched.check()
    return [res for _, res in reqs]


def params(i, n=10):
    # a mix of greedy and seeded sampling rows
    if i % 3 == 2:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_new_tokens=n)
    return SamplingParams(max_new_tokens=n)


def agent_turns(sched, rng_seed=0, sessions=3, turns=3):
    """A coding agent's shape: one long system prompt, files re-read every turn, a growing conversation."""
    rng = np.random.default_rng(rng_seed)
    system = list(rng.integers(0, VOCAB, 40))
    files = [list(rng.integers(0, VOCAB, 24)) for _ in range(2)]
    history = [[] for _ in range(sessions)]
    outputs, cached = [], []
    for _ in range(turns):
        prompts = []
        for s in range(sessions):
            history[s] += list(rng.integers(0, VOCAB, 6))  # the user's (or tool's) new message
            prompts.append(system + files[s % 2] + history[s])
        results = run_batch(sched, prompts, [params(s) for s in range(sessions)])
        for s, r in enumerate(results):
            assert r.finish in ("length", "stop")
            history[s] += r.tokens
        outputs.append([r.tokens for r in results])
        cached.append([r.cached for r in results])
    return outputs, cached


@pytest.fixture(scope="module")
def agent_ref(engine):
    """agent_turns with the prefix cache off: (outputs, cached tokens), the reference every cache path must equal
    (computed once for the module; each test recomputed the same turns)."""
    return agent_turns(Scheduler(engine, SchedulerConfig(prefix_cache=False)))


def tier_tokens(sched) -> dict:
    return {t: sched.metrics.cached_tokens.labels(t)._value.get() for t in ("device", "host", "remote")}


def test_matches_engine_generate(ref_engine, engine, rng):
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (1, 9, 33, 70, 16)]
    sps = [params(i, 12) for i in range(len(prompts))]
    expected = [c.tokens for c in ref_engine.generate(prompts, sps)]
    for prefix_cache in (False, True):
        sched = Scheduler(engine, SchedulerConfig(prefix_cache=prefix_cache))
        assert [r.tokens for r in run_batch(sched, prompts, sps, check_every=1)] == expected
        assert [r.tokens for r in run_batch(sched, prompts, sps, check_every=1)] == expected  # hits when on


def test_short_prefills_pass_long_ones_and_the_oldest_keeps_advancing(ref_engine, engine, rng):
    """Two prefill rows per call, three prompts: two long (4 chunks each) then a short one. The call's rows are
    the oldest prompt and the one with least left to compute, so the short one gets its first token before the
    second long one does, the oldest is never passed over, and the outputs match the plain engine."""
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (128, 128, 20)]
    sps = [SamplingParams(max_new_tokens=4)] * 3
    expected = [c.tokens for c in ref_engine.generate(prompts, sps)]
    sched = Scheduler(engine, SchedulerConfig(prefix_cache=False, max_prefill_rows=2))
    reqs = [submit(sched, p, sp) for p, sp in zip(prompts, sps, strict=True)]
    first_token_step, steps = {}, 0
    while sched.has_work() or steps == 0:
        sched.step()
        steps += 1
        for i, (_, res) in enumerate(reqs):
            if res.tokens and i not in first_token_step:
                first_token_step[i] = steps
    sched.check()
    assert [res.tokens for _, res in reqs] == expected
    assert first_token_step[2] < first_token_step[1], first_token_step  # the short prompt passed the second long
    assert first_token_step[0] <= first_token_step[1], first_token_step  # the oldest was never passed over


def test_a_call_of_finishing_rows_leaves_the_oldest_out_never_twice_running(ref_engine, engine, rng, monkeypatch):
    """A long prompt A (150 tokens: 5 chunks of 32) and, after its first chunk, short prompts B and C: the next
    call holds B and C alone (both finish; beside A's full chunk they would pad to it). D arrives next: the call
    after takes A again, with D. The outputs match the plain engine."""
    calls = []
    prefill_rows = engine.prefill_rows

    def spy(slots, chunks, starts):
        calls.append([len(c) for c in chunks])
        return prefill_rows(slots, chunks, starts)

    monkeypatch.setattr(engine, "prefill_rows", spy)
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (150, 20, 9, 5)]
    sps = [SamplingParams(max_new_tokens=3)] * 4
    expected = [c.tokens for c in ref_engine.generate(prompts, sps)]
    sched = Scheduler(engine, SchedulerConfig(prefix_cache=False, max_prefill_rows=4))  # A, B and C fit one call
    reqs = [submit(sched, prompts[0], sps[0])]
    sched.step()
    reqs += [submit(sched, p, sp) for p, sp in zip(prompts[1:3], sps[1:3], strict=True)]
    sched.step()
    reqs.append(submit(sched, prompts[3], sps[3]))
    sched.run_until_idle()
    sched.check()
    assert calls == [[32], [9, 20], [32, 5], [32], [32], [22]], calls
    assert [res.tokens for _, res in reqs] == expected


@pytest.mark.parametrize("prefill_decode_steps", [1, 2, ECFG.decode_steps])
def test_decode_rows_take_fewer_steps_while_a_prompt_prefills(ref_engine, engine, rng, prefill_decode_steps):
    """A calls that also prefill B's 100-token prompt (4 chunks of 32) decode prefill_decode_steps tokens for A;
    the calls without a prefill decode_steps; the outputs match the plain engine either way."""
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (10, 100)]
    sps = [SamplingParams(max_new_tokens=40), SamplingParams(temperature=0.8, seed=7, max_new_tokens=6)]
    expected = [c.tokens for c in ref_engine.generate(prompts, sps)]
    sched = Scheduler(engine, SchedulerConfig(prefix_cache=False, prefill_decode_steps=prefill_decode_steps))
    assert sched.decode_step_counts() == sorted({prefill_decode_steps, ECFG.decode_steps})
    (_, a), growth = submit(sched, prompts[0], sps[0]), []

    def step():
        n = len(a.tokens)
        sched.step()
        growth.append(len(a.tokens) - n)

    step()  # A's prefill: its first token
    step()  # A decodes alone
    _, b = submit(sched, prompts[1], sps[1])
    for _ in range(4):  # B's 4 chunks beside A's decode
        step()
    assert len(b.tokens) == 1  # B's first token came with its last chunk
    step()  # both decode
    assert growth == [1, ECFG.decode_steps] + [prefill_decode_steps] * 4 + [ECFG.decode_steps], growth
    sched.run_until_idle()
    sched.check()
    assert [a.tokens, b.tokens] == expected


def test_identical_with_cache_off_on_flushed_and_from_host(engine, agent_ref):
    ref, ref_cached = agent_ref
    assert all(c == 0 for turn in ref_cached for c in turn)

    sched = Scheduler(engine, SchedulerConfig(host_pages=96))
    out, cached = agent_turns(sched)
    assert out == ref
    assert sum(cached[1]) > 3 * 64  # later turns reuse system prompt, files and history
    out, _ = agent_turns(sched)  # everything cached now
    assert out == ref

    sched.flush_cache()
    sched.check()
    assert sched.allocator.num_free == sched.allocator.capacity and sched.radix.num_nodes == 0
    out, cached = agent_turns(sched)
    assert out == ref and cached[0][0] == 0

    before = tier_tokens(sched)["host"]
    sched.radix.evict(sched.radix.num_evictable)  # every cached page to host RAM
    assert sched.radix.num_device == 0 and sched.radix.num_nodes > 0
    out, _ = agent_turns(sched)
    assert out == ref
    assert tier_tokens(sched)["host"] > before and sched.radix.stats["host_loaded_pages"] > 0
    sched.check()


def test_identical_from_redis_and_with_corrupt_pages(engine, agent_ref, monkeypatch):
    need_redis()
    ref, _ = agent_ref
    monkeypatch.setattr(scheduler_mod, "FETCH_PIECE", 2)  # fetched pages go to the device in several pieces
    with RedisProcess() as server:
        writer = Scheduler(engine, remote=RedisStore(server.url))
        assert agent_turns(writer)[0] == ref
        writer.remote.drain()
        assert writer.remote.stats["pages_written"] > 0
        writer.stop()

        reader = Scheduler(engine, remote=RedisStore(server.url))  # a second server: empty tree, same store
        out, cached = agent_turns(reader)
        assert out == ref
        assert cached[0][0] >= 64 and tier_tokens(reader)["remote"] >= 64
        fetches = list(reader.metrics.fetches)  # each fetch timed by phase, and exported
        assert sum(f[0] for f in fetches) * ECFG.page_size >= tier_tokens(reader)["remote"]
        assert all(min(f[1:]) >= 0 for f in fetches)
        assert b'codegen_remote_fetch_seconds_count{phase="read"} %d' % len(fetches) in reader.metrics.render()
        reader.stop()

        import redis

        client = redis.Redis.from_url(server.url)
        keys = client.keys("cgj:kv:*")
        for k in keys[::2]:  # truncate half the pages, flip a byte in the others
            v = client.get(k)
            client.set(k, v[:-7] if keys.index(k) % 4 == 0 else v[:100] + bytes([v[100] ^ 1]) + v[101:])
        third = Scheduler(engine, remote=RedisStore(server.url))
        out, _ = agent_turns(third)
        assert out == ref  # bad pages were recomputed
        assert third.remote.stats["pages_rejected"] > 0
        third.stop()


@pytest.mark.parametrize("rates", [None, (1.0, 3.0), (3.0, 1.0)])
def test_remote_overlap_recomputes_the_head_while_the_tail_is_fetched(engine, agent_ref, rates):
    """remote_overlap: a second server recomputes the head of each remote hit while fetching its tail, split by the
    (recompute, fetch) rates (half and half before any is measured); outputs stay identical, the head is computed
    and the tail comes from the store."""
    ref, _ = agent_ref
    store = InProcessStore()
    writer = Scheduler(engine, remote=store)
    agent_turns(writer)
    writer.remote.drain()
    writer.stop()

    reader = Scheduler(engine, SchedulerConfig(remote_overlap=True), remote=store)
    splits = []
    split = reader._split

    def record(n):
        if rates is not None:  # fixed rates: the split must follow them
            reader.rates = {"recompute": rates[0], "fetch": rates[1]}
        splits.append((n, split(n)))
        return splits[-1][1]

    reader._split = record
    out, cached = agent_turns(reader)
    assert out == ref
    n, head = splits[0]  # the first request: nothing local, every full page but the last token's is remote
    share = 0.5 if rates is None else rates[0] / sum(rates)
    assert n >= 8 and head == min(n - 1, int(n * share)) and 0 < head < n
    assert cached[0][0] == (n - head) * ECFG.page_size  # what was fetched, not what was recomputed
    assert tier_tokens(reader)["remote"] >= (n - head) * ECFG.page_size
    if rates is None:  # both rates measured on the way
        assert all(v is not None and v > 0 for v in reader.rates.values())
        # replayed, every prompt is a full hit that recomputes its last token in a whole step: windows that small
        # are fixed cost, not a rate (averaged in, they sent the H200's split to 1 page of 512), so none is counted
        before = dict(reader.rates)
        assert agent_turns(reader)[0] == ref
        assert reader.rates == before
    reader.check()
    reader.stop()


def test_overlap_splits_the_pages_the_store_holds(ref_engine, engine, rng):
    """remote_overlap on a prompt whose first pages the store holds and whose longer rest it does not: the split
    is of the held pages (half recomputed, half fetched at equal rates), not of every missing page, which would
    give the recompute all the held pages and the fetch only pages the store lacks."""
    store = InProcessStore()
    held = list(rng.integers(0, VOCAB, 5 * ECFG.page_size))
    writer = Scheduler(engine, remote=store)
    run_batch(writer, [held], [SamplingParams(max_new_tokens=1)])
    writer.remote.drain()
    writer.stop()
    prompt = held + list(rng.integers(0, VOCAB, 9 * ECFG.page_size))  # 5 pages held, 9 more the store lacks
    reader = Scheduler(engine, SchedulerConfig(remote_overlap=True), remote=store)
    reader.rates = {"recompute": 1.0, "fetch": 1.0}
    sp = SamplingParams(max_new_tokens=4)
    res = run_batch(reader, [prompt], [sp])[0]
    assert res.tokens == ref_engine.generate([prompt], sp)[0].tokens
    assert res.cached == 3 * ECFG.page_size  # 5 held: 2 recomputed, 3 fetched
    assert reader.remote.stats["pages_fetched"] == 3
    reader.stop()


class CountingStore(InProcessStore):
    def __init__(self, exists_s: float = 0.0):
        super().__init__()
        self.calls, self.exists_s = Counter(), exists_s

    def exists(self, keys):
        self.calls["exists"] += 1
        time.sleep(self.exists_s)  # a network round trip
        return super().exists(keys)

    def get(self, keys):
        self.calls["get"] += 1
        return super().get(keys)


def test_a_remote_miss_is_admitted_at_once_and_a_hit_counted_once(ref_engine, engine, rng):
    """The remote pages after the cached prefix are counted by one EXISTS when the request arrives: with none, it
    takes a slot and its first chunk in the step it arrived in (a background count left it waiting a step); with
    some, the background fetch gets them without a second EXISTS."""
    store = CountingStore(exists_s=0.05)
    prompt, sp = list(rng.integers(0, VOCAB, 5 * ECFG.page_size + 3)), SamplingParams(max_new_tokens=3)
    writer = Scheduler(engine, remote=store)
    req, res = submit(writer, prompt, sp)
    writer.step()
    assert req.fetch is None and req.phase in ("prefill", "decode") and req.pos > 0, (req.phase, req.pos)
    assert store.calls == {"exists": 1}
    writer.run_until_idle()
    writer.remote.drain()
    writer.stop()
    store.calls.clear()
    reader = Scheduler(engine, remote=store)  # a second server: empty tree, same store
    got = run_batch(reader, [prompt], [sp])[0]
    assert got.tokens == res.tokens == ref_engine.generate([prompt], sp)[0].tokens
    assert got.cached == 5 * ECFG.page_size and reader.remote.stats["pages_fetched"] == 5
    assert store.calls["exists"] == 1 and store.calls["get"] >= 1
    reader.stop()

    # remote_min_tokens, on a prompt of 7 full pages whose first 5 the store holds: fetched at a threshold of 5
    # pages, recomputed at 6 (the EXISTS tells), and at 8 the store is not asked (fewer pages are missing)
    ps = ECFG.page_size
    longer = prompt[: 5 * ps] + list(rng.integers(0, VOCAB, 2 * ps + 3))
    expected = ref_engine.generate([longer], sp)[0].tokens
    held = dict(store.items)  # the prompt's 5 pages only: each case starts from them
    for least, fetched, exists in ((5, 5, 1), (6, 0, 1), (8, 0, 0)):
        case = CountingStore()
        case.items.update(held)
        reader = Scheduler(engine, SchedulerConfig(remote_min_tokens=least * ps), remote=case)
        got = run_batch(reader, [longer], [sp])[0]
        assert got.tokens == expected and got.cached == fetched * ps, (least, got.cached)
        assert reader.remote.stats["pages_fetched"] == fetched and case.calls["exists"] == exists, least
        reader.stop()


def test_a_row_at_its_fetched_pages_waits_for_their_install(engine):
    """A row that recomputed its head up to the first fetched page is not prefilled until the fetch is installed,
    even once the fetch is done: done after this iteration's installs, it would be sent an empty piece (the engine
    step failed, under load, in the overlap test above)."""
    from concurrent.futures import Future

    sched = Scheduler(engine, SchedulerConfig(remote_overlap=True), remote=InProcessStore())
    done = Future()
    done.set_result(None)
    req = Request(list(range(40)), SamplingParams(max_new_tokens=1), Result())
    req.phase, req.pos, req.fetch, req.fetch_start = "prefill", 2 * ECFG.page_size, done, 2
    sched.running.append(req)
    assert sched._prefill_rows() == []
    req.fetch = None  # installed: the row goes on
    assert sched._prefill_rows() == [req]
    sched.running.remove(req)
    sched.stop()


def test_remote_pages_placed_after_the_cache_grew(engine, rng):
    """A fetch that finishes after another request inserted part of the same prefix: only the fetched pages past
    the grown cache are placed (the host-side slice of the staged pages), and the output is unchanged."""
    import threading

    system = list(map(int, rng.integers(0, VOCAB, 60)))
    a, b = system + [1, 2, 3], system + [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    sp = SamplingParams(max_new_tokens=6)
    ref = [r.tokens for r in run_batch(Scheduler(engine, SchedulerConfig(prefix_cache=False)), [a, b], [sp, sp])]
    store = InProcessStore()
    writer = Scheduler(engine, remote=store)
    run_batch(writer, [b], [sp])  # b's whole prefix goes to the store
    writer.remote.drain()
    writer.stop()

    reader = Scheduler(engine, remote=store)
    gate, calls, fetch = threading.Event(), [], reader._fetch_staged

    def held_second(digests, submitted):
        calls.append(len(digests))
        if len(calls) == 2:
            assert gate.wait(60)
        return fetch(digests, submitted)

    reader._fetch_staged = held_second
    ra, res_a = submit(reader, a, sp)
    rb, res_b = submit(reader, b, sp)  # its fetch starts now, from an empty cache, and is held
    while res_a.finish is None:  # a fetches, computes and inserts its pages while b waits for its fetch
        reader.step()
    assert rb.fetch_start == 0 and len(reader.radix.match(b, touch=False)) > 0
    gate.set()
    while reader.has_work():
        reader.step()
    reader.check()
    assert [res_a.tokens, res_b.tokens] == ref
    grown = len(reader.radix.match(a, touch=False)) * ECFG.page_size
    assert res_b.cached == (len(b) - 1) // ECFG.page_size * ECFG.page_size
    assert tier_tokens(reader)["remote"] >= res_b.cached - grown > 0  # b took the rest from the remote tier
    reader.stop()


def test_redis_killed_mid_run_then_back(engine, rng):
    need_redis()
    prompts = [list(rng.integers(0, VOCAB, 40)) + list(rng.integers(0, VOCAB, n)) for n in (5, 30, 60, 17, 44, 9)]
    sps = [params(i) for i in range(len(prompts))]
    ref = [r.tokens for r in run_batch(Scheduler(engine, SchedulerConfig(prefix_cache=False)), prompts, sps)]
    with RedisProcess() as server:
        store = RedisStore(server.url, timeout_s=0.3, retry_s=0.3)
        sched = Scheduler(engine, remote=store)
        reqs = [submit(sched, p, sp) for p, sp in zip(prompts, sps, strict=True)]
        for _ in range(3):
            sched.step()
        server.kill()  # mid-run: some requests decoding, others queued with lookups to do
        while sched.has_work():
            sched.step()
        assert [res.tokens for _, res in reqs] == ref
        assert [r.tokens for r in run_batch(sched, prompts, sps)] == ref  # a dead store is just a miss
        sched.remote.drain()
        assert store.errors > 0
        sched.stop()

        server.start()  # back, on the same port and empty
        time.sleep(0.35)
        sched = Scheduler(engine, remote=store)
        assert [r.tokens for r in run_batch(sched, prompts, sps)] == ref
        sched.remote.drain()
        assert store.up and store.exists([f"cgj:kv:{n.digest.hex()}" for n in sched.radix.match(prompts[2])]) > 0
        sched.stop()


@pytest.mark.parametrize("overlap", [False, True], ids=["fetch", "overlap"])
def test_random_requests_cancellations_and_preemption_leak_nothing(engine, rng, overlap):
    n = 200
    base = [list(rng.integers(0, VOCAB, k)) for k in (24, 40, 56)]
    prompts = [base[rng.integers(3)][: rng.integers(8, 57)] + list(rng.integers(0, VOCAB, rng.integers(1, 60)))
               for _ in range(n)]
    sps = [params(i, int(rng.integers(1, min(48, 160 - len(p)) + 1))) for i, p in enumerate(prompts)]
    # first a burst of 4 long requests (~20 of the 47 pages each at full length, arriving together): whatever
    # the seed, running requests outgrow the pool and preemption happens
    heavy = 4
    prompts = [list(rng.integers(0, VOCAB, 90)) for _ in range(heavy)] + prompts
    sps = [SamplingParams(max_new_tokens=60) for _ in range(heavy)] + sps
    n += heavy
    cancel_at = {i: int(rng.integers(0, 6)) for i in range(heavy, n) if rng.random() < 0.2}

    ref = run_batch(Scheduler(engine, SchedulerConfig(prefix_cache=False)), prompts, sps)
    sched = Scheduler(engine, SchedulerConfig(host_pages=40, max_prefill_rows=2, remote_overlap=overlap),
                      remote=InProcessStore())
    live = {i: submit(sched, prompts[i], sps[i]) for i in range(heavy)}
    pending = list(range(heavy, n))
    step = 0
    while pending or sched.has_work():
        for _ in range(int(rng.integers(0, 4))):  # arrivals while others run
            if pending:
                i = pending.pop(0)
                live[i] = submit(sched, prompts[i], sps[i])
        for i, (req, res) in list(live.items()):
            if i in cancel_at and res.finish is None:
                cancel_at[i] -= 1
                if cancel_at[i] < 0:
                    sched.cancel(req.id)
        sched.step()
        step += 1
        if step % 7 == 0:
            sched.check()
        if step % 50 == 0:
            sched.flush_cache()
    sched.check()
    for i, (_, res) in live.items():
        if res.finish == "cancelled":
            assert res.tokens == ref[i].tokens[: len(res.tokens)]
        else:
            assert res.tokens == ref[i].tokens and res.finish == ref[i].finish, i
    assert sum(res.finish == "cancelled" for _, res in live.values()) > 5
    print("scheduler", dict(sched.stats), "radix", dict(sched.radix.stats), "remote", sched.remote.stats)
    assert sched.stats["preemptions"] > 0 and sched.radix.stats["evicted_pages"] > 0
    assert sched.radix.stats["host_loaded_pages"] > 0 and sched.remote.stats["pages_fetched"] > 0
    # nothing leaked: once the cache lets go, every page and host slot is free again
    sched.flush_cache()
    sched.check()
    assert sched.allocator.num_free == sched.allocator.capacity
    assert sched.radix.host.num_free == sched.radix.host.capacity
    sched.stop()


def test_bad_requests_and_full_queue(engine):
    sched = Scheduler(engine, SchedulerConfig(max_queue=2))
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        sched.submit(Request([], ok, print))
    with pytest.raises(ValueError, match="max_seq_len 160"):
        sched.submit(Request([1] * 150, SamplingParams(max_new_tokens=20), print))
    with pytest.raises(ValueError, match="outside"):
        sched.submit(Request([VOCAB], ok, print))
    from serve.scheduler import QueueFull, ShuttingDown

    a, b = submit(sched, [1, 2, 3], ok), submit(sched, [4, 5], ok)
    with pytest.raises(QueueFull):
        submit(sched, [6], ok)
    sched.run_until_idle()
    assert a[1].finish == b[1].finish == "length"
    sched.stop()
    with pytest.raises(ShuttingDown):
        submit(sched, [6], ok)


@pytest.mark.parametrize("kind", ["apply", "suffix"])
def test_speculating_rows_beside_plain_rows_match_engine_generate(model, engine, ref_engine, rng, kind):
    # rows that speculate and rows that decode plainly share every step; greedy rows are token-identical to the
    # engine alone whichever path they take, seeded sampled rows on the plain path too (a speculative sampled
    # row keeps the target's distribution, not the fused decode's draws). Prompts repeat themselves so the
    # drafters do propose.
    from drafters.factory import build_speculator

    base = [list(rng.integers(0, VOCAB, n)) for n in (5, 12, 20, 9, 30, 14)]
    prompts = [p + p + p[: len(p) // 2] for p in base]
    sps = [params(i, 14) for i in range(len(prompts))]
    expected = [c.tokens for c in ref_engine.generate(prompts, sps)]
    sched = Scheduler(engine, SchedulerConfig(prefix_cache=True), speculator=build_speculator(kind, engine, model))
    for _ in range(2):  # the second round also hits the prefix cache
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, sps, strict=True)):
            res = Result()
            req = Request(list(map(int, p)), sp, res, speculate=i % 2 == 0)
            sched.submit(req)
            reqs.append((req, res))
        sched.step()  # takes the submissions in
        while sched.has_work():
            sched.step()
            sched.check()
        for i, (req, res) in enumerate(reqs):
            assert res.finish == "length" and len(res.tokens) == 14
            if sps[i].temperature == 0 or not req.speculate:
                assert res.tokens == expected[i], (i, kind)
    assert sched.metrics.acceptance._sum.get() > 0  # the speculative step ran
