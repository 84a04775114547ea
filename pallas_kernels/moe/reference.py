"""Pure-JAX MoE layer: softmax router, top-k, SwiGLU experts through grouped matmuls, weighted combine.

Expert weights are bf16/f16 arrays or `QuantizedWeight`s (int8 values with one float32 scale per output channel,
made by `quantize_int8`); the reference dequantises them up front, the kernels after each dot.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QuantizedWeight(NamedTuple):
    """Int8 expert weights with per-output-channel scales: w[e, i, o] ~= values[e, i, o] * scale[e, o]."""

    values: jax.Array  # [E, In, Out] int8
    scale: jax.Array  # [E, Out] float32

    @property
    def shape(self):
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype


def quantize_int8(w: jax.Array) -> QuantizedWeight:
    """[E, In, Out] float -> symmetric int8 with one scale per (expert, output channel): max |w| over In / 127."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / 127.0  # [E, Out]
    scale = jnp.where(scale == 0, 1.0, scale)
    values = jnp.clip(jnp.round(w / scale[:, None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(values, scale)


def dequantize(w: jax.Array | QuantizedWeight, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):
        return (w.values.astype(jnp.float32) * w.scale[:, None, :]).astype(dtype)
    return w


def router_logits(x: jax.Array, router: jax.Array) -> jax.Array:
    """x [T, D] @ router [E, D]^T -> [T, E] float32 logits (the kernels' routing starts from these same values)."""
    return jnp.einsum("td,ed->te", x, router, preferred_element_type=jnp.float32)


def route(x: jax.Array, router: jax.Array, *, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax router and top-k: ([T, K] float32 weights, [T, K] int32 expert ids)."""
    logits = router_logits(x, router)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, K]
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def moe_reference(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array | QuantizedWeight,
    w_up: jax.Array | QuantizedWeight,
    w_down: jax.Array | QuantizedWeight,
    *,
    top_k: int,
    norm_topk_prob: bool,
) -> jax.Array:
    """Sparse MoE with SwiGLU experts (Qwen3-MoE semantics).

    Args:
      x: [T, D] tokens.
      router: [E, D] router weights (logits = x @ router.T).
      w_gate, w_up: [E, D, F] expert input projections (or QuantizedWeight with scale [E, F]).
      w_down: [E, F, D] expert output projections (or QuantizedWeight with scale [E, D]).
      top_k: experts per token.
      norm_topk_prob: renormalise the top-k probabilities to sum to 1.
    Returns:
      [T, D] in x's dtype.
    """
    T, D = x.shape
    E = router.shape[0]
    w_gate, w_up, w_down = (dequantize(w, x.dtype) for w in (w_gate, w_up, w_down))
    weights, experts = route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)
    weights = weights.astype(x.dtype)

    # Group the T*K (token, expert) pairs by expert so each expert's weights are read once.
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]  # [T*K, D]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)
    out = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)  # [T*K, D]
    out = out.astype(x.dtype) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((T, D), jnp.float32).at[token].add(out.astype(jnp.float32)).astype(x.dtype)
