"""Collective matmuls that overlap communication with compute, for use inside `jax.shard_map`.

Tensor parallelism with a sequence-sharded residual stream (Megatron's sequence parallelism) needs two
collectives per block: an all-gather of the tokens before the column-parallel matmul, and a reduce-scatter after
the row-parallel one. Done plainly, each is a bulk transfer the matmul waits for; on a PCIe box (no NVLink) that
is 40-75% of a prefill step. Here each is a ring of `ppermute`s written as an unrolled Python loop: the step
computes on the shard it holds while the next one is in flight, so XLA's scheduler can run the transfer under the
matmul. The bidirectional rings send half of each shard each way, using both directions of every link.

All functions run per device inside a shard_map whose mesh has `axis` (size n); shapes below are per device.
The `*_reference` functions are the plain collectives (`all_gather`, `psum_scatter`, `psum`) with the same
signatures: the baseline the benchmark times and the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _shift(x: jax.Array, axis: str, n: int, step: int) -> jax.Array:
    """Sends x from device i to device i + step (mod n)."""
    return jax.lax.ppermute(x, axis, [(i, (i + step) % n) for i in range(n)])


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    # x [M, D], w [F, D] (the checkpoints' [out, in] layout) -> [M, F]
    return jnp.einsum("md,fd->mf", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# ---- all-gather then matmul (column-parallel input) ------------------------------------------------------------


def all_gather_matmul_reference(x: jax.Array, ws: Sequence[jax.Array], *, axis: str) -> list[jax.Array]:
    """x [M, D] this device's tokens; ws: weights [F_i, D] (this device's output columns).
    Returns [n*M, F_i] per weight: every device's tokens (in device order) times the local columns."""
    full = jax.lax.all_gather(x, axis, tiled=True)
    return [_dot(full, w) for w in ws]


