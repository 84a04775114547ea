"""The drafters' training losses over packed rows with the target's features computed in the same step.

Both losses work on anchors: a position p whose next token is in a response. At serving time the drafter's newest
token is x[p], its context window holds the target's features of positions p-W .. p-1 (the cached ones) and it
drafts x[p+1], x[p+2], ...; training builds exactly those windows (right-aligned, cut at the segment start) so the
model sees what it will be served.

- block: `num_blocks` random anchors per row; cross-entropy of every masked position against the target's tokens
  (the response is the target's output), weighted by exp(-(i-1)/decay) for draft position i when decay > 0
  (earlier positions matter more: a miss ends the accepted run).
- eagle3: the drafter is unrolled `draft_len` steps from each anchor feeding itself its own argmax tokens and
  hidden states (training-time test: it learns from the states it will meet, not only teacher-forced ones), each
  step against the target's distribution over the draft vocabulary (soft targets); step 0 also learns at every
  window position, which costs nothing extra.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from drafters.block_drafter import BlockDrafter
from drafters.eagle3 import Eagle3Drafter


def sample_anchors(key, batch: dict, n: int) -> tuple[jax.Array, jax.Array]:
    """Up to n distinct random anchors per row: (anchors [B, n], valid [B, n]). Anchor p: x[p+1] is a response
    token of p's own segment."""
    seg, loss = batch["segments"], batch["loss"]
    nxt_ok = (loss[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)  # [B, T-1]
    scores = jnp.where(nxt_ok, jax.random.uniform(key, nxt_ok.shape), -1.0)
    top, anchors = jax.lax.top_k(scores, n)  # a Gumbel-free top-k of uniforms: n distinct uniform picks
    return anchors, top >= 0


def context_windows(feats, batch: dict, anchors, W: int):
    """The serving-time window of each anchor: ctx [B, n, W, F] features of positions p-W .. p-1, ctx_next
    [B, n, W] the token after each (x[p] last), ctx_len [B, n] how many are in p's segment."""
    idx = anchors[..., None] - W + jnp.arange(W)  # [B, n, W]
    safe = jnp.maximum(idx, 0)
    ctx = jax.vmap(lambda f, i: f[i])(feats, safe)
    ctx_next = jax.vmap(lambda r, i: r[i])(batch["tokens"], safe + 1)  # idx + 1 <= p: always inside the row
    ctx_len = jnp.minimum(jnp.take_along_axis(batch["positions"], anchors, axis=1), W)
    return ctx, ctx_next, ctx_len


def _ahead(batch: dict, anchors, K: int):
    """Positions p+1 .. p+K of each anchor: (pos [B, n, K] clipped, ok [B, n, K] in p's segment and a response)."""
    T = batch["tokens"].shape[1]
    pos = anchors[..., None] + 1 + jnp.arange(K)
    clipped = jnp.minimum(pos, T - 1)
    seg_p = jnp.take_along_axis(batch["segments"], anchors, axis=1)[..., None]
    take = lambda a: jax.vmap(lambda r, i: r[i])(a, clipped)
    ok = (pos < T) & (take(batch["segments"]) == seg_p) & (take(batch["loss"]) > 0)
    return clipped, ok


def block_loss(model: BlockDrafter, embed, head, feats, batch: dict, key, *, num_blocks: int, decay: float):
    """embed, head [V, D] the target's; feats [B, T, F] its captured features. Returns (loss, metrics)."""
    cfg = model.cfg
    B = feats.shape[0]
    K = cfg.block_size - 1
    anchors, valid = sample_anchors(key, batch, num_blocks)
    ctx, _, ctx_len = context_windows(feats, batch, anchors, cfg.context)
    last = jnp.take_along_axis(batch["tokens"], anchors, axis=1)
    logits = model(embed, head, ctx.reshape(B * num_blocks, *ctx.shape[2:]), ctx_len.reshape(-1), last.reshape(-1))
    logits = logits.reshape(B, num_blocks, K, -1)  # [B, n, K, V]
    pos, ok = _ahead(batch, anchors, K)
    labels = jax.vmap(lambda r, i: r[i])(batch["tokens"], pos)  # [B, n, K]
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    mask = (ok & valid[..., None]).astype(jnp.float32)
    w = mask * (jnp.exp(-jnp.arange(K) / decay) if decay > 0 else 1.0)
    loss = (ce * w).sum() / jnp.maximum(w.sum(), 1.0)
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    # the drafted run a greedy verify would accept, per block: leading correct positions
    run = jnp.cumprod(hit, axis=-1).sum(-1)
    return loss, {"acc": hit.sum() / jnp.maximum(mask.sum(), 1.0),
                  "accepted": (run * valid).sum() / jnp.maximum(valid.sum(), 1)}


def eagle3_unroll(model: Eagle3Drafter, embed, ctx, ctx_next, ctx_len):
    """The serving draft loop (Eagle3Drafter.draft at temperature 0), differentiable: ctx [S, W, F], ctx_next
    [S, W] (last token at W-1), ctx_len [S]. Returns (logits [S, K, Vd] of each draft step, step 0's logits [S, W,
    Vd] at every window position, tokens [S, K] the greedy drafts as target ids)."""
    cfg = model.cfg
    S, W, _ = ctx.shape
    K, D = cfg.draft_len, cfg.target_hidden
    d2t = model.d2t[...]
    dt = ctx.dtype
    emb = jnp.zeros((S, W + K, D), dt).at[:, :W].set(jnp.take(embed, ctx_next, axis=0).astype(dt))
    hid = jnp.zeros((S, W + K, D), dt).at[:, :W].set(model.fc(ctx))
    positions = jnp.broadcast_to(jnp.arange(W + K)[None], (S, W + K))
    i = jnp.arange(W + K)
    valid = i[None] >= (W - ctx_len)[:, None]
    mask = (valid[:, None] & (i[:, None] >= i[None])[None]) | jnp.eye(W + K, dtype=bool)[None]
    steps, tokens, dense = [], [], None
    for j in range(K):  # unrolled: K is small and every step needs its own gradient path
        out = model.layer(jnp.concatenate([emb, hid], -1), hid, None, positions, mask, cfg.rope_theta)
        if j == 0:
            dense = model.lm_head(model.norm(out[:, :W])).astype(jnp.float32)
        h = out[:, W - 1 + j]  # [S, D]
        lg = model.lm_head(model.norm(h)).astype(jnp.float32)
        tok = d2t[jnp.argmax(lg, -1)]
        emb = emb.at[:, W + j].set(jax.lax.stop_gradient(jnp.take(embed, tok, axis=0).astype(dt)))
        hid = hid.at[:, W + j].set(h)
        steps.append(lg)
        tokens.append(tok)
    return jnp.stack(steps, 1), dense, jnp.stack(tokens, 1)


def _soft_ce(logits, target_logits):
    """Cross-entropy of logits [..., Vd] against softmax(target_logits [..., Vd])."""
    return -(jax.nn.softmax(target_logits, -1) * jax.nn.log_softmax(logits, -1)).sum(-1)


def eagle3_loss(model: Eagle3Drafter, embed, head, feats, hidden, batch: dict, key, *, num_blocks: int,
                decay: float):
    """feats [B, T, F] captured features; hidden [B, T, D] the target's final hidden states (its distribution is
    head @ hidden, restricted to the draft vocabulary). Returns (loss, metrics)."""
    cfg = model.cfg
    B, T, _ = feats.shape
    W, K = cfg.context, cfg.draft_len
    d2t = model.d2t[...]
    # the target's logits over the draft vocabulary at every position: logits at q predict x[q+1]
    tl = jnp.einsum("btd,vd->btv", hidden, jnp.take(head, d2t, axis=0).astype(hidden.dtype),
                    preferred_element_type=jnp.float32)  # [B, T, Vd]
    anchors, valid = sample_anchors(key, batch, num_blocks)
    ctx, ctx_next, ctx_len = context_windows(feats, batch, anchors, W)
    flat = lambda a: a.reshape(B * num_blocks, *a.shape[2:])
    steps, dense, _ = eagle3_unroll(model, embed, flat(ctx).astype(feats.dtype), flat(ctx_next), flat(ctx_len))
    steps = steps.reshape(B, num_blocks, K, -1)
    dense = dense.reshape(B, num_blocks, W, -1)
    pos, ok = _ahead(batch, anchors, K)  # step j predicts x[p+1+j]: the target's logits at p+j
    t_steps = jax.vmap(lambda r, i: r[i])(tl, pos - 1)
    mask = (ok & valid[..., None]).astype(jnp.float32)
    w = mask * (jnp.exp(-jnp.arange(K) / decay) if decay > 0 else 1.0)
    step_loss = (_soft_ce(steps, t_steps) * w).sum() / jnp.maximum(w.sum(), 1.0)
    # step 0 at window slot i (position p-W+i) predicts x[p-W+i+2]: the target's logits at p-W+i+1
    wpos = jnp.clip(anchors[..., None] - W + 1 + jnp.arange(W), 0, T - 1)
    t_dense = jax.vmap(lambda r, i: r[i])(tl, wpos)
    in_ctx = (jnp.arange(W) >= (W - ctx_len)[..., None]) & (jnp.arange(W) < W - 1) & valid[..., None]
    dmask = in_ctx.astype(jnp.float32)
    dense_loss = (_soft_ce(dense, t_dense) * dmask).sum() / jnp.maximum(dmask.sum(), 1.0)
    hit = (jnp.argmax(steps, -1) == jnp.argmax(t_steps, -1)).astype(jnp.float32) * mask
    run = jnp.cumprod(hit, axis=-1).sum(-1)
    return step_loss + dense_loss, {"acc": hit.sum() / jnp.maximum(mask.sum(), 1.0),
                                    "accepted": (run * valid).sum() / jnp.maximum(valid.sum(), 1)}
