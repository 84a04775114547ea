"""The `codegen-jax` command line. A thin dispatcher: heavy imports happen inside the subcommands.

Bad arguments and unloadable checkpoints exit with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """Something the user gave us that we cannot use; printed as one line, exit code 2."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="codegen-jax", description="Fast inference for coding agents, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json, safetensors, "
                   "tokenizer.json)")
    g.add_argument("--prompt", required=True, help="prompt text (with --chat: the user message)")
    g.add_argument("--max-new-tokens", type=_positive, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and KV dtype")
    g.add_argument("--max-seq-len", type=_positive, default=4096, help="prompt + output limit (default 4096)")
    g.add_argument("--page-size", type=_positive, default=16, help="tokens per KV page (default 16)")
    _add_parallel(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--speculator", choices=["apply", "suffix", "block", "eagle3"], default=None,
                   help="speculative decoding: apply (drafts from the prompt, for edits), suffix (suffix tree), "
                   "block or eagle3 (neural drafters, need --drafter)")
    g.add_argument("--drafter", default=None, help="drafter checkpoint directory for --speculator block/eagle3")
    g.add_argument("--draft-len", type=_positive, default=None,
                   help="most tokens drafted per step (default: apply 64, suffix 16, neural: the checkpoint's)")
    _add_serve(sub)
    return parser


def _add_parallel(p) -> None:
    p.add_argument("--tp", type=_positive, default=1, help="tensor parallelism: devices the model is split over "
                   "(heads, MLP columns, vocabulary; default 1)")
    p.add_argument("--ep", type=_positive, default=1, help="expert parallelism for MoE models: devices the "
                   "experts are split over (default 1); --tp * --ep devices in all")
    p.add_argument("--tp-strategy", default="auto", help="collective matmuls: auto (by interconnect and message "
                   "size), xla, ring, bidi, sp, allreduce or allreduce_overlap (default auto)")
    p.add_argument("--tp-microbatches", type=_positive, default=1, help="with --tp: run prefill chunks as this many "
                   "micro-batches of at least 256 tokens each (cut at 64-token blocks), interleaved layer by layer, "
                   "so one's collectives run under another's matmuls (default 1: off; above 1 it also sets XLA "
                   "flags: the dot merger off and an all-reduce latency profile for its scheduler, see "
                   "sharding.strategy.MICROBATCH_XLA_FLAGS)")


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible, with a prefix cache)")
    s.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    s.add_argument("--drafter", default=None, help="block or EAGLE-3 drafter checkpoint: speculative decoding for "
                   "every request with it")
    s.add_argument("--speculator", choices=["apply", "suffix", "block", "eagle3", "none"], default=None,
                   help="the speculative drafter (default: the --drafter checkpoint's kind, else apply)")
    s.add_argument("--speculate", choices=["apply", "all"], default=None, help="which requests speculate: apply "
                   "(/v1/apply only; default without --drafter) or all (default with --drafter)")
    s.add_argument("--draft-len", type=int, default=0, help="longest draft (default 0: the drafter's own)")
    s.add_argument("--remote", default=None, help="shared KV store for prefix pages: redis://HOST:PORT "
                   "(several servers share prefixes through it) or memory://")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--served-model-name", default=None, help="model id in the API (default: directory name)")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and KV dtype")
    s.add_argument("--max-seq-len", type=_positive, default=4096, help="prompt + output limit (default 4096)")
    s.add_argument("--page-size", type=_positive, default=16, help="tokens per KV page (default 16)")
    s.add_argument("--max-slots", type=_positive, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--num-pages", type=int, default=0, help="device KV pages (default 0: max-slots full sequences)")
    s.add_argument("--prefill-chunk", type=_positive, default=512, help="longest prefill call, a power of two")
    s.add_argument("--decode-steps", type=_positive, default=8, help="decode steps fused per device call")
    s.add_argument("--prefill-decode-steps", type=_positive, default=1,
                   help="decode steps of a call that also prefills (default 1: a waiting prompt's first token "
                   "comes sooner; up to --decode-steps)")
    s.add_argument("--max-prefill-rows", type=_positive, default=2,
                   help="prompts prefilled in one call, a chunk each: the oldest and those with least left (default 2)")
    _add_parallel(s)
    s.add_argument("--remote-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="on a remote hit, recompute the prefix's head while its tail is fetched (split by the "
                   "measured rates; default on)")
    s.add_argument("--remote-min-tokens", type=int, default=None,
                   help="recompute remote hits shorter than this many tokens instead of fetching them (default 2048)")
    s.add_argument("--host-pages", type=int, default=0, help="host-RAM tier size in KV pages (default 0: off)")
    s.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt (for comparisons)")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip compiling the speculative step's verify widths at start-up (faster start)")
    s.add_argument("--max-queue", type=_positive, default=256, help="waiting requests before 429 (default 256)")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish "
                   "after SIGTERM before they are ended (default 30)")
    s.add_argument("--switch-interval-ms", type=float, default=0.2,
                   help="the process's GIL switch interval: how soon a thread waiting on a socket (remote fetch, "
                   "HTTP) runs while the engine thread runs Python (default 0.2; CPython's own is 5)")


