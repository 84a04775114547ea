"""Builds a server from a checkpoint directory and runs it under uvicorn (`codegen-jax serve`)."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("codegen_jax.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `codegen-jax serve` takes; see `codegen-jax serve --help`."""

    model: str
    drafter: str | None = None  # a block or EAGLE-3 checkpoint; picks that speculator
    speculator: str | None = None  # apply | suffix | block | eagle3 | none; None: from --drafter, else apply
    speculate: str | None = None  # which requests use it: apply (/v1/apply only) | all; None: all with a drafter
    draft_len: int = 0  # longest draft (0: the drafter's default)
    remote: str | None = None  # redis://HOST:PORT, memory://, or None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    dtype: str = "bfloat16"
    max_seq_len: int = 4096
    page_size: int = 16
    max_slots: int = 8
    num_pages: int = 0
    prefill_chunk: int = 512
    decode_steps: int = 8
    prefill_decode_steps: int = 1  # decode steps of a call that also prefills (SchedulerConfig)
    max_prefill_rows: int = 2  # prompts prefilled in one call, a chunk each (SchedulerConfig)
    prefix_cache: bool = True
    host_pages: int = 0
    # a remote hit: recompute its head while its tail is fetched, and recompute hits shorter than 2,048 tokens
    # whole (SchedulerConfig). H200, Qwen2.5-Coder-7B, Redis on the same box (agent_trace_7b_probe.json): the
    # overlapped fetch beat recomputing from 2,048 tokens (1.01x; 1.14x at 4k, 1.42x at 12k), the plain fetch from
    # 8,192 (1.02x; 1.20x at 12k); the trace's cached turns on the second server: 163.6 ms TTFT p50 with these
    # against 318.8 ms fetching every hit whole (agent_trace_7b_sweep/overlap_min2048_c71493c.json, rows2_762dc0c.json)
    remote_overlap: bool = True
    remote_min_tokens: int = 2048
    tp: int = 1  # devices the model is split over (tensor parallel), times ep (experts) for MoE models
    ep: int = 1
    tp_strategy: str = "auto"
    tp_microbatches: int = 1  # prefill chunks as micro-batches interleaved layer by layer (Transformer.microbatches)
    max_queue: int = 256
    max_body_bytes: int = 8 << 20
    drain_timeout_s: float = 30.0
    # the process's GIL switch interval: threads that wait on sockets (remote fetches, HTTP) get the GIL back within
    # this of their data arriving while the engine thread runs Python (CPython's default, 5 ms, cut a remote fetch
    # under a busy Python thread to ~1/10 of its idle rate: benchmarks/redis_fetch.py's "busy" rows)
    switch_interval_ms: float = 0.2
    warmup: bool = True  # compile the speculative step's verify widths before serving

    def __post_init__(self):
        if self.speculator not in (None, "none", "apply", "suffix", "block", "eagle3"):
            raise ValueError(f"speculator must be apply, suffix, block, eagle3 or none, got {self.speculator!r}")
        if self.speculate not in (None, "apply", "all"):
            raise ValueError(f"speculate must be apply or all, got {self.speculate!r}")
        if self.draft_len < 0:
            raise ValueError(f"draft length must be >= 0, got {self.draft_len}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout_s}")
        if self.tp < 1 or self.ep < 1:
            raise ValueError(f"--tp and --ep must be >= 1, got {self.tp} and {self.ep}")
        if self.remote_min_tokens < 0:
            raise ValueError(f"remote min tokens must be >= 0, got {self.remote_min_tokens}")
        if not self.switch_interval_ms > 0:
            raise ValueError(f"switch interval must be > 0 ms, got {self.switch_interval_ms}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")

    @property
    def model_id(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def build(cfg: ServeConfig):
    """Loads the model and tokenizer, and wires engine, scheduler, tiers and app. Returns (app, ServeState)."""
    import jax.numpy as jnp

    from codegen_jax.checkpoint import load_model
    from codegen_jax.parallel import replica_mesh
    from codegen_jax.tokenizer import Tokenizer

    model = load_model(cfg.model, dtype=getattr(jnp, cfg.dtype), progress=False, mesh=replica_mesh(cfg.tp, cfg.ep))
    return assemble(cfg, model, Tokenizer.from_dir(cfg.model), _fingerprint(cfg.model))


def assemble(cfg: ServeConfig, model, tokenizer, fingerprint: str, *, share_programs: bool = False):
    """Wires engine, scheduler, tiers and app around a loaded model (the benchmarks pass a random-weight one).
    `fingerprint` names the weights in remote keys: servers share KV pages only when it matches. share_programs:
    the engine shares compiled programs with the alike engines of this process (EngineConfig.share_programs)."""
    from codegen_jax.engine import EngineConfig
    from codegen_jax.parallel import replica_engine, replica_mesh
    from drafters.factory import build_speculator, neural_kind
    from serve.app import ServeState, create_app
    from serve.protocol import Limits
    from serve.remote_tier import open_store
    from serve.scheduler import Scheduler, SchedulerConfig

    engine = replica_engine(model, EngineConfig(max_slots=cfg.max_slots, page_size=cfg.page_size,
                                                max_seq_len=cfg.max_seq_len, num_pages=cfg.num_pages,
                                                prefill_chunk=cfg.prefill_chunk, decode_steps=cfg.decode_steps,
                                                share_programs=share_programs),
                            replica_mesh(cfg.tp, cfg.ep), cfg.tp_strategy, microbatches=cfg.tp_microbatches)
    # The apply speculator by default, for /v1/apply (an edit's output is mostly its input: long drafts, and
    # lossless, so the choice never changes an output); a drafter checkpoint serves every request.
    kind = cfg.speculator or (neural_kind(cfg.drafter) if cfg.drafter else "apply")
    speculator = None if kind == "none" else build_speculator(kind, engine, model, drafter_dir=cfg.drafter,
                                                              draft_len=cfg.draft_len)
    if speculator is not None and cfg.warmup:
        speculator.warmup()  # a width first met mid-request would compile inside someone's latency
    speculate_all = (cfg.speculate or ("all" if cfg.drafter else "apply")) == "all"
    scheduler = Scheduler(engine, SchedulerConfig(prefix_cache=cfg.prefix_cache, host_pages=cfg.host_pages,
                                                  remote_overlap=cfg.remote_overlap, max_queue=cfg.max_queue,
                                                  remote_min_tokens=cfg.remote_min_tokens,
                                                  prefill_decode_steps=cfg.prefill_decode_steps,
                                                  max_prefill_rows=cfg.max_prefill_rows),
                          remote=open_store(cfg.remote), model_id=f"{cfg.model_id}:{fingerprint}",
                          speculator=speculator)
    stop = {*model.cfg.eos_token_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    limits = Limits(cfg.model_id, cfg.max_seq_len, model.cfg.vocab_size, tuple(sorted(stop)))
    state = ServeState(tokenizer, scheduler, limits, cfg.max_body_bytes, cfg.drain_timeout_s,
                       speculate_all=speculator is not None and speculate_all)
    return create_app(state), state


def _fingerprint(model_dir: str) -> str:
    """Salts remote keys with the weights' identity, not the directory name: config.json, and each weight file's
    name, size and first 64 KiB (header and leading tensors), the same on every box holding the checkpoint."""
    import hashlib

    h = hashlib.sha256()
    for p in [Path(model_dir, "config.json"), *sorted(Path(model_dir).glob("*.safetensors"))]:
        if p.exists():
            with open(p, "rb") as f:
                h.update(f"{p.name}:{p.stat().st_size}:".encode() + f.read(1 << 16))
    return h.hexdigest()[:16]


def run(cfg: ServeConfig) -> int:
    """Serves until SIGTERM or SIGINT: new requests then get 503, in-flight ones finish (up to
    drain_timeout_s), and the process exits 0."""
    import uvicorn

    from codegen_jax.jit_cache import enable_compilation_cache

    enable_compilation_cache()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing ("no TPU") is not the server's news
    sys.setswitchinterval(cfg.switch_interval_ms / 1e3)  # the whole process's: set here, not by build/assemble
    app, state = build(cfg)

    drain: list[threading.Thread] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # refuse new work at once; in-flight requests get drain_timeout_s to finish, then the scheduler ends
            # them with finish_reason "abort", so every stream still closes with its last chunk and [DONE]
            # (uvicorn's own grace period, a little longer, would instead cut the connections)
            state.scheduler.begin_shutdown()
            if not drain:
                drain.append(threading.Thread(target=state.scheduler.stop, args=(cfg.drain_timeout_s,),
                                              name="drain", daemon=True))
                drain[0].start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version re-raises the signal after a graceful shutdown, so the process would die of
            # SIGTERM (exit -15) instead of exiting 0 once drained
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                   timeout_graceful_shutdown=math.ceil(cfg.drain_timeout_s) + 5))
    log.info("serving %s on http://%s:%d (signal %s to stop)", cfg.model_id, cfg.host, cfg.port,
             signal.Signals.SIGTERM.name)
    server.run()
    return 0


class BackgroundServer:
    """The app under uvicorn on a thread of this process, for tests and benchmarks that start their own servers:
    `with BackgroundServer(app) as s: s.url`. Leaving stops uvicorn, which drains and stops the scheduler."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        from serve.redis_process import free_port

        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        import threading
        import time

        # uvicorn installs no signal handlers off the main thread: the process's own stay in place
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on port {self.port} did not start within {timeout_s}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout_s)
            assert not self.thread.is_alive(), f"the server on port {self.port} did not stop within {timeout_s}s"
            self.thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
