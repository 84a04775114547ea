"""The block drafter (DFlash-style): one forward pass drafts a whole block.

The target's hidden states from several layers at the last `context` cached positions are concatenated and
projected to the model width; every draft layer attends to them (as extra keys and values) and to the block. The
block is the last accepted token followed by block_size - 1 mask embeddings, attending to each other both ways;
the outputs at the mask positions, through the target's LM head, are the draft. Embeddings and LM head are the
target's, so the drafter holds only its projection, its few layers and the mask embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from codegen_jax.model import Linear, RMSNorm
from drafters.neural import DraftLayer, draw


@dataclass(frozen=True)
class BlockDrafterConfig:
    """target_hidden: the target's width D; target_layers: layers whose outputs are read (sorted, distinct);
    block_size: tokens per block (drafts block_size - 1); context: target positions attended to."""

    target_hidden: int
    target_layers: tuple[int, ...]
    block_size: int = 16
    num_layers: int = 2
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
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the last token and at least one mask), got {self.block_size}")
        for name in ("num_layers", "num_heads", "head_dim", "intermediate_size", "context", "target_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockDrafterConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def draft_len(self) -> int:
        return self.block_size - 1


class BlockDrafter(nnx.Module):
    def __init__(self, cfg: BlockDrafterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, dtype = cfg.target_hidden, jnp.dtype(cfg.dtype)
        self.fc = Linear(len(cfg.target_layers) * D, D, bias=False, dtype=dtype, rngs=rngs)
        self.mask_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (D,), jnp.float32).astype(dtype))
        self.layers = nnx.List([DraftLayer(D, D, cfg.num_heads, cfg.head_dim, cfg.intermediate_size,
                                           cfg.rms_norm_eps, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, embed, head, ctx, ctx_len, last):
        """embed, head [V, D] the target's; ctx [S, W, F] target features (right-aligned, ctx_len [S] valid);
        last [S] the last accepted token. Returns logits [S, block_size - 1, V] float32 for the masked positions."""
        cfg = self.cfg
        S, W, _ = ctx.shape
        Bk = cfg.block_size
        x = jnp.concatenate([jnp.take(embed, last, axis=0)[:, None].astype(ctx.dtype),
                             jnp.broadcast_to(self.mask_embedding[...], (S, Bk - 1, cfg.target_hidden))], axis=1)
        c = self.fc(ctx)  # [S, W, D]
        positions = jnp.broadcast_to(jnp.arange(W + Bk)[None], (S, W + Bk))
        valid_ctx = jnp.arange(W)[None] >= (W - ctx_len)[:, None]  # [S, W]
        mask = jnp.concatenate([jnp.broadcast_to(valid_ctx[:, None], (S, Bk, W)), jnp.ones((S, Bk, Bk), bool)], -1)
        for layer in self.layers:
            x = layer(x, x, c, positions, mask, cfg.rope_theta)
        h = self.norm(x[:, 1:])
        return jnp.einsum("bkd,vd->bkv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)

    def draft(self, embed, head, ctx, ctx_next, ctx_len, last, seeds, positions, temperature, *, with_probs: bool):
        """The NeuralDrafter entry: tokens [S, K] (each drawn independently from its position's distribution, or
        its argmax at temperature 0) and, with_probs, those distributions [S, K, V]."""
        logits = self(embed, head, ctx, ctx_len, last)  # [S, K, V]
        K = logits.shape[1]
        tokens, probs = jax.vmap(lambda lg, j: draw(lg, seeds, positions + j, temperature), in_axes=(1, 0),
                                 out_axes=1)(logits, jnp.arange(K))
        return tokens, (probs if with_probs else None)
