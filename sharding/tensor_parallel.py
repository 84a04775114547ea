"""Column- and row-parallel matmuls over the mesh's 'tp' axis, each with a chosen strategy (see `strategy.py`).

These are the two halves of a Megatron block, callable from GSPMD code: the shard_map inside takes global arrays
and gives global arrays back, so the surrounding jit (norms, attention, residual) stays unchanged and XLA
reshards at the boundaries when needed.

Layouts (global shapes, `tp` = n):
  column_parallel: x [N, D] -> [N, F_i] per weight w_i [F_i, D], F split over tp.
  row_parallel:    x [N, F] (F split over tp), w [D, F] -> [N, D]; token-split over tp for the sequence-parallel
                   strategies ('ring', 'bidi', 'sp', 'nocomm'), replicated for 'allreduce*'.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding import collectives as C
from sharding.moe import moe_expert_parallel

SEQUENCE_PARALLEL = ("ring", "bidi", "sp", "nocomm")


def _smap(f, mesh, in_specs, out_specs):
    # check_vma off: the one-shot all-reduce and 'nocomm' give values the type system cannot prove replicated.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def column_parallel(x: jax.Array, ws: Sequence[jax.Array], mesh: Mesh, strategy: str, axis: str = "tp",
                    chunks: int = 1) -> list[jax.Array]:
    """x [N, D]; ws [F_i, D]. Returns [N, F_i] per weight, split over `axis` on F. `chunks`: pieces per shard
    on the 'ring' (see `collectives.all_gather_matmul`)."""
    n = mesh.shape[axis]
    k = len(ws)
    for w in ws:
        if w.shape[0] % n:
            raise ValueError(f"a weight with {w.shape[0]} output features does not split over tp={n}")
    out_specs = [P(None, axis)] * k
    if strategy in ("allreduce", "allreduce_overlap"):
        def local(x, *ws):
            return [C._dot(x, w) for w in ws]

        return _smap(local, mesh, (P(), *[P(axis)] * k), out_specs)(x, *ws)
    if strategy not in SEQUENCE_PARALLEL:
        raise ValueError(f"column_parallel has no strategy {strategy!r}")
    if strategy == "sp":
        f = partial(C.all_gather_matmul_reference, axis=axis)
    elif strategy == "nocomm":
        def f(x, ws):  # the ring's compute on n blocks of tokens; distinct ones, since XLA rewrites a dot of
            # n tiled copies into one dot of the shard (half the ring's compute at tp=2: a floor too low)
            return [C._dot(jnp.concatenate([x + s for s in range(n)]), w) for w in ws]
    else:
        f = partial(C.all_gather_matmul, axis=axis, bidirectional=strategy == "bidi", chunks=chunks)
    return _smap(lambda x, *ws: f(x, ws), mesh, (P(axis), *[P(axis)] * k), out_specs)(x, *ws)


def row_parallel(x: jax.Array, w: jax.Array, mesh: Mesh, strategy: str, axis: str = "tp", chunks: int = 1
                 ) -> jax.Array:
    """x [N, F], w [D, F], F split over `axis`. Returns x @ w.T [N, D]. `chunks`: pieces per accumulator on the
    'ring' (see `collectives.matmul_reduce_scatter`)."""
    n = mesh.shape[axis]
    if w.shape[1] % n:
        raise ValueError(f"a weight with {w.shape[1]} input features does not split over tp={n}")
    if strategy == "allreduce":
        f, out = partial(C.matmul_all_reduce_reference, axis=axis), P()
    elif strategy == "allreduce_overlap":
        f, out = partial(C.matmul_all_reduce, axis=axis), P()
    elif strategy == "sp":
        f, out = partial(C.matmul_reduce_scatter_reference, axis=axis), P(axis)
    elif strategy == "nocomm":
        def f(x, w):  # the same partial product, summed over local token blocks instead of devices
            p = jnp.einsum("nf,df->nd", x, w, preferred_element_type=jnp.float32)
            return p.reshape(n, -1, p.shape[-1]).sum(0).astype(x.dtype)
        out = P(axis)
    elif strategy in ("ring", "bidi"):
        f, out = partial(C.matmul_reduce_scatter, axis=axis, bidirectional=strategy == "bidi", chunks=chunks), P(axis)
    else:
        raise ValueError(f"row_parallel has no strategy {strategy!r}")
    return _smap(lambda x, w: f(x, w).astype(x.dtype), mesh, (P(None, axis), P(None, axis)), out)(x, w)


def tokens_fit(strategy: str, tokens: int, n: int) -> bool:
    """Whether `strategy` can split `tokens` tokens over n devices (rings split each shard in two for 'bidi')."""
    if strategy in ("ring", "sp", "nocomm"):
        return tokens % n == 0
    if strategy == "bidi":
        return tokens % (2 * n) == 0
    return True


def expert_parallel_moe(x: jax.Array, router, w_gate, w_up, w_down, mesh: Mesh, *, top_k: int,
                        norm_topk_prob: bool, axis: str = "ep") -> jax.Array:
    """x [N, D] -> [N, D] with experts [E, ...] split over `axis`; tokens are padded to a multiple of its size,
    split over it, and sent to their experts with all_to_all (`sharding.moe`)."""
    n = mesh.shape[axis]
    N = x.shape[0]
    pad = -N % n
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    f = partial(moe_expert_parallel, top_k=top_k, norm_topk_prob=norm_topk_prob, axis=axis)
    y = _smap(f, mesh, (P(axis), P(), P(axis), P(axis), P(axis)), P(axis))(xp, router, w_gate, w_up, w_down)
    return y[:N]
