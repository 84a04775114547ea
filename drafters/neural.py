"""What the neural drafters share: a draft decoder layer, and the driver that keeps each slot's window of target
features on the device and runs a drafter model's jitted `draft` against the target's embeddings and LM head.

The target's features (residual streams after the drafter's `target_layers`, concatenated) of the last `context`
cached positions of each slot live in a device array, right-aligned: ctx [S, W, F], with ctx_next [S, W] the token
that followed each position and ctx_len [S] how many are valid. The speculative step traces `draft` and `append`
into its own program, so a step's draft, verify and window update are one dispatch and nothing of the drafter goes
through the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codegen_jax.model import Linear, RMSNorm, Transformer, apply_rope
from drafters.base import Draft, Drafter, Sequence


def rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim / 2] for positions [B, T]."""
    inv = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv
    return jnp.cos(angles), jnp.sin(angles)


class DraftLayer(nnx.Module):
    """A pre-norm decoder layer whose queries come from its own tokens and whose keys and values come from extra
    context vectors (projected target features) followed by its own tokens. d_in is the width attention reads
    (EAGLE-3 reads [embedding; hidden], 2D); d is the residual width."""

    def __init__(self, d_in: int, d: int, heads: int, head_dim: int, ffn: int, eps: float, *, dtype, rngs):
        self.input_layernorm = RMSNorm(d_in, eps, dtype=dtype)
        self.q_proj = Linear(d_in, heads * head_dim, bias=False, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d_in, heads * head_dim, bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d_in, heads * head_dim, bias=False, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(heads * head_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype=dtype)
        self.gate_proj = Linear(d, ffn, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, ffn, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(ffn, d, bias=False, dtype=dtype, rngs=rngs)
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, x_in, residual, extra, positions, mask, theta: float):
        """x_in [B, T, d_in] this layer's tokens; residual [B, T, d]; extra [B, C, d_in] or None, context keys
        and values before the tokens; positions [B, C + T]; mask [B, T, C + T] True where attention may look."""
        B, T, _ = x_in.shape
        H, hd = self.heads, self.head_dim
        h = self.input_layernorm(x_in)
        src = h if extra is None else jnp.concatenate([self.input_layernorm(extra), h], axis=1)  # [B, C+T, d_in]
        S = src.shape[1]
        cos, sin = rope(positions, hd, theta)
        q = apply_rope(self.q_proj(h).reshape(B, T, H, hd), cos[:, S - T :], sin[:, S - T :])
        k = apply_rope(self.k_proj(src).reshape(B, S, H, hd), cos, sin)
        v = self.v_proj(src).reshape(B, S, H, hd)
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
        weights = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1).astype(v.dtype)
        o = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, H * hd)
        x = residual + self.o_proj(o)
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))


def draw(logits, seeds, positions, temperature):
    """logits [B, V] float32 -> (token [B], probs [B, V]): a draw from softmax(logits / T) for T > 0 rows (their
    probs are that distribution), the argmax for T == 0 rows."""
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), p), 3))(seeds, positions)
    drawn = jax.vmap(jax.random.categorical)(keys, jnp.log(probs))
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, -1)).astype(jnp.int32), probs


def append_window(ctx, ctx_next, ctx_len, feats, next_tokens, n):
    """Appends the first n[s] of feats [S, T, F] / next_tokens [S, T] to each right-aligned window (traced)."""
    W = ctx.shape[1]
    idx = n[:, None] + jnp.arange(W)[None]  # the last W of the W + n[s] valid entries
    all_f = jnp.concatenate([ctx, feats.astype(ctx.dtype)], axis=1)
    all_t = jnp.concatenate([ctx_next, next_tokens.astype(jnp.int32)], axis=1)
    ctx = jnp.take_along_axis(all_f, idx[..., None], axis=1)
    return ctx, jnp.take_along_axis(all_t, idx, axis=1), jnp.minimum(ctx_len + n, W)


_append = jax.jit(append_window, donate_argnums=(0, 1, 2))


@jax.jit
def _set_row(ctx, ctx_next, ctx_len, slot, feats, next_tokens, n):
    """The window with row `slot` replaced by feats [W, F], next_tokens [W] and length n: one dispatch per new
    request (three eager `.at[].set` calls cost ~3 ms of host time, a serving step's worth)."""
    return ctx.at[slot].set(feats), ctx_next.at[slot].set(next_tokens), ctx_len.at[slot].set(n)


