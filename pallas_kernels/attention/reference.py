"""Pure-JAX paged attention: the reference every kernel is tested against, and the fallback on any platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a row with no valid key gives 0 instead of NaN


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    q_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention of each sequence's new tokens over its cached prefix and themselves (causal).

    Args:
      q: [B, T, Hq, D] queries; row b holds q_lens[b] valid tokens, at positions kv_lens[b] - q_lens[b] + t.
      k_pages, v_pages: [Hkv, P, S, D] the layer's page pool (P pages of S tokens); the new tokens' K/V are
        already written. Hq must be a multiple of Hkv (GQA).
      page_table: [B, N] int32 page ids of each sequence, in order; entries past the sequence are ignored.
      kv_lens: [B] int32 tokens in the cache after this step (prefix + new).
      q_lens: [B] int32 new tokens per sequence (0 for an empty slot).
      scale: softmax scale (usually D ** -0.5).
      sliding_window: if set, a query at position p sees keys in (p - sliding_window, p].
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
    Returns:
      [B, T, Hq, D] in q's dtype; rows t >= q_lens[b] are 0.
    """
    B, T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    N = page_table.shape[1]
    G = Hq // Hkv
    k = k_pages[:, page_table].reshape(Hkv, B, N * S, D)  # [K, B, L, D]
    v = v_pages[:, page_table].reshape(Hkv, B, N * S, D)
    kpos = jnp.arange(N * S)
    q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(T)[None]  # [B, T]
    key_ok = kpos[None, :] < kv_lens[:, None]  # [B, L]
    row_ok = jnp.arange(T)[None] < q_lens[:, None]  # [B, T]
    mask = key_ok[:, None, :] & (kpos[None, None, :] <= q_pos[:, :, None]) & row_ok[:, :, None]  # [B, T, L]
    if sliding_window is not None:
        mask &= kpos[None, None, :] > q_pos[:, :, None] - sliding_window
    # Zero V outside the sequence so garbage (even NaN) in unused pages cannot leak through 0 * NaN.
    v = jnp.where(key_ok[None, :, :, None], v, 0)

    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,kbld->bkgtl", qg, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    m = mask[:, None, None]  # [B, 1, 1, T, L]
    s = jnp.where(m, s, NEG_INF)
    p = jnp.where(m, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    o = jnp.einsum("bkgtl,kbld->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, T, Hq, D).astype(q.dtype)
