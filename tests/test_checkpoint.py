"""Loading checkpoint directories: the happy paths are in test_parity; here every broken directory gets one
clear error that names the problem."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

from codegen_jax import CheckpointError, Tokenizer, load_config, load_model


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "llama", d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_config_fields(ckpt):
    cfg = load_config(ckpt)
    assert cfg.model_type == "llama" and cfg.rope.type == "llama3" and not cfg.tie_word_embeddings
    moe = load_config(FIXTURES / "qwen3_moe")
    assert moe.num_experts == 8 and moe.moe_layers == (True, False, True) and moe.norm_topk_prob
    assert load_config(FIXTURES / "qwen3").head_dim == 32
    assert load_config(FIXTURES / "qwen2").tie_word_embeddings


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(ckpt, progress=False)


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(ckpt, progress=False)


def test_unsupported_architecture(ckpt):
    edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*not supported"):
        load_model(ckpt, progress=False)


def test_bad_field_is_named(ckpt):
    edit_config(ckpt, hidden_size="wide")
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_model(ckpt, progress=False)
    edit_config(ckpt, hidden_size=64, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        load_model(ckpt, progress=False)


def test_wrong_tensor_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((7, 64), np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(7, 64\), expected \(32, 64\)"):
        load_model(ckpt, progress=False)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor model.norm.weight"):
        load_model(ckpt, progress=False)


def test_unexpected_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.9.*not a parameter"):
        load_model(ckpt, progress=False)


def test_missing_shard(tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "qwen2", d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.*missing"):
        load_model(d, progress=False)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ckpt, progress=False)


def test_missing_experts(tmp_path):
    d = tmp_path / "moe"
    shutil.copytree(FIXTURES / "qwen3_moe", d)
    tensors = load_file(d / "model.safetensors")
    for p in ("gate_proj", "up_proj", "down_proj"):
        del tensors[f"model.layers.2.mlp.experts.5.{p}.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing experts"):
        load_model(d, progress=False)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        Tokenizer.from_dir(ckpt)


def test_weights_land_in_requested_dtype():
    model = load_model(FIXTURES / "qwen3_moe", dtype=jnp.bfloat16, progress=False)
    assert model.layers[0].mlp.experts.gate_proj.get_value().dtype == jnp.bfloat16
    assert model.layers[0].mlp.experts.gate_proj.get_value().shape == (8, 64, 32)  # [E, D, F]
