"""Continuous batching over the engine's fixed decode slots, with the radix prefix cache and its tiers.

One iteration (`step`), all on the engine thread:
1. reserve the pages the decoding slots need for their next tokens: evict cold cache pages, else preempt the
   most recently admitted request (its computed pages go into the cache, so resuming it is a cache hit);
2. admit waiting requests into free slots while pages allow: longest cached prefix first, FCFS once more than
   `lpm_max_waiting` wait (matching every queued prompt each step costs host time, and LPM can starve);
   a match brings host-tier pages back and places remote pages fetched in the background; with `remote_overlap`
   the pages past the local match are split: the head is recomputed while the tail is fetched (the split from the
   measured recompute and fetch rates), so a remote hit takes about L / (recompute rate + fetch rate), never
   longer than recomputing;
3. one chunked-prefill call for up to `max_prefill_rows` prefilling slots (their uncached suffix, a chunk each);
4. one fused decode call (or the speculative step, when configured) for the decoding slots;
5. wait for the sampled tokens (the one host sync), hand them to the requests, finish or continue.
Steps 3 and 4 are dispatched back to back, so the device runs them while the host is still in step 5 of the
previous iteration's bookkeeping; prefill chunks bound how long a long prompt delays the decoders.

HTTP handlers never touch this state: they call `submit` / `cancel`, which go through a queue, and receive
`Output`s through the request's callback (called on the engine thread).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import jax
import numpy as np

from codegen_jax.engine import Engine
from codegen_jax.sampling import SamplingParams, sample
from serve.host_tier import HostTier
from serve.metrics import ServeMetrics
from serve.page_allocator import PageAllocator
from serve.radix_cache import RadixCache, dtype_of, page_array_shape
from serve.remote_tier import RemoteTier, page_digests

log = logging.getLogger("codegen_jax.serve")


class QueueFull(RuntimeError):
    pass


class ShuttingDown(RuntimeError):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    """prefix_cache: radix cache on; host_pages: host-RAM tier size in pages (0: none); max_queue: waiting
    requests before `submit` refuses; max_prefill_rows: slots prefilled in one call; lpm_max_waiting: queue
    length above which admission is FCFS instead of longest-prefix-first; remote_overlap: recompute the head of a
    remote hit while its tail is fetched (off: fetch all of it, then compute what follows); remote_min_tokens: a
    remote hit shorter than this is recomputed instead (SGLang's HiCache has such a prefetch threshold). Both
    default to the plain mechanism here (every hit fetched whole); the server's ServeConfig turns the split on and
    sets 2,048 tokens, from the H200 agent trace's crossover; prefill_decode_steps: decode steps of a
    call that also prefills (capped at the engine's decode_steps, which calls without prefill run): while a
    prompt waits for its first token, decoding rows advance one token a call, as vLLM's chunked prefill does, so
    a cached turn's few new tokens do not wait behind several fused decode steps per chunk."""

    prefix_cache: bool = True
    host_pages: int = 0
    remote_overlap: bool = False
    remote_min_tokens: int = 0
    max_queue: int = 256
    # 2: on the H200 7B agent trace (e47e029) the cached turns' TTFT p50 was 198 ms against 331 ms at 4, and the
    # same turns recomputed (cache off) 1,203 against 1,620 ms (agent_trace_7b_sweep/rows{2,4}_e47e029.json)
    max_prefill_rows: int = 2
    lpm_max_waiting: int = 32
    prefill_decode_steps: int = 1

    def __post_init__(self):
        for name in ("max_queue", "max_prefill_rows", "prefill_decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.remote_min_tokens < 0:
            raise ValueError(f"SchedulerConfig.remote_min_tokens must be >= 0, got {self.remote_min_tokens}")
        for name in ("host_pages", "lpm_max_waiting"):
            if getattr(self, name) < 0:
                raise ValueError(f"SchedulerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.host_pages and not self.prefix_cache:
            raise ValueError("SchedulerConfig.host_pages needs prefix_cache=True")


@dataclass
class Output:
    """What a request's callback receives: new tokens, and on the last call a finish reason
    ("stop", "length", "cancelled", "abort" at shutdown, "error")."""

    tokens: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class SpecRow:
    slot: int
    tokens: list[int]  # prompt + generated; tokens[-1] is sampled but not yet in the cache
    params: SamplingParams


class SpeculativeStep(Protocol):
    """The hook a drafter plugs into (drafters/ builds it): one draft-and-verify step for the decoding rows.

    On entry each row's cache holds len(tokens) - 1 tokens. On return row i's cache length grew by
    len(result[i]) >= 1, and result[i] is the accepted draft plus the bonus token (the last one not cached):
    the same contract as a decode call, with a variable number of tokens. Roll back with `cache.lengths`."""

    lookahead: int  # most tokens one step appends to a row (the scheduler reserves pages for them)

    def __call__(self, engine: Engine, rows: list[SpecRow]) -> list[list[int]]: ...


# pages per host-to-device copy of a remote fetch (a power of two: write_pages' size classes)
FETCH_PIECE = 64


class StagedPages(NamedTuple):
    """n pages fetched from the remote tier, on the host and on the device in pieces of FETCH_PIECE pages (the
    last padded to its size class; see Scheduler._fetch_staged)."""

    n: int
    host: np.ndarray | None
    device: tuple[jax.Array, ...]


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    speculate: bool = False  # decode through the scheduler's speculative step (when it has one)
    arrival: float = field(default_factory=time.monotonic)
    # engine-thread state
    output: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt, then every token the device produced
    phase: str = "new"  # new | waiting | prefill | decode | done
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    nodes: list = field(default_factory=list)  # locked radix path
    pos: int = 0  # tokens cached so far while prefilling
    fetch: Future | None = None  # remote pages from page fetch_start on (StagedPages), until installed
    fetch_start: int = 0
    fetch_head: int = 0  # pages to recompute before fetch_start, as the split was made (0: nothing to do meanwhile)
    known_remote: range = range(0)
    cached: dict[str, int] | None = None  # prompt tokens per tier, from the first admission
    admitted_at: int = 0
    placed: float = 0.0  # time.monotonic() of its first admission to a slot

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values()) if self.cached else 0


class Scheduler:
    def __init__(self, engine: Engine, cfg: SchedulerConfig = SchedulerConfig(), *, remote=None,
                 model_id: str = "model", metrics: ServeMetrics | None = None,
                 speculator: SpeculativeStep | None = None):
        """remote: a RemoteStore (serve.remote_tier) shared with other servers, or None."""
        self.engine, self.cfg = engine, cfg
        self.metrics = metrics or ServeMetrics()
        self.speculator = speculator
        self.kv = engine.cache
        self.page_size = engine.cfg.page_size
        ecfg = engine.cfg
        self.allocator = PageAllocator(ecfg.pages)
        # the allocator owns the pool now: the engine's own reserve() must not hand out pages, and a previous
        # owner's page tables mean nothing (stale page contents are harmless: a page is written before it is read)
        self.kv.free.clear()
        self.kv.page_table[:] = 0
        self.kv.lengths[:] = 0
        self.radix: RadixCache | None = None
        self.remote: RemoteTier | None = None
        self._fetcher: ThreadPoolExecutor | None = None
        if cfg.prefix_cache:
            from serve.remote_tier import salt

            shape, dtype = page_array_shape(self.kv), dtype_of(self.kv)
            host = HostTier(cfg.host_pages, shape, dtype) if cfg.host_pages else None
            if remote is not None:
                self.remote = RemoteTier(remote, shape, dtype)
                # fetches at once (each waits on the tier's getter threads, where they take turns): with 2, the
                # H200 trace's second server had its cached turns wait 94 ms (p50) for one behind long fetches
                self._fetcher = ThreadPoolExecutor(4, thread_name_prefix="kv-remote-fetch")
            layout = (engine.model_cfg.num_layers, engine.model_cfg.num_kv_heads, engine.model_cfg.head_dim)
            self.radix = RadixCache(self.allocator, self.page_size, salt(model_id, str(dtype), layout,
                                                                         self.page_size),
                                    kv=self.kv, host=host, remote=self.remote)
        elif remote is not None:
            raise ValueError("a remote KV store needs the prefix cache on")
        B = ecfg.max_slots
        self.slots: list[Request | None] = [None] * B
        self.running: list[Request] = []  # admission order
        self.waiting: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.last = np.zeros(B, np.int32)
        self.seeds = np.zeros(B, np.uint32)
        self.temperature = np.zeros(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.top_p = np.ones(B, np.float32)
        self._sample = jax.jit(sample, static_argnames="greedy")
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not yet admitted (guarded by _lock; submit runs on other threads)
        self._closing = False
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._admissions = 0
        self._passed_oldest = False  # the last prefill call left the oldest prefilling row out
        # decode steps of a call that also prefills (the engine's decode_steps at most)
        self._prefill_steps = min(cfg.prefill_decode_steps, ecfg.decode_steps)
        self._ahead = max(ecfg.decode_steps, speculator.lookahead if speculator else 0)  # tokens a step appends
        self.stats = Counter()
        # a remote hit's split: recomputed and fetched tokens per second (EMAs; None until measured)
        self.remote_overlap, self.remote_min_tokens = cfg.remote_overlap, cfg.remote_min_tokens
        self.rates: dict[str, float | None] = {"recompute": None, "fetch": None}
        self._prefilled = (0, 0.0)  # prefill tokens dispatched since the last host sync, and when the first was

    # ---- the thread-safe surface ---------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queues a request (any thread). Raises ValueError for a request the engine cannot run, QueueFull when
        max_queue requests wait, ShuttingDown after `stop`."""
        ecfg = self.engine.cfg
        if not req.prompt:
            raise ValueError("prompt is empty")
        if len(req.prompt) + req.params.max_new_tokens > ecfg.max_seq_len:
            raise ValueError(f"prompt has {len(req.prompt)} tokens + max_new_tokens {req.params.max_new_tokens} "
                             f"> max_seq_len {ecfg.max_seq_len}")
        if min(req.prompt) < 0 or max(req.prompt) >= self.engine.model_cfg.vocab_size:
            raise ValueError(f"prompt has token ids outside [0, {self.engine.model_cfg.vocab_size})")
        pages = math.ceil((len(req.prompt) + req.params.max_new_tokens + self._ahead) / self.page_size)
        if pages > self.allocator.capacity:
            raise ValueError(f"prompt + max_new_tokens need {pages} KV pages; the pool has {self.allocator.capacity}")
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if self._queued >= self.cfg.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (max_queue {self.cfg.max_queue})")
            self._queued += 1
        self._inbox.put(("submit", req))

    def cancel(self, request_id: str) -> None:
        """Ends a request (any thread); its pages are freed and its computed prefix stays in the cache."""
        self._inbox.put(("cancel", request_id))

    def call(self, fn: Callable[[], object]) -> Future:
        """Runs fn on the engine thread between iterations (flush, invariant checks, stats)."""
        fut: Future = Future()
        if self._thread is None:  # no engine thread: the caller's thread is the engine thread
            fut.set_result(fn())
        else:
            self._inbox.put(("call", fn, fut))
        return fut

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuses new requests, lets queued and running ones finish for up to timeout_s, then ends the rest
        with finish_reason "abort" and stops the engine thread. Idempotent; concurrent calls wait for the first
        (the server calls it from a signal's drain timer and again from the app's shutdown)."""
        with self._stop_lock:
            if self._stopped:
                return
            self.begin_shutdown()
            deadline = time.monotonic() + timeout_s
            if self._thread is not None:
                while time.monotonic() < deadline and (self.call(self.has_work).result() or self._queued):
                    time.sleep(0.02)
                self._stop.set()
                self._inbox.put(("wake",))
                self._thread.join()
                self._thread = None
            self._drain_inbox(block=False)
            for req in list(self.running) + list(self.waiting):
                self._finish(req, "abort")
            if self.remote is not None:
                self.remote.close()
            if self._fetcher is not None:
                self._fetcher.shutdown(wait=False, cancel_futures=True)
            self._stopped = True

    def begin_shutdown(self) -> None:
        """Refuses new requests from now on; queued and running ones go on until `stop`."""
        with self._lock:
            self._closing = True

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def num_waiting(self) -> int:
        return self._queued

    # ---- the loop --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> bool:
        """One iteration; returns whether it ran anything on the device. Blocks briefly when idle."""
        self._drain_inbox(block=not self.has_work())
        if not self.running and not any(self._ready(r) for r in self.waiting):
            if self.waiting:  # only remote fetches in flight
                time.sleep(0.002)
            return False
        try:
            ran = self._iteration()
            if not ran:
                time.sleep(0.001)  # waiting requests that cannot be placed yet: do not spin
            return ran
        except Exception as e:
            log.exception("engine step failed; failing the running requests")
            for req in list(self.running):
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return False
        finally:
            self.metrics.waiting.set(self._queued)
            self.metrics.running.set(len(self.running))
            self.metrics.free_pages.set(self.allocator.num_free)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Runs iterations on the calling thread until nothing is queued or running (tests, benchmarks)."""
        for _ in range(max_steps):
            self._drain_inbox(block=False)
            if not self.has_work():
                return
            self.step()
        raise RuntimeError("run_until_idle: still busy")

    def _drain_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind = msg[0]
            if kind == "submit":
                self._intake(msg[1])
            elif kind == "cancel":
                req = self.by_id.get(msg[1])
                if req is not None:
                    self._finish(req, "cancelled")
            elif kind == "call":
                fut = msg[2]
                try:
                    fut.set_result(msg[1]())
                except Exception as e:
                    fut.set_exception(e)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _intake(self, req: Request) -> None:
        req.tokens = list(req.prompt)
        req.phase = "waiting"
        self.by_id[req.id] = req
        self.waiting.append(req)
        if self.remote is not None:
            self._start_fetch(req)

    def _start_fetch(self, req: Request) -> None:
        """Counts, with one EXISTS on this thread, the remote pages that follow the prompt's cached prefix, and
        fetches them in the background. A request the store holds nothing for is admitted at once: counted in the
        background, it waited a whole iteration for the answer (on the H200 agent trace, cached turns queued
        110-190 ms with nothing to fetch). With remote_overlap the split is of the pages the store holds: a split
        of every missing page would give the recompute the pages the store has and the fetch those it lacks."""
        path = self.radix.match(req.tokens, touch=False)
        limit = (len(req.tokens) - 1) // self.page_size
        ps, least = self.page_size, max(1, -(-self.remote_min_tokens // self.page_size))  # pages worth a fetch
        if limit - len(path) >= least:
            digests = page_digests(self.radix.digest_after(path), req.tokens[len(path) * ps : limit * ps], ps)
            digests = digests[: self.remote.present(digests)]
            if len(digests) < least:
                return
            head = self._split(len(digests)) if self.remote_overlap else 0
            req.fetch_start, req.fetch_head = len(path) + head, head
            req.fetch = self._fetcher.submit(self._fetch_staged, digests[head:], time.perf_counter())

    def _split(self, n: int) -> int:
        """Pages (of n missing) to recompute while the rest is fetched: both finish together when
        head / recompute rate = (n - head) / fetch rate. Half and half until both rates are measured."""
        r, f = self.rates["recompute"], self.rates["fetch"]
        share = 0.5 if r is None or f is None else r / (r + f)
        return min(n - 1, int(n * share)) if n > 1 else 0

    def _rate(self, name: str, tokens: int, seconds: float) -> None:
        """Updates a rate (tokens per second) from a window of at least one prefill chunk. Smaller windows are
        mostly fixed cost: a remote hit recomputes one token in a whole step. Averaged in, they made the H200
        probe's overlapped 8,192-token hit recompute 1 page of 512 and fetch the rest, where its own recompute
        and fetch times (269 ms and 1,125 ms: ~30k and ~7k tokens/s) call for ~410 recomputed
        (benchmarks/results/agent_trace_7b_probe.json)."""
        if tokens >= self.engine.cfg.prefill_chunk and seconds > 0:
            old, new = self.rates[name], tokens / seconds
            self.rates[name] = new if old is None else 0.7 * old + 0.3 * new

    def _fetch_staged(self, digests: list[bytes], submitted: float) -> StagedPages:
        """On a fetcher thread: the remote pages read into one host buffer [m, L, 2, Hkv, S, D] (m: the count padded
        to write_pages' size class), and copied to the device in pieces of FETCH_PIECE pages as they land, the copy
        of one piece overlapping the reading of the next. Placing them then costs the engine thread one scatter per
        piece. (Stacking the pages after the reads and one copy of the whole at the end ran at ~390 MB/s on the
        H200 agent trace's 12k-token probe.)"""
        t = time.perf_counter()
        n, piece = len(digests), FETCH_PIECE
        buf = np.empty((1 << (n - 1).bit_length(), *self.remote.page_shape), self.remote.dtype)
        pieces: list[jax.Array] = []

        def landed(k: int) -> None:  # the first k pages are in: each whole piece among them goes to the device
            while (len(pieces) + 1) * piece <= k:
                lo = len(pieces) * piece
                pieces.append(jax.device_put(buf[lo : lo + piece]))

        got = self.remote.fetch_into(digests, buf, counted=True, landed=landed)  # _start_fetch's EXISTS counted
        read = time.perf_counter()
        if not got:
            return StagedPages(0, None, ())
        lo = len(pieces) * piece
        if got > lo:  # the last piece, padded to its size class with zeros (written to the scratch page)
            hi = lo + (1 << (got - lo - 1).bit_length())
            buf[got:hi] = 0
            pieces.append(jax.device_put(buf[lo:hi]))
        for p in pieces:
            p.block_until_ready()
        done = time.perf_counter()
        self.metrics.fetched(got, t - submitted, read - t, done - read)
        self._rate("fetch", got * self.page_size, done - t)
        return StagedPages(got, buf, tuple(pieces))

    def _install_fetched(self, req: Request) -> None:
        """Writes req's fetched pages where they continue its prefix (req.pos, page-aligned, at or past
        fetch_start: pages the cache or the recompute already covers are skipped) and moves pos past them."""
        ps, staged = self.page_size, req.fetch.result()
        req.fetch = None
        at = req.pos // ps
        skip = at - req.fetch_start  # > 0 when the cache grew since the fetch started
        fetched = max(0, staged.n - skip) if skip >= 0 and req.pos % ps == 0 else 0
        if fetched:
            if skip == 0:
                for lo, piece in zip(range(0, fetched, FETCH_PIECE), staged.device, strict=True):
                    self.kv.write_pages(req.pages[at + lo : at + min(fetched, lo + FETCH_PIECE)], piece)
            else:
                self.kv.write_pages(req.pages[at : at + fetched], staged.host[skip : staged.n])
            req.known_remote = range(at, at + fetched)
            req.pos = (at + fetched) * ps
            self.kv.lengths[req.slot] = req.pos
            req.cached["remote"] += fetched * ps
            self.metrics.admitted(0, {"remote": fetched * ps})

    def _stalled(self, req: Request) -> bool:
        """A prefilling row at its first fetched page whose pages are not installed yet: still on their way from the
        remote tier, or landed after this iteration's installs (the next one installs them). Its prefill piece
        would be empty: the fetch's done-ness must not be read twice in one iteration."""
        return req.fetch is not None and req.pos >= req.fetch_start * self.page_size

    def _iteration(self) -> bool:
        spec = self.speculator
        for req in [r for r in self.running if r.phase == "decode"]:
            if req.phase == "decode":  # an earlier reservation may have preempted it
                self._reserve(req, int(self.kv.lengths[req.slot]) + self._ahead)
        self._admit()
        for req in self.running:
            if self._stalled(req) and req.fetch.done():
                self._install_fetched(req)
        prefill = self._prefill_rows()
        decode = [r for r in self.running if r.phase == "decode"]
        if not prefill and not decode:
            return False
        pos = sum(r.pos for r in prefill)
        if prefill and not self._prefilled[0]:
            self._prefilled = (0, time.perf_counter())
        first, done = self._dispatch_prefill(prefill) if prefill else (None, [])
        self._prefilled = (self._prefilled[0] + sum(r.pos for r in prefill) - pos, self._prefilled[1])
        # Rows that speculate go through the speculative step, the others through the fused decode call; both
        # run on the same pool one after the other, and each leaves the other's rows untouched (q_len 0, inactive).
        drafted = [r for r in decode if r.speculate] if spec is not None else []
        plain = [r for r in decode if r not in drafted] if drafted else decode
        out = self._dispatch_decode(plain, self._prefill_steps if prefill else None) if plain else None
        if drafted:
            rows = [SpecRow(r.slot, r.tokens, r.params) for r in drafted]
            new = spec(self.engine, rows)
            assert len(new) == len(rows) and all(new), "a speculative step returns >= 1 token per row"
            for r, toks in zip(drafted, new, strict=True):
                self.metrics.acceptance.observe(len(toks))
                self._advance(r, [int(t) for t in toks])
        if out is not None:
            out = np.asarray(out)  # the host sync
            for r in plain:
                self._advance(r, out[r.slot].tolist())
        if first is not None:
            first = np.asarray(first)
            for i, r in enumerate(prefill):
                if r in done:
                    self._prefill_done(r, int(first[i]))
        if self._prefilled[0] and (first is not None or out is not None or drafted):
            # the device ran every prefill chunk dispatched since the first one unsynced (decode rows in the same
            # calls count against the rate): no sync of its own, so chunks still pipeline
            self._rate("recompute", self._prefilled[0], time.perf_counter() - self._prefilled[1])
            self._prefilled = (0, 0.0)
        return True

    def _prefill_rows(self) -> list[Request]:
        """The prefilling rows of this call (at most max_prefill_rows): the one that arrived first, so every prompt
        advances, then those with the fewest prompt tokens left to compute. A cached turn's few new tokens then
        reach their first token in a call or two instead of queueing behind whole first prompts (shortest remaining
        work first minimises the mean time to first token).

        A call whose other rows all take their last piece leaves the oldest out, never two calls running: the
        rows pad to the longest piece, so a cached turn's tail of a few hundred tokens beside the oldest's full
        chunk cost a call of full chunks; alone it costs a call of its own length."""
        rows = [r for r in self.running if r.phase == "prefill" and not self._stalled(r)]
        if not rows:
            return []
        oldest = min(rows, key=lambda r: r.arrival)
        rest = sorted((r for r in rows if r is not oldest), key=lambda r: (len(r.tokens) - r.pos, r.arrival))
        rest = rest[: self.cfg.max_prefill_rows - 1]
        if rest and not self._passed_oldest and not self._finishes(oldest) and all(map(self._finishes, rest)):
            self._passed_oldest = True
            return rest
        self._passed_oldest = False
        return [oldest, *rest]

    def _finishes(self, req: Request) -> bool:
        """req's next prefill piece is its last (a row with a fetch in flight stops short of the fetched pages)."""
        return req.fetch is None and len(req.tokens) - req.pos <= self.engine.cfg.prefill_chunk

    # ---- admission and pages -----------------------------------------------------------------------------

    def _admit(self) -> None:
        free_slots = [s for s, r in enumerate(self.slots) if r is None]
        if not free_slots or not self.waiting:
            return
        ready = [r for r in self.waiting if self._ready(r)]
        if self.radix is not None and len(self.waiting) <= self.cfg.lpm_max_waiting:
            # longest cached prefix first; resumed (preempted) requests keep their place by arrival
            ready.sort(key=lambda r: (-len(self.radix.match(r.tokens, touch=False)), r.arrival))
        else:
            ready.sort(key=lambda r: r.arrival)
        for req in ready:
            if not free_slots:
                break
            if not self._place(req, free_slots[0]):
                break  # head of line waits for pages; later requests would only take them from it
            free_slots.pop(0)

    @staticmethod
    def _ready(req: Request) -> bool:
        """Admissible now: no fetch in flight, or one that leaves the request work to do meanwhile."""
        return req.fetch is None or req.fetch_head > 0 or req.fetch.done()

    def _place(self, req: Request, slot: int) -> bool:
        """Gives req a slot and pages for its sequence, reusing every cached page it can; False if the pool
        cannot hold it now."""
        ps, seq = self.page_size, req.tokens
        radix = self.radix
        path = radix.match(seq) if radix is not None else []
        if radix is not None:
            radix.lock(path)
        n_dev = sum(n.page is not None for n in path)
        total = math.ceil(len(seq) / ps)
        # room for the prompt and the first decode call, so admission does not cause an immediate preemption
        want = math.ceil((len(seq) + self.engine.cfg.decode_steps) / ps) - n_dev
        short = want - self.allocator.num_free
        if short > 0 and radix is not None:
            radix.evict(short)
        if want > self.allocator.num_free:
            if radix is not None:
                radix.unlock(path)
            return False
        if radix is not None:
            assert radix.load(path) == len(path)
        shared = [n.page for n in path]
        self.allocator.incref(shared)
        new = self.allocator.allocate(total - len(path))
        req.pages = shared + new
        req.nodes = path
        req.known_remote = range(0)
        req.pos = len(path) * ps
        if req.cached is None:
            req.cached = {"device": n_dev * ps, "host": (len(path) - n_dev) * ps, "remote": 0}
            self.metrics.admitted(len(req.prompt), req.cached)
            req.placed = time.monotonic()
        self.waiting.remove(req)
        with self._lock:
            self._queued -= 1
        req.phase, req.slot = "prefill", slot
        self._admissions += 1
        req.admitted_at = self._admissions
        self.slots[slot] = req
        self.running.append(req)
        self.kv.page_table[slot] = 0
        self.kv.page_table[slot, : len(req.pages)] = req.pages
        self.kv.lengths[slot] = req.pos
        if self._stalled(req) and req.fetch.done():
            self._install_fetched(req)  # a fetch with no head to recompute (or one the cache covered)
        sp = req.params
        self.seeds[slot], self.temperature[slot], self.top_k[slot], self.top_p[slot] = (
            sp.seed, sp.temperature, sp.top_k, sp.top_p)
        return True

    def _reserve(self, req: Request, n_tokens: int) -> None:
        """Makes req's pages cover n_tokens: takes free pages, then evicts cache pages, then preempts the most
        recently admitted requests (req itself if it is the newest)."""
        need = min(math.ceil(n_tokens / self.page_size), self.kv.max_pages) - len(req.pages)
        if need <= 0:
            return
        if need > self.allocator.num_free and self.radix is not None:
            self.radix.evict(need - self.allocator.num_free)
        while need > self.allocator.num_free:
            victim = max(self.running, key=lambda r: r.admitted_at)
            self._preempt(victim)
            if victim is req:
                return
            if self.radix is not None:
                self.radix.evict(need - self.allocator.num_free)
        new = self.allocator.allocate(need)
        self.kv.page_table[req.slot, len(req.pages) : len(req.pages) + need] = new
        req.pages.extend(new)

    def _preempt(self, req: Request) -> None:
        self.metrics.preemptions.inc()
        self.stats["preemptions"] += 1
        self._release(req)
        if req.phase == "decode":
            # resume by prefilling prompt + output (its last token was sampled but never cached)
            req.tokens = req.prompt + req.output
        req.phase = "waiting"
        req.pos = 0
        self.waiting.insert(0, req)
        with self._lock:
            self._queued += 1

    def _release(self, req: Request) -> None:
        """Frees req's slot and page references; its computed full pages go into the cache first."""
        slot = req.slot
        if self.radix is not None:
            full = int(self.kv.lengths[slot]) // self.page_size
            self.radix.insert(req.tokens[: full * self.page_size], req.pages[:full], known_remote=req.known_remote)
            self.radix.unlock(req.nodes)
        self.allocator.decref(req.pages)
        req.pages, req.nodes, req.known_remote = [], [], range(0)
        self.kv.page_table[slot] = 0
        self.kv.lengths[slot] = 0
        self.slots[slot] = None
        self.running.remove(req)
        req.slot = None

    # ---- device calls and their results -------------------------------------------------------------------

    def _dispatch_prefill(self, rows: list[Request]):
        chunk, ps = self.engine.cfg.prefill_chunk, self.page_size
        # a row with a fetch in flight stops at its first fetched page
        pieces = [r.tokens[r.pos : r.pos + chunk if r.fetch is None else min(r.pos + chunk, r.fetch_start * ps)]
                  for r in rows]
        logits = self.engine.prefill_rows([r.slot for r in rows], pieces, [r.pos for r in rows])
        for r, p in zip(rows, pieces, strict=True):
            r.pos += len(p)
        done = [r for r in rows if r.pos == len(r.tokens)]
        if not done:
            return None, []
        n = logits.shape[0]
        idx = [r.slot for r in rows] + [0] * (n - len(rows))
        positions = np.array([r.pos for r in rows] + [0] * (n - len(rows)), np.int32)
        greedy = all(r.params.temperature == 0 for r in done)
        first = self._sample(logits, self.seeds[idx], positions, self.temperature[idx], self.top_k[idx],
                             self.top_p[idx], greedy=greedy)
        return first, done

    def _dispatch_decode(self, rows: list[Request], n_steps: int | None = None):
        """The fused decode call for rows: n_steps each (None: the engine's decode_steps)."""
        active = np.zeros(len(self.slots), bool)
        active[[r.slot for r in rows]] = True
        return self.engine.decode(self.last, active, self.seeds, self.temperature, self.top_k, self.top_p,
                                  greedy=bool((self.temperature[active] == 0).all()), n_steps=n_steps)

    def decode_step_counts(self) -> list[int]:
        """The step counts of the fused decode calls this scheduler makes (one program each, for warm-ups)."""
        return sorted({self.engine.cfg.decode_steps, self._prefill_steps})

    def _prefill_done(self, req: Request, token: int) -> None:
        if self.radix is not None:
            full = len(req.tokens) // self.page_size
            path = self.radix.insert(req.tokens[: full * self.page_size], req.pages[:full],
                                     known_remote=req.known_remote)
            self.radix.lock(path)
            self.radix.unlock(req.nodes)
            req.nodes = path
        req.phase = "decode"
        if not req.output:
            self.metrics.first_token(req.id, time.monotonic(), req.arrival, req.placed)
        self._advance(req, [token])

    def _advance(self, req: Request, tokens: list[int]) -> None:
        """Appends tokens the device produced for req (the last one not cached yet) and emits what counts."""
        req.tokens.extend(tokens)
        self.last[req.slot] = tokens[-1]
        sp, emitted, reason = req.params, [], None
        for t in tokens:
            emitted.append(t)
            if t in sp.stop_token_ids:
                reason = "stop"
            elif len(req.output) + len(emitted) >= sp.max_new_tokens:
                reason = "length"
            if reason:
                break
        req.output.extend(emitted)
        self.metrics.tokens(len(emitted))
        if reason:
            self._finish(req, reason, tokens=emitted)
        else:
            req.emit(Output(emitted, prompt_tokens=len(req.prompt), cached_tokens=req.cached_tokens))

    def _finish(self, req: Request, reason: str, *, tokens: list[int] | None = None, error: str | None = None):
        if req.phase == "done":
            return
        if req.slot is not None:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            with self._lock:
                self._queued -= 1
        req.phase = "done"
        self.by_id.pop(req.id, None)
        self.metrics.requests.labels(reason).inc()
        try:
            req.emit(Output(tokens or [], reason, len(req.prompt), req.cached_tokens, error))
        except Exception:
            log.exception("request %s: output callback failed", req.id)

    # ---- maintenance -------------------------------------------------------------------------------------------

    def flush_cache(self) -> int:
        """Drops every unlocked cached page (device and host); engine thread only (use `call`)."""
        return self.radix.flush() if self.radix is not None else 0

    def check(self) -> None:
        """Asserts the allocator, radix and slot invariants; engine thread only (use `call`)."""
        holders = Counter()
        for req in self.running:
            assert self.slots[req.slot] is req
            holders.update(req.pages)
            row = self.kv.page_table[req.slot]
            assert list(row[: len(req.pages)]) == req.pages and not row[len(req.pages) :].any()
            assert self.kv.lengths[req.slot] <= len(req.pages) * self.page_size
        assert sum(r is not None for r in self.slots) == len(self.running)
        if self.radix is not None:
            holders.update(self.radix.holders())
            self.radix.check()
        self.allocator.check(holders)
        assert self._queued >= len(self.waiting), (self._queued, len(self.waiting))  # the rest is in the inbox
