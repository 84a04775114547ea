"""Pure-JAX MoE layer: softmax router, top-k, SwiGLU experts through grouped matmuls, weighted combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_reference(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    top_k: int,
    norm_topk_prob: bool,
) -> jax.Array:
    """Sparse MoE with SwiGLU experts (Qwen3-MoE semantics).

    Args:
      x: [T, D] tokens.
      router: [E, D] router weights (logits = x @ router.T).
      w_gate, w_up: [E, D, F] expert input projections.
      w_down: [E, F, D] expert output projections.
      top_k: experts per token.
      norm_topk_prob: renormalise the top-k probabilities to sum to 1.
    Returns:
      [T, D] in x's dtype.
    """
    T, D = x.shape
    E = router.shape[0]
    logits = jnp.einsum("td,ed->te", x, router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)  # [T, K]
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
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