class NeuralDrafter(Drafter):
    """Drives a drafter model (BlockDrafter, Eagle3Drafter) for an engine's slots. The model exposes `cfg`
    (target_layers, context, draft_len) and `draft(embed [V, D], head [V, D], ctx, ctx_next, ctx_len, last,
    seeds, positions, temperature, *, with_probs) -> (tokens [S, K], probs [S, K, V] | None)`.

    `on_device`: the speculative step traces `draft` and `append` into its own jit (one dispatch per step, the
    draft never visits the host); `propose`/`observe` run the same computations as separate calls."""

    on_device = True

    def __init__(self, model: nnx.Module, target: Transformer, num_slots: int):
        cfg = model.cfg
        if max(cfg.target_layers) >= target.cfg.num_layers:
            raise ValueError(f"drafter reads target layers {cfg.target_layers} but the target has "
                             f"{target.cfg.num_layers}")
        if cfg.target_hidden != target.cfg.hidden_size:
            raise ValueError(f"drafter was built for target hidden size {cfg.target_hidden}, the target has "
                             f"{target.cfg.hidden_size}")
        self.model, self.num_slots = model, num_slots
        self.capture, self.context, self.max_draft = tuple(cfg.target_layers), cfg.context, cfg.draft_len
        self.embed = target.embed_tokens.weight.get_value()  # shared with the target, not copied
        self.head = self.embed if target.lm_head is None else target.lm_head.weight.get_value()
        dtype = self.embed.dtype
        F = len(self.capture) * target.cfg.hidden_size
        self.ctx = jnp.zeros((num_slots, cfg.context, F), dtype)  # [S, W, F]
        self.ctx_next = jnp.zeros((num_slots, cfg.context), jnp.int32)
        self.ctx_len = jnp.zeros((num_slots,), jnp.int32)
        self.graphdef, self.params = nnx.split(model)  # params: an nnx.State (train/ swaps in new ones)
        self._flat: tuple = (None, [], None)  # (the State flattened, its leaves, treedef)
        self._draft = jax.jit(self.draft, static_argnames="with_probs")

    def flat_params(self) -> list[jax.Array]:
        """`params` as a flat list, flattened once per State: flattening an nnx.State costs a Python callback per
        Variable, more than a small model's step (the engine does the same)."""
        if self._flat[0] is not self.params:
            leaves, treedef = jax.tree.flatten(self.params)
            self._flat = (self.params, leaves, treedef)
        return self._flat[1]

    @property
    def window(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(ctx [S, W, F], ctx_next [S, W], ctx_len [S]): the device state a step reads and replaces."""
        return self.ctx, self.ctx_next, self.ctx_len

    @window.setter
    def window(self, value) -> None:
        self.ctx, self.ctx_next, self.ctx_len = value

    def draft(self, params, embed, head, window, last, seeds, positions, temperature, *, with_probs: bool):
        """Traced: the model's draft from the window (params: `flat_params()`; embed, head [V, D] the target's).
        last, seeds, positions, temperature [S]. Returns (tokens [S, K], probs [S, K, V] or None)."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._flat[2], params))
        return model.draft(embed, head, *window, last, seeds, positions, temperature, with_probs=with_probs)

    @staticmethod
    def append(window, feats, next_tokens, n):
        """Traced: the window after appending the first n [S] of feats [S, T, F] / next_tokens [S, T] per row."""
        return append_window(*window, feats, next_tokens, n)

    def begin(self, seq: Sequence, features: jax.Array | None = None) -> None:
        W, s = self.context, seq.slot
        n = 0 if features is None else int(features.shape[0])
        feats = np.zeros(self.ctx.shape[1:], self.ctx.dtype)
        nxt = np.zeros(W, np.int32)
        if n:
            feats[W - n :] = np.asarray(features)
            nxt[W - n :] = seq.tokens[len(seq.tokens) - n :]  # the token after each of the last n cached ones
        self.ctx, self.ctx_next, self.ctx_len = _set_row(self.ctx, self.ctx_next, self.ctx_len, s, feats, nxt, n)

    def propose(self, seqs: list[Sequence], max_lens: dict[int, int]) -> Draft:
        S = self.num_slots
        last, seeds, positions = np.zeros(S, np.int32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
        temperature, lengths = np.zeros(S, np.float32), np.zeros(S, np.int32)
        for s in seqs:
            last[s.slot], seeds[s.slot], positions[s.slot] = s.tokens[-1], s.params.seed, len(s.tokens)
            temperature[s.slot] = s.params.temperature
            lengths[s.slot] = min(self.max_draft, max_lens[s.slot])
        with_probs = bool((temperature > 0).any())
        tokens, probs = self._draft(self.flat_params(), self.embed, self.head, self.window, last, seeds, positions,
                                    temperature, with_probs=with_probs)
        return Draft(np.asarray(tokens), lengths, probs)

    def observe(self, seqs, draft, accepted, new_tokens, features=None) -> None:
        assert features is not None
        n = np.zeros(self.num_slots, np.int32)
        for s in seqs:
            n[s.slot] = accepted[s.slot] + 1  # last and the accepted drafts are now cached
        self.ctx, self.ctx_next, self.ctx_len = _append(self.ctx, self.ctx_next, self.ctx_len, features,
                                                        np.asarray(new_tokens), n)
