"""Pure-JAX MoE layer: softmax router, top-k, SwiGLU experts through grouped matmuls, weighted combine.

Expert weights are bf16/f16 arrays or `QuantizedWeight`s (int8 values with one float32 scale per output channel,
made by `quantize_int8`); the reference dequantises them up front, the kernels after each dot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scale"], meta_fields=["k_major"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Int8 expert weights with per-output-channel scales: w[e, i, o] ~= values[e, i, o] * scale[e, o].

    k_major: values are stored [E, Out, In] instead (each output channel's inputs contiguous, torch's Linear
    layout), the one an int8 x int8 tensor-core dot reads its weight operand in without a transpose: on the H200 a
    Qwen3-235B gate/up pass of 8 experts streamed 3.1 TB/s that way against 2.3 in [E, In, Out]
    (benchmarks/results/logs/README.md, session 25). `shape` is the logical [E, In, Out] either way; the Triton
    kernels read both layouts."""

    values: jax.Array  # [E, In, Out] int8 ([E, Out, In] with k_major)
    scale: jax.Array  # [E, Out] float32
    k_major: bool = False

    @property
    def shape(self):
        E, a, b = self.values.shape
        return (E, b, a) if self.k_major else (E, a, b)

    @property
    def dtype(self):
        return self.values.dtype

    def io_values(self) -> jax.Array:
        """values as [E, In, Out] whatever the storage."""
        return jnp.swapaxes(self.values, 1, 2) if self.k_major else self.values


def quantize_int8(w: jax.Array, k_major: bool = False) -> QuantizedWeight:
    """[E, In, Out] float -> symmetric int8 with one scale per (expert, output channel): max |w| over In / 127;
    stored [E, Out, In] with k_major (see QuantizedWeight)."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / 127.0  # [E, Out]
    scale = jnp.where(scale == 0, 1.0, scale)
    values = jnp.clip(jnp.round(w / scale[:, None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(jnp.swapaxes(values, 1, 2) if k_major else values, scale, k_major)


def dequantize(w: jax.Array | QuantizedWeight, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):
        return (w.io_values().astype(jnp.float32) * w.scale[:, None, :]).astype(dtype)
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
