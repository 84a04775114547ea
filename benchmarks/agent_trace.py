"""A coding agent's multi-turn workload against our server: prefix-cache hit rate per tier, time to first token
and throughput with the cache off, on, and on a second server that fetches from Redis what the first computed.

The workload: several concurrent sessions of one agent. Every request holds a long system prompt (instructions,
the repository map and the tool list), the files the session works on (real source files of this repository,
re-sent unchanged every turn), then the growing conversation: each turn appends the model's answer and a tool
result that re-reads one of the session's files. Sessions are closed loops: a turn is sent when the previous one
has been answered.

Runs, all on servers this script starts in its own process (uvicorn threads, one shared redis-server):
  on      prefix cache with host-RAM and remote tiers; plays the conversations and records every request;
  off     no prefix cache; replays the recorded requests;
  second  a fresh server on the same Redis; replays them, so what `on` computed comes from the remote tier.
Then, for prompts of growing length, TTFT of a recompute (`off`) vs a fetch from Redis (`second`): the prefix
length above which fetching beats recomputing, with the KV bytes each fetch moved and its rate in MB/s.

TTFT is reported over all requests and separately for first turns and cached turns (turns >= 2 of a session,
whose prefix an earlier turn computed): the cache's claim is about a cached turn against its recompute. Before
anything is timed every server plays the workload once with other text, then compiles every shape the runs can
use (each prefill/extend row count and length bucket, decode, sampling, the page copies of the host and remote
tiers); the JSON records how many programs were still traced during each measured run (0 expected)
and the radix cache's page moves in it (evictions, host-tier spills and loads, remote writes).

GPU (default): a random-weight model with Qwen2.5-Coder-1.5B's shapes, bf16; --model-shape 7b: Qwen2.5-Coder-7B's
(~57 KB of KV per token vs 28 KB, ~5x the FLOPs per token: recompute costs more per byte fetched). CPU: --tiny,
the fixture checkpoint (a smoke test of this script, under a minute). Random weights emit arbitrary ids, so the
servers render each output token as its vocabulary string (the fixture tokenizer's, modulo its size): every token
streams at once.
Prompts are tokenized with the fixture tokenizer (no Qwen tokenizer is available offline): workload sizes are
given in those tokens. Client and servers share one process (the GIL): TTFT includes that overhead for all runs.

Run on the GPU machine:  python benchmarks/agent_trace.py [--model-shape 7b]            (CPU: --tiny)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import device, table, versions, write_result  # noqa: E402
from benchmarks.decode import QWEN25_CODER_1_5B, QWEN25_CODER_7B  # noqa: E402
from serve.server import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen2"
MODEL_SHAPES = {"1.5b": QWEN25_CODER_1_5B, "7b": QWEN25_CODER_7B}


@dataclass(frozen=True)
class Shape:
    """Workload sizes (fixture-tokenizer tokens) and server sizes for one mode."""

    sessions: int
    turns: int
    system_tokens: int  # instructions + repository map + tool list
    files: int  # files per session, re-sent every turn
    file_tokens: int
    reread_tokens: int  # the tool result appended each turn
    max_tokens: int  # answer length per turn
    max_slots: int
    page_size: int
    max_seq_len: int
    num_pages: int  # small enough that the device cache cannot hold every session: the host tier matters
    host_pages: int
    prefill_chunk: int
    decode_steps: int
    probe_lengths: tuple[int, ...]  # prefix lengths for the fetch-vs-recompute crossover
    probe_reps: int
    prefill_decode_steps: int = 1  # decode steps of a server call that also prefills (ServeConfig)
    max_prefill_rows: int = ServeConfig.max_prefill_rows  # prompts a server prefills in one call
    switch_interval_ms: float = ServeConfig.switch_interval_ms  # the process's GIL switch interval (ServeConfig)
    remote_overlap: bool = ServeConfig.remote_overlap  # the second server recomputes a remote hit's head meanwhile
    remote_min_tokens: int = ServeConfig.remote_min_tokens  # the second server recomputes shorter remote hits


# ~8k-token first prompts growing ~700 a turn, 128-token answers: an agent's prompts run 37x to 2,494x its outputs
GPU = Shape(sessions=8, turns=4, system_tokens=3072, files=3, file_tokens=1536, reread_tokens=512, max_tokens=128,
            max_slots=8, page_size=16, max_seq_len=16384, num_pages=5120, host_pages=8192, prefill_chunk=512,
            decode_steps=8, probe_lengths=(1024, 2048, 4096, 8192, 12288, 15360), probe_reps=3)
TINY = Shape(sessions=6, turns=3, system_tokens=64, files=1, file_tokens=24, reread_tokens=16, max_tokens=8,
             max_slots=4, page_size=8, max_seq_len=512, num_pages=200, host_pages=512, prefill_chunk=64,
             decode_steps=4, probe_lengths=(32, 64, 128, 256), probe_reps=2,
             remote_overlap=False, remote_min_tokens=0)  # every remote hit fetched whole: the tests count them

TOOLS = [
    ("read_file", "Read a file of the repository", {"path": "string", "start_line": "integer", "end_line": "integer"}),
    ("write_file", "Replace a file's contents", {"path": "string", "content": "string"}),
    ("apply_edit", "Apply a partial edit with `// ... existing code ...` markers", {"path": "string",
                                                                                    "update": "string"}),
    ("grep", "Search the repository with a regular expression", {"pattern": "string", "glob": "string"}),
    ("list_dir", "List a directory", {"path": "string"}),
    ("run_tests", "Run pytest on some test files and return the summary", {"paths": "array"}),
    ("run_command", "Run a shell command in the repository root", {"command": "string", "timeout_s": "integer"}),
]

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- the workload ------------------------------------------------------------------------------------------------


class Workload:
    """Builds the sessions' messages from this repository's own files, cut to token budgets."""

    def __init__(self, shape: Shape, tokenizer, salt: str = ""):
        self.shape, self.tok, self.salt = shape, tokenizer, salt
        self.sources = sorted(p for p in ROOT.glob("*/*.py") if ".venv" not in p.parts and p.stat().st_size > 2000)
        assert len(self.sources) >= shape.files, "too few source files to build the workload from"
        repo_map = "\n".join(f"- {p.relative_to(ROOT)}: {self._first_line(p)}" for p in self.sources)
        tools = json.dumps([{"type": "function", "function": {"name": n, "description": d, "parameters": {
            "type": "object", "properties": {k: {"type": v} for k, v in props.items()}}}} for n, d, props in TOOLS])
        readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else ""
        head = (f"{salt}You are a coding agent working in the codegen-jax repository. Use the tools to read and "
                "edit files; keep edits small; run the tests you touch.\n\n# Tools\n" + tools + "\n\n")
        tail = "\n\n# Repository\n" + repo_map + "\n\n# README\n" + readme
        # the tool list first (in tiny mode it is cut too), then the repository map and README to the budget
        self.system = self.cut(head + tail, shape.system_tokens)

    @staticmethod
    def _first_line(p: Path) -> str:
        text = p.read_text().lstrip()
        return text.strip('"').splitlines()[0][:80] if text.startswith('"""') else "(no docstring)"

    def cut(self, text: str, n_tokens: int) -> str:
        ids = self.tok.encode(text, add_special_tokens=False)[: max(0, n_tokens)]
        return self.tok.decode(ids)

    def files_of(self, s: int) -> list[Path]:
        return [self.sources[(s * self.shape.files + i) % len(self.sources)] for i in range(self.shape.files)]

    def read(self, path: Path, n_tokens: int) -> str:
        return f"<file path=\"{path.relative_to(ROOT)}\">\n{self.cut(path.read_text(), n_tokens)}\n</file>"

    def first_messages(self, s: int) -> list[dict]:
        files = "\n".join(self.read(p, self.shape.file_tokens) for p in self.files_of(s))
        task = f"{self.salt}Task {s}: tidy up the error handling in these files and keep the tests passing.\n\n"
        return [{"role": "system", "content": self.system}, {"role": "user", "content": task + files}]

    def next_messages(self, s: int, t: int, messages: list[dict], answer: str) -> list[dict]:
        """The conversation after turn t: the answer, then the tool result re-reading one of the files."""
        path = self.files_of(s)[t % self.shape.files]
        result = f"Tool result (read_file {path.relative_to(ROOT)}), step {t + 1}:\n"
        return messages + [{"role": "assistant", "content": answer},
                           {"role": "user", "content": result + self.read(path, self.shape.reread_tokens)}]


