"""Expert-parallel MoE: experts split over a mesh axis, tokens sent to their experts' devices with all_to_all.

Runs per device inside `jax.shard_map` (tokens and experts both split over `axis`), with the semantics of
`pallas_kernels.moe.moe_reference`. No token is dropped: each device's send buffer to each peer holds all of its
(token, expert) pairs, the worst case, so the shapes are static and the result exact. `capacity` caps it (pairs
over the cap are dropped, as capacity-factor MoE does) when the buffers would be too large.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_expert_parallel(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    top_k: int,
    norm_topk_prob: bool,
    axis: str,
    capacity: int | None = None,
) -> jax.Array:
    """x [T, D] this device's tokens; router [E, D] (all experts); w_gate, w_up [E/n, D, F], w_down [E/n, F, D]
    this device's experts (device i holds experts i*E/n ...). Returns [T, D] in x's dtype."""
    n = jax.lax.axis_size(axis)
    T, D = x.shape
    E, E_loc = router.shape[0], w_gate.shape[0]
    assert E == n * E_loc, f"{E} experts over {n} devices holding {E_loc} each"
    logits = jnp.einsum("td,ed->te", x, router, preferred_element_type=jnp.float32)
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # [T, K]
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    weights = weights.astype(x.dtype)

    # Pack pairs per destination device: pair p goes to slot pos[p] of buffer dest[p].
    flat = experts.reshape(-1)  # [T*K], token-major
    token = jnp.arange(T * top_k) // top_k
    dest = flat // E_loc
    C = T * top_k if capacity is None else capacity
    pos = jnp.take_along_axis(jnp.cumsum(jax.nn.one_hot(dest, n, dtype=jnp.int32), axis=0), dest[:, None], 1)[:, 0] - 1
    kept = pos < C
    pos = jnp.where(kept, pos, C)  # dropped pairs write out of bounds (discarded by mode="drop")
    send_x = jnp.zeros((n, C, D), x.dtype).at[dest, pos].set(x[token], mode="drop")
    send_e = jnp.full((n, C), -1, jnp.int32).at[dest, pos].set(flat % E_loc, mode="drop")

    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)  # [n, C, D]: recv[j] came from device j
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0)  # [n, C] local expert ids, -1 for empty slots

    # Grouped matmuls over the local experts; empty slots sort last, past every group.
    rx, re = recv_x.reshape(n * C, D), recv_e.reshape(n * C)
    key = jnp.where(re < 0, E_loc, re)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=E_loc + 1)[:E_loc].astype(jnp.int32)
    xs = rx[order]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x.dtype)
    out = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)  # [n*C, D]
    out = jnp.where((key[order] < E_loc)[:, None], out, 0.0).astype(x.dtype)
    y = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(n, C, D)

    back = jax.lax.all_to_all(y, axis, 0, 0)  # [n, C, D]: back[j] = results of the pairs sent to device j
    res = back[dest, jnp.minimum(pos, C - 1)] * kept[:, None].astype(x.dtype)  # [T*K, D]
    res = res * weights.reshape(-1)[:, None]
    return jnp.zeros((T, D), jnp.float32).at[token].add(res.astype(jnp.float32)).astype(x.dtype)
