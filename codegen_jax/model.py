"""Decoder-only transformer in Flax NNX: Llama, Qwen2/2.5, Qwen3 and Qwen3-MoE.

Parameter names and layouts mirror the Hugging Face checkpoints (`layers.3.self_attn.q_proj.weight` is
[out, in]) so loading is a rename, not a reshuffle; the one exception is MoE experts, stacked per layer as
[E, D, F] / [E, F, D] for grouped matmuls. Attention reads and writes the paged KV cache through
`pallas_kernels.paged_attention`; the same forward serves prefill chunks, decode and multi-token verify.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from codegen_jax.config import ModelConfig
from pallas_kernels import moe, paged_attention

# One layer's KV pool: (k_pages, v_pages), each [Hkv, P, S, D].
LayerKV = tuple[jax.Array, jax.Array]


class Batch(NamedTuple):
    """Where a step's new tokens sit in the paged cache. Built once per step, shared by all layers."""

    positions: jax.Array  # [B, T] absolute positions of the new tokens
    page_table: jax.Array  # [B, N] int32
    kv_lens: jax.Array  # [B] tokens cached after this step
    q_lens: jax.Array  # [B] valid new tokens per row
    write_page: jax.Array  # [B, T] page each new token's K/V goes to (0, the scratch page, for padding)
    write_slot: jax.Array  # [B, T] slot inside that page


def make_batch(page_table: jax.Array, kv_lens: jax.Array, q_lens: jax.Array, T: int, page_size: int) -> Batch:
    positions = (kv_lens - q_lens)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    valid = jnp.arange(T)[None] < q_lens[:, None]
    page_idx = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    write_page = jnp.where(valid, jnp.take_along_axis(page_table, page_idx, axis=1), 0)
    return Batch(positions, page_table, kv_lens, q_lens, write_page, positions % page_size)


