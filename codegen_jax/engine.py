"""The generation engine: chunked prefill, fused multi-step decode over fixed slots, and multi-token verify.

Device work is three jitted functions with static shapes (prefill per bucketed chunk length, decode per slot
count, verify per draft length), each taking the KV pool donated so it is updated in place. The host keeps page
tables and lengths in numpy and waits only for sampled tokens: decode runs `decode_steps` steps per call, sampling
on the device between them, and the host checks stop conditions once per call.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codegen_jax.kv_cache import PagedKVCache
from codegen_jax.model import Transformer, make_batch
from codegen_jax.sampling import SamplingParams, sample


@dataclass(frozen=True)
class EngineConfig:
    """max_slots: sequences decoded together; page_size: tokens per KV page; max_seq_len: prompt + output limit;
    num_pages: pool size (0: enough for every slot at max_seq_len); prefill_chunk: longest prefill call (chunks
    are bucketed to powers of two from 16 up to it); decode_steps: decode steps fused into one device call."""

    max_slots: int = 8
    page_size: int = 16
    max_seq_len: int = 4096
    num_pages: int = 0
    prefill_chunk: int = 512
    decode_steps: int = 8
    attn_impl: str | None = None
    # Share jitted programs with the alike engines of this process that also share (same model structure, page
    # size and attn_impl): each shape is then traced and compiled once, not once per engine. Kernel choices made
    # at trace time (the dispatchers' picks, tuned tables, patches) are then those of the engine that traced first.
    share_programs: bool = False

    def __post_init__(self):
        for name in ("max_slots", "page_size", "max_seq_len", "prefill_chunk", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk & (self.prefill_chunk - 1):
            raise ValueError(f"EngineConfig.prefill_chunk must be a power of two, got {self.prefill_chunk}")

    @property
    def pages(self) -> int:
        per_seq = math.ceil((self.max_seq_len + self.decode_steps) / self.page_size)
        return self.num_pages or self.max_slots * per_seq + 1


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    time_to_first_token_s: float = 0.0


def bucket(n: int, largest: int) -> int:
    """Smallest power of two >= n (at least 16, at most `largest`)."""
    return min(largest, max(16, 1 << (n - 1).bit_length()))


_PROGRAMS: dict = {}


def _programs(graphdef, treedef, page_size: int, attn_impl: str | None) -> _Programs:
    """The one shared _Programs of this model structure, page size and attention implementation in the process (a
    fresh one when the structure is not hashable)."""
    key = (graphdef, treedef, page_size, attn_impl)
    try:
        hash(key)
    except TypeError:
        return _Programs(*key)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _Programs(*key)
    return _PROGRAMS[key]


class _Programs:
    """An engine's jitted device functions. They depend on the model's structure (graphdef, parameter tree), the
    page size and the attention implementation, never on an engine's arrays or slot counts (shapes come with the
    arguments): engines alike in one process (the agent benchmark's three servers) can share them
    (EngineConfig.share_programs), so each shape is traced and compiled once, not once per engine."""

    def __init__(self, graphdef, treedef, page_size: int, attn_impl: str | None):
        self.graphdef, self.treedef, self.page_size, self.attn_impl = graphdef, treedef, page_size, attn_impl
        self.prefill = jax.jit(partial(self.forward, last_only=True), donate_argnums=1)
        self.verify = jax.jit(partial(self.forward, last_only=False), donate_argnums=1)
        self.decode = jax.jit(self.decode_loop, donate_argnums=1, static_argnames=("n_steps", "greedy"))
        self.verify_capture = jax.jit(self.forward_capture, donate_argnums=1, static_argnames="capture")
        self.sample = jax.jit(sample, static_argnames="greedy")

    def forward(self, params: list[jax.Array], kv, tokens, page_table, kv_lens, q_lens, *, last_only: bool):
        """tokens [B, T] new tokens; kv_lens [B] lengths after them; q_lens [B] valid new tokens.
        Returns (logits [B, V] of each row's last valid token, or [B, T, V] for all), updated kv."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, params))
        B, T = tokens.shape
        batch = make_batch(page_table, kv_lens, q_lens, T, self.page_size)
        hidden, kv, _ = model(tokens, kv, batch, attn_impl=self.attn_impl)
        if last_only:
            hidden = hidden[jnp.arange(B), jnp.maximum(q_lens - 1, 0)]
        return model.logits(hidden), kv

    def forward_capture(self, params, kv, tokens, page_table, kv_lens, q_lens, *, capture: tuple[int, ...]):
        """As forward over all tokens, also returning the residual streams after layers `capture`,
        concatenated: (logits [B, T, V], kv, features [B, T, len(capture) * D])."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, params))
        batch = make_batch(page_table, kv_lens, q_lens, tokens.shape[1], self.page_size)
        hidden, kv, captured = model(tokens, kv, batch, attn_impl=self.attn_impl, capture=capture)
        return model.logits(hidden), kv, jnp.concatenate(captured, axis=-1)

    def decode_loop(self, params, kv, tokens, page_table, kv_lens, active, seeds, temperature, top_k, top_p,
                    *, n_steps: int, greedy: bool):
        """n_steps decode steps for all slots. tokens [B] last sampled tokens (not yet in the cache);
        kv_lens [B] cached lengths. Returns (kv, new tokens [B, n_steps])."""
        q_lens = active.astype(jnp.int32)

        def step(i, carry):
            kv, tokens, kv_lens, out = carry
            kv_lens = kv_lens + q_lens
            logits, kv = self.forward(params, kv, tokens[:, None], page_table, kv_lens, q_lens, last_only=True)
            nxt = sample(logits, seeds, kv_lens, temperature, top_k, top_p, greedy=greedy)
            nxt = jnp.where(active, nxt, 0)
            return kv, nxt, kv_lens, out.at[:, i].set(nxt)

        out = jnp.zeros((tokens.shape[0], n_steps), jnp.int32)
        kv, _, _, out = jax.lax.fori_loop(0, n_steps, step, (kv, tokens, kv_lens, out))
        return kv, out


class Engine:
    def __init__(self, model: Transformer, cfg: EngineConfig = EngineConfig()):
        self.cfg = cfg
        self.model_cfg = model.cfg
        self.graphdef, state = nnx.split(model)
        # The jitted steps take the parameters as a flat list: flattening an nnx.State (hundreds of Variables, a
        # Python callback each) on every call costs the host more than a whole decode step on the GPU.
        self.state = state
        self.params, self._treedef = jax.tree.flatten(state)
        self.dtype = model.embed_tokens.weight.get_value().dtype
        self.cache = PagedKVCache(model.cfg, num_slots=cfg.max_slots, page_size=cfg.page_size,
                                  num_pages=cfg.pages, max_seq_len=cfg.max_seq_len + cfg.decode_steps,
                                  dtype=self.dtype)
        key = (self.graphdef, self._treedef, cfg.page_size, cfg.attn_impl)
        programs = _programs(*key) if cfg.share_programs else _Programs(*key)
        self._forward, self._forward_capture = programs.forward, programs.forward_capture
        self._decode_loop = programs.decode_loop
        self._prefill, self._verify, self._decode = programs.prefill, programs.verify, programs.decode
        self._verify_capture, self._sample = programs.verify_capture, programs.sample

    # ---- host-side building blocks (also used by drafters and the server) -----------------------------------

    def prefill(self, slot: int, tokens: list[int], start: int = 0) -> jax.Array:
        """Writes tokens[start:] of `slot`'s sequence into the cache in bucketed chunks (tokens[:start] are
        cached already); returns the float32 logits [V] after the last token. Pages must be reserved."""
        cache, chunk = self.cache, self.cfg.prefill_chunk
        # a numpy copy, as prefill_rows and warmup_prefill pass: a jax array would be another jit dispatch entry
        row = np.array(cache.page_table[slot : slot + 1])
        logits = None
        for lo in range(start, len(tokens), chunk):
            piece = tokens[lo : lo + chunk]
            T = bucket(len(piece), chunk)
            ids = np.zeros((1, T), np.int32)
            ids[0, : len(piece)] = piece
            kv_len = np.array([lo + len(piece)], np.int32)
            logits, cache.pages = self._prefill(self.params, cache.pages, ids, row, kv_len,
                                                np.array([len(piece)], np.int32))
        cache.lengths[slot] = len(tokens)
        return logits[0]

    def prefill_rows(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> jax.Array:
        """One prefill call for several slots (the server's chunked prefill): chunks[i] (at most prefill_chunk
        tokens) goes to positions starts[i]... of slot slots[i], whose earlier tokens are cached and pages
        reserved. Rows pad to a power of two and the chunk length to its bucket, so a batch compiles once per
        (rows, length) class. Sets the slots' lengths; returns float32 logits [rows, V] (row i after chunk i's
        last token for i < len(slots), padding after), on the device and not awaited."""
        cache = self.cache
        rows = 1 << max(0, len(slots) - 1).bit_length()
        T = bucket(max(map(len, chunks)), self.cfg.prefill_chunk)
        ids = np.zeros((rows, T), np.int32)
        table = np.zeros((rows, cache.max_pages), np.int32)  # padding rows: q_len 0, scratch page only
        kv_lens = np.zeros(rows, np.int32)
        q_lens = np.zeros(rows, np.int32)
        for i, (slot, chunk, start) in enumerate(zip(slots, chunks, starts, strict=True)):
            assert 0 < len(chunk) <= self.cfg.prefill_chunk, len(chunk)
            ids[i, : len(chunk)] = chunk
            table[i] = cache.page_table[slot]
            kv_lens[i], q_lens[i] = start + len(chunk), len(chunk)
            cache.lengths[slot] = start + len(chunk)
        logits, cache.pages = self._prefill(self.params, cache.pages, ids, table, kv_lens, q_lens)
        return logits

    def warmup_prefill(self, rows: int = 1) -> list[int]:
        """Compiles the prefill step for every chunk-length bucket (16, 32, ... prefill_chunk) and every padded
        row count up to `rows` (`prefill` uses 1, `prefill_rows` up to its batch). A prompt's last chunk is
        shorter than the rest, so its bucket depends on the prompt's length: one first met mid-request compiles
        inside that request's latency. The calls write only the scratch page (q_len 0, page table all scratch)
        and change no lengths. Returns the buckets."""
        chunk = self.cfg.prefill_chunk
        buckets = sorted({bucket(n, chunk) for n in range(1, chunk + 1)})
        classes = [(r, T) for r in sorted({1 << (n - 1).bit_length() for n in range(1, rows + 1)}) for T in buckets]

        def args(r: int, T: int) -> tuple:  # as prefill_rows passes them (numpy), so the calls below reuse these
            zeros = np.zeros(r, np.int32)
            return (self.params, self.cache.pages, np.zeros((r, T), np.int32),
                    np.zeros((r, self.cache.max_pages), np.int32), zeros, zeros)

        # XLA compiles with the GIL released: the classes compile side by side on a many-core host (a 1.5B model's
        # 24 prefill programs took minutes one after another on the H200 machine); on 2 cores, one at a time
        workers = min(len(classes), max(1, (os.cpu_count() or 2) // 2))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda c: self._prefill.lower(*args(*c)).compile(), classes))
        for r, T in classes:
            _, self.cache.pages = self._prefill(*args(r, T))
        return buckets

    def decode(self, last: np.ndarray, active: np.ndarray, seeds, temperature, top_k, top_p, *,
               greedy: bool, n_steps: int | None = None) -> jax.Array:
        """n_steps (default decode_steps, at most that) fused steps for the `active` [max_slots] slots; last
        [max_slots] holds each slot's newest token (sampled, not yet cached), the sampling arrays are per slot.
        Advances active slots' lengths by n_steps (their pages must cover that); returns tokens [max_slots,
        n_steps], not awaited. Each step count is its own program."""
        steps = n_steps or self.cfg.decode_steps
        assert 1 <= steps <= self.cfg.decode_steps, (steps, self.cfg.decode_steps)
        cache = self.cache
        # Copies: on the CPU a numpy argument may be aliased, not copied, and the host edits these arrays while
        # the step is still in flight.
        host = [np.array(a) for a in (last, cache.page_table, cache.lengths, active, seeds, temperature, top_k, top_p)]
        cache.pages, out = self._decode(self.params, cache.pages, *host, n_steps=steps, greedy=greedy)
        cache.lengths[active] += steps
        return out

    def verify(self, tokens: np.ndarray, q_lens: np.ndarray) -> jax.Array:
        """Multi-token step over all slots: tokens [max_slots, k], q_lens [max_slots] valid per row. Appends them
        to each slot's cache and returns logits [max_slots, k, V]. Roll back rejected ones by lowering lengths."""
        cache = self.cache
        kv_lens = cache.lengths + q_lens.astype(np.int32)
        logits, cache.pages = self._verify(self.params, cache.pages, tokens.astype(np.int32),
                                           cache.page_table, kv_lens, q_lens.astype(np.int32))
        cache.lengths[:] = kv_lens
        return logits

    def verify_forward(self, params: list[jax.Array], kv, tokens, page_table, kv_lens, q_lens, *,
                       capture: tuple[int, ...] = ()):
        """Traced (for callers that fuse their own work around a verify in one jit, as the speculative step
        does): the forward of `verify` (capture: of `verify_features`) over params = `self.params`, kv =
        `self.cache.pages`; kv_lens [B] lengths after the q_lens [B] new tokens [B, T]. Returns (logits
        [B, T, V], kv, features [B, T, len(capture) * D] or None). The caller sets `cache.lengths`."""
        if capture:
            return self._forward_capture(params, kv, tokens, page_table, kv_lens, q_lens, capture=capture)
        return (*self._forward(params, kv, tokens, page_table, kv_lens, q_lens, last_only=False), None)

    def verify_features(self, tokens: np.ndarray, q_lens: np.ndarray,
                        capture: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """`verify` that also returns the target's residual streams after layers `capture` (sorted, distinct) for
        drafters: (logits [max_slots, k, V], features [max_slots, k, len(capture) * D]), on the device."""
        assert capture and list(capture) == sorted(set(capture)), capture
        cache = self.cache
        kv_lens = cache.lengths + q_lens.astype(np.int32)
        logits, cache.pages, feats = self._verify_capture(self.params, cache.pages, tokens.astype(np.int32),
                                                          cache.page_table, kv_lens, q_lens.astype(np.int32),
                                                          capture=tuple(capture))
        cache.lengths[:] = kv_lens
        return logits, feats

    # ---- the generation loop ---------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Generates for every prompt, keeping up to max_slots in flight (a finished slot takes the next)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        limit = self.cfg.max_seq_len
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sp.max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens + max_new_tokens {sp.max_new_tokens} > "
                                 f"max_seq_len {limit}")
            if max(p) >= self.model_cfg.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.model_cfg.vocab_size})")
        B, n = self.cfg.max_slots, self.cfg.decode_steps
        cache = self.cache
        results = [Completion(prompt_tokens=len(p)) for p in prompts]
        waiting = deque(range(len(prompts)))
        running: dict[int, int] = {}  # slot -> request index
        last = np.zeros(B, np.int32)
        seeds = np.zeros(B, np.uint32)
        temperature = np.zeros(B, np.float32)
        top_k = np.zeros(B, np.int32)
        top_p = np.ones(B, np.float32)
        start = time.perf_counter()

        def accept(slot: int, tokens) -> bool:
            """Appends tokens to the slot's request; True when it is finished."""
            r = running[slot]
            res, sp = results[r], params[r]
            for t in tokens:
                res.tokens.append(int(t))
                if int(t) in sp.stop_token_ids:
                    res.finish_reason = "stop"
                elif len(res.tokens) >= sp.max_new_tokens:
                    res.finish_reason = "length"
                if res.finish_reason:
                    return True
            return False

        while waiting or running:
            for slot in range(B):
                if not waiting:
                    break
                if slot in running:
                    continue
                r = waiting[0]
                sp = params[r]
                need = len(prompts[r]) + sp.max_new_tokens + n
                if cache.pages_needed(slot, need) > cache.num_free_pages:
                    break
                waiting.popleft()
                cache.reserve(slot, need)
                running[slot] = r
                seeds[slot], temperature[slot], top_k[slot], top_p[slot] = sp.seed, sp.temperature, sp.top_k, sp.top_p
                logits = self.prefill(slot, prompts[r])
                first = self._sample(logits[None], seeds[slot : slot + 1], cache.lengths[slot : slot + 1],
                                     temperature[slot : slot + 1], top_k[slot : slot + 1], top_p[slot : slot + 1],
                                     greedy=bool(sp.temperature == 0))
                last[slot] = int(first[0])
                results[r].time_to_first_token_s = time.perf_counter() - start
                if accept(slot, [last[slot]]):
                    cache.release(slot)
                    del running[slot]
            if not running:
                continue
            active = np.zeros(B, bool)
            active[list(running)] = True
            cache.pages, out = self._decode(self.params, cache.pages, last, cache.page_table, cache.lengths, active,
                                            seeds, temperature, top_k, top_p, n_steps=n,
                                            greedy=bool((temperature[active] == 0).all()))
            out = np.asarray(out)
            for slot in list(running):
                cache.lengths[slot] += n
                last[slot] = out[slot, -1]
                if accept(slot, out[slot]):
                    cache.release(slot)
                    del running[slot]
        return results