def _generate(args) -> int:
    import jax.numpy as jnp

    from codegen_jax.checkpoint import load_model
    from codegen_jax.engine import EngineConfig
    from codegen_jax.jit_cache import enable_compilation_cache
    from codegen_jax.parallel import replica_engine, replica_mesh
    from codegen_jax.sampling import SamplingParams
    from codegen_jax.tokenizer import Tokenizer

    cached = enable_compilation_cache()  # compiled programs are cached across runs of the CLI (not on the CPU)
    try:
        mesh = replica_mesh(args.tp, args.ep)
        _strategy(args.tp_strategy)
        model = load_model(args.model, dtype=getattr(jnp, args.dtype), progress=not args.quiet, mesh=mesh)
        tokenizer = Tokenizer.from_dir(args.model)
    except ValueError as e:  # bad --tp/--ep, CheckpointError / ConfigError
        raise UsageError(str(e)) from e
    try:
        sampling = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=tuple({*model.cfg.eos_token_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id
                                                               is not None else [])}),
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        try:
            ids = tokenizer.encode_chat(messages)
        except ValueError as e:
            raise UsageError(str(e)) from e
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens")
    if len(ids) + args.max_new_tokens > args.max_seq_len:
        raise UsageError(f"prompt has {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that exceeds "
                         f"--max-seq-len {args.max_seq_len}")
    try:
        engine = replica_engine(model, EngineConfig(max_slots=1, page_size=args.page_size,
                                                    max_seq_len=args.max_seq_len), mesh, args.tp_strategy,
                                microbatches=args.tp_microbatches)
    except ValueError as e:  # a model whose heads or experts do not split over --tp / --ep
        raise UsageError(str(e)) from e
    spec = _speculator(args, engine, model) if args.speculator else None
    start = time.perf_counter()
    (result,) = (spec or engine).generate([ids], sampling)
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(result.tokens)
    if args.json:
        print(json.dumps({
            "prompt_tokens": len(ids),
            "tokens": result.tokens,
            "text": text,
            "finish_reason": result.finish_reason,
            "time_to_first_token_s": round(result.time_to_first_token_s, 4),
            "tokens_per_second": round(len(result.tokens) / elapsed, 2),
            **({"speculator": args.speculator, "target_forwards": result.forwards,
                "drafted_tokens": result.drafted, "accepted_tokens": result.accepted,
                "acceptance": round(result.accepted_per_forward, 3),  # mean accepted draft tokens per forward
                "tokens_per_forward": round(result.tokens_per_forward, 3)} if spec else {}),
            "note": "timings include compilation on a first run; compiled programs are cached for the next" if cached
            else "timings include compilation (the CPU backend keeps no compilation cache across runs)",
        }))
    else:
        print(text)
    return 0


def _strategy(name: str) -> str:
    from sharding.strategy import validate

    try:
        return validate(name)
    except ValueError as e:
        raise ValueError(f"--tp-strategy: {e}") from None


def _speculator(args, engine, model):
    from drafters.factory import build_speculator

    try:
        return build_speculator(args.speculator, engine, model, drafter_dir=args.drafter, draft_len=args.draft_len)
    except ValueError as e:  # CheckpointError included
        raise UsageError(str(e)) from e


def _serve(args) -> int:
    from serve.server import ServeConfig, run

    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a directory")
    try:
        cfg = ServeConfig(model=args.model, drafter=args.drafter, speculator=args.speculator,
                          speculate=args.speculate, draft_len=args.draft_len, remote=args.remote, host=args.host,
                          port=args.port,
                          served_model_name=args.served_model_name, dtype=args.dtype, max_seq_len=args.max_seq_len,
                          page_size=args.page_size, max_slots=args.max_slots, num_pages=args.num_pages,
                          prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
                          prefill_decode_steps=args.prefill_decode_steps, max_prefill_rows=args.max_prefill_rows,
                          prefix_cache=not args.no_prefix_cache, host_pages=args.host_pages,
                          **{k: v for k, v in (("remote_overlap", args.remote_overlap),
                                               ("remote_min_tokens", args.remote_min_tokens)) if v is not None},
                          tp=args.tp, ep=args.ep,
                          tp_strategy=_strategy(args.tp_strategy), tp_microbatches=args.tp_microbatches,
                          max_queue=args.max_queue, drain_timeout_s=args.drain_timeout,
                          switch_interval_ms=args.switch_interval_ms,
                          warmup=not args.no_warmup)
        if cfg.remote and not cfg.remote.startswith(("redis://", "rediss://", "unix://", "memory://")):
            raise ValueError(f"--remote must look like redis://HOST:PORT or memory://, got {cfg.remote!r}")
        if cfg.remote and not cfg.prefix_cache:
            raise ValueError("--remote needs the prefix cache (drop --no-prefix-cache)")
        if args.remote_overlap and not cfg.remote:
            raise ValueError("--remote-overlap needs --remote")
        return run(cfg)
    except ValueError as e:  # bad flags, CheckpointError / ConfigError
        raise UsageError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tp_microbatches", 1) > 1:
        # read when JAX starts its backend, which has not happened yet (jax is imported by the commands)
        from sharding.strategy import with_microbatch_flags

        os.environ["XLA_FLAGS"] = with_microbatch_flags(os.environ.get("XLA_FLAGS", ""))
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
    except UsageError as e:
        print(f"codegen-jax: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
