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
length above which fetching beats recomputing.

GPU (default): a random-weight model with Qwen2.5-Coder-1.5B's shapes, bf16. CPU: --tiny, the fixture checkpoint
(a smoke test of this script, under a minute). Random weights emit arbitrary ids, so the servers render each
output token as its vocabulary string (the fixture tokenizer's, modulo its size): every token streams at once.
Prompts are tokenized with the fixture tokenizer (no Qwen tokenizer is available offline): workload sizes are
given in those tokens. Client and servers share one process (the GIL): TTFT includes that overhead for all runs.

Run on the GPU machine:  python benchmarks/agent_trace.py            (CPU: --tiny)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import device, table, versions, write_result  # noqa: E402
from benchmarks.decode import QWEN25_CODER_1_5B  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen2"


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


GPU = Shape(sessions=16, turns=6, system_tokens=1536, files=2, file_tokens=768, reread_tokens=384, max_tokens=128,
            max_slots=8, page_size=16, max_seq_len=16384, num_pages=4096, host_pages=8192, prefill_chunk=512,
            decode_steps=8, probe_lengths=(256, 512, 1024, 2048, 4096, 8192), probe_reps=3)
TINY = Shape(sessions=6, turns=3, system_tokens=64, files=1, file_tokens=24, reread_tokens=16, max_tokens=8,
             max_slots=4, page_size=8, max_seq_len=512, num_pages=200, host_pages=512, prefill_chunk=64,
             decode_steps=4, probe_lengths=(32, 64, 128, 256), probe_reps=2)

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


async def chat(client, url: str, messages: list[dict], max_tokens: int, model: str) -> Turn:
    """One streamed, greedy chat request; TTFT is the first chunk that carries text (or the finish)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
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
            for ch in obj["choices"]:
                content = ch["delta"].get("content")
                if ttft is None and (content or ch.get("finish_reason")):
                    ttft = time.perf_counter() - t0
                if content:
                    text.append(content)
    assert usage is not None and ttft is not None, "the stream ended without usage or tokens"
    return Turn(ttft, time.perf_counter() - t0, "".join(text), usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"])


@dataclass
class Run:
    name: str
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    tiers: dict[str, float] = field(default_factory=dict)  # cached tokens per tier / prompt tokens

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
                "out_tok_s": round(out / self.wall_s, 1), "prompt_tok_s": round(prompt / self.wall_s, 1),
                "wall_s": round(self.wall_s, 2)}


async def play(url: str, w: Workload, model: str, recorded: list[list[list[dict]]] | None = None) -> tuple[
        list[Turn], list[list[list[dict]]]]:
    """Runs every session concurrently: live (recording each request's messages) or replaying `recorded`."""
    import httpx

    turns: list[Turn] = []
    record: list[list[list[dict]]] = [[] for _ in range(w.shape.sessions)]

    async def session(client, s: int) -> None:
        if recorded is not None:
            for messages in recorded[s]:
                turns.append(await chat(client, url, messages, w.shape.max_tokens, model))
            return
        messages = w.first_messages(s)
        for t in range(w.shape.turns):
            record[s].append(messages)
            turn = await chat(client, url, messages, w.shape.max_tokens, model)
            turns.append(turn)
            messages = w.next_messages(s, t, messages, turn.text)

    limits = httpx.Limits(max_connections=w.shape.sessions + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(session(client, s) for s in range(w.shape.sessions)))
    return turns, record


def measure(name: str, server, w: Workload, model: str, recorded=None) -> tuple[Run, list]:
    metrics = server.state.scheduler.metrics
    before = metrics.totals()
    t = time.perf_counter()
    turns, record = asyncio.run(play(server.url, w, model, recorded))
    run = Run(name, turns, time.perf_counter() - t)
    after = metrics.totals()
    prompt = after["prompt"] - before["prompt"]
    run.tiers = {tier: (after[tier] - before[tier]) / max(1, prompt) for tier in ("device", "host", "remote")}
    log(f"{name}: {len(turns)} requests in {run.wall_s:.1f}s")
    return run, record


# ---- fetch vs recompute ------------------------------------------------------------------------------------------


def crossover(servers: dict, shape: Shape, vocab: int, model: str) -> tuple[list[dict], int | None]:
    """TTFT of a prompt whose first L tokens are in Redis (fetched by `second`) vs recomputed (`off`), and on
    `on`'s device for reference; returns the rows and the smallest L from which fetching wins at every L."""
    import httpx
    import numpy as np

    rng = np.random.default_rng(0)
    http = httpx.Client(timeout=600)  # one client: a fresh one per request costs more than a small prefill

    def ttft(server, ids) -> tuple[float, int]:
        t = time.perf_counter()  # one token out: the latency is the time to first token
        r = http.post(f"{server.url}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1,
                                                            "temperature": 0})
        dt = time.perf_counter() - t
        assert r.status_code == 200, r.text
        return dt, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    rows = []
    for L in shape.probe_lengths:
        times = {"recompute": [], "redis": [], "device": []}
        for rep in range(shape.probe_reps + 1):  # rep 0 compiles this length's shapes: not counted
            ids = rng.integers(0, vocab, L + 1).tolist()  # L cached tokens: every full page before the last token
            ttft(servers["on"], ids)
            servers["on"].state.scheduler.remote.drain()
            dev, dev_cached = ttft(servers["on"], ids)
            red, red_cached = ttft(servers["second"], ids)
            rec, _ = ttft(servers["off"], ids)
            assert dev_cached == L and red_cached == L, (L, dev_cached, red_cached)
            if rep:
                times["device"].append(dev)
                times["redis"].append(red)
                times["recompute"].append(rec)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        rows.append({"prefix_tokens": L, "recompute_ms": round(med["recompute"], 2),
                     "redis_fetch_ms": round(med["redis"], 2), "device_hit_ms": round(med["device"], 2),
                     "fetch_speedup": round(med["recompute"] / med["redis"], 2)})
        log(f"probe L={L}: recompute {med['recompute']:.1f} ms, redis {med['redis']:.1f} ms")
    http.close()
    wins = [r["redis_fetch_ms"] < r["recompute_ms"] for r in rows]
    above = None
    for i in range(len(rows)):
        if all(wins[i:]):
            above = rows[i]["prefix_tokens"]
            break
    return rows, above


# ---- main ------------------------------------------------------------------------------------------------------------


def build_model(tiny: bool):
    import jax.numpy as jnp

    from codegen_jax import ModelConfig, Tokenizer, init_model, load_model

    tokenizer = Tokenizer.from_dir(FIXTURE)
    if tiny:
        return load_model(FIXTURE, dtype=jnp.float32, progress=False), tokenizer, "fixture-qwen2"
    cfg = ModelConfig(model_type="qwen2", rms_norm_eps=1e-6, **QWEN25_CODER_1_5B)
    return init_model(cfg, dtype=jnp.bfloat16), tokenizer, "random-qwen2.5-coder-1.5b-seed0"


def start_servers(model, tokenizer, fingerprint: str, shape: Shape, dtype: str, redis_url: str) -> dict:
    from serve.server import BackgroundServer, ServeConfig, assemble

    servers = {}
    for name, cache in (("on", True), ("off", False), ("second", True)):
        cfg = ServeConfig(model=str(FIXTURE), served_model_name="agent", dtype=dtype, max_seq_len=shape.max_seq_len,
                          page_size=shape.page_size, max_slots=shape.max_slots, num_pages=shape.num_pages,
                          prefill_chunk=shape.prefill_chunk, decode_steps=shape.decode_steps, prefix_cache=cache,
                          host_pages=shape.host_pages if cache else 0, remote=redis_url if cache else None,
                          max_queue=4 * shape.sessions + 16, drain_timeout_s=30)
        app, state = assemble(cfg, model, IdText(tokenizer), fingerprint)
        servers[name] = BackgroundServer(app).start()
        servers[name].state = state
    return servers


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="fixture checkpoint on the CPU: a smoke test of this script")
    p.add_argument("--sessions", type=int, default=None, help="concurrent agent sessions (default: per mode)")
    p.add_argument("--turns", type=int, default=None, help="turns per session (default: per mode)")
    p.add_argument("--redis", default=None, help="redis://HOST:PORT to use (default: start a redis-server here)")
    p.add_argument("--no-probe", action="store_true", help="skip the fetch-vs-recompute crossover")
    p.add_argument("--results-dir", default=None, help="write the JSON here instead of benchmarks/results (tests)")
    args = p.parse_args(argv)

    import dataclasses

    import jax

    # every server compiles the same programs: the second and third load them from the persistent cache
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/codegen-jax/jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if args.tiny:
        jax.config.update("jax_default_matmul_precision", "highest")  # as the tests: exact across cache paths

    from serve.redis_process import RedisProcess

    shape = TINY if args.tiny else GPU
    shape = dataclasses.replace(shape, **{k: v for k, v in (("sessions", args.sessions), ("turns", args.turns))
                                          if v is not None})
    model, tokenizer, fingerprint = build_model(args.tiny)
    log(f"model ready ({fingerprint}) on {device()}")
    redis = None if args.redis else RedisProcess().start()
    servers = start_servers(model, tokenizer, fingerprint, shape, "float32" if args.tiny else "bfloat16",
                            args.redis or redis.url)
    try:
        # warm-up: the same workload with other text, on every server, so that no measured request waits for a
        # compile (the second server fetches the warm-up's pages from Redis: its fetch path compiles too)
        warm = Workload(shape, tokenizer, salt="(warm-up) ")
        _, warm_record = asyncio.run(play(servers["on"].url, warm, "agent"))
        servers["on"].state.scheduler.remote.drain()
        for name in ("off", "second"):
            asyncio.run(play(servers[name].url, warm, "agent", warm_record))
        log("warm-up done")

        w = Workload(shape, tokenizer)
        on, record = measure("cache on", servers["on"], w, "agent")
        servers["on"].state.scheduler.remote.drain()
        off, _ = measure("cache off", servers["off"], w, "agent", record)
        second, _ = measure("second server (redis)", servers["second"], w, "agent", record)
        runs = [off, on, second]
        remote_stats = {n: dict(servers[n].state.scheduler.remote.stats) for n in ("on", "second")}
        probe, above = ([], None) if args.no_probe else crossover(servers, shape, model.cfg.vocab_size, "agent")
    finally:
        for s in servers.values():
            s.stop()
        if redis is not None:
            redis.kill()

    rows = [r.row() for r in runs]
    print(table(rows, list(rows[0])))
    if probe:
        print()
        print(table(probe, list(probe[0])))
        print(f"fetching from Redis beats recomputing for prefixes of {above} tokens and more" if above else
              f"recomputing beat fetching from Redis at every probed length (up to {shape.probe_lengths[-1]})")
    prompt_lens = [t.prompt_tokens for t in on.turns]
    result = {
        "device": device(), "versions": versions("jax", "jaxlib", "fastapi", "uvicorn", "redis"),
        "model": fingerprint, "shape": dataclasses.asdict(shape),
        "workload": {"requests": len(on.turns), "prompt_tokens_mean": sum(prompt_lens) / len(prompt_lens),
                     "prompt_tokens_max": max(prompt_lens), "system_prompt_chars": len(w.system)},
        "runs": rows, "remote": remote_stats, "fetch_vs_recompute": probe,
        "redis_beats_recompute_above_tokens": above,
        "note": "client and servers in one process; TTFT measured by the client at the first streamed token",
    }
    if args.results_dir:
        common.RESULTS = Path(args.results_dir)
    path = write_result("agent_trace_tiny" if args.tiny else "agent_trace", result)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
