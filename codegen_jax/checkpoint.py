"""Loading Hugging Face checkpoint directories: config.json + single or sharded safetensors.

Tensors are read through a memory map and put on the device one at a time, converted there to the model dtype,
so the host never holds a second copy of the weights. Every problem with the directory raises CheckpointError
with one line that names the file and the tensor or field.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from codegen_jax.config import ConfigError, ModelConfig
from codegen_jax.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory we cannot load; the message names the problem."""


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for each tensor; arrays are read-only views of a memory map (no copy)."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if len(mm) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(mm[:8], "little")
    try:
        header = json.loads(mm[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from e
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if base + end > len(mm) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} is truncated or its offsets are wrong")
        yield name, np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)), offset=base + begin).reshape(shape)


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [directory / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names {f.name}, which is missing from {directory}")
        return files
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    return files


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """Reads config.json (and generation_config.json's stop tokens) into a ModelConfig."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: missing config.json")
    try:
        hf = json.loads(path.read_text())
        cfg = ModelConfig.from_hf(hf)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    gen = directory / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e})") from e
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *extra])))
    return cfg


_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attention\.masked_bias)$")


def _plan(cfg: ModelConfig, abstract: dict[str, jax.ShapeDtypeStruct]):
    """Maps a checkpoint tensor name to (our name, expert index or None, expected checkpoint shape)."""

    def resolve(name: str):
        key = name.removeprefix("model.")
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            return None  # some tied checkpoints store the head too; we use the embedding
        m = _EXPERT.match(key)
        if m:
            ours = f"layers.{m[1]}.mlp.experts.{m[3]}"
            if ours not in abstract or int(m[2]) >= cfg.num_experts:
                raise KeyError(name)
            e, d_in, d_out = abstract[ours].shape  # ours is [E, in, out]; the checkpoint stores [out, in]
            return ours, int(m[2]), (d_out, d_in)
        if key not in abstract:
            raise KeyError(name)
        return key, None, abstract[key].shape

    return resolve


def _set_expert(buf, e, w):
    return buf.at[e].set(w.T.astype(buf.dtype))


_set_expert = jax.jit(_set_expert, donate_argnums=0)


def load_model(directory: str | os.PathLike, *, dtype=jnp.bfloat16, progress: bool = True, mesh=None,
               rules=None) -> Transformer:
    """Loads a checkpoint directory into a Transformer whose parameters live on the default device in `dtype`, or,
    given a `mesh`, split over it by `rules` (sharding.rules; default: Megatron tp, experts over ep) as they are
    read: each device receives only its shard, so a model larger than one device loads."""
    directory = Path(directory)
    cfg = load_config(directory)
    files = weight_files(directory)
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract_model)
    abstract = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    resolve = _plan(cfg, abstract)
    placement: dict[str, jax.sharding.Sharding | None] = dict.fromkeys(abstract)
    if mesh is not None:
        from sharding.rules import ShardingRules, logical_axes

        rules = rules or ShardingRules()
        placement = {k: rules.sharding(mesh, logical_axes(k, v.ndim), v.shape) for k, v in abstract.items()}
    values: dict[str, jax.Array] = {}
    experts_seen: dict[str, set[int]] = {}

    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {directory.name}", disable=not progress)
    for f in files:
        for name, array in read_safetensors(f):
            bar.update(array.nbytes)
            if _IGNORED.search(name):
                continue
            try:
                target = resolve(name)
            except KeyError:
                raise CheckpointError(
                    f"{f.name}: tensor {name} is not a parameter of a {cfg.model_type} model with this config"
                ) from None
            if target is None:
                continue
            ours, expert, shape = target
            if tuple(array.shape) != tuple(shape):
                raise CheckpointError(
                    f"{f.name}: tensor {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
            like = abstract[ours]
            if expert is None:
                values[ours] = jax.device_put(array, placement[ours]).astype(like.dtype)  # converted on the device
            else:
                if ours not in values:
                    values[ours] = jnp.zeros(like.shape, like.dtype, device=placement[ours])
                values[ours] = _set_expert(values[ours], expert, jax.device_put(array))
                experts_seen.setdefault(ours, set()).add(expert)
    bar.close()

    for ours, seen in experts_seen.items():
        if len(seen) != cfg.num_experts:
            missing = sorted(set(range(cfg.num_experts)) - seen)[:3]
            raise CheckpointError(f"{directory}: {ours} is missing experts {missing} (of {cfg.num_experts})")
    missing = [k for k in abstract if k not in values]
    if missing:
        raise CheckpointError(f"{directory}: checkpoint is missing tensor model.{missing[0]} ({len(missing)} missing)")
    flat = [(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0) -> Transformer:
    """A randomly initialised model (benchmarks, tests): N(0, 0.02) weights, unit norms, zero biases.

    Parameters are drawn one at a time on the device (one small program per shape); tracing the whole
    constructor under jit makes one huge program that takes minutes to compile at 1B+ sizes."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    key = jax.random.key(seed)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        like = var.get_value()
        if str(path[-2]).endswith("norm"):
            value = jnp.ones(like.shape, like.dtype)
        elif path[-1] == "bias":
            value = jnp.zeros(like.shape, like.dtype)
        else:
            value = _normal(jax.random.fold_in(key, i), like.shape, like.dtype)
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
