"""Prometheus metrics of one server: queue, running, tokens/s, prefix-cache hit rate per tier, acceptance length,
time to first token split into queue time (to a slot) and prefill time (slot to first token).

Each server owns its registry (tests and the benchmark run several in one process). Hit rates are exported both
as counters (cached tokens per tier, prompt tokens: rate them in Prometheus) and as a ready-made ratio gauge.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIERS = ("device", "host", "remote")


class ServeMetrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("codegen_queue_requests", "requests waiting for a decode slot", registry=r)
        self.running = Gauge("codegen_running_requests", "requests holding a decode slot", registry=r)
        self.free_pages = Gauge("codegen_free_kv_pages", "device KV pages on the free list", registry=r)
        self.requests = Counter("codegen_requests", "finished requests by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("codegen_prompt_tokens", "prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("codegen_cached_prompt_tokens", "prompt tokens served from the prefix cache",
                                     ["tier"], registry=r)
        self.hit_rate = Gauge("codegen_cache_hit_rate", "cached / admitted prompt tokens since start", ["tier"],
                              registry=r)
        self.generated = Counter("codegen_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("codegen_tokens_per_second", f"generated tokens/s over the last {window_s:g}s",
                                  registry=r)
        self.ttft = Histogram("codegen_time_to_first_token_seconds", "submission to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queue_time = Histogram("codegen_queue_time_seconds", "submission to the first admission to a slot",
                                    registry=r, buckets=(0.001, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.prefill_time = Histogram("codegen_prefill_time_seconds", "first admission to a slot to the first token",
                                      registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        # per request id, the last `keep` first tokens: (queue s, prefill s), for benchmarks that split TTFT
        self.first_tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._keep = 4096
        self.acceptance = Histogram("codegen_acceptance_length", "tokens kept per speculative step and request",
                                    registry=r, buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32))
        self.remote_fetch = Histogram("codegen_remote_fetch_seconds", "a remote-tier fetch by phase: queued for a "
                                      "fetcher, reading and checking the pages, the last copy to the device",
                                      ["phase"], registry=r, buckets=(0.001, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        # the last `keep` fetches: (pages, queued s, read s, device s), for benchmarks that split a remote hit
        self.fetches: deque[tuple[int, float, float, float]] = deque(maxlen=4096)
        self.preemptions = Counter("codegen_preemptions", "requests preempted for pages", registry=r)
        for tier in TIERS:  # every series from the start, so a scrape before the first request sees them at 0
            self.cached_tokens.labels(tier)
            self.hit_rate.labels(tier)
        self._lock = threading.Lock()
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._prompt_total = 0
        self._cached_total = dict.fromkeys(TIERS, 0)
        self._generated_total = 0

    def admitted(self, prompt_tokens: int, cached: dict[str, int]) -> None:
        with self._lock:
            self._prompt_total += prompt_tokens
            self.prompt_tokens.inc(prompt_tokens)
            for tier in TIERS:
                self._cached_total[tier] += cached.get(tier, 0)
                self.cached_tokens.labels(tier).inc(cached.get(tier, 0))
                self.hit_rate.labels(tier).set(self._cached_total[tier] / max(1, self._prompt_total))

    def first_token(self, request_id: str, now: float, arrival: float, placed: float) -> None:
        """A request's first token at `now` (time.monotonic()), submitted at `arrival`, first admitted at `placed`."""
        queue_s, prefill_s = placed - arrival, now - placed
        self.ttft.observe(now - arrival)
        self.queue_time.observe(queue_s)
        self.prefill_time.observe(prefill_s)
        with self._lock:
            self.first_tokens[request_id] = (queue_s, prefill_s)
            while len(self.first_tokens) > self._keep:
                self.first_tokens.popitem(last=False)

    def fetched(self, pages: int, queued_s: float, read_s: float, device_s: float) -> None:
        for phase, t in (("queued", queued_s), ("read", read_s), ("device", device_s)):
            self.remote_fetch.labels(phase).observe(t)
        with self._lock:
            self.fetches.append((pages, queued_s, read_s, device_s))

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated.inc(n)
            self._generated_total += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self._window_s:
                self._recent.popleft()
            self.tokens_per_s.set(sum(k for _, k in self._recent) / self._window_s)

    def hit_rates(self) -> dict[str, float]:
        with self._lock:
            return {t: self._cached_total[t] / max(1, self._prompt_total) for t in TIERS}

    def totals(self) -> dict[str, float]:
        """Cumulative counts (prompt, cached per tier, generated tokens): a benchmark diffs two of these."""
        with self._lock:
            return {"prompt": self._prompt_total, **{t: self._cached_total[t] for t in TIERS},
                    "generated": self._generated_total}

    def render(self) -> bytes:
        return generate_latest(self.registry)
