"""The speculative generate loop over an Engine: prefill, then repeat {propose, verify, accept, roll back}.

Each step puts every running row's newest token and its draft into one `Engine.verify` call (a row may draft
nothing; it then decodes one token), picks the kept tokens with the lossless rule on the device, and rolls the
rejected KV back by lowering `cache.lengths` (nothing is copied). A row's cache always holds its tokens but the
newest, exactly as in `Engine.generate`, so the first output token comes out of the first verify call.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from codegen_jax.engine import Completion, Engine
from codegen_jax.sampling import SamplingParams
from drafters.base import Draft, Drafter, Sequence
from drafters.verify import verify_tokens


@dataclass
class SpecCompletion(Completion):
    forwards: int = 0  # target forwards (verify calls) that produced this request's tokens
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.forwards, 1)

    @property
    def accepted_per_forward(self) -> float:
        return self.accepted / max(self.forwards, 1)


def _width(k: int, most: int) -> int:
    """Verify width for drafts of up to k tokens: a power of two (few compiled shapes), at least 2, at most most+1."""
    return max(2, min(1 << k.bit_length(), most + 1))


class SpeculativeDecoder:
    """Drives `engine` with `drafter`. Also the server's `SpeculativeStep` hook (`__call__`, `lookahead`).

    A step is one jitted call and one device->host transfer: the verify forward, the accept rule and, for an
    `on_device` drafter, the draft before it and the drafter's window update after it, all in one program whose
    only output the host reads is [accepted | new tokens]. On a GPU each transfer costs the pipeline's latency and
    each dispatch its launch, so a step that fetched the draft, then the accepted lengths, then the tokens (and
    dispatched four programs) spent several ms of host time around a ~3 ms verify."""

    def __init__(self, engine: Engine, drafter: Drafter):
        self.engine, self.drafter = engine, drafter
        self.lookahead = drafter.max_draft + 1
        self._slot_seq: dict[int, Sequence] = {}  # for the server hook: the request each slot holds
        self._host_step = jax.jit(self._verify_host_draft, donate_argnums=1, static_argnames=("greedy", "capture"))
        self._device_step = jax.jit(self._draft_and_verify, donate_argnums=(1, 2), static_argnames=("width", "greedy"))

    # ---- the step's device program (traced) -------------------------------------------------------------------

    def _accept(self, params, kv, tokens, page_table, ints, floats, probs, capture, greedy):
        """The verify forward of tokens [S, T] (each row's newest token, then its draft) and the accept rule.
        ints [6, S] int32: q_lens, kv_lens, seeds (uint32 bits), positions, top_k, last (each row's newest
        token); floats [2, S]: temperature, top_p. Returns (kv, result [S, 1 + T] int32: accepted, then the new
        tokens, features or None)."""
        q_lens, kv_lens, seeds, positions, top_k = ints[0], ints[1], ints[2], ints[3], ints[4]
        seeds = jax.lax.bitcast_convert_type(seeds, jnp.uint32)
        logits, kv, features = self.engine.verify_forward(params, kv, tokens, page_table, kv_lens, q_lens,
                                                          capture=capture)
        draft_len = jnp.maximum(q_lens - 1, 0)
        accepted, out = verify_tokens(logits, tokens[:, 1:], draft_len, probs, seeds, positions, floats[0], top_k,
                                      floats[1], greedy=greedy)
        return kv, jnp.concatenate([accepted[:, None], out], axis=1), features

    def _verify_host_draft(self, params, kv, tokens, page_table, ints, floats, probs, *, greedy, capture):
        """A host drafter's step: tokens [S, T] built on the host, probs [S, T - 1, V] or None."""
        return self._accept(params, kv, tokens, page_table, ints, floats, probs, capture, greedy)

    def _draft_and_verify(self, params, kv, window, draft_params, embed, head, page_table, ints, floats, *,
                          width: int, greedy: bool):
        """An on-device drafter's step: draft from `window` (the drafter's device state), verify [last, draft
        [:width - 1]], accept, and append the cached positions' features to the window. Returns (kv, window,
        result [S, 1 + width])."""
        drafter = self.drafter
        q_lens, positions, last = ints[0], ints[3], ints[5]
        seeds = jax.lax.bitcast_convert_type(ints[2], jnp.uint32)
        # the sampled rows need the draft's distributions; the greedy ones never read them
        draft, probs = drafter.draft(draft_params, embed, head, window, last, seeds, positions, floats[0],
                                     with_probs=not greedy)
        draft = draft[:, : width - 1]
        probs = None if probs is None else probs[:, : width - 1]
        tokens = jnp.concatenate([last[:, None], draft.astype(jnp.int32)], axis=1)
        kv, result, features = self._accept(params, kv, tokens, page_table, ints, floats, probs, drafter.capture,
                                            greedy)
        # last and the accepted drafts are now cached; rows outside the step (q_len 0) append nothing
        window = drafter.append(window, features, result[:, 1:], jnp.where(q_lens > 0, result[:, 0] + 1, 0))
        return kv, window, result

    def _dispatch(self, T: int, tokens: np.ndarray | None, probs, ints: np.ndarray, floats: np.ndarray,
                  greedy: bool):
        """Runs one step program (not awaited). tokens [S, T] for a host drafter, None for an on-device one.
        Returns (result [S, 1 + T] on the device, features or None)."""
        engine, drafter = self.engine, self.drafter
        cache = engine.cache
        if drafter.on_device:
            cache.pages, drafter.window, result = self._device_step(
                engine.params, cache.pages, drafter.window, drafter.flat_params(), drafter.embed, drafter.head,
                cache.page_table, ints, floats, width=T, greedy=greedy)
            return result, None
        cache.pages, result, features = self._host_step(engine.params, cache.pages, tokens, cache.page_table, ints,
                                                        floats, probs, greedy=greedy, capture=drafter.capture)
        return result, features

    # ---- one step ----------------------------------------------------------------------------------------------

    def step(self, seqs: list[Sequence], max_lens: dict[int, int]) -> tuple[dict[int, list[int]], np.ndarray]:
        """One draft-and-verify step for `seqs` (each cache holds len(tokens) - 1 tokens); slot s drafts at most
        max_lens[s]. Appends the new tokens to each seq.tokens and returns ({slot: new tokens}, drafted [S]);
        each row's cache grew by its number of new tokens (the last one is not cached)."""
        engine, drafter = self.engine, self.drafter
        cache, S = engine.cache, engine.cfg.max_slots
        draft = None if drafter.on_device else drafter.propose(seqs, max_lens)
        lengths = np.zeros(S, np.int32)
        for s in seqs:
            k = drafter.max_draft if draft is None else int(draft.lengths[s.slot])
            lengths[s.slot] = min(k, max_lens[s.slot])
        T = _width(int(lengths.max()), drafter.max_draft)
        last, q_lens, positions, top_k = (np.zeros(S, np.int32) for _ in range(4))
        seeds = np.zeros(S, np.uint32)
        temperature, top_p = np.zeros(S, np.float32), np.ones(S, np.float32)
        for s in seqs:
            assert cache.lengths[s.slot] == len(s.tokens) - 1, (cache.lengths[s.slot], len(s.tokens))
            sp = s.params
            last[s.slot], q_lens[s.slot], positions[s.slot] = s.tokens[-1], lengths[s.slot] + 1, len(s.tokens)
            seeds[s.slot], temperature[s.slot] = sp.seed, sp.temperature
            top_k[s.slot], top_p[s.slot] = sp.top_k, sp.top_p
        ints = np.stack([q_lens, cache.lengths + q_lens, seeds.view(np.int32), positions, top_k, last])
        floats = np.stack([temperature, top_p])
        greedy = all(s.params.temperature == 0 for s in seqs)
        tokens = probs = None
        if draft is not None:
            tokens = np.zeros((S, T), np.int32)
            tokens[:, 0] = last
            tokens[:, 1:] = _fit(draft.tokens, T - 1)
            if draft.probs is not None:
                probs = draft.probs[:, : T - 1]
                if probs.shape[1] < T - 1:
                    probs = jnp.pad(probs, ((0, 0), (0, T - 1 - probs.shape[1]), (0, 0)))
        result, features = self._dispatch(T, tokens, probs, ints, floats, greedy)
        result = np.asarray(result)  # the step's one device->host transfer
        accepted, out = result[:, 0], result[:, 1:]
        new: dict[int, list[int]] = {}
        for s in seqs:
            n = int(accepted[s.slot])
            # the cache holds last + all drafts; keep last + the n accepted ones (the bonus is not cached yet)
            cache.lengths[s.slot] = len(s.tokens) + n
            new[s.slot] = out[s.slot, : n + 1].tolist()
            s.tokens.extend(new[s.slot])
        if draft is not None:
            active = np.zeros(S, bool)
            active[[s.slot for s in seqs]] = True
            drafter.observe(seqs, Draft(tokens[:, 1:], lengths, probs), np.where(active, accepted, 0), out, features)
        return new, lengths

    def warmup(self) -> list[int]:
        """Compiles every step program a generation can use (each verify width, the accept rule greedy and
        sampling; for an on-device drafter its draft, with and without probabilities, is in that program) and,
        for drafters reading target features, every width of `start`'s capture of a prompt's tail, with calls that
        change no state: every row has q_len 0, so the forward writes only the scratch page, lengths stay and a
        drafter's window appends nothing; the drafter sees no sequence. Draft lengths follow acceptance, so
        without this a width first met mid-request compiles there, inside someone's latency. Returns the widths."""
        engine, drafter = self.engine, self.drafter
        S = engine.cfg.max_slots
        before = engine.cache.lengths.copy()
        if not drafter.on_device:
            drafter.propose([], {})
        steps = sorted({_width(k, drafter.max_draft) for k in range(drafter.max_draft + 1)})
        # `start`'s capture of the prompt's tail, one width per power of two up to the context
        tails = {_context_width(n) for n in range(1, drafter.context + 1)} if drafter.capture else set()
        ints = np.zeros((6, S), np.int32)
        ints[1] = engine.cache.lengths
        floats = np.stack([np.zeros(S, np.float32), np.ones(S, np.float32)])
        zeros_i = np.zeros(S, np.int32)
        for T in steps:
            tokens = None if drafter.on_device else np.zeros((S, T), np.int32)
            for greedy in (True, False):
                result, features = self._dispatch(T, tokens, None, ints, floats, greedy)
            if not drafter.on_device:
                result = np.asarray(result)
                drafter.observe([], Draft(tokens[:, 1:], zeros_i), result[:, 0], result[:, 1:], features)
        for T in sorted(tails):
            engine.verify_features(np.zeros((S, T), np.int32), zeros_i, drafter.capture)
        jax.block_until_ready(engine.cache.pages)
        assert (engine.cache.lengths == before).all(), "warm-up must leave the cache's lengths alone"
        return sorted(set(steps) | tails)

    # ---- prefill ----------------------------------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        """Prefills seq.tokens[:-1] into its slot (pages reserved) and hands the request to the drafter."""
        engine, drafter = self.engine, self.drafter
        cached = seq.tokens[:-1]
        n_ctx = min(len(cached), drafter.context) if drafter.capture else 0
        if len(cached) > n_ctx:
            engine.prefill(seq.slot, cached[: len(cached) - n_ctx])
        else:
            engine.cache.lengths[seq.slot] = 0
        features = None
        if n_ctx:
            # the drafter's context: the target's features for the prompt's tail, from a verify over that tail
            S, T = engine.cfg.max_slots, _context_width(n_ctx)
            ids = np.zeros((S, T), np.int32)
            ids[seq.slot, :n_ctx] = cached[-n_ctx:]
            q_lens = np.zeros(S, np.int32)
            q_lens[seq.slot] = n_ctx
            _, feats = engine.verify_features(ids, q_lens, drafter.capture)
            features = feats[seq.slot, :n_ctx]
        drafter.begin(seq, features)

    # ---- the generation loop ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[SpecCompletion]:
        """As `Engine.generate`, speculatively: up to max_slots requests in flight, stop tokens and max tokens
        honoured (tokens past a stop token in an accepted run are dropped)."""
        engine = self.engine
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sp.max_new_tokens > engine.cfg.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens + max_new_tokens {sp.max_new_tokens} > "
                                 f"max_seq_len {engine.cfg.max_seq_len}")
            if max(p) >= engine.model_cfg.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside [0, {engine.model_cfg.vocab_size})")
        cache = engine.cache
        results = [SpecCompletion(prompt_tokens=len(p)) for p in prompts]
        waiting = deque(range(len(prompts)))
        running: dict[int, tuple[int, Sequence]] = {}  # slot -> (request index, sequence)
        t0 = time.perf_counter()
        while waiting or running:
            for slot in range(engine.cfg.max_slots):
                if not waiting:
                    break
                if slot in running:
                    continue
                r = waiting[0]
                need = len(prompts[r]) + params[r].max_new_tokens
                if cache.pages_needed(slot, need) > cache.num_free_pages:
                    break
                waiting.popleft()
                cache.reserve(slot, need)
                seq = Sequence(slot, list(prompts[r]), len(prompts[r]), params[r])
                running[slot] = (r, seq)
                self.start(seq)
            seqs = [seq for _, seq in running.values()]
            room = {s.slot: params[r].max_new_tokens - len(results[r].tokens) - 1 for r, s in running.values()}
            new, drafted = self.step(seqs, room)
            for slot, toks in new.items():
                r, seq = running[slot]
                res, sp = results[r], params[r]
                if not res.tokens:
                    res.time_to_first_token_s = time.perf_counter() - t0
                res.forwards += 1
                res.drafted += int(drafted[slot])
                res.accepted += len(toks) - 1
                for t in toks:
                    res.tokens.append(t)
                    if t in sp.stop_token_ids:
                        res.finish_reason = "stop"
                    elif len(res.tokens) >= sp.max_new_tokens:
                        res.finish_reason = "length"
                    if res.finish_reason:
                        break
                if res.finish_reason:
                    del seq.tokens[seq.prompt_len + len(res.tokens):]
                    self.drafter.end(seq)
                    cache.release(slot)
                    del running[slot]
        return results

    # ---- the server's hook ------------------------------------------------------------------------------------

    def __call__(self, engine: Engine, rows) -> list[list[int]]:
        """serve.scheduler.SpeculativeStep: rows have .slot, .tokens (prompt + generated), .params. A slot whose
        tokens no longer extend what it held starts a new request for the drafter."""
        assert engine is self.engine
        seqs = []
        for row in rows:
            seq = self._slot_seq.get(row.slot)
            if seq is None or len(row.tokens) < len(seq.tokens) or row.tokens[: len(seq.tokens)] != seq.tokens:
                if seq is not None:
                    self.drafter.end(seq)
                seq = Sequence(row.slot, list(row.tokens), len(row.tokens), row.params)
                self.drafter.begin(seq)
                self._slot_seq[row.slot] = seq
            else:
                seq.tokens.extend(row.tokens[len(seq.tokens):])
            seqs.append(seq)
        room = {s.slot: min(self.drafter.max_draft,
                            s.params.max_new_tokens - (len(s.tokens) - s.prompt_len) - 1) for s in seqs}
        new, _ = self.step(seqs, {k: max(v, 0) for k, v in room.items()})
        return [new[row.slot] for row in rows]


def _context_width(n: int) -> int:
    """Width of `start`'s verify over a prompt tail of n positions (a power of two, at least 16)."""
    return max(16, 1 << (n - 1).bit_length())


def _fit(a: np.ndarray, K: int) -> np.ndarray:
    """a [S, k] cut or zero-padded to [S, K]."""
    a = np.asarray(a, np.int32)[:, :K]
    return np.pad(a, ((0, 0), (0, K - a.shape[1])))
