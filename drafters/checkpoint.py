"""Drafter checkpoints: a directory with `config.json` ({"kind": ..., config fields}) and `model.safetensors`
(parameters by dotted path), written by training and read by serving."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
from drafters.eagle3 import Eagle3Config, Eagle3Drafter

KINDS = {"block": (BlockDrafter, BlockDrafterConfig), "eagle3": (Eagle3Drafter, Eagle3Config)}


def _kind(model) -> str:
    for kind, (cls, _) in KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"not a drafter model: {type(model).__name__}")


def save_drafter(model: BlockDrafter | Eagle3Drafter, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"kind": _kind(model), **dataclasses.asdict(model.cfg)}, indent=2))
    flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    save_file(flat, str(path / "model.safetensors"))


def load_drafter(path: str | Path) -> BlockDrafter | Eagle3Drafter:
    """Raises ValueError naming the problem when the directory is not a drafter checkpoint."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a drafter checkpoint ({e})") from e
    kind = raw.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"{path}/config.json: kind must be one of {sorted(KINDS)}, got {kind!r}")
    cls, cfg_cls = KINDS[kind]
    cfg = cfg_cls(**raw)
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    tensors = load_file(str(path / "model.safetensors"))
    graphdef, state = nnx.split(model)
    flat = []
    for k, v in nnx.to_flat_state(state):
        name = ".".join(map(str, k))
        if name not in tensors:
            raise ValueError(f"{path}/model.safetensors has no tensor {name!r}")
        like = v.get_value()
        if tensors[name].shape != like.shape:
            raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, the config needs {like.shape}")
        flat.append((k, v.replace(jnp.asarray(tensors[name], like.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
