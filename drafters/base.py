"""The drafter interface: what a speculator sees of a batch and what it proposes.

A drafter proposes up to k tokens per sequence (k may differ per sequence and per step); the speculative loop
verifies them in one target forward and tells the drafter what was kept. Rows of a `Draft` are the engine's
slots, so a draft feeds `Engine.verify` without reshuffling; slots not in the step have length 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from codegen_jax.sampling import SamplingParams


@dataclass
class Sequence:
    """One sequence in a speculative step. tokens: prompt + generated; tokens[-1] is sampled but not yet in the
    cache, so the slot's cache holds len(tokens) - 1 tokens."""

    slot: int
    tokens: list[int]
    prompt_len: int
    params: SamplingParams


@dataclass
class Draft:
    """tokens [S, K] int32 (S = engine slots), lengths [S] drafted per slot (<= K), and probs [S, K, V] float32:
    the distribution each draft token was drawn from (None: the drafter has none; verification treats the draft
    as one-hot)."""

    tokens: np.ndarray
    lengths: np.ndarray
    probs: jax.Array | None = None

    @staticmethod
    def from_lists(num_slots: int, drafts: dict[int, list[int]]) -> Draft:
        """A probability-free draft from per-slot token lists."""
        K = max((len(d) for d in drafts.values()), default=0)
        tokens = np.zeros((num_slots, max(K, 1)), np.int32)
        lengths = np.zeros(num_slots, np.int32)
        for slot, d in drafts.items():
            tokens[slot, : len(d)] = d
            lengths[slot] = len(d)
        return Draft(tokens, lengths)


class Drafter:
    """Base class. Host drafters (apply, suffix tree) override `propose` and maybe `begin`/`observe`/`end`;
    neural drafters also name the target layers they read (`capture`) and take features in `begin`/`observe`."""

    max_draft: int = 16  # the most tokens one proposal holds for one sequence
    capture: tuple[int, ...] = ()  # target layers whose residual streams the drafter reads (sorted, distinct)
    context: int = 0  # how many trailing prompt positions' features `begin` wants (neural drafters)
    # True: the drafter drafts on the device inside the verify step's jit (NeuralDrafter's traced `draft` and
    # `append`, its `window` state); `propose`/`observe` are then not called by the speculative step
    on_device: bool = False

    def begin(self, seq: Sequence, features: jax.Array | None = None) -> None:
        """A new request in seq.slot. features [n, F]: the target's captured features of the last n positions
        of tokens[:-1] (n <= `context`), when the drafter has `capture`."""

    def propose(self, seqs: list[Sequence], max_lens: dict[int, int]) -> Draft:
        """Drafts for `seqs`; slot s drafts at most max_lens[s] tokens (the loop's room left)."""
        raise NotImplementedError

    def observe(self, seqs: list[Sequence], draft: Draft, accepted: np.ndarray, new_tokens: np.ndarray,
                features: jax.Array | None = None) -> None:
        """After verification: accepted [S] draft tokens kept per slot, new_tokens [S, T] (row s: its accepted
        drafts then the bonus token, accepted[s] + 1 valid), features [S, T, F] of the verified positions
        ([last, drafts...], the first accepted[s] + 1 now cached). seqs' tokens already hold the new tokens."""

    def end(self, seq: Sequence) -> None:
        """The request in seq.slot finished (seq.tokens is its whole text)."""
