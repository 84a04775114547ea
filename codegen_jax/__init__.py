"""codegen-jax: Flax models that load Hugging Face checkpoints, a paged-KV engine, sampling and the CLI."""

from codegen_jax.checkpoint import CheckpointError, init_model, load_config, load_model
from codegen_jax.config import ConfigError, ModelConfig
from codegen_jax.engine import Completion, Engine, EngineConfig
from codegen_jax.sampling import SamplingParams
from codegen_jax.tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "Completion", "ConfigError", "Engine", "EngineConfig", "ModelConfig", "SamplingParams",
    "Tokenizer", "init_model", "load_config", "load_model",
]