class IdText:
    """The fixture tokenizer, with `decode` rendering each id on its own (modulo the vocabulary; a partial UTF-8
    character as "?"): a random-weight model's ids, of a larger vocabulary, stream as text one token at a time,
    and an answer re-encodes to about as many tokens as it had."""

    def __init__(self, inner):
        self.inner = inner
        pieces = [inner.decode([i]) for i in range(inner.vocab_size)]
        self.vocab = [p if p and "\ufffd" not in p else "?" for p in pieces]

    def decode(self, ids, **kw) -> str:
        return "".join(self.vocab[i % len(self.vocab)] for i in ids)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---- the client -----------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    ttft_s: float
    latency_s: float
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    session: int = -1
    turn: int = -1  # 0: the session's first turn; >= 1: a cached turn (an earlier turn computed its prefix)
    id: str = ""  # the server's request id (the response's, less its prefix)
    queue_s: float = float("nan")  # the server's split of TTFT: submission to a slot, then slot to first token
    prefill_s: float = float("nan")


async def chat(client, url: str, messages: list[dict], max_tokens: int, model: str) -> Turn:
    """One streamed, greedy chat request; TTFT is the first chunk that carries text (or the finish)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage, rid = None, [], None, ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"{url}: {obj['error']}")
            usage = obj.get("usage") or usage
            rid = obj.get("id", rid)
            for ch in obj["choices"]:
                content = ch["delta"].get("content")
                if ttft is None and (content or ch.get("finish_reason")):
                    ttft = time.perf_counter() - t0
                if content:
                    text.append(content)
    assert usage is not None and ttft is not None, "the stream ended without usage or tokens"
    return Turn(ttft, time.perf_counter() - t0, "".join(text), usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"],
                id=rid.removeprefix("chatcmpl-"))


def p50_ms(seconds) -> float:
    import numpy as np

    v = [x for x in seconds if x == x]  # NaN: the server kept no record of it
    return round(float(np.median(v)) * 1e3, 1) if v else float("nan")


def ttft_ms(turns: list[Turn], q: float) -> float:
    import numpy as np

    return round(float(np.percentile([t.ttft_s * 1e3 for t in turns], q)), 1) if turns else float("nan")


@dataclass
class Run:
    name: str
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    tiers: dict[str, float] = field(default_factory=dict)  # cached tokens per tier / prompt tokens
    traced: int = 0  # programs traced (compiled or loaded from the persistent cache) during the run
    pages: dict[str, int] = field(default_factory=dict)  # the radix cache's page moves during the run

    @property
    def first(self) -> list[Turn]:
        return [t for t in self.turns if t.turn == 0]

    @property
    def cached(self) -> list[Turn]:
        return [t for t in self.turns if t.turn >= 1]

    def row(self) -> dict:
        import numpy as np

        ttft = np.array([t.ttft_s for t in self.turns]) * 1e3
        prompt = sum(t.prompt_tokens for t in self.turns)
        out = sum(t.completion_tokens for t in self.turns)
        return {"run": self.name, "requests": len(self.turns), "prompt_tok_mean": round(prompt / len(self.turns)),
                **{f"hit_{k}": round(v, 3) for k, v in self.tiers.items()},
                "hit_total": round(sum(self.tiers.values()), 3),
                "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
                "ttft_p90_ms": round(float(np.percentile(ttft, 90)), 1),
                "ttft_first_p50_ms": ttft_ms(self.first, 50), "ttft_cached_p50_ms": ttft_ms(self.cached, 50),
                "ttft_cached_p90_ms": ttft_ms(self.cached, 90),
                "cached_queue_p50_ms": p50_ms(t.queue_s for t in self.cached),
                "cached_prefill_p50_ms": p50_ms(t.prefill_s for t in self.cached),
                "out_tok_s": round(out / self.wall_s, 1), "prompt_tok_s": round(prompt / self.wall_s, 1),
                "wall_s": round(self.wall_s, 2), "traced": self.traced, **self.pages}


def cached_turns(off: Run, runs: list[Run]) -> dict:
    """TTFT of cached turns (turns >= 2) against the same requests' recompute (`off`), and of first turns."""
    import numpy as np

    def mean_ms(turns):
        return round(float(np.mean([t.ttft_s for t in turns])) * 1e3, 1)

    out = {"requests": len(off.cached), "off": {"first_p50_ms": ttft_ms(off.first, 50),
                                                "cached_p50_ms": ttft_ms(off.cached, 50),
                                                "cached_p90_ms": ttft_ms(off.cached, 90),
                                                "cached_mean_ms": mean_ms(off.cached)}}
    for run in runs:
        p50, mean = ttft_ms(run.cached, 50), mean_ms(run.cached)
        out[run.name] = {"first_p50_ms": ttft_ms(run.first, 50), "cached_p50_ms": p50,
                         "cached_p90_ms": ttft_ms(run.cached, 90), "cached_mean_ms": mean,
                         "cached_p50_reduction_pct": round(100 * (1 - p50 / out["off"]["cached_p50_ms"]), 1),
                         "cached_mean_reduction_pct": round(100 * (1 - mean / out["off"]["cached_mean_ms"]), 1)}
    return out


