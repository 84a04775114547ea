"""Model configuration, built from a Hugging Face checkpoint's `config.json`.

One frozen dataclass covers the four families we serve (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE); the family only
decides defaults (biases, q/k norm, MoE layers). Both the transformers 4 layout (`rope_theta`, `rope_scaling`) and
the transformers 5 layout (`rope_parameters`) are read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


class ConfigError(ValueError):
    """A checkpoint's config.json that we cannot serve; the message names the field."""


# architecture name -> model_type; the families this package implements.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope_theta ({self.theta}) and rope factor ({self.factor}) must be positive")

    def inv_freq(self, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
        """Returns (inv_freq [head_dim // 2] float64, attention scaling applied to cos/sin)."""
        base = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        if self.type == "default":
            return base, 1.0
        if self.type == "linear":
            return base / self.factor, 1.0
        if self.type == "llama3":
            old = self.original_max_position_embeddings or max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / base
            scaled = np.where(wavelen > low_wavelen, base / self.factor, base)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled), 1.0
        # yarn: interpolate low frequencies, extrapolate high ones, ramp between; scale attention.
        old = self.original_max_position_embeddings or max_position_embeddings

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = self.attention_factor
        if attn is None:
            if self.mscale and self.mscale_all_dim:
                attn = mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
            else:
                attn = mscale(self.factor)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (base / self.factor) * (1 - extrapolation) + base * extrapolation
        return inv, attn


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer. `moe_layers[i]` says whether layer i is sparse."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # MoE (Qwen3-MoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.moe_layers) not in (0, self.num_layers):
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if any(self.moe_layers):
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                    f"({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Builds the config from a parsed `config.json`; raises ConfigError naming the bad field."""
        if not isinstance(hf, dict):
            raise ConfigError("config.json must hold a JSON object")
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if known:
            model_type = known[0]
        elif archs:
            raise ConfigError(
                f"architecture {archs[0]!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        if model_type not in ARCHITECTURES.values():
            raise ConfigError(
                f"model_type {model_type!r} is not supported "
                f"(supported: {', '.join(sorted(set(ARCHITECTURES.values())))})"
            )

        def need(key: str, kind=int):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}")
            value = hf[key]
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(f"config.json field {key!r} must be an integer, got {value!r}")
            if kind is float and not isinstance(value, int | float):
                raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        layers = need("num_hidden_layers")
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or (hidden // heads)
        if hf.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported yet (Qwen2 sliding-window layers)")

        moe_layers: tuple[bool, ...] = ()
        extra: dict = {}
        if model_type == "qwen3_moe":
            # transformers 5 writes num_local_experts; the hub's Qwen3-MoE configs say num_experts
            num_experts = hf.get("num_experts", hf.get("num_local_experts"))
            if not isinstance(num_experts, int) or isinstance(num_experts, bool):
                raise ConfigError(f"config.json needs an integer 'num_experts', got {num_experts!r}")
            step = hf.get("decoder_sparse_step", 1) or 1
            dense = set(hf.get("mlp_only_layers") or [])
            moe_layers = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(layers))
            extra = dict(
                num_experts=num_experts,
                num_experts_per_tok=need("num_experts_per_tok"),
                moe_intermediate_size=need("moe_intermediate_size"),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            )

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        defaults = {
            "llama": dict(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
                          mlp_bias=bool(hf.get("mlp_bias", False))),
            "qwen2": dict(qkv_bias=True),
            "qwen3": dict(qkv_bias=bool(hf.get("attention_bias", False)),
                          o_bias=bool(hf.get("attention_bias", False)), qk_norm=True),
            "qwen3_moe": dict(qkv_bias=bool(hf.get("attention_bias", False)),
                              o_bias=bool(hf.get("attention_bias", False)), qk_norm=True),
        }[model_type]
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf.get("intermediate_size", 0) or 0,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            moe_layers=moe_layers,
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
            **defaults,
            **extra,
        )


def _rope_from_hf(hf: dict) -> RopeConfig:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type layout
        params = params["full_attention"]
    if not isinstance(params, dict):
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "dynamic":
        raise ConfigError("rope_scaling type 'dynamic' is not supported (its frequencies change with length)")
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    kw = {k: v for k, v in params.items() if k in fields and v is not None}
    kw.pop("type", None)
    try:
        return RopeConfig(theta=float(params.get("rope_theta", 10000.0)), type=rope_type, **kw)
    except TypeError as e:
        raise ConfigError(f"bad rope parameters {params!r}: {e}") from e
