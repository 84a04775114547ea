"""The suffix-tree speculator: drafts from what this session has seen, scored by frequency.

Two trees of token suffixes (depth-capped tries: every suffix of a text up to `depth` tokens, each node counting
how often its path occurred): a per-request tree over the request's prompt and its output so far, grown as
tokens arrive, and a global tree over the session's earlier prompts and outputs. A draft walks from the longest
match of the sequence's tail, taking the most frequent child while the path's estimated probability (product of
child count / parent count) stays above `min_prob`; the tree whose draft has the larger expected accepted length
(the sum of those probabilities) wins.
"""

from __future__ import annotations

from drafters.base import Draft, Drafter, Sequence

RECENT = 8  # earlier texts `end` compares a new one with


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
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixTrie:
    """Every suffix of the added texts, cut at `depth` tokens, with occurrence counts."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root = _Node()

    def add(self, tokens: list[int], skip: int = 0) -> None:
        """Adds a text (for the global tree). The suffixes ending in its first `skip` tokens, a prefix added
        before, are not counted again: growing starts from that prefix's open nodes, which exist."""
        grower = self.grower()
        if skip:
            grower.resume(tokens[:skip])
        for t in tokens[skip:]:
            grower.append(t)

    def grower(self) -> _Grower:
        return _Grower(self)

    def match(self, tail: list[int]) -> tuple[_Node | None, int]:
        """The node of the longest suffix of `tail` (up to depth - 1 tokens) that occurred with a continuation,
        and that suffix's length."""
        for m in range(min(len(tail), self.depth - 1), 0, -1):
            node = self.root
            for t in tail[-m:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.children:
                return node, m
        return None, 0

    def draft(self, tail: list[int], k: int, min_prob: float) -> tuple[list[int], float]:
        """(tokens, expected accepted length) continuing `tail` along the most frequent children."""
        node, m = self.match(tail)
        out, prob, score = [], 1.0, 0.0
        while node is not None and node.children and len(out) < min(k, self.depth - m):
            t, child = max(node.children.items(), key=lambda kv: kv[1].count)
            prob *= child.count / max(node.count, child.count)
            if prob < min_prob:
                break
            out.append(t)
            score += prob
            node = child
        return out, score


class _Grower:
    """Appends tokens to a trie one at a time: keeps the nodes of the suffixes ending at the newest token."""

    def __init__(self, trie: SuffixTrie):
        self.trie, self.open = trie, []

    def append(self, t: int) -> None:
        nxt = []
        for node in [*self.open, self.trie.root]:
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node()
            child.count += 1
            nxt.append(child)
        self.trie.root.count += 1
        # the suffix that reached `depth` tokens stops growing
        self.open = nxt[-(self.trie.depth - 1) :] if self.trie.depth > 1 else []

    def resume(self, text: list[int]) -> None:
        """Sets the open nodes to the suffixes ending at the end of `text`, an earlier added text's prefix,
        counting nothing (longest first, as `append` keeps them)."""
        self.open = []
        for m in range(min(len(text), self.trie.depth - 1), 0, -1):
            node = self.trie.root
            for t in text[-m:]:
                node = node.children[t]
            self.open.append(node)


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
        self.local: dict[int, tuple[SuffixTrie, _Grower, int]] = {}  # slot -> (trie, grower, tokens added)

    def begin(self, seq: Sequence, features=None) -> None:
        trie = SuffixTrie(self.global_trie.depth)
        grower = trie.grower()
        for t in seq.tokens:
            grower.append(t)
        self.local[seq.slot] = (trie, grower, len(seq.tokens))

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
            trie, grower, added = self.local[s.slot]
            for t in s.tokens[added:]:
                grower.append(t)
            self.local[s.slot] = (trie, grower, len(s.tokens))
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
