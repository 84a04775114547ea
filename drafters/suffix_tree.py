"""The suffix-tree speculator: drafts from what this session has seen, scored by frequency.

Two trees of token suffixes (depth-capped tries: every suffix of a text up to `depth` tokens, each node counting
how often its path occurred): a per-request tree over the request's prompt and its output so far, grown as
tokens arrive, and a global tree over the session's earlier prompts and outputs. A draft walks from the longest
match of the sequence's tail, taking the most frequent child while the path's estimated probability (product of
child count / parent count) stays above `min_prob`; the tree whose draft has the larger expected accepted length
(the sum of those probabilities) wins.
"""

from __future__ import annotations

from collections import Counter
from operator import itemgetter

import numpy as np

from drafters.base import Draft, Drafter, Sequence

RECENT = 8  # earlier texts `end` compares a new one with
SEP = -1  # between texts in a trie's token array: never a token, so no path crosses it


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    """A trie node, computed when asked for: the positions in the trie's token array where its path ends (some
    may be uncounted context) and its count."""

    __slots__ = ("trie", "ends", "length", "count")

    def __init__(self, trie: SuffixTrie, ends: np.ndarray, length: int, count: int):
        self.trie, self.ends, self.length, self.count = trie, ends, length, count

    @property
    def children(self) -> dict[int, _Node]:
        """The path's counted continuations, in order of first occurrence (the order a growing trie makes them)."""
        if self.length >= self.trie.depth:
            return {}
        toks, counted = self.trie._tokens, self.trie._counted
        nxt = toks[self.ends + 1]
        kids = {}
        for t in dict.fromkeys(nxt[counted[self.ends + 1]].tolist()):
            ends = self.ends[nxt == t] + 1
            kids[t] = _Node(self.trie, ends, self.length + 1, int(counted[ends].sum()))
        return kids


class SuffixTrie:
    """Every suffix of the added texts, cut at `depth` tokens, with occurrence counts.

    Stored as the texts' tokens (one array, a separator between texts) and their positions sorted by token; a node
    is the set of positions where its path ends, found by narrowing the positions of its last token one token back
    at a time, and its count is how many of those positions are counted (not context, see `add`). Adding n tokens
    is a sort of n and a merge, where a node per token per depth cost n * depth dict updates in Python (0.44 s for
    a 7.5k-token prompt, on the request's path)."""

    def __init__(self, depth: int):
        self.depth = depth
        self._tokens = np.full(1024, SEP, np.int32)  # the texts; SEP before each and after the last
        self._counted = np.zeros(1024, bool)  # per position: a path ending there counts
        self._n = 1
        self._keys = np.zeros(0, np.int32)  # the stored tokens, sorted
        self._ends = np.zeros(0, np.int64)  # their positions, in that order (ascending per token)

    def add(self, tokens: list[int], skip: int = 0) -> None:
        """Adds a text (for the global tree). The suffixes ending in its first `skip` tokens, a prefix added
        before, are not counted again: of those, only the last depth - 1 are stored, uncounted, as the start of
        the paths that end after them."""
        self._n += 1  # a separator: no path runs from one text into the next
        self._write(tokens[max(0, skip - (self.depth - 1)) : skip], counted=False)
        self._write(tokens[skip:], counted=True)

    def extend(self, tokens: list[int]) -> None:
        """Appends tokens to the newest text (the per-request tree, as the output grows)."""
        self._write(tokens, counted=True)

    def _write(self, tokens: list[int], counted: bool) -> None:
        new = np.asarray(tokens, np.int32)
        n = self._n
        if n + len(new) + 1 > len(self._tokens):  # amortised growth; the tail stays SEP
            size = max(2 * len(self._tokens), n + len(new) + 1)
            self._tokens = np.concatenate([self._tokens[:n], np.full(size - n, SEP, np.int32)])
            self._counted = np.concatenate([self._counted[:n], np.zeros(size - n, bool)])
        self._tokens[n : n + len(new)] = new
        self._counted[n : n + len(new)] = counted
        self._n += len(new)
        if len(new):
            order = np.argsort(new, kind="stable")
            keys, ends = new[order], n + order
            at = np.searchsorted(self._keys, keys, side="right")  # after equal keys: earlier positions stay first
            self._keys, self._ends = np.insert(self._keys, at, keys), np.insert(self._ends, at, ends)

    def _positions(self, t: int) -> np.ndarray:
        lo, hi = np.searchsorted(self._keys, t, "left"), np.searchsorted(self._keys, t, "right")
        return self._ends[lo:hi]

    @property
    def root(self) -> _Node:
        return _Node(self, np.sort(self._ends) - 1, 0, int(self._counted.sum()))

    def _match(self, tail: list[int]) -> tuple[np.ndarray | None, int]:
        """(end positions, length) of the longest suffix of `tail` (up to depth - 1 tokens) that occurred with a
        counted continuation. A suffix one token longer ends at a subset of the positions: narrow until none is
        left, then take the longest with a continuation (checked from the longest down: usually one check)."""
        toks = self._tokens
        if not tail or self.depth < 2:
            return None, 0
        ends = [self._positions(tail[-1])]  # ends[j]: where tail[-1 - j:] ends
        for j in range(1, min(len(tail), self.depth - 1)):
            narrower = ends[-1][toks[ends[-1] - j] == tail[-1 - j]]  # the separator at 0 stops a path at the start
            if not len(narrower):
                break
            ends.append(narrower)
        for m in range(len(ends), 0, -1):
            if self._counted[ends[m - 1] + 1].any():
                return ends[m - 1], m
        return None, 0

    def match(self, tail: list[int]) -> tuple[_Node | None, int]:
        """The node of the longest suffix of `tail` (up to depth - 1 tokens) that occurred with a continuation,
        and that suffix's length."""
        ends, m = self._match(tail)
        return (None, 0) if ends is None else (_Node(self, ends, m, int(self._counted[ends].sum())), m)

    def draft(self, tail: list[int], k: int, min_prob: float) -> tuple[list[int], float]:
        """(tokens, expected accepted length) continuing `tail` along the most frequent children (ties: the one
        seen first)."""
        ends, m = self._match(tail)
        if ends is None:
            return [], 0.0
        out, prob, score = [], 1.0, 0.0
        toks, counted = self._tokens, self._counted
        limit = min(k, self.depth - m)
        count = int(counted[ends].sum())  # the path's count; a child's is its number of counted continuations
        while len(out) < limit and prob >= min_prob:
            if len(ends) == 1:  # one occurrence: every child has probability 1, so the rest is its continuation
                e, n = int(ends[0]) + 1, limit - len(out)
                ok = counted[e : e + n]
                n = n if ok.all() else int(ok.argmin())
                out += toks[e : e + n].tolist()
                score += prob * n
                break
            nxt = toks[ends + 1]
            counts = Counter(nxt[counted[ends + 1]].tolist())  # children, in order of first occurrence
            if not counts:
                break
            t, c = max(counts.items(), key=itemgetter(1))
            prob *= c / max(count, c)
            if prob < min_prob:
                break
            out.append(t)
            score += prob
            ends, count = ends[nxt == t] + 1, c
        return out, score


