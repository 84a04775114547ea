"""Speculative decoding against plain decoding, same model, same run: tokens per target forward and tokens/s.

Target: a randomly initialised model with Qwen2.5-Coder-1.5B's shapes (bf16), greedy; tokens are the bytes of
real source files from this repository (ids < 256, inside any vocabulary), so no tokenizer is needed.

Apply speculator, edit-merge workload: for each source file, the prompt is the original file plus an edit
snippet (a rewritten function body and an appended line, unchanged code elided with `# ... existing code ...`),
and the intended output is the merged file. A random target will not write the merged file, so we force it:
each step the speculator drafts from the merged file's prefix generated so far, the target verifies the draft in
a real `Engine.verify` call and the device accept rule runs (and is waited on) as in serving, but the accepted
length is the draft's agreement with the merged file (teacher forcing). This measures the device cost of the
real draft lengths with the acceptance a target that does output the merged file would give; the alternative,
measuring acceptance offline against the merged file, would not time the verify calls. Plain decoding produces
the same number of tokens with `Engine.generate`.

Other drafters (suffix tree, block, EAGLE-3), code completion: the prompt is a file's first half, the real
speculative loop generates `--new-tokens`. With a random target and randomly initialised neural drafters
(unless --block-drafter / --eagle3-drafter give trained checkpoints) acceptance is near zero: these rows show the
overhead a drafter adds per target forward, not the speed-up a trained drafter gives.

Run on the GPU machine:  python benchmarks/speculative.py          (CPU: --tiny, a smoke test of this script)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, table, versions, write_result  # noqa: E402
from benchmarks.decode import QWEN25_CODER_1_5B, TINY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILES = ["codegen_jax/engine.py", "codegen_jax/model.py", "codegen_jax/checkpoint.py", "serve/scheduler.py"]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def edit_merge(path: Path, max_lines: int) -> tuple[list[int], list[int]]:
    """(prompt, merged) byte tokens for one file: a function body rewritten, a line appended near the end."""
    lines = path.read_text().splitlines(keepends=True)[:max_lines]
    a = len(lines) // 3
    b = a + 6
    new_mid = ["        # rewritten by the edit\n", "        value = self.compute(x, y)\n", "        return value\n"]
    tail = len(lines) - 5
    merged = lines[:a] + new_mid + lines[b:tail] + ["# appended by the edit\n"] + lines[tail:]
    snippet = ["# ... existing code ...\n", *lines[a - 2 : a], *new_mid, *lines[b : b + 2],
               "# ... existing code ...\n", "# appended by the edit\n", "# ... existing code ...\n"]
    prompt = "<original>\n" + "".join(lines) + "</original>\n<edit>\n" + "".join(snippet) + "</edit>\n<merged>\n"
    return list(prompt.encode()), list("".join(merged).encode())


def warm_forced(engine, max_draft: int) -> None:
    """Compiles what `forced_apply` calls (`Engine.verify` and greedy `verify_tokens`; it never samples and never
    runs the serving step) at every verify width, with q_len 0 rows (only the scratch page is written)."""
    import numpy as np

    from drafters.speculative import _width
    from drafters.verify import verify_tokens

    S = engine.cfg.max_slots
    zeros_i, zeros_f, ones_f = np.zeros(S, np.int32), np.zeros(S, np.float32), np.ones(S, np.float32)
    for T in sorted({_width(k, max_draft) for k in range(max_draft + 1)}):
        tokens = np.zeros((S, T), np.int32)
        logits = engine.verify(tokens, zeros_i)
        verify_tokens(logits, tokens[:, 1:], zeros_i, None, zeros_i.astype(np.uint32), zeros_i, zeros_f, zeros_i,
                      ones_f, greedy=True)


def forced_apply(engine, drafter, prompt: list[int], truth: list[int]) -> tuple[int, float]:
    """Teacher-forced speculative decoding of `truth` (see the module docstring): (target forwards, seconds)."""
    import numpy as np

    from codegen_jax.sampling import SamplingParams
    from drafters.base import Sequence
    from drafters.speculative import SpeculativeDecoder, _fit, _width
    from drafters.verify import verify_tokens

    spec = SpeculativeDecoder(engine, drafter)
    S = engine.cfg.max_slots
    engine.cache.reserve(0, len(prompt) + len(truth))
    t = time.perf_counter()
    seq = Sequence(0, list(prompt), len(prompt), SamplingParams(max_new_tokens=len(truth)))
    spec.start(seq)
    forwards = 0
    zeros_i, zeros_f = np.zeros(S, np.int32), np.zeros(S, np.float32)
    while (done := len(seq.tokens) - len(prompt)) < len(truth):
        draft = drafter.propose([seq], {0: len(truth) - done - 1})
        k = int(draft.lengths[0])
        T = _width(k, drafter.max_draft)
        tokens = np.zeros((S, T), np.int32)
        tokens[0, 0] = seq.tokens[-1]
        tokens[:, 1:] = _fit(draft.tokens, T - 1)
        q_lens = np.zeros(S, np.int32)
        q_lens[0] = k + 1
        logits = engine.verify(tokens, q_lens)
        lengths = np.zeros(S, np.int32)
        lengths[0] = k
        acc, out = verify_tokens(logits, tokens[:, 1:], lengths, None, zeros_i.astype(np.uint32), zeros_i, zeros_f,
                                 zeros_i, np.ones(S, np.float32), greedy=True)
        np.asarray(acc)  # wait for the device as serving does
        a = 0
        while a < k and tokens[0, 1 + a] == truth[done + a]:
            a += 1
        new = truth[done : done + a + 1]
        engine.cache.lengths[0] = len(seq.tokens) + a
        seq.tokens.extend(new)
        forced = np.zeros((S, T), np.int32)
        forced[0, : len(new)] = new
        drafter.observe([seq], draft, np.array([a] + [0] * (S - 1)), forced)
        forwards += 1
    dt = time.perf_counter() - t
    engine.cache.release(0)
    return forwards, dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and inputs: a CPU smoke test of this script")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per code-completion request")
    p.add_argument("--max-lines", type=int, default=400, help="lines of each source file used")
    p.add_argument("--drafters", nargs="+", default=["apply", "suffix", "block", "eagle3"])
    p.add_argument("--completion-files", type=int, default=1,
                   help="source files for each drafter's code-completion rows (each costs its verify widths' compiles)")
    p.add_argument("--block-drafter", default=None, help="trained block drafter checkpoint (default: random init)")
    p.add_argument("--eagle3-drafter", default=None, help="trained EAGLE-3 checkpoint (default: random init)")
    p.add_argument("--no-write", action="store_true", help="print the result, write nothing under results/")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codegen_jax import Engine, EngineConfig, ModelConfig, SamplingParams, init_model
    from drafters.apply_speculator import ApplySpeculator
    from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
    from drafters.checkpoint import load_drafter
    from drafters.eagle3 import Eagle3Config, Eagle3Drafter
    from drafters.neural import NeuralDrafter
    from drafters.speculative import SpeculativeDecoder
    from drafters.suffix_tree import SuffixTreeSpeculator

    shape = TINY if args.tiny else QWEN25_CODER_1_5B
    if args.tiny:
        args.new_tokens, args.max_lines = min(args.new_tokens, 24), min(args.max_lines, 40)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    cfg = ModelConfig(model_type="qwen2", **shape)
    log(f"init target ({'tiny' if args.tiny else 'Qwen2.5-Coder-1.5B shapes'}) on {device()}")
    target = init_model(cfg, dtype=dtype, seed=0)
    workloads = [edit_merge(ROOT / f, args.max_lines) for f in (FILES[:2] if args.tiny else FILES)]
    longest = max(len(pr) + len(m) for pr, m in workloads)
    seq_len = 1 << (longest + 128).bit_length()
    ecfg = EngineConfig(max_slots=1, page_size=16, max_seq_len=seq_len, prefill_chunk=64 if args.tiny else 512,
                        decode_steps=16)
    engine = Engine(target, ecfg)
    rows = []

    def save(complete: bool) -> None:
        # after every row: a run cut off by a time limit still leaves what it measured
        if args.no_write:
            return
        payload = {"device": device(), "shapes": "tiny" if args.tiny else "Qwen2.5-Coder-1.5B (random init)",
                   "dtype": jnp.dtype(dtype).name, "versions": versions("jax", "flax"), "rows": rows,
                   "complete": complete, "trained_drafters": {"block": args.block_drafter,
                                                              "eagle3": args.eagle3_drafter}}
        path = write_result("speculative_tiny" if args.tiny else "speculative", payload)
        if complete:
            log(f"wrote {path}")

    def compiles() -> int:
        """Programs the engine's steps have compiled so far: a timed run that adds some timed a compile."""
        return sum(f._cache_size() for f in (engine._prefill, engine._decode, engine._sample, engine._verify,
                                             engine._verify_capture))

    # Every engine program a timed row can use compiles here, before the first row: each prefill bucket (a prompt's
    # last chunk takes the bucket of its own length, so a warm-up on one workload misses another's: on the H100,
    # serve/scheduler.py's 219-token last chunk compiled inside its timed row), and `plain`'s decode loop and
    # first-token sampler (fixed shapes: a one-token prompt compiles them). Verify widths: per drafter, below.
    engine.warmup_prefill()
    engine.generate([[0]], SamplingParams(max_new_tokens=ecfg.decode_steps + 1))

    def plain(prompt, n) -> tuple[float, int]:
        """Plain decoding of n tokens after `prompt`: (tokens/s, programs compiled while timed)."""
        compiled = compiles()
        t = time.perf_counter()
        out = engine.generate([prompt], SamplingParams(max_new_tokens=n))[0]
        jax.block_until_ready(engine.cache.pages)
        return len(out.tokens) / (time.perf_counter() - t), compiles() - compiled

    layers = (1, cfg.num_layers // 2, cfg.num_layers - 2) if cfg.num_layers > 3 else (0, cfg.num_layers - 1)
    D = cfg.hidden_size
    small = dict(head_dim=16, intermediate_size=128, context=32) if args.tiny else dict(
        num_heads=16, head_dim=128, intermediate_size=8960, context=256)
    # longest drafts: tiny ones of 7 take verify widths 2, 4, 8 (the full draft's width included); each width is
    # two step programs a drafter compiles (greedy, sampling), ~2 s apiece on the CPU
    block_size, draft_len = (8, 7) if args.tiny else (16, 8)

    def drafter_for(kind):
        if kind == "suffix":
            return SuffixTreeSpeculator(1)
        if kind == "block":
            m = (load_drafter(args.block_drafter) if args.block_drafter else
                 BlockDrafter(BlockDrafterConfig(D, layers, block_size=block_size, dtype=jnp.dtype(dtype).name,
                                                 **small), rngs=nnx.Rngs(0)))
        else:
            m = (load_drafter(args.eagle3_drafter) if args.eagle3_drafter else
                 Eagle3Drafter(Eagle3Config(D, layers, cfg.vocab_size, min(cfg.vocab_size, 32000),
                                            draft_len=draft_len, dtype=jnp.dtype(dtype).name, **small),
                               rngs=nnx.Rngs(0)))
        return NeuralDrafter(m, target, 1)

    if "apply" in args.drafters:
        # the draft length adapts up and down: every verify width and the accept rule compile here (the forced loop
        # calls them directly: a SpeculativeDecoder's warm-up of its serving step compiled 14 programs no row ran)
        warm_forced(engine, ApplySpeculator(1).max_draft)
        for (prompt, merged), name in zip(workloads, FILES, strict=False):
            compiled = compiles()
            fwd, dt = forced_apply(engine, ApplySpeculator(1), prompt, merged)
            late = compiles() - compiled
            base, plain_late = plain(prompt, len(merged))
            rows.append({"drafter": "apply", "workload": f"edit-merge {name}", "prompt": len(prompt),
                         "tokens": len(merged), "forwards": fwd, "tokens_per_forward": round(len(merged) / fwd, 2),
                         "tok_s": round(len(merged) / dt, 1), "plain_tok_s": round(base, 1),
                         "speedup": round(len(merged) / dt / base, 2), "compiles_while_timed": late + plain_late})
            log(str(rows[-1]))
            save(complete=False)

    completion = workloads[: args.completion_files]
    for kind in [k for k in args.drafters if k != "apply"]:
        for (_, merged), name in zip(completion, FILES, strict=False):
            # code completion: the merged file's first half as the prompt
            ctx = merged[: len(merged) // 2]
            sp = SamplingParams(max_new_tokens=args.new_tokens)
            # warm-up on this very prompt and length: the drafter's own programs (a neural drafter's, per shape)
            # compile here, not in the timed run (a fresh drafter then starts from the same state)
            SpeculativeDecoder(engine, drafter_for(kind)).generate([ctx], sp)
            spec = SpeculativeDecoder(engine, drafter_for(kind))
            spec.warmup()  # and every verify width, should this run's drafts take another path
            compiled = compiles()
            t = time.perf_counter()
            out = spec.generate([ctx], sp)[0]
            dt = time.perf_counter() - t
            late = compiles() - compiled
            base, plain_late = plain(ctx, args.new_tokens)
            rows.append({"drafter": kind, "workload": f"completion {name}", "prompt": len(ctx),
                         "tokens": len(out.tokens), "forwards": out.forwards,
                         "tokens_per_forward": round(out.tokens_per_forward, 2),
                         "tok_s": round(len(out.tokens) / dt, 1), "plain_tok_s": round(base, 1),
                         "speedup": round(len(out.tokens) / dt / base, 2), "compiles_while_timed": late + plain_late})
            log(str(rows[-1]))
            save(complete=False)

    cols = ["drafter", "workload", "prompt", "tokens", "forwards", "tokens_per_forward", "tok_s", "plain_tok_s",
            "speedup", "compiles_while_timed"]
    print(table(rows, cols))
    save(complete=True)


if __name__ == "__main__":
    main()