async def play(url: str, w: Workload, model: str, recorded: list[list[list[dict]]] | None = None) -> tuple[
        list[Turn], list[list[list[dict]]]]:
    """Runs every session concurrently: live (recording each request's messages) or replaying `recorded`."""
    import httpx

    turns: list[Turn] = []
    record: list[list[list[dict]]] = [[] for _ in range(w.shape.sessions)]

    async def session(client, s: int) -> None:
        if recorded is not None:
            for t, messages in enumerate(recorded[s]):
                turn = await chat(client, url, messages, w.shape.max_tokens, model)
                turn.session, turn.turn = s, t
                turns.append(turn)
            return
        messages = w.first_messages(s)
        for t in range(w.shape.turns):
            record[s].append(messages)
            turn = await chat(client, url, messages, w.shape.max_tokens, model)
            turn.session, turn.turn = s, t
            turns.append(turn)
            messages = w.next_messages(s, t, messages, turn.text)

    limits = httpx.Limits(max_connections=w.shape.sessions + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(session(client, s) for s in range(w.shape.sessions)))
    return turns, record


def measure(name: str, server, w: Workload, model: str, recorded=None) -> tuple[Run, list]:
    metrics, radix = server.state.scheduler.metrics, server.state.scheduler.radix
    before, traced, n_fetches = metrics.totals(), TRACES.count, len(metrics.fetches)
    moves = dict(radix.stats) if radix is not None else {}
    t = time.perf_counter()
    turns, record = asyncio.run(play(server.url, w, model, recorded))
    run = Run(name, turns, time.perf_counter() - t)
    after = metrics.totals()
    for turn in turns:  # the server's split of each TTFT (same process)
        turn.queue_s, turn.prefill_s = metrics.first_tokens.get(turn.id, (float("nan"),) * 2)
    run.traced = TRACES.count - traced
    prompt = after["prompt"] - before["prompt"]
    run.tiers = {tier: (after[tier] - before[tier]) / max(1, prompt) for tier in ("device", "host", "remote")}
    if radix is not None:  # evictions, host spills and loads, remote writes: where the run's host time may go
        run.pages = {k: v - moves.get(k, 0) for k, v in sorted(radix.stats.items())}
    fetches = list(metrics.fetches)[n_fetches:]  # the run's remote fetches: pages and time by phase
    if fetches:
        import numpy as np

        run.pages["fetches"] = len(fetches)
        for i, phase in enumerate(("queued", "read", "device"), start=1):
            run.pages[f"fetch_{phase}_p50_ms"] = round(float(np.median([f[i] for f in fetches])) * 1e3, 1)
        run.pages["fetch_pages_p50"] = int(np.median([f[0] for f in fetches]))
    log(f"{name}: {len(turns)} requests in {run.wall_s:.1f}s, {run.traced} programs traced")
    return run, record


