"""The XLA side shared by the split-KV kernels: query rows grouped per KV head going in, splits combined coming out.

Row n = t * G + g of KV head h is query head h * G + g of new token t; a kernel works on tiles of R such rows
(`nqt` tiles per KV head), so each KV page is read once for the whole group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def query_tiles(q, kv_lens, q_lens, *, num_kv_heads: int, rows: int, num_tiles: int, kv_cap: int,
                sliding_window: int | None):
    """q [B, T, Hq, D] -> (qt [B, Hkv, nqt, R, D] zeroed past q_lens and padded to whole tiles, qpos [B, nqt, R]
    each row's position (-1 for padding), row_ok [B, T], lo [B] / hi [B] the first and one-past-last KV token any
    query of the row may see (hi 0 for an empty slot, at most kv_cap))."""
    B, T, Hq, D = q.shape
    G = Hq // num_kv_heads
    n_rows = T * G
    pad = num_tiles * rows - n_rows
    kv_lens = kv_lens.astype(jnp.int32)
    q_lens = q_lens.astype(jnp.int32)
    qt = q.reshape(B, T, num_kv_heads, G, D).transpose(0, 2, 1, 3, 4).reshape(B, num_kv_heads, n_rows, D)
    row_ok = jnp.arange(T)[None, :] < q_lens[:, None]  # [B, T]
    qt = jnp.where(jnp.repeat(row_ok, G, axis=1)[:, None, :, None], qt, 0)
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, num_kv_heads, num_tiles, rows, D)
    pos = (kv_lens - q_lens)[:, None] + jnp.arange(T)[None, :]  # [B, T]
    qpos = jnp.repeat(jnp.where(row_ok, pos, -1), G, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1).reshape(B, num_tiles, rows)
    hi = jnp.where(q_lens > 0, jnp.clip(kv_lens, 0, kv_cap), 0)
    lo = jnp.zeros_like(hi)
    if sliding_window is not None:
        lo = jnp.clip(kv_lens - q_lens - sliding_window + 1, 0, hi)
    return qt, qpos, row_ok, lo, hi


def combine_splits(o, m, l):
    """o: [..., splits, R, D], m, l: [..., splits, R] (log2-domain running max, running sum) -> [..., R, D]
    normalised over all splits."""
    w = jnp.exp2(m - m.max(axis=-2, keepdims=True))  # [..., splits, R]
    num = (o * w[..., None]).sum(axis=-3)
    den = (l * w).sum(axis=-2)[..., None]
    return num / jnp.where(den == 0, 1.0, den)


def output_rows(o, m, l, row_ok, *, num_q_heads: int, dtype, normalised: bool = False) -> jax.Array:
    """The kernel's per-split tiles o [B, Hkv, nqt, splits, R, D] (with m, l) -> [B, T, Hq, D] in `dtype`, rows
    past q_lens exactly 0. `normalised`: one split the kernel already normalised (no combine). With one query
    tile only the group's real rows are combined (decode pads G rows up to the kernel's tile)."""
    B, Hkv, nqt, _, R, D = o.shape
    T = row_ok.shape[1]
    G = num_q_heads // Hkv
    n_rows = T * G
    keep = n_rows if nqt == 1 else R
    o, m, l = o[..., :keep, :], m[..., :keep], l[..., :keep]
    out = o[:, :, :, 0] if normalised else combine_splits(o, m, l)
    out = out.reshape(B, Hkv, nqt * keep, D)[:, :, :n_rows]  # [B, Hkv, T * G, D]
    out = out.reshape(B, Hkv, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, num_q_heads, D)
    return jnp.where(row_ok[:, :, None, None], out, 0).astype(dtype)
