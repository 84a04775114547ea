"""Regeneration: the target answers the training prompts with our engine, in the decoding mode that will be served,
so the drafter learns the target's own distribution rather than some other model's text.

Responses go to a JSONL file whose first line records what produced them (target, mode, limits, a digest of the
prompts); a later run (a resume) with the same settings reads them back instead of generating again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from codegen_jax.engine import Engine
from codegen_jax.sampling import SamplingParams


def prompts_digest(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def regenerate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], path: str | Path, *,
               meta: dict, chunk: int = 64, progress: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) pairs, read from `path` when it holds this exact run (same `meta` and prompts), else
    generated `chunk` prompts per engine call (each call batches up to max_slots) and written there."""
    path = Path(path)
    meta = {**meta, "prompts": prompts_digest(prompts), "count": len(prompts)}
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("meta") == meta and len(lines) == len(prompts) + 1:
            return [(p, json.loads(line)["response_ids"]) for p, line in zip(prompts, lines[1:], strict=True)]
    pairs = []
    bar = tqdm(total=len(prompts), desc="regenerate", unit="prompt", disable=not progress)
    for lo in range(0, len(prompts), chunk):
        done = engine.generate(prompts[lo : lo + chunk], params[lo : lo + chunk])
        pairs += [(p, c.tokens) for p, c in zip(prompts[lo : lo + chunk], done, strict=True)]
        bar.update(len(done))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join([json.dumps({"meta": meta})] + [json.dumps({"response_ids": r}) for _, r in pairs])
                   + "\n")
    tmp.replace(path)  # a kill mid-write leaves no half file that a resume would trust
    return pairs
