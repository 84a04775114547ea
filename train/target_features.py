"""The frozen target inside the training step: one dense causal forward over packed rows that returns the residual
streams the drafter reads and the target's logits, with no KV cache and no feature dump on disk.

Packed rows hold several sequences; attention stays inside a segment (segment ids) and rope positions restart
at every segment, so each sequence's features equal what `Engine.verify_features` gives for it alone (a test
checks this). The layers' own projections, norms and MLPs are called; only the paged attention is replaced by a
dense, segment-masked one, since the training rows are short and fully known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codegen_jax.model import Transformer, rope_tables


def _attention(attn, x, cos, sin, mask):
    """x [B, T, D]; mask [B, T, T] True where query t may see key s. The layer's projections, dense GQA."""
    B, T, _ = x.shape
    H, K, hd = attn.shape
    q, k, v = attn.heads(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), cos, sin)
    q = q.reshape(B, T, K, H // K, hd)  # query heads grouped by their KV head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    weights = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(B, T, H * hd)
    return attn.o_proj(o)


def target_forward(target: Transformer, tokens: jax.Array, segments: jax.Array, positions: jax.Array,
                   capture: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """tokens, segments, positions [B, T] (segment 0 is padding; positions restart at 0 per segment).

    Returns (features [B, T, len(capture) * D] the residual streams after layers `capture`, concatenated; final
    hidden states [B, T, D] after the norm, for the LM head), both without gradient."""
    x = target.embed_tokens(tokens)
    cos, sin = rope_tables(target.cfg, positions)
    causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0)
    mask = (same & causal[None]) | jnp.eye(tokens.shape[1], dtype=bool)[None]  # padding sees itself: no NaN
    captured = []
    for i, layer in enumerate(target.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if i in capture:
            captured.append(x)
    feats = jnp.concatenate(captured, axis=-1)
    return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(target.norm(x))
