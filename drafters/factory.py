"""Builds a speculator by name, for every entry point (the CLI's generate, the server)."""

from __future__ import annotations

from pathlib import Path

from codegen_jax.engine import Engine
from drafters.speculative import SpeculativeDecoder

KINDS = ("apply", "suffix", "block", "eagle3")
NEURAL = {"block": "BlockDrafter", "eagle3": "Eagle3Drafter"}


def neural_kind(drafter_dir: str | Path) -> str:
    """block or eagle3: what a drafter checkpoint holds. Raises ValueError for anything else."""
    from drafters.checkpoint import load_drafter

    name = type(load_drafter(drafter_dir)).__name__
    for kind, cls in NEURAL.items():
        if name == cls:
            return kind
    raise ValueError(f"drafter checkpoint {drafter_dir} holds a {name}, not a block or eagle3 drafter")


def build_speculator(kind: str, engine: Engine, target, *, drafter_dir: str | Path | None = None,
                     draft_len: int = 0) -> SpeculativeDecoder:
    """A SpeculativeDecoder over `engine` with the named drafter, for all of the engine's slots.

    kind: apply | suffix (host drafters, no checkpoint) or block | eagle3 (need `drafter_dir`); draft_len: the
    longest draft (0: the drafter's default). Raises ValueError naming the problem for a bad combination, a
    missing or mismatched checkpoint."""
    from drafters.apply_speculator import ApplySpeculator
    from drafters.suffix_tree import SuffixTreeSpeculator

    slots, k = engine.cfg.max_slots, draft_len
    if kind not in KINDS:
        raise ValueError(f"unknown speculator {kind!r} (known: {', '.join(KINDS)})")
    if kind in ("apply", "suffix"):
        if drafter_dir:
            raise ValueError(f"--drafter is for the neural speculators (block, eagle3), not {kind}")
        if kind == "apply":
            return SpeculativeDecoder(engine, ApplySpeculator(slots, max_draft=k or 64, start_draft=min(8, k or 64)))
        return SpeculativeDecoder(engine, SuffixTreeSpeculator(slots, max_draft=k or 16))
    from drafters.checkpoint import load_drafter
    from drafters.neural import NeuralDrafter

    if not drafter_dir:
        raise ValueError(f"--speculator {kind} needs --drafter DIR (a drafter checkpoint)")
    model = load_drafter(drafter_dir)
    if type(model).__name__ != NEURAL[kind]:
        raise ValueError(f"--drafter {drafter_dir} holds a {type(model).__name__}, not a {kind} drafter")
    drafter = NeuralDrafter(model, target, slots)
    if k:
        drafter.max_draft = min(k, drafter.max_draft)
    return SpeculativeDecoder(engine, drafter)
