"""Training data: prompts from local files, packing of (prompt, response) pairs into fixed-length rows, and a grain
pipeline over the rows with deterministic shuffling, sharding across hosts and a resumable iterator.

Prompt sources (`load_prompts`):
- JSONL (.jsonl, .json): one object a line with "prompt" (text), "messages" (chat turns, rendered with the target's
  chat template) or "prompt_ids" (token ids);
- parquet (.parquet): a "prompt" or "messages" column (needs pyarrow);
- code: a source file or a directory of them; "completion" prompts are each file cut after evenly spaced lines,
  "edit" prompts ask (through the chat template) to rewrite the whole file, which a coding agent's edits mostly copy.

Every problem a user can cause raises DataError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from codegen_jax.tokenizer import Tokenizer

CODE_SUFFIXES = {".py", ".js", ".ts", ".go", ".rs", ".c", ".h", ".cc", ".cpp", ".java", ".rb", ".sh", ".md", ".toml"}


class DataError(ValueError):
    """A data file we cannot use; the message names the file and the problem."""


def _from_record(rec, where: str, tok: Tokenizer) -> list[int]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt_ids" in rec:
        ids = rec["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise DataError(f"{where}: prompt_ids must be a list of ints")
        return ids
    if isinstance(rec.get("prompt"), str):
        return tok.encode(rec["prompt"])
    if isinstance(rec.get("messages"), list):
        if not tok.chat_template:
            raise DataError(f"{where}: chat messages need a chat template, the target's tokenizer has none")
        return tok.encode_chat(list(rec["messages"]))
    raise DataError(f"{where}: needs a 'prompt' (text), 'messages' (chat turns) or 'prompt_ids' field")


def _jsonl(path: Path, tok: Tokenizer) -> list[list[int]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            out.append(_from_record(rec, f"{path}:{n}", tok))
    return out


def _parquet(path: Path, tok: Tokenizer) -> list[list[int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError and more for bad files
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    rows = table.to_pylist()
    return [_from_record(r, f"{path}: row {i}", tok) for i, r in enumerate(rows)]


def _code(paths: list[Path], tok: Tokenizer, task: str, cuts: int) -> list[list[int]]:
    out = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: cannot read as UTF-8 text ({e})") from e
        if task == "edit":
            if not tok.chat_template:
                raise DataError(f"{p}: edit prompts need a chat template, the target's tokenizer has none")
            msg = f"Rewrite {p.name} with clear names and docstrings; reply with the whole file.\n```\n{text}\n```"
            out.append(tok.encode_chat([{"role": "user", "content": msg}]))
            continue
        lines = text.splitlines(keepends=True)
        for c in range(1, cuts + 1):
            cut = max(1, len(lines) * c // (cuts + 1))
            if prefix := "".join(lines[:cut]):
                out.append(tok.encode(prefix))
    return out


def load_prompts(path: str | Path, tok: Tokenizer, *, code_task: str = "completion",
                 cuts_per_file: int = 4) -> list[list[int]]:
    """Token ids of every prompt in `path` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CODE_SUFFIXES)
        prompts = _code(files, tok, code_task, cuts_per_file)
    elif path.suffix in (".jsonl", ".json"):
        prompts = _jsonl(path, tok)
    elif path.suffix == ".parquet":
        prompts = _parquet(path, tok)
    else:
        prompts = _code([path], tok, code_task, cuts_per_file)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    bad = [i for p in prompts for i in p if not 0 <= i < tok.vocab_size]
    if bad:
        raise DataError(f"{path}: token id {bad[0]} is outside the tokenizer's vocabulary [0, {tok.vocab_size})")
    return prompts


# ---- packing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """Rows of length T: tokens, segments (1, 2, ... per sequence in the row; 0 is padding), positions (restart
    at 0 per segment) and loss (1 where the token is the target's response), each [N, T] int32."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def row(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[i], "segments": self.segments[i], "positions": self.positions[i],
                "loss": self.loss[i]}


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> Packed:
    """First-fit decreasing packing of (prompt, response) pairs into rows of seq_len tokens. A pair longer than
    seq_len keeps its last seq_len tokens (the response and the prompt's end, what a drafter reads)."""
    seqs = []
    for prompt, response in examples:
        if not response:
            continue
        toks = (list(prompt) + list(response))[-seq_len:]
        n_resp = min(len(response), len(toks))
        seqs.append((toks, n_resp))
    if not seqs:
        raise DataError("no (prompt, response) pair has a response to train on")
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))  # deterministic: ties by index
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i][0])
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([])
            room.append(seq_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    N = len(rows)
    out = {k: np.zeros((N, seq_len), np.int32) for k in ("tokens", "segments", "positions", "loss")}
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            toks, n_resp = seqs[i]
            n = len(toks)
            out["tokens"][r, at : at + n] = toks
            out["segments"][r, at : at + n] = s
            out["positions"][r, at : at + n] = np.arange(n)
            out["loss"][r, at + n - n_resp : at + n] = 1
            at += n
    return Packed(**out)


# ---- the grain pipeline ----------------------------------------------------------------------------------------


def dataset(packed: Packed, batch_size: int, *, seed: int, shard: int = 0, num_shards: int = 1) -> grain.IterDataset:
    """Batches of packed rows, forever: each host takes every num_shards-th row from `shard`, shuffled anew each
    epoch from `seed`. batch_size is per host. Batches are dicts of [batch_size, T] int32."""
    rows = grain.MapDataset.range(len(packed))[shard::num_shards]
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} packed rows per host is fewer than the batch size {batch_size}: "
                        "add prompts, lower --batch-size or --seq-len")
    ds = rows.shuffle(seed=seed).repeat().map(packed.row).batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset()


class DataIterator:
    """A resumable iterator over `dataset`: `state()` is a small JSON-able dict for the checkpoint and `restore`
    puts the iterator back exactly where that state was taken."""

    def __init__(self, ds: grain.IterDataset):
        self._it = iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def __iter__(self):
        return self

    def state(self) -> dict:
        return self._it.get_state()

    def restore(self, state: dict) -> None:
        self._it.set_state(state)