# ---- warm-up -----------------------------------------------------------------------------------------------------


class TraceCounter:
    """Counts programs JAX traces (every jit cache miss: a compile or a load from the persistent cache)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration_s: float, **kw) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            self.count += 1


TRACES = TraceCounter()


def warm_shapes(scheduler, max_tokens: int) -> None:
    """Compiles, on the engine thread (between iterations, while the server is idle), every program a run of
    requests up to `max_tokens` long (prompt + output) can use: prefill/extend for each padded row count and length
    bucket, the first-token sampler, the fused decode (each step count), and the page copies of the host and remote
    tiers (a gather and a scatter per power-of-two count). Free slots' page tables point at the scratch page:
    nothing cached changes."""
    import numpy as np

    from codegen_jax.engine import bucket

    def run() -> None:
        engine, kv = scheduler.engine, scheduler.kv
        ecfg = engine.cfg
        free = [s for s, r in enumerate(scheduler.slots) if r is None]
        assert len(free) == ecfg.max_slots, "warm_shapes runs on an idle server"
        row_classes = sorted({1 << max(0, n - 1).bit_length()
                              for n in range(1, min(scheduler.cfg.max_prefill_rows, ecfg.max_slots) + 1)})
        lengths = sorted({bucket(n, ecfg.prefill_chunk) for n in range(1, ecfg.prefill_chunk + 1)})
        for rows in row_classes:
            slots = free[:rows]
            for T in lengths:
                logits = engine.prefill_rows(slots, [[0] * T] * rows, [0] * rows)
                idx = slots + [0] * (logits.shape[0] - rows)
                positions = np.full(logits.shape[0], T, np.int32)
                scheduler._sample(logits, scheduler.seeds[idx], positions, scheduler.temperature[idx],
                                  scheduler.top_k[idx], scheduler.top_p[idx], greedy=True)  # requests: greedy
        kv.lengths[free] = 0
        active = np.zeros(ecfg.max_slots, bool)
        for n_steps in scheduler.decode_step_counts():  # with and without a prefill in the same call
            engine.decode(scheduler.last, active, scheduler.seeds, scheduler.temperature, scheduler.top_k,
                          scheduler.top_p, greedy=True, n_steps=n_steps)
        if scheduler.radix is not None:  # page copies: host tier spills and loads, remote writes and fetches
            from serve.radix_cache import dtype_of, page_array_shape

            shape, dtype = page_array_shape(kv), dtype_of(kv)
            pages = min(kv.max_pages, -(-max_tokens // ecfg.page_size))
            n = 1
            while n < 2 * pages:  # gathers and scatters compile once per power-of-two count
                kv.read_pages([0] * n)
                kv.write_pages([0] * n, np.zeros((n, *shape), dtype))
                n *= 2
        np.asarray(kv.pages[0][0][0, 0, 0])  # wait for it all

    scheduler.call(run).result()


# ---- fetch vs recompute ------------------------------------------------------------------------------------------


def crossover(servers: dict, shape: Shape, vocab: int, model: str, kv_bytes_per_token: int) -> tuple[
        list[dict], int | None]:
    """TTFT of a prompt whose first L tokens are in Redis (fetched by `second`) vs recomputed (`off`), and on
    `on`'s device for reference; `second` takes each remote hit two ways, on prompts of its own: fetching all of it
    (redis) and with remote_overlap, recomputing the head while the tail is fetched (overlap). Returns the rows and,
    for each way, the smallest L from which it beats recomputing at every L.
    A row's fetch rate: the prefix's KV bytes over the Redis hit's TTFT (redis_MB_s, everything included) and over
    what it took beyond a device hit of the same prefix (fetch_MB_s: fetch, check, copy to the device)."""
    import httpx
    import numpy as np

    rng = np.random.default_rng(0)
    http = httpx.Client(timeout=600)  # one client: a fresh one per request costs more than a small prefill

    split = {}  # the last request's (queue s, prefill s) on each server: the scheduler's side of its TTFT

    def ttft(server, ids) -> tuple[float, int]:
        t = time.perf_counter()  # one token out: the latency is the time to first token
        r = http.post(f"{server.url}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1,
                                                            "temperature": 0})
        dt = time.perf_counter() - t
        assert r.status_code == 200, r.text
        rid = r.json()["id"].removeprefix("cmpl-")
        split[id(server)] = server.state.scheduler.metrics.first_tokens.get(rid, (float("nan"),) * 2)
        return dt, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    rows = []
    for L in shape.probe_lengths:
        times = {"recompute": [], "redis": [], "device": [], "overlap": []}
        fetched = []
        second = servers["second"].state.scheduler
        second.remote_min_tokens = 0  # every probed length is fetched (read on the engine thread at arrival)
        second.remote_overlap = False  # the plain fetch first, whatever the server runs with (--remote-overlap)
        for rep in range(shape.probe_reps + 1):  # rep 0 compiles this length's shapes: not counted
            # L cached tokens: every full page before the last token; a second prompt for the overlapped hit
            ids, ids2 = (rng.integers(0, vocab, L + 1).tolist() for _ in range(2))
            for x in (ids, ids2):
                ttft(servers["on"], x)
            servers["on"].state.scheduler.remote.drain()
            dev, dev_cached = ttft(servers["on"], ids)
            red, red_cached = ttft(servers["second"], ids)
            phases = (*(second.metrics.fetches[-1][1:] if second.metrics.fetches else (0.0,) * 3),
                      *split[id(servers["second"])])
            second.remote_overlap = True  # read on the engine thread when the request arrives
            try:
                ovl, ovl_cached = ttft(servers["second"], ids2)
            finally:
                second.remote_overlap = False
            rec, _ = ttft(servers["off"], ids)
            assert dev_cached == L and red_cached == L and 0 < ovl_cached <= L, (L, dev_cached, red_cached,
                                                                                 ovl_cached)
            if rep:
                times["device"].append(dev)
                times["redis"].append(red)
                times["overlap"].append(ovl)
                times["recompute"].append(rec)
                fetched.append(ovl_cached)
                for name, t in zip(("fetch_queued", "fetch_read", "fetch_device", "redis_queue", "redis_prefill"),
                                   phases, strict=True):
                    times.setdefault(name, []).append(t)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        mb = L * kv_bytes_per_token / 1e6
        extra_ms = med["redis"] - med["device"]
        rows.append({"prefix_tokens": L, "recompute_ms": round(med["recompute"], 2),
                     "redis_fetch_ms": round(med["redis"], 2), "device_hit_ms": round(med["device"], 2),
                     "fetch_speedup": round(med["recompute"] / med["redis"], 2),
                     "overlap_ms": round(med["overlap"], 2), "overlap_fetched_tokens": int(np.median(fetched)),
                     "overlap_speedup": round(med["recompute"] / med["overlap"], 2), "kv_MB": round(mb, 2),
                     # the Redis hit's fetch by phase: waiting for a fetcher, reading + checking, device copy after
                     **{f"{k}_ms": round(med[k], 2) for k in ("fetch_queued", "fetch_read", "fetch_device")},
                     # and the scheduler's split of its TTFT: arrival to a slot (the fetch within), slot to token
                     **{f"{k}_ms": round(med[k], 2) for k in ("redis_queue", "redis_prefill")},
                     "redis_MB_s": round(mb / med["redis"] * 1e3, 1),
                     "fetch_MB_s": round(mb / extra_ms * 1e3, 1) if extra_ms > 0 else None})
        log(f"probe L={L}: recompute {med['recompute']:.1f} ms, redis {med['redis']:.1f} ms ({mb:.1f} MB), "
            f"overlap {med['overlap']:.1f} ms")
    http.close()

    def above(col: str) -> int | None:
        wins = [r[col] < r["recompute_ms"] for r in rows]
        return next((rows[i]["prefix_tokens"] for i in range(len(rows)) if all(wins[i:])), None)

    return rows, above("redis_fetch_ms"), above("overlap_ms")


# ---- main ------------------------------------------------------------------------------------------------------------


def build_model(tiny: bool, model_shape: str = "1.5b"):
    import jax.numpy as jnp

    from codegen_jax import ModelConfig, Tokenizer, init_model, load_model

    tokenizer = Tokenizer.from_dir(FIXTURE)
    if tiny:
        return load_model(FIXTURE, dtype=jnp.float32, progress=False), tokenizer, "fixture-qwen2"
    cfg = ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **MODEL_SHAPES[model_shape])
    return init_model(cfg, dtype=jnp.bfloat16), tokenizer, f"random-qwen2.5-coder-{model_shape}-seed0"


def kv_bytes_per_token(cfg, dtype: str) -> int:
    """K and V of every layer for one token."""
    import numpy as np

    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def start_servers(model, tokenizer, fingerprint: str, shape: Shape, dtype: str, redis_url: str) -> dict:
    from serve.server import BackgroundServer, ServeConfig, assemble

    servers = {}
    for name, cache in (("on", True), ("off", False), ("second", True)):
        cfg = ServeConfig(model=str(FIXTURE), served_model_name="agent", dtype=dtype, max_seq_len=shape.max_seq_len,
                          page_size=shape.page_size, max_slots=shape.max_slots, num_pages=shape.num_pages,
                          prefill_chunk=shape.prefill_chunk, decode_steps=shape.decode_steps,
                          prefill_decode_steps=shape.prefill_decode_steps, max_prefill_rows=shape.max_prefill_rows,
                          prefix_cache=cache,
                          host_pages=shape.host_pages if cache else 0, remote=redis_url if cache else None,
                          max_queue=4 * shape.sessions + 16, drain_timeout_s=30,
                          switch_interval_ms=shape.switch_interval_ms,
                          remote_overlap=shape.remote_overlap and name == "second",
                          remote_min_tokens=shape.remote_min_tokens,
                          speculator="none")  # chat requests only: the default apply speculator would compile
        # its verify widths at start-up (~100 s per server for the 7B shape on the H200) for requests never sent
        # one model, three alike engines: they share compiled programs (each prefill shape is traced once, not 3x)
        app, state = assemble(cfg, model, IdText(tokenizer), fingerprint, share_programs=True)
        servers[name] = BackgroundServer(app).start()
        servers[name].state = state
    return servers


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="fixture checkpoint on the CPU: a smoke test of this script")
    p.add_argument("--model-shape", choices=list(MODEL_SHAPES), default="1.5b",
                   help="random-weight Qwen2.5-Coder shapes on the GPU (ignored with --tiny)")
    p.add_argument("--sessions", type=int, default=None, help="concurrent agent sessions (default: per mode)")
    p.add_argument("--turns", type=int, default=None, help="turns per session (default: per mode)")
    p.add_argument("--redis", default=None, help="redis://HOST:PORT to use (default: start a redis-server here)")
    p.add_argument("--no-probe", action="store_true", help="skip the fetch-vs-recompute crossover")
    p.add_argument("--prefill-decode-steps", type=int, default=None,
                   help="decode steps of a server call that also prefills (default: the servers' default, 1)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="device KV pages per server (default: per mode; the GPU shape's 5120 make admission wait "
                   "for pages and evict to the host tier)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="longest prefill piece per prompt and call, a power of two (default: per mode)")
    p.add_argument("--max-prefill-rows", type=int, default=None,
                   help="prompts a server prefills in one call (default: the servers' default, 2)")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the servers' GIL switch interval (default: ServeConfig's)")
    p.add_argument("--remote-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="the second server recomputes each remote hit's head while its tail is fetched (default: "
                   "ServeConfig's, on)")
    p.add_argument("--remote-min-tokens", type=int, default=None,
                   help="the servers recompute remote hits shorter than this (default: ServeConfig's; the probe "
                   "fetches every length)")
    p.add_argument("--results-dir", default=None, help="write the JSON here instead of benchmarks/results (tests)")
    args = p.parse_args(argv)

    import dataclasses

    import jax

    from codegen_jax.jit_cache import enable_compilation_cache

    # every server compiles the same programs: on a GPU the second and third load them from the persistent cache
    enable_compilation_cache(min_compile_time_s=0)
    jax.monitoring.register_event_duration_secs_listener(TRACES)
    if args.tiny:
        jax.config.update("jax_default_matmul_precision", "highest")  # as the tests: exact across cache paths

    from serve.redis_process import RedisProcess

    shape = TINY if args.tiny else GPU
    shape = dataclasses.replace(shape, **{k: v for k, v in (("sessions", args.sessions), ("turns", args.turns),
                                                             ("prefill_decode_steps", args.prefill_decode_steps),
                                                             ("max_prefill_rows", args.max_prefill_rows),
                                                             ("num_pages", args.num_pages),
                                                             ("prefill_chunk", args.prefill_chunk),
                                                             ("switch_interval_ms", args.switch_interval_ms),
                                                             ("remote_overlap", args.remote_overlap),
                                                             ("remote_min_tokens", args.remote_min_tokens))
                                          if v is not None})
    sys.setswitchinterval(shape.switch_interval_ms / 1e3)  # as `codegen-jax serve` sets it for its process
    model, tokenizer, fingerprint = build_model(args.tiny, args.model_shape)
    dtype = "float32" if args.tiny else "bfloat16"
    kv_bytes = kv_bytes_per_token(model.cfg, dtype)
    log(f"model ready ({fingerprint}, {kv_bytes} KV bytes per token) on {device()}")
    redis = None if args.redis else RedisProcess().start()
    servers = start_servers(model, tokenizer, fingerprint, shape, dtype, args.redis or redis.url)
    try:
        # warm-up: the same workload with other text, on every server (the second server fetches the warm-up's
        # pages from Redis), then every shape a request as long as the longest one (+25%: answers differ between
        # runs) or the probe can use, so that no measured request waits for a compile
        traced = TRACES.count
        for name, server in servers.items():  # the prefill classes first: they compile side by side in threads
            t, sch = time.perf_counter(), server.state.scheduler
            rows = min(sch.cfg.max_prefill_rows, sch.engine.cfg.max_slots)
            sch.call(lambda sch=sch, rows=rows: sch.engine.warmup_prefill(rows=rows)).result()
            log(f"{name}: prefill classes compiled in {time.perf_counter() - t:.1f}s")
        warm = Workload(shape, tokenizer, salt="(warm-up) ")
        warm_turns, warm_record = asyncio.run(play(servers["on"].url, warm, "agent"))
        servers["on"].state.scheduler.remote.drain()
        for name in ("off", "second"):
            asyncio.run(play(servers[name].url, warm, "agent", warm_record))
        longest = max([int(1.25 * max(t.prompt_tokens for t in warm_turns))]
                      + ([] if args.no_probe else [max(shape.probe_lengths) + 1]))
        for name, server in servers.items():
            t = time.perf_counter()
            warm_shapes(server.state.scheduler, longest + shape.max_tokens + shape.decode_steps)
            log(f"{name}: every shape compiled in {time.perf_counter() - t:.1f}s")
        warm_traces = TRACES.count - traced
        log(f"warm-up done ({warm_traces} programs traced)")

        w = Workload(shape, tokenizer)
        on, record = measure("cache on", servers["on"], w, "agent")
        servers["on"].state.scheduler.remote.drain()
        off, _ = measure("cache off", servers["off"], w, "agent", record)
        second, _ = measure("second server (redis)", servers["second"], w, "agent", record)
        runs = [off, on, second]
        remote_stats = {n: dict(servers[n].state.scheduler.remote.stats) for n in ("on", "second")}
        traced = TRACES.count
        probe, above, above_overlap = ([], None, None) if args.no_probe else crossover(
            servers, shape, model.cfg.vocab_size, "agent", kv_bytes)
        probe_traces = TRACES.count - traced
    finally:
        for s in servers.values():
            s.stop()
        if redis is not None:
            redis.kill()

    rows = [r.row() for r in runs]
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))  # `off` has no page moves
    cached = cached_turns(off, [on, second])
    on_c, second_c = cached["cache on"], cached["second server (redis)"]
    print(f"\ncached turns (>= 2 of a session, {cached['requests']} requests), TTFT p50: off "
          f"{cached['off']['cached_p50_ms']} ms, on {on_c['cached_p50_ms']} ms ({on_c['cached_p50_reduction_pct']}% "
          f"below), second server {second_c['cached_p50_ms']} ms ({second_c['cached_p50_reduction_pct']}% below)")
    if probe:
        print()
        print(table(probe, list(probe[0])))
        print(f"fetching from Redis beats recomputing for prefixes of {above} tokens and more" if above else
              f"recomputing beat fetching from Redis at every probed length (up to {shape.probe_lengths[-1]})")
        print(f"fetching the tail while recomputing the head beats recomputing from {above_overlap} tokens"
              if above_overlap else "recomputing beat the overlapped fetch at every probed length")
    prompt_lens = [t.prompt_tokens for t in on.turns]
    result = {
        "device": device(), "versions": versions("jax", "jaxlib", "fastapi", "uvicorn", "redis"),
        "model": fingerprint, "model_shape": "tiny" if args.tiny else args.model_shape,
        "kv_bytes_per_token": kv_bytes, "shape": dataclasses.asdict(shape), "warm_up_traces": warm_traces,
        "workload": {"requests": len(on.turns), "prompt_tokens_mean": sum(prompt_lens) / len(prompt_lens),
                     "prompt_tokens_max": max(prompt_lens), "system_prompt_chars": len(w.system)},
        "runs": rows, "cached_turns": cached, "remote": remote_stats, "fetch_vs_recompute": probe,
        "redis_beats_recompute_above_tokens": above, "overlap_beats_recompute_above_tokens": above_overlap,
        "probe_traces": probe_traces,
        "note": "client and servers in one process; TTFT measured by the client at the first streamed token",
    }
    if args.results_dir:
        common.RESULTS = Path(args.results_dir)
    name = "agent_trace_tiny" if args.tiny else "agent_trace" if args.model_shape == "1.5b" else "agent_trace_7b"
    path = write_result(name, result)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
