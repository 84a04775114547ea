"""The drafter-training configuration: one frozen dataclass whose fields are the command-line flags (their help is
the field's metadata), filled from an optional JSON or TOML file and then the flags, validated in __post_init__."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


class UsageError(ValueError):
    """A bad flag or config file value; the message names it."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # what to train, on what
    target: str = _f("", "target checkpoint directory (Hugging Face layout: config.json, safetensors, tokenizer)")
    drafter: str = _f("block", "drafter kind to train", choices=("block", "eagle3"))
    data: str = _f("", "prompts: JSONL/JSON lines ('prompt', 'messages' or 'prompt_ids'), parquet ('prompt' or "
                       "'messages' column), or a code file / directory of code files")
    out: str = _f("", "output directory: regenerated responses, checkpoints, metrics.jsonl, the exported drafter")
    code_task: str = _f("completion", "prompts made from code files", choices=("completion", "edit"))
    cuts_per_file: int = _f(4, "completion prompts per code file (the file cut after evenly spaced lines)")
    max_prompt_len: int = _f(1024, "prompts longer than this keep their last max_prompt_len tokens")
    eval_data: str = _f("", "held-out prompts for evaluation (same formats as --data); default: the last "
                            "--eval-prompts prompts of --data, which are then not trained on")
    eval_prompts: int = _f(8, "how many prompts evaluation uses")
    # regeneration: the decoding mode that will be served
    temperature: float = _f(0.0, "regeneration and evaluation temperature (0: greedy)")
    top_k: int = _f(0, "regeneration and evaluation top-k (0: off)")
    top_p: float = _f(1.0, "regeneration and evaluation top-p (1: off)")
    max_new_tokens: int = _f(256, "tokens the target generates per training prompt")
    slots: int = _f(8, "sequences the engine decodes together (regeneration and evaluation)")
    # the drafter's shape
    target_layers: str = _f("", "comma-separated target layers the drafter reads (default: low, middle, high)")
    block_size: int = _f(16, "block drafter: tokens per block (drafts block_size - 1)")
    draft_len: int = _f(8, "eagle3: tokens per proposal (and training-time-test steps)")
    num_layers: int = _f(1, "block drafter: decoder layers")
    num_heads: int = _f(4, "drafter attention heads")
    head_dim: int = _f(64, "drafter head width")
    intermediate_size: int = _f(1024, "drafter MLP width")
    context: int = _f(64, "target positions in the drafter's context window")
    draft_vocab_size: int = _f(32000, "eagle3: reduced vocabulary (the tokens most frequent in the responses)")
    # optimisation
    steps: int = _f(1000, "optimiser steps")
    batch_size: int = _f(8, "packed rows per step, over all devices and hosts")
    seq_len: int = _f(512, "tokens per packed row")
    num_blocks: int = _f(4, "anchors (random draft starts inside responses) per row and step")
    position_decay: float = _f(7.0, "loss weight exp(-(i-1)/decay) for draft position i; 0: uniform")
    lr: float = _f(3e-4, "peak learning rate (AdamW)")
    warmup_steps: int = _f(50, "linear warm-up steps, then cosine decay to lr * min_lr_ratio")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    clip_norm: float = _f(1.0, "gradient clipping by global norm")
    compute_dtype: str = _f("bfloat16", "drafter compute dtype (master weights stay float32)",
                            choices=("bfloat16", "float32"))
    target_dtype: str = _f("bfloat16", "dtype the target is loaded in", choices=("bfloat16", "float32"))
    export_dtype: str = _f("", "dtype of the exported drafter (default: --target-dtype)")
    seed: int = _f(0, "seed of the drafter's init, the data order, the anchors and sampled regeneration")
    # parallelism: one (dp, ep, tp) mesh of every device; the drafter and its optimiser state are replicated
    tp: int = _f(1, "tensor-parallel ways: the frozen target's heads, MLP columns and vocabulary are split over tp "
                    "devices; the batch over the devices / (tp * ep) data-parallel groups")
    ep: int = _f(1, "expert-parallel ways (MoE targets): the target's experts are split over ep devices")
    # bookkeeping
    checkpoint_every: int = _f(200, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    eval_every: int = _f(200, "steps between acceptance evaluations (also before training and at the end; 0: "
                              "never)")
    eval_max_new_tokens: int = _f(64, "tokens generated per evaluation prompt")
    log_every: int = _f(10, "steps between metric lines in metrics.jsonl")
    no_progress: bool = _f(False, "no tqdm progress bars")
    stop_after_step: int = _f(0, "for tests: end the run after this step as if killed (no final checkpoint or "
                                 "export); 0: off")

    def __post_init__(self):
        for name in ("target", "data", "out"):
            if not getattr(self, name):
                raise UsageError(f"--{name.replace('_', '-')} is required (flag or config file)")
        for name in ("steps", "batch_size", "seq_len", "num_blocks", "slots", "max_new_tokens", "checkpoint_every",
                     "log_every", "max_prompt_len", "eval_max_new_tokens", "keep_checkpoints", "tp", "ep"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "eval_prompts", "position_decay", "stop_after_step"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"--lr must be in (0, 1) and --min-lr-ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.export_dtype not in ("", "bfloat16", "float32"):
            raise UsageError(f"--export-dtype must be bfloat16 or float32, got {self.export_dtype!r}")

    @property
    def layers(self) -> tuple[int, ...] | None:
        if not self.target_layers:
            return None
        try:
            return tuple(int(x) for x in self.target_layers.split(","))
        except ValueError as e:
            raise UsageError(f"--target-layers must be comma-separated ints, got {self.target_layers!r}") from e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.drafter",
        description="Train a drafter (block or EAGLE-3) on the target's own output: regenerate responses to the "
                    "prompts with the engine, then train with the target's features computed online.")
    p.add_argument("--config", default="", help="JSON or TOML file of flag values (keys as the flags, '-' or '_'); "
                                                 "flags given on the command line win")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=None, choices=f.metadata.get("choices"),
                           help=f.metadata["help"] + f" (default: {f.default!r})")
    return p


def load_file(path: str) -> dict:
    """Flag values from a JSON or TOML file; raises UsageError naming the file and the bad key."""
    try:
        text = Path(path).read_text()
        raw = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read the config file ({e})") from e
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        name = k.replace("-", "_")
        if name not in names:
            raise UsageError(f"{path}: unknown key {k!r}")
        out[name] = ",".join(map(str, v)) if name == "target_layers" and isinstance(v, list) else v
    return out


def parse(argv: list[str] | None) -> TrainConfig:
    """TrainConfig from the command line (and --config). Raises UsageError with a one-line message."""
    args = parser().parse_args(argv)
    values = load_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values)
