"""Sampling on the device: greedy, temperature, top-k, top-p, with per-row parameters (no recompiles)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def token_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row: the token at position p of a request is drawn with fold_in(key(seed), p), so a
    request's samples do not depend on its batch neighbours, on chunking, or on speculative verification."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> tempered logits with everything outside top-k / top-p set to -inf."""
    V = logits.shape[-1]
    lg = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-lg, axis=-1)  # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    ranks = jnp.arange(V)[None]
    in_k = ranks < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    # keep a token while the mass ranked above it is below top_p (the first token always stays); top_p >= 1
    # keeps all of top-k even where the float32 running sum reaches 1 before the tail
    keep = in_k & (((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p >= 1)[:, None])
    n_keep = jnp.maximum(keep.sum(-1), 1)
    threshold = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(lg >= threshold, lg, -jnp.inf)


def sample(logits, seeds, positions, temperature, top_k, top_p, *, greedy: bool = False) -> jax.Array:
    """logits [B, V] float32; seeds, positions, top_k [B] int; temperature, top_p [B] float -> tokens [B] int32.

    `greedy` (static) says every row has temperature 0: the caller knows it on the host, and choosing here rather
    than with lax.cond matters on GPUs, where XLA evaluates a conditional's predicate on the host and so stalls
    the device once per decode step."""
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    filtered = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(token_keys(seeds, positions), filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, argmax)
