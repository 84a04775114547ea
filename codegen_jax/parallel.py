"""Running the model and engine on a mesh: parameters and KV pages placed by `sharding.rules`, and optionally the
attention/MLP projections swapped for tensor-parallel blocks whose collectives overlap compute.

Two levels, same model code:
  1. `shard_model` + `shard_cache`: parameters and KV pages get NamedShardings from the rules; GSPMD propagates
     them through the unchanged jitted forward (the drafter trainer's frozen target runs so).
  2. `parallelize(model, mesh, strategy)`: each layer's attention and dense MLP become `TPAttention`/`TPMLP` (the
     same Linear submodules under the same names, so checkpoints and shardings still match by path) whose
     projections go through `sharding.tensor_parallel` with the chosen strategy; MoE layers become `EPMoE`
     (experts over 'ep', all_to_all dispatch) when the mesh has ep > 1. 'auto' picks per call from the token
     count and the interconnect (`sharding.strategy.choose`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from codegen_jax.engine import Engine, EngineConfig
from codegen_jax.kv_cache import PagedKVCache
from codegen_jax.model import MLP, Attention, SparseMoE, Transformer
from sharding import strategy as S
from sharding import tensor_parallel as TP
from sharding.mesh import interconnect
from sharding.rules import ShardingRules, kv_sharding, param_shardings

DEFAULT_RULES = ShardingRules()


def replica_mesh(tp: int = 1, ep: int = 1) -> Mesh | None:
    """The mesh one serving replica runs on: this process's first tp*ep devices as (dp 1, ep, tp); None for one
    device. Raises ValueError (naming --tp/--ep) when there are not enough devices."""
    from sharding.mesh import make_mesh

    if tp < 1 or ep < 1:
        raise ValueError(f"--tp and --ep must be >= 1, got {tp} and {ep}")
    if tp * ep == 1:
        return None
    local = jax.local_devices()
    if tp * ep > len(local):
        raise ValueError(f"--tp {tp} times --ep {ep} needs {tp * ep} devices, this process has {len(local)}")
    return make_mesh(tp=tp, ep=ep, devices=local[: tp * ep])


def replica_engine(model: Transformer, cfg: EngineConfig, mesh: Mesh | None, strategy: str = "auto",
                   microbatches: int = 1) -> Engine:
    """`Engine` on one device, or `sharded_engine` on `replica_mesh`'s mesh."""
    if mesh is None:
        return Engine(model, cfg)
    return sharded_engine(model, cfg, mesh, strategy=strategy, microbatches=microbatches)