def microbatch_cuts(T: int, m: int, align: int = 64) -> tuple[int, ...]:
    """Boundaries (0, ..., T) of m consecutive pieces of T tokens, as equal as whole blocks of `align` tokens allow
    (the earlier pieces take the spare blocks, the last piece any tail under a block; blocks of 1 token when T is
    under m blocks): 2048 in 2 -> (0, 1024, 2048), in 3 -> (0, 704, 1408, 2048); 16 in 3 -> (0, 6, 11, 16)."""
    if not 1 <= m <= T:
        raise ValueError(f"cannot cut {T} tokens into {m} pieces")
    unit = align if T >= m * align else 1
    blocks, extra = divmod(T // unit, m)
    cuts = [0]
    for i in range(m):
        cuts.append(cuts[-1] + (blocks + (i < extra)) * unit)
    cuts[-1] = T
    return tuple(cuts)


def split_batch(batch: Batch, cuts: tuple[int, ...]) -> list[Batch]:
    """The step's new tokens per row as consecutive pieces [cuts[i], cuts[i + 1]), each a Batch of its own, its
    cache length ending at its last valid token (a row with fewer valid tokens has none in the later pieces: q_len
    0, nothing written, no query rows)."""
    start = batch.kv_lens - batch.q_lens  # cached before the step
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        out.append(Batch(batch.positions[:, lo:hi], batch.page_table,
                         start + jnp.minimum(batch.q_lens, hi), jnp.clip(batch.q_lens - lo, 0, hi - lo),
                         batch.write_page[:, lo:hi], batch.write_slot[:, lo:hi]))
    return out


def _param(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


class Linear(nnx.Module):
    """y = x @ weight.T + bias, weight [out, in] as in the checkpoints."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (d_out, d_in), dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...d,fd->...f", x, self.weight[...])
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, vocab: int, d: int, *, dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (vocab, d), dtype)

    def __call__(self, tokens):
        return jnp.take(self.weight[...], tokens, axis=0)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D/2] float32 for the given positions."""
    inv, attn_scale = cfg.rope.inv_freq(cfg.head_dim, cfg.max_position_embeddings)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv, jnp.float32)
    return jnp.cos(angles) * attn_scale, jnp.sin(angles) * attn_scale


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; rotates halves (the HF layout, not interleaved pairs)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None], sin[:, :, None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def write_kv(pages: jax.Array, new: jax.Array, batch: Batch) -> jax.Array:
    """pages [K, P, S, D] <- new [B, T, K, D] at (write_page, write_slot)."""
    return pages.at[:, batch.write_page, batch.write_slot].set(new.transpose(2, 0, 1, 3))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, H, K, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(D, H * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(D, K * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(D, K * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(H * hd, D, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.shape = (H, K, hd)

    def heads(self, q, k, v, cos, sin):
        """Projected q [B, T, H*hd], k, v [B, T, K*hd] -> per-head q [B, T, H, hd], k, v [B, T, K, hd], q and k
        normed (Qwen3) and rotated. Shared by the sharded attention and the drafters' training forward."""
        B, T, _ = q.shape
        H, K, hd = self.shape
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, K, hd), v.reshape(B, T, K, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def paged(self, q, k, v, kv: LayerKV, batch: Batch, attn_impl: str | None):
        """Writes k, v into the pages and attends: (o [B, T, H*hd] before o_proj, (k_pages, v_pages))."""
        B, T, H, hd = q.shape
        k_pages = write_kv(kv[0], k.astype(kv[0].dtype), batch)
        v_pages = write_kv(kv[1], v.astype(kv[1].dtype), batch)
        o = paged_attention(q, k_pages, v_pages, batch.page_table, batch.kv_lens, batch.q_lens,
                            scale=hd**-0.5, impl=attn_impl)
        return o.reshape(B, T, H * hd), (k_pages, v_pages)

    def __call__(self, x, cos, sin, kv: LayerKV, batch: Batch, attn_impl: str | None):
        q, k, v = self.heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin)
        o, pages = self.paged(q, k, v, kv, batch, attn_impl)
        return self.o_proj(o), pages


class MLP(nnx.Module):
    def __init__(self, d: int, f: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nnx.Module):
    """E SwiGLU experts stacked for grouped matmuls: gate/up [E, D, F], down [E, F, D]."""

    def __init__(self, e: int, d: int, f: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = _param(rngs, (e, d, f), dtype)
        self.up_proj = _param(rngs, (e, d, f), dtype)
        self.down_proj = _param(rngs, (e, f, d), dtype)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype=dtype, rngs=rngs)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x):
        B, T, D = x.shape
        e = self.experts
        y = moe(x.reshape(B * T, D), self.gate.weight[...], e.gate_proj[...], e.up_proj[...], e.down_proj[...],
                top_k=self.top_k, norm_topk_prob=self.norm_topk_prob)
        return y.reshape(B, T, D)


def after(x: jax.Array, tick: jax.Array | None) -> jax.Array:
    """x, unchanged in value, made to wait for the scalar `tick`: orders independent work for XLA's scheduler
    (`Transformer.microbatch_stagger`). min(|t|, 0) is 0 for every finite or infinite t and NaN for NaN, which the
    select maps to 0; XLA folds neither (under NaN they are not identities), so the dependence survives."""
    if tick is None:
        return x
    z = jnp.minimum(jnp.abs(tick.astype(jnp.float32)), 0.0)
    return x + jnp.where(z == z, z, 0.0).astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, i: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.is_moe_layer(i):
            self.mlp = SparseMoE(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv: LayerKV, batch: Batch, attn_impl):
        x, kv, _ = self.attention_stage(x, cos, sin, kv, batch, attn_impl, stage=False)
        return self.mlp_stage(x, stage=False)[0], kv

    # The two halves, each with its residual. As stages (`Transformer.microbatch_stagger`, stage=True) each starts
    # after `dep` and returns a tick, a scalar of its output projection's partial product before any all-reduce
    # (None where the block has no `staged` form, which leaves its stages unordered).
    def attention_stage(self, x, cos, sin, kv: LayerKV, batch: Batch, attn_impl, dep=None, stage=True):
        x = after(x, dep)
        a = self.self_attn
        args = (self.input_layernorm(x), cos, sin, kv, batch, attn_impl)
        h, kv, tick = a.staged(*args) if stage and hasattr(a, "staged") else (*a(*args), None)
        return x + h, kv, tick

    def mlp_stage(self, x, dep=None, stage=True):
        x = after(x, dep)
        m, y = self.mlp, self.post_attention_layernorm(x)
        h, tick = m.staged(y) if stage and hasattr(m, "staged") else (m(y), None)
        return x + h, tick


class Transformer(nnx.Module):
    """The causal LM. `__call__` returns final hidden states; `logits` applies the LM head.

    microbatches (m, default 1): a step of T new tokens per row whose smallest piece holds at least
    `microbatch_min_tokens` tokens (a prefill chunk, not decode or verify) runs as m consecutive pieces (cut at whole
    blocks of 64 tokens where T allows, `microbatch_cuts`)
    interleaved layer by layer: piece i's layer l writes its K/V into the pages before piece i + 1's layer l attends
    to them, so the output is the unsplit forward's, while the pieces' work is independent inside a layer. With
    tensor parallelism that is what lets one piece's all-reduce run under the next piece's matmuls: two
    micro-batches in flight, the overlap coming from the data rather than from splitting each collective.

    microbatch_stagger: the pieces' sublayers run as stages in a fixed order (every piece's attention, then every
    piece's MLP, layer by layer), each stage starting after the previous stage's output projection (`after`), so a
    stage's all-reduce has the whole next stage beside it. Left to itself XLA runs both pieces' same matmuls
    together and gives each all-reduce a kernel or two. Same output.
    """

    microbatches: int = 1
    microbatch_min_tokens: int = 256
    microbatch_stagger: bool = False

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        kv: tuple[LayerKV, ...],
        batch: Batch,
        *,
        attn_impl: str | None = None,
        capture: tuple[int, ...] = (),
    ) -> tuple[jax.Array, tuple[LayerKV, ...], tuple[jax.Array, ...]]:
        """tokens [B, T] -> (hidden [B, T, D] after the final norm, updated KV, captured layer outputs).

        `capture` names layers whose outputs (the residual stream after layer i) are returned, for drafters.
        """
        cos, sin = rope_tables(self.cfg, batch.positions)
        B, T = tokens.shape
        m = self.microbatches
        cuts = microbatch_cuts(T, m) if 1 < m <= T else ()
        cut = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        if cut and B * min(s.stop - s.start for s in cut) >= self.microbatch_min_tokens:
            # looked up per piece: with a vocab-sharded table each lookup ends in an all-reduce, and a later
            # piece's can run under the first piece's first layer
            xs = [self.embed_tokens(tokens[:, s]) for s in cut]
            pieces = [(cos[:, s], sin[:, s], b) for s, b in zip(cut, split_batch(batch, cuts), strict=True)]
        else:
            xs, pieces = [self.embed_tokens(tokens)], [(cos, sin, batch)]

        def joined():
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)

        new_kv, captured = [], []
        tick = None  # the last stage's (staggered pieces)
        for i, layer in enumerate(self.layers):
            layer_kv = kv[i]
            if self.microbatch_stagger and len(pieces) > 1:
                for j, (cj, sj, bj) in enumerate(pieces):
                    xs[j], layer_kv, tick = layer.attention_stage(xs[j], cj, sj, layer_kv, bj, attn_impl, tick)
                for j in range(len(pieces)):
                    xs[j], tick = layer.mlp_stage(xs[j], tick)
            else:
                for j, (cj, sj, bj) in enumerate(pieces):
                    xs[j], layer_kv = layer(xs[j], cj, sj, layer_kv, bj, attn_impl)
            new_kv.append(layer_kv)
            if i in capture:
                captured.append(joined())
        return self.norm(joined()), tuple(new_kv), tuple(captured)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""
        w = self.embed_tokens.weight[...] if self.lm_head is None else self.lm_head.weight[...]
        return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
