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
    """Drives `engine` with `drafter`. Also the server's `SpeculativeStep` hook (`__call__`, `lookahead`)."""

    def __init__(self, engine: Engine, drafter: Drafter):
        self.engine, self.drafter = engine, drafter
        self.lookahead = drafter.max_draft + 1
        self._slot_seq: dict[int, Sequence] = {}  # for the server hook: the request each slot holds

    # ---- one step ----------------------------------------------------------------------------------------------

    def step(self, seqs: list[Sequence], max_lens: dict[int, int]) -> tuple[dict[int, list[int]], np.ndarray]:
        """One draft-and-verify step for `seqs` (each cache holds len(tokens) - 1 tokens); slot s drafts at most
        max_lens[s]. Appends the new tokens to each seq.tokens and returns ({slot: new tokens}, accepted [S]);
        each row's cache grew by its number of new tokens (the last one is not cached)."""
        engine, drafter = self.engine, self.drafter
        S = engine.cfg.max_slots
        draft = drafter.propose(seqs, max_lens)
        lengths = np.zeros(S, np.int32)
        for s in seqs:
            lengths[s.slot] = min(int(draft.lengths[s.slot]), max_lens[s.slot])
        T = _width(int(lengths.max()), drafter.max_draft)
        tokens = np.zeros((S, T), np.int32)
        tokens[:, 1:] = _fit(draft.tokens, T - 1)
        q_lens = np.zeros(S, np.int32)
        seeds, positions = np.zeros(S, np.uint32), np.zeros(S, np.int32)
        temperature, top_k, top_p = np.zeros(S, np.float32), np.zeros(S, np.int32), np.ones(S, np.float32)
        for s in seqs:
            assert engine.cache.lengths[s.slot] == len(s.tokens) - 1, (engine.cache.lengths[s.slot], len(s.tokens))
            tokens[s.slot, 0] = s.tokens[-1]
            q_lens[s.slot] = lengths[s.slot] + 1
            sp = s.params
            seeds[s.slot], positions[s.slot] = sp.seed, len(s.tokens)
            temperature[s.slot], top_k[s.slot], top_p[s.slot] = sp.temperature, sp.top_k, sp.top_p
        probs = None
        if draft.probs is not None:
            probs = draft.probs[:, : T - 1]
            if probs.shape[1] < T - 1:
                probs = jax.numpy.pad(probs, ((0, 0), (0, T - 1 - probs.shape[1]), (0, 0)))
        features = None
        if drafter.capture:
            logits, features = engine.verify_features(tokens, q_lens, drafter.capture)
        else:
            logits = engine.verify(tokens, q_lens)
        greedy = all(s.params.temperature == 0 for s in seqs)
        accepted, out = verify_tokens(logits, tokens[:, 1:], lengths, probs, seeds, positions, temperature, top_k,
                                      top_p, greedy=greedy)
        accepted, out = np.array(accepted), np.array(out)
        new: dict[int, list[int]] = {}
        for s in seqs:
            n = int(accepted[s.slot])
            # the cache holds last + all drafts; keep last + the n accepted ones (the bonus is not cached yet)
            engine.cache.lengths[s.slot] = len(s.tokens) + n
            new[s.slot] = out[s.slot, : n + 1].tolist()
            s.tokens.extend(new[s.slot])
        active = np.zeros(S, bool)
        active[[s.slot for s in seqs]] = True
        accepted = np.where(active, accepted, 0)
        drafter.observe(seqs, Draft(tokens[:, 1:], lengths, probs), accepted, out, features)
        return new, lengths

    def warmup(self) -> list[int]:
        """Compiles every verify width a step can use (verify or verify_features, the accept rule greedy and
        sampling, the drafter's propose and observe) and, for drafters reading target features, every width of
        `start`'s capture of a prompt's tail, with calls that change no state: every row has q_len 0, so
        the forward writes only the scratch page and lengths stay; the drafter sees no sequence. Draft lengths
        follow acceptance, so without this a width first met mid-request compiles there, inside someone's
        latency. Returns the widths."""
        engine, drafter = self.engine, self.drafter
        S = engine.cfg.max_slots
        before = engine.cache.lengths.copy()
        drafter.propose([], {})
        widths = {_width(k, drafter.max_draft) for k in range(drafter.max_draft + 1)}
        if drafter.capture:  # `start`'s capture of the prompt's tail, one width per power of two up to the context
            widths |= {_context_width(n) for n in range(1, drafter.context + 1)}
        widths = sorted(widths)
        zeros_i, zeros_f = np.zeros(S, np.int32), np.zeros(S, np.float32)
        for T in widths:
            tokens = np.zeros((S, T), np.int32)
            features = None
            if drafter.capture:
                logits, features = engine.verify_features(tokens, zeros_i, drafter.capture)
            else:
                logits = engine.verify(tokens, zeros_i)
            for greedy in (True, False):
                accepted, out = verify_tokens(logits, tokens[:, 1:], zeros_i, None, zeros_i.astype(np.uint32),
                                              zeros_i, zeros_f, zeros_i, np.ones(S, np.float32), greedy=greedy)
            drafter.observe([], Draft(tokens[:, 1:], zeros_i), np.asarray(accepted), np.asarray(out), features)
        assert (engine.cache.lengths == before).all(), "warm-up must leave the cache's lengths alone"
        return widths

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