def shard_model(model: Transformer, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Transformer:
    """Moves the model's parameters to their NamedShardings (in place); returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def shard_cache(cache: PagedKVCache, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> PagedKVCache:
    """Places every layer's KV pool [Hkv, P, S, D] by the rules (heads over tp); donated steps keep the layout."""
    sh = kv_sharding(mesh, cache.pages[0][0].shape, rules)
    cache.pages = tuple((jax.device_put(k, sh), jax.device_put(v, sh)) for k, v in cache.pages)
    return cache


def sharded_engine(model: Transformer, cfg: EngineConfig, mesh: Mesh, *, rules: ShardingRules = DEFAULT_RULES,
                   strategy: str = "xla", microbatches: int = 1) -> Engine:
    """An Engine whose parameters and KV pages live on `mesh`, its layers `parallelize`d. With 'xla' the projections
    stay GSPMD's; attention (and MoE over ep) still run per device on their shards, since the Pallas kernels are
    opaque to GSPMD, which would gather their operands to every device."""
    shard_model(model, mesh, rules)
    parallelize(model, mesh, strategy, microbatches=microbatches)
    engine = Engine(model, cfg)
    shard_cache(engine.cache, mesh, rules)
    return engine


def _resolve(strategy: str, mesh: Mesh, tokens: int, hidden: int, itemsize: int) -> str:
    n = mesh.shape["tp"]
    if strategy == "auto":
        strategy = S.choose(interconnect(), tokens, hidden, n, itemsize)
    if strategy != "xla" and not TP.tokens_fit(strategy, tokens, n):
        strategy = "allreduce"  # e.g. a decode batch that does not split over the ring
    return strategy


def _bias(y, lin):
    return y if lin.bias is None else y + lin.bias[...]


def _pieced(x, lin, mesh: Mesh, pieces: int, column: bool):
    """`lin(x)` under GSPMD as `pieces` matmuls, each its own kernel: column-parallel (weight [out, in] split over
    tp on out) in column pieces of every device's shard, row-parallel (split on in) in pieces of the output.
    NCCL's kernels take no SM that another kernel holds, and one cuBLAS matmul holds every SM to its end: a host-
    staged 32 MB transfer hid at most 29% of one matmul beside it and 79-96% of the same product as 4 (2 H200s,
    benchmarks/results/collective_overlap.json). Pieces let the other micro-batch's transfers start between them."""
    w = lin.weight[...]
    out, d_in = w.shape
    n = mesh.shape["tp"]
    if pieces <= 1 or out % (n * pieces if column else pieces):
        return lin(x)
    if column:  # [n, pieces, f, in]: the tp split stays on the major dimension, each piece a slice of every shard
        wr = w.reshape(n, pieces, out // (n * pieces), d_in)
        y = jnp.stack([jnp.einsum("...d,nfd->...nf", x, wr[:, i]) for i in range(pieces)], axis=-2)
        y = y.reshape(*x.shape[:-1], out)
    else:
        y = jnp.concatenate(_row_pieces(x, w, pieces), axis=-1)
    return _bias(y, lin)


def _row_pieces(x, w, pieces: int) -> list:
    """x @ w.T (w [out, in]) as `pieces` matmuls, one per slice of the output (pieces divides out)."""
    p = w.shape[0] // pieces
    return [jnp.einsum("...f,df->...d", x, w[i * p:(i + 1) * p]) for i in range(pieces)]


def _row_staged(x, lin, mesh: Mesh, pieces: int):
    """A row-parallel `lin(x)` (weight [out, in] split over tp on in) for a stage (`Transformer.microbatch_stagger`):
    local matmuls and a psum each in x's dtype, what GSPMD does, but written out so that the partial product exists
    before its all-reduce. Returns (y, tick), tick a scalar of the last partial: the next stage waits for it, not for
    the all-reduce. `pieces` as in `_pieced` (one psum per piece of the output)."""
    w = lin.weight[...]
    pieces = pieces if pieces > 1 and w.shape[0] % pieces == 0 else 1

    def local(x, w):
        parts = _row_pieces(x, w, pieces)
        y = jnp.concatenate([jax.lax.psum(q, "tp") for q in parts], axis=-1)
        return y, parts[-1].reshape(-1)[0]

    spec = P(*(None,) * (x.ndim - 1), "tp")
    y, tick = jax.shard_map(local, mesh=mesh, in_specs=(spec, P(None, "tp")), out_specs=(P(), P()),
                            check_vma=False)(x, w)
    return _bias(y, lin), tick


class TPAttention(nnx.Module):
    """`model.Attention` with q/k/v from one column-parallel collective matmul and o_proj row-parallel."""

    def __init__(self, attn: Attention, mesh: Mesh, strategy: str):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm, self.shape = attn.q_norm, attn.k_norm, attn.shape
        self.mesh, self.strategy = mesh, S.validate(strategy)
        self.chunks = 1  # pieces per shard on the 'ring' (sharding.collectives); with 'xla', matmuls per projection

    heads, paged = Attention.heads, Attention.paged  # the same per-head and paged steps as the dense layer

    def attend(self, q, k, v, kv, batch, attn_impl):
        """`paged` on each device's own heads: q [B, T, H, hd], k, v [B, T, K, hd] and the KV pools [K, P, S, D]
        split over tp, the batch's page tables replicated. A Pallas attention kernel is opaque to GSPMD, which
        would otherwise gather every head's q and KV pages to each device and run all heads everywhere."""
        H, K, _ = self.shape
        n = self.mesh.shape["tp"]
        if n == 1 or H % n or K % n:
            return self.paged(q, k, v, kv, batch, attn_impl)
        heads, pool = P(None, None, "tp", None), P("tp")
        return jax.shard_map(lambda q, k, v, kv, batch: self.paged(q, k, v, kv, batch, attn_impl), mesh=self.mesh,
                             in_specs=(heads, heads, heads, (pool, pool), P()),
                             out_specs=(P(None, None, "tp"), (pool, pool)), check_vma=False)(q, k, v, tuple(kv), batch)

    def __call__(self, x, cos, sin, kv, batch, attn_impl):
        y, pages, _ = self.staged(x, cos, sin, kv, batch, attn_impl, stage=False)
        return y, pages

    def staged(self, x, cos, sin, kv, batch, attn_impl, stage=True):
        """(y, pages, tick): with stage and 'xla', o_proj as `_row_staged` and its tick; otherwise tick None."""
        B, T, D = x.shape
        H, _, hd = self.shape
        strategy = _resolve(self.strategy, self.mesh, B * T, D, x.dtype.itemsize)
        if strategy == "xla":
            q, k, v = (_pieced(x, lin, self.mesh, self.chunks, True) for lin in (self.q_proj, self.k_proj, self.v_proj))
        else:
            lins = (self.q_proj, self.k_proj, self.v_proj)
            q, k, v = (_bias(y, lin) for y, lin in zip(
                TP.column_parallel(x.reshape(B * T, D), [lin.weight[...] for lin in lins], self.mesh, strategy,
                                   chunks=self.chunks),
                lins, strict=True))
        o, pages = self.attend(*self.heads(q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1), cos, sin),
                               kv, batch, attn_impl)
        if strategy == "xla" and stage:
            y, tick = _row_staged(o, self.o_proj, self.mesh, self.chunks)
            return y, pages, tick
        if strategy == "xla":
            return _pieced(o, self.o_proj, self.mesh, self.chunks, False), pages, None
        y = TP.row_parallel(o.reshape(B * T, H * hd), self.o_proj.weight[...], self.mesh, strategy, chunks=self.chunks)
        return _bias(y, self.o_proj).reshape(B, T, D), pages, None


class TPMLP(nnx.Module):
    """`model.MLP` with gate/up from one column-parallel collective matmul and down_proj row-parallel."""

    def __init__(self, mlp: MLP, mesh: Mesh, strategy: str):
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.mesh, self.strategy = mesh, S.validate(strategy)
        self.chunks = 1

    def __call__(self, x):
        return self.staged(x, stage=False)[0]

    def staged(self, x, stage=True):
        """(y, tick), as `TPAttention.staged`."""
        B, T, D = x.shape
        strategy = _resolve(self.strategy, self.mesh, B * T, D, x.dtype.itemsize)
        if strategy == "xla":
            g, u = (_pieced(x, lin, self.mesh, self.chunks, True) for lin in (self.gate_proj, self.up_proj))
            h = jax.nn.silu(g) * u
            if stage:
                return _row_staged(h, self.down_proj, self.mesh, self.chunks)
            return _pieced(h, self.down_proj, self.mesh, self.chunks, False), None
        g, u = TP.column_parallel(x.reshape(B * T, D), [self.gate_proj.weight[...], self.up_proj.weight[...]],
                                  self.mesh, strategy, chunks=self.chunks)
        h = jax.nn.silu(_bias(g, self.gate_proj)) * _bias(u, self.up_proj)
        y = TP.row_parallel(h, self.down_proj.weight[...], self.mesh, strategy, chunks=self.chunks)
        return _bias(y, self.down_proj).reshape(B, T, D), None


class EPMoE(nnx.Module):
    """`model.SparseMoE` with its experts split over 'ep' and tokens dispatched with all_to_all."""

    def __init__(self, moe: SparseMoE, mesh: Mesh):
        self.gate, self.experts = moe.gate, moe.experts
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.mesh = mesh

    def __call__(self, x):
        B, T, D = x.shape
        e = self.experts
        y = TP.expert_parallel_moe(x.reshape(B * T, D), self.gate.weight[...], e.gate_proj[...], e.up_proj[...],
                                   e.down_proj[...], self.mesh, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob)
        return y.reshape(B, T, D)


def parallelize(model: Transformer, mesh: Mesh, strategy: str = "auto", microbatches: int = 1) -> Transformer:
    """Swaps (in place) every layer's attention and dense MLP for the tensor-parallel blocks with `strategy`, and
    MoE layers for expert-parallel ones when the mesh's ep axis is larger than 1. microbatches > 1: prefill-sized
    steps run as that many pieces interleaved layer by layer (`Transformer.microbatches`), their sublayers as
    ordered stages (`Transformer.microbatch_stagger`), so one piece's collectives run under another's matmuls.
    Returns the model."""
    S.validate(strategy)
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    model.microbatches = microbatches
    model.microbatch_stagger = microbatches > 1
    for layer in model.layers:
        layer.self_attn = TPAttention(layer.self_attn, mesh, strategy)
        if isinstance(layer.mlp, MLP):
            layer.mlp = TPMLP(layer.mlp, mesh, strategy)
        elif isinstance(layer.mlp, SparseMoE) and mesh.shape["ep"] > 1:
            layer.mlp = EPMoE(layer.mlp, mesh)
    return model