def _pieces(M: int, chunks: int) -> list[tuple[int, int]]:
    """(start, size) of `chunks` row pieces of an M-row shard (fewer when M is small or does not divide)."""
    c = max(1, min(chunks, M))
    while M % c:
        c -= 1
    return [(i * (M // c), M // c) for i in range(c)]


def all_gather_matmul(x: jax.Array, ws: Sequence[jax.Array], *, axis: str, bidirectional: bool = False,
                      chunks: int = 1) -> list[jax.Array]:
    """As `all_gather_matmul_reference`, as a ring: step s multiplies the token shard of device idx + s (held now)
    while passing it on. One ring serves all weights (q/k/v, or gate/up), so the tokens travel once. With
    `chunks` > 1 (one direction) each shard travels as that many pieces: a piece's dots start as soon as it
    lands, while the next is in flight, so only the last piece's compute waits on the link."""
    n = jax.lax.axis_size(axis)
    if n == 1:
        return [_dot(x, w) for w in ws]
    idx = jax.lax.axis_index(axis)
    M = x.shape[0]
    outs = [jnp.zeros((n, M, w.shape[0]), x.dtype) for w in ws]  # [n blocks, M, F]
    if not bidirectional:
        pieces = [x[lo : lo + size] for lo, size in _pieces(M, chunks)]
        for s in range(n):
            # issued first: in flight during this step's dots
            nxt = [_shift(p, axis, n, -1) for p in pieces] if s < n - 1 else None
            src = (idx + s) % n
            new = []
            for o, w in zip(outs, ws, strict=True):
                y = jnp.concatenate([_dot(p, w) for p in pieces]) if len(pieces) > 1 else _dot(pieces[0], w)
                new.append(jax.lax.dynamic_update_index_in_dim(o, y, src, 0))
            outs, pieces = new, nxt
        return [o.reshape(n * M, -1) for o in outs]
    # Bidirectional: the first half of every shard travels right, the second left; each link carries half a
    # shard per step in each direction. Step s holds first halves from idx - s and second halves from idx + s.
    assert M % 2 == 0, f"bidirectional all-gather needs an even shard, got {M} rows"
    h = M // 2
    a, b = x[:h], x[h:]
    outs = [o.reshape(n, 2, h, -1) for o in outs]
    for s in range(n):
        nxt = (_shift(a, axis, n, 1), _shift(b, axis, n, -1)) if s < n - 1 else None
        src_a, src_b = (idx - s) % n, (idx + s) % n
        new = []
        for o, w in zip(outs, ws, strict=True):
            o = o.at[src_a, 0].set(_dot(a, w))
            new.append(o.at[src_b, 1].set(_dot(b, w)))
        outs = new
        if nxt is not None:
            a, b = nxt
    return [o.reshape(n * M, -1) for o in outs]


# ---- matmul then reduce-scatter (row-parallel output) ----------------------------------------------------------


def matmul_reduce_scatter_reference(x: jax.Array, w: jax.Array, *, axis: str) -> jax.Array:
    """x [N, F] all tokens, this device's slice of the contracted dim; w [D, F] the matching input rows.
    Returns [N/n, D]: sum over devices of x @ w.T, this device's block of tokens. Partials travel in x's dtype,
    as GSPMD's own reduce-scatter of a bf16 matmul does (float32 would double the bytes on the wire)."""
    return jax.lax.psum_scatter(_partial(x, w).astype(x.dtype), axis, scatter_dimension=0, tiled=True)


def _partial(x, w):
    return jnp.einsum("nf,df->nd", x, w, preferred_element_type=jnp.float32)


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, *, axis: str, bidirectional: bool = False,
                          chunks: int = 1) -> jax.Array:
    """As `matmul_reduce_scatter_reference`, as a ring: an accumulator per token block visits every device, which
    adds its partial product for that block (computed while the accumulator is in flight). Each device sums in
    float32; the accumulator travels in x's dtype, as the reference's partials do. With `chunks` > 1 (one
    direction) each accumulator travels as that many row pieces, each sent as soon as its partial is added."""
    n = jax.lax.axis_size(axis)
    N = x.shape[0]
    assert N % n == 0, f"{N} tokens do not split over {n} devices"
    M = N // n
    if n == 1:
        return _partial(x, w).astype(x.dtype)
    idx = jax.lax.axis_index(axis)

    def block(j, lo=0, size=M):  # partial product of token rows [j*M + lo, j*M + lo + size)
        return _partial(jax.lax.dynamic_slice_in_dim(x, j * M + lo, size, 0), w)

    def send(acc, step):  # float32 [rows, D] -> x.dtype on the wire -> float32
        return _shift(acc.astype(x.dtype), axis, n, step).astype(jnp.float32)

    if not bidirectional:
        # The accumulator moves right; at step s this device adds to block (idx - 1 - s), so the last step
        # (s = n-1) lands on its own block.
        pieces = _pieces(M, chunks)
        accs = [block((idx - 1) % n, lo, size) for lo, size in pieces]
        for s in range(1, n):
            j = (idx - 1 - s) % n
            accs = [send(acc, 1) + block(j, lo, size) for acc, (lo, size) in zip(accs, pieces, strict=True)]
        return jnp.concatenate(accs).astype(x.dtype) if len(accs) > 1 else accs[0].astype(x.dtype)
    assert M % 2 == 0, f"bidirectional reduce-scatter needs an even block, got {M} rows"
    h = M // 2
    # First halves move right (block idx - 1 - s at step s), second halves left (block idx + 1 + s).
    acc_a, acc_b = block((idx - 1) % n, 0, h), block((idx + 1) % n, h, h)
    for s in range(1, n):
        part_a, part_b = block((idx - 1 - s) % n, 0, h), block((idx + 1 + s) % n, h, h)
        acc_a = send(acc_a, 1) + part_a
        acc_b = send(acc_b, -1) + part_b
    return jnp.concatenate([acc_a, acc_b]).astype(x.dtype)


# ---- matmul then all-reduce (decode: tokens too few to scatter) ------------------------------------------------


def matmul_all_reduce_reference(x: jax.Array, w: jax.Array, *, axis: str) -> jax.Array:
    """x [N, F] this device's slice of the contracted dim; w [D, F]. Returns [N, D], the sum over devices."""
    return jax.lax.psum(_partial(x, w), axis).astype(x.dtype)


def matmul_all_reduce(x: jax.Array, w: jax.Array, *, axis: str, chunks: int = 2) -> jax.Array:
    """As `matmul_all_reduce_reference` for decode-sized messages (latency-bound: a ring's 2(n-1) hops cost more
    than the bytes). Output columns are split in `chunks`; each chunk's partial goes to every other device in one
    hop (a one-shot all-reduce) while the next chunk is computed. Every device adds the n partials in device
    order, so all hold the same bits."""
    n = jax.lax.axis_size(axis)
    D = w.shape[0]
    chunks = max(1, min(chunks, D))
    while D % chunks:
        chunks -= 1
    if n == 1:
        return _partial(x, w).astype(x.dtype)
    idx = jax.lax.axis_index(axis)
    c = D // chunks
    out = []
    for i in range(chunks):
        part = _partial(x, w[i * c : (i + 1) * c])  # [N, c]
        got = jnp.stack([part] + [_shift(part, axis, n, k) for k in range(1, n)])  # got[k] is from device idx - k
        order = (idx - jnp.arange(n)) % n  # device of each row of got
        out.append(_sum_in_device_order(got, order))
    return jnp.concatenate(out, axis=-1).astype(x.dtype)


def _sum_in_device_order(got: jax.Array, order: jax.Array) -> jax.Array:
    # got [n, N, c] rows from devices `order`; summing after sorting by device makes every device's sum identical
    inv = jnp.argsort(order)
    return jnp.sum(got[inv], axis=0)
