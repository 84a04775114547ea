"""The lossless accept rule, batched on the device: which draft tokens to keep and the token that follows them.

Row s verified [last, d_1 .. d_k] in one target forward, so logits[s, j] is the target's distribution p_j for the
token after d_j (after `last` for j = 0). Greedy keeps the longest run of drafts equal to the target's argmax and
then the target's own token. Sampling keeps d_{j+1} with probability min(1, p_j(d) / q_j(d)) and, at the first
rejection, draws from normalize(max(0, p_j - q_j)); after a fully accepted draft it draws from p_k. The output is
then distributed exactly as sampling the target token by token (Leviathan et al. 2023, Chen et al. 2023). A
drafter without probabilities drafts deterministically, so its q is one-hot on the draft token.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from codegen_jax.sampling import filter_logits


def _key(seed, position, stream: int):
    # stream 1: accept uniforms, 2: the bonus/residual draw; position keeps draws independent across steps
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), position), stream)


@partial(jax.jit, static_argnames="greedy")
def verify_tokens(logits, draft, draft_len, probs, seeds, positions, temperature, top_k, top_p, *, greedy: bool):
    """logits [S, T, V] float32 (T = K + 1); draft [S, K] int32; draft_len [S] (<= K); probs [S, K, V] draft
    distributions or None (one-hot); seeds, top_k [S] int; positions [S] position of row's first new token;
    temperature, top_p [S] float. `greedy` (static): every row has temperature 0.

    Returns (accepted [S] int32 draft tokens kept, tokens [S, T] int32: row s's new tokens are
    tokens[s, :accepted[s] + 1], the kept drafts then the target's token)."""
    S, T, V = logits.shape
    K = T - 1
    in_draft = jnp.arange(K)[None] < draft_len[:, None]  # [S, K]
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S, T]
    # the longest prefix of drafts equal to the argmax; after it, argmax is the target's token, so it is the output
    g_acc = jnp.cumprod((draft == argmax[:, :K]) & in_draft, axis=1).sum(1).astype(jnp.int32)
    if greedy:
        return g_acc, argmax

    rep = lambda a: jnp.repeat(a, T)  # per-row parameters for every position
    filtered = filter_logits(logits.reshape(S * T, V), rep(temperature), rep(top_k), rep(top_p))
    p = jax.nn.softmax(filtered, axis=-1).reshape(S, T, V)  # the target's sampling distribution
    q = jax.nn.one_hot(draft, V, dtype=jnp.float32) if probs is None else probs.astype(jnp.float32)  # [S, K, V]
    p_d = jnp.take_along_axis(p[:, :K], draft[..., None], axis=-1)[..., 0]  # [S, K]
    q_d = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    pos = positions[:, None] + jnp.arange(K)[None]  # [S, K] the position each draft token would take
    u = jax.vmap(jax.vmap(lambda s, t: jax.random.uniform(_key(s, t, 1))))(jnp.broadcast_to(seeds[:, None], pos.shape),
                                                                           pos)
    # u < p/q without dividing (q_d > 0 for a token drawn from q); accepts surely where p >= q
    ok = (u * q_d < p_d) & in_draft
    acc = jnp.cumprod(ok, axis=1).sum(1).astype(jnp.int32)  # [S]
    rows = jnp.arange(S)
    p_n = p[rows, acc]  # [S, V]
    q_n = jnp.where((acc < draft_len)[:, None], q[rows, jnp.minimum(acc, K - 1)], 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)
    # a rejection has p(d) < q(d), so the residual has mass; the fallback only guards float round-off
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_n)
    bonus_keys = jax.vmap(lambda s, t: _key(s, t, 2))(seeds, positions + acc)
    bonus = jax.vmap(jax.random.categorical)(bonus_keys, jnp.log(resid)).astype(jnp.int32)
    cols = jnp.arange(T)[None]
    drafted = jnp.pad(draft, ((0, 0), (0, 1)))
    tokens = jnp.where(cols < acc[:, None], drafted, bonus[:, None])
    sampled = (temperature > 0)[:, None]
    return jnp.where(sampled[:, 0], acc, g_acc), jnp.where(sampled, tokens, argmax)
