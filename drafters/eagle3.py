"""The EAGLE-3-style drafter: one decoder layer over fused target features, drafting token by token.

Low, middle and high target features of each cached position are fused by one linear layer into the model width;
position i's input is [embedding of token i+1; fused features of i] (2D wide) and its output predicts token i+2.
Past the cached positions the drafter feeds itself: the input for draft j is [embedding of draft j; the layer's
own output at the previous position]. The head maps to a reduced draft vocabulary (the tokens the target emits
most), and `d2t` maps draft ids back to the target's; draft probabilities are scattered into the full vocabulary
(zero elsewhere, which verification handles exactly). Embeddings are the target's.

Each draft step runs the layer over the window (W context positions + the drafts so far) again, a fixed shape
in a fori_loop: the window is small and the layer single, so recomputing beats keeping a second KV cache here.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from codegen_jax.model import Linear, RMSNorm
from drafters.neural import DraftLayer, draw


class DraftVocab(nnx.Variable):
    """Non-trainable draft -> target token map, saved with the checkpoint."""


@dataclass(frozen=True)
class Eagle3Config:
    """target_hidden: the target's width D; target_layers: low, middle and high layers (sorted, distinct);
    vocab_size: the target's; draft_vocab_size: the head's reduced vocabulary; draft_len: tokens per proposal."""

    target_hidden: int
    target_layers: tuple[int, ...]
    vocab_size: int
    draft_vocab_size: int
    draft_len: int = 8
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    context: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "target_layers", tuple(self.target_layers))
        if not self.target_layers or list(self.target_layers) != sorted(set(self.target_layers)):
            raise ValueError(f"target_layers must be sorted and distinct, got {self.target_layers}")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..vocab_size ({self.vocab_size}), "
                             f"got {self.draft_vocab_size}")
        for name in ("draft_len", "num_heads", "head_dim", "intermediate_size", "context", "target_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"Eagle3Config.{name} must be >= 1, got {getattr(self, name)}")


class Eagle3Drafter(nnx.Module):
    def __init__(self, cfg: Eagle3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, dtype = cfg.target_hidden, jnp.dtype(cfg.dtype)
        self.fc = Linear(len(cfg.target_layers) * D, D, bias=False, dtype=dtype, rngs=rngs)
        self.layer = DraftLayer(2 * D, D, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps,
                                dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = Linear(D, cfg.draft_vocab_size, bias=False, dtype=dtype, rngs=rngs)
        # default map: the first draft_vocab_size target ids; training sets the most frequent ones
        self.d2t = DraftVocab(jnp.arange(cfg.draft_vocab_size, dtype=jnp.int32))

    def draft(self, embed, head, ctx, ctx_next, ctx_len, last, seeds, positions, temperature, *, with_probs: bool):
        """embed [V, D] the target's (head unused: the drafter has its own reduced head); ctx [S, W, F] target
        features (right-aligned, ctx_len [S] valid), ctx_next [S, W] the token after each; last [S] the newest
        token. Returns tokens [S, K] target ids and, with_probs, their distributions [S, K, V]."""
        del head
        cfg = self.cfg
        S, W, _ = ctx.shape
        K, D, V = cfg.draft_len, cfg.target_hidden, cfg.vocab_size
        d2t = self.d2t[...]
        ctx_next = ctx_next.at[:, W - 1].set(last)  # also right when no context was kept yet
        emb = jnp.zeros((S, W + K, D), ctx.dtype).at[:, :W].set(jnp.take(embed, ctx_next, axis=0).astype(ctx.dtype))
        hid = jnp.zeros((S, W + K, D), ctx.dtype).at[:, :W].set(self.fc(ctx))
        positions_w = jnp.broadcast_to(jnp.arange(W + K)[None], (S, W + K))
        i = jnp.arange(W + K)
        valid = (i[None] >= (W - ctx_len)[:, None])  # [S, W+K]: context kept, and every draft slot
        causal = i[:, None] >= i[None]
        mask = (valid[:, None] & causal[None]) | jnp.eye(W + K, dtype=bool)[None]  # a query always sees itself

        def step(j, carry):
            emb, hid, tokens, probs = carry
            x = jnp.concatenate([emb, hid], axis=-1)  # [S, W+K, 2D]
            out = self.layer(x, hid, None, positions_w, mask, cfg.rope_theta)
            h = jax.lax.dynamic_index_in_dim(out, W - 1 + j, axis=1, keepdims=False)  # [S, D]
            logits = self.lm_head(self.norm(h)).astype(jnp.float32)  # [S, Vd]
            t, p = draw(logits, seeds, positions + j, temperature)
            tok = d2t[t]
            emb = jax.lax.dynamic_update_index_in_dim(emb, jnp.take(embed, tok, axis=0).astype(emb.dtype), W + j, 1)
            hid = jax.lax.dynamic_update_index_in_dim(hid, h, W + j, 1)
            tokens = tokens.at[:, j].set(tok)
            if with_probs:
                probs = probs.at[:, j].set(jnp.zeros((S, V), jnp.float32).at[:, d2t].set(p))
            return emb, hid, tokens, probs

        probs = jnp.zeros((S, K, V), jnp.float32) if with_probs else jnp.zeros((), jnp.float32)
        _, _, tokens, probs = jax.lax.fori_loop(0, K, step, (emb, hid, jnp.zeros((S, K), jnp.int32), probs))
        return tokens, (probs if with_probs else None)