class SuffixTreeSpeculator(Drafter):
    """max_draft: longest draft; depth: tokens a trie path holds (match + draft); min_prob: stop a draft when its
    estimated probability falls below this."""

    def __init__(self, num_slots: int, *, max_draft: int = 16, depth: int = 32, min_prob: float = 0.1,
                 max_match: int = 16):
        if depth <= max_match:
            raise ValueError(f"depth ({depth}) must exceed max_match ({max_match}) to leave room for drafts")
        self.num_slots, self.max_draft, self.min_prob, self.max_match = num_slots, max_draft, min_prob, max_match
        self.global_trie = SuffixTrie(depth)
        self.recent: list[list[int]] = []  # the last texts added to the global tree, newest last
        self.local: dict[int, tuple[SuffixTrie, int]] = {}  # slot -> (trie, tokens added)

    def begin(self, seq: Sequence, features=None) -> None:
        trie = SuffixTrie(self.global_trie.depth)
        trie.add(seq.tokens)
        self.local[seq.slot] = (trie, len(seq.tokens))

    def end(self, seq: Sequence) -> None:
        """The prompt and the output join the session's tree, for later requests. An agent re-sends its whole
        conversation each turn: a prefix of at least `depth` tokens shared with a recent text is already
        counted, so only what follows it is added (a turn costs its new tokens, not its length)."""
        self.local.pop(seq.slot, None)
        tokens = seq.tokens
        shared = max((_common_prefix(tokens, r) for r in self.recent), default=0)
        # a shorter overlap is a coincidence, not a re-sent text: counted as usual
        self.global_trie.add(tokens, skip=shared if shared >= self.global_trie.depth else 0)
        self.recent = [*self.recent[-(RECENT - 1) :], list(tokens)]

    def propose(self, seqs: list[Sequence], max_lens: dict[int, int]) -> Draft:
        drafts = {}
        for s in seqs:
            if s.slot not in self.local:
                self.begin(s)
            trie, added = self.local[s.slot]
            trie.extend(s.tokens[added:])
            self.local[s.slot] = (trie, len(s.tokens))
            k = min(self.max_draft, max_lens[s.slot])
            tail = s.tokens[-self.max_match :]
            best, best_score = [], 0.0
            if k > 0:
                for tree in (trie, self.global_trie):
                    d, score = tree.draft(tail, k, self.min_prob)
                    if score > best_score:
                        best, best_score = d, score
            drafts[s.slot] = best
        return Draft.from_lists(self.num_slots, drafts)
