"""Logical axes for parameters and KV pages, and the rules that map them to mesh axes.

Models name logical axes ('heads', 'mlp', ...); one `ShardingRules` table says which mesh axis each is split over.
The decoder's parameters are matched by their Hugging Face path (`layers.3.self_attn.q_proj.weight`, Linear
weights [out, in]) in `PARAM_AXES`, so the model file needs no sharding annotations and a checkpoint's names are
the single source of truth.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or axes, or None: replicated). The defaults are Megatron tensor parallelism
    (heads and MLP columns over tp, vocab over tp) with experts over ep."""

    batch: MeshAxes = "dp"
    vocab: MeshAxes = "tp"
    embed: MeshAxes = None
    heads: MeshAxes = "tp"
    kv_heads: MeshAxes = "tp"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tp"
    experts: MeshAxes = "ep"
    moe_mlp: MeshAxes = "tp"
    pages: MeshAxes = None
    page_slot: MeshAxes = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok = v is None or isinstance(v, str) or (isinstance(v, tuple) and all(isinstance(a, str) for a in v))
            if not ok:
                raise ValueError(f"ShardingRules.{f.name} must be a mesh axis name, a tuple of them or None, got {v!r}")

    def mesh_axes(self, logical: tuple[str | None, ...]) -> tuple[MeshAxes, ...]:
        """Mesh axes per dimension; raises when two dimensions would split over the same mesh axis."""
        out, used = [], {}
        for name in logical:
            if name is None:
                out.append(None)
                continue
            if not hasattr(self, name):
                raise ValueError(f"no sharding rule for logical axis {name!r}")
            axes = getattr(self, name)
            for a in (axes,) if isinstance(axes, str) else axes or ():
                if a in used:
                    raise ValueError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} in {logical}")
                used[a] = name
            out.append(axes)
        return tuple(out)

    def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...] | None = None,
             mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes. With `shape` and `mesh`, a dimension that a mesh
        axis does not divide (2 KV heads on tp=4), or a mesh axis the mesh lacks, is replicated instead."""
        axes = list(self.mesh_axes(logical))
        if mesh is not None:
            for i, a in enumerate(axes):
                names = (a,) if isinstance(a, str) else a or ()
                if any(n not in mesh.shape for n in names):
                    axes[i] = None
                elif shape is not None and names:
                    size = 1
                    for n in names:
                        size *= mesh.shape[n]
                    if shape[i] % size:
                        axes[i] = None
        while axes and axes[-1] is None:
            axes.pop()
        return PartitionSpec(*axes)

    def sharding(self, mesh: Mesh, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical, shape, mesh))


# Parameter path (dots) -> logical axes, first match wins. Linear weights are [out, in]; experts [E, D, F] / [E, F, D].
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens\.weight$", ("vocab", "embed")),
    (r"lm_head\.weight$", ("vocab", "embed")),
    (r"self_attn\.q_proj\.weight$", ("heads", "embed")),
    (r"self_attn\.q_proj\.bias$", ("heads",)),
    (r"self_attn\.[kv]_proj\.weight$", ("kv_heads", "embed")),
    (r"self_attn\.[kv]_proj\.bias$", ("kv_heads",)),
    (r"self_attn\.o_proj\.weight$", ("embed", "heads")),
    (r"self_attn\.o_proj\.bias$", ("embed",)),
    (r"self_attn\.[qk]_norm\.weight$", ("head_dim",)),
    (r"mlp\.experts\.(gate|up)_proj$", ("experts", "embed", "moe_mlp")),
    (r"mlp\.experts\.down_proj$", ("experts", "moe_mlp", "embed")),
    (r"mlp\.gate\.weight$", (None, "embed")),  # the MoE router [E, D]: small, every device routes its own tokens
    (r"mlp\.(gate|up)_proj\.weight$", ("mlp", "embed")),
    (r"mlp\.(gate|up)_proj\.bias$", ("mlp",)),
    (r"mlp\.down_proj\.weight$", ("embed", "mlp")),
    (r"mlp\.down_proj\.bias$", ("embed",)),
    (r"(layernorm|norm)\.weight$", ("embed",)),
)

# One layer's KV pool array [Hkv, P, S, D].
KV_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (e.g. 'layers.0.mlp.down_proj.weight')."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path} has {ndim} dims but its rule {pattern!r} names {axes}")
            return axes
    raise ValueError(f"no logical axes for parameter {path!r}: add a pattern to sharding.rules.PARAM_AXES")


def path_str(path) -> str:
    """A pytree key path (from `jax.tree_util.tree_flatten_with_path`) as dots: 'layers.0.mlp.gate_proj.weight'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(p for p in parts if p not in ("value", "raw_value"))


def param_shardings(params, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """A pytree of NamedShardings matching `params` (an nnx.State or any pytree whose key paths are the
    parameter names)."""
    def one(path, leaf):
        name = path_str(path)
        return rules.sharding(mesh, logical_axes(name, leaf.ndim), leaf.shape)

    return jax.tree_util.tree_map_with_path(one, params)


def kv_sharding(mesh: Mesh, shape: tuple[int, ...], rules: ShardingRules = ShardingRules()) -> NamedSharding:
    """Sharding of one KV pool array [Hkv, P, S, D] (pages of a head live with that head's attention)."""
    return rules.sharding(mesh, KV_AXES, shape)
