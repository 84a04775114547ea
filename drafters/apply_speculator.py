"""The apply speculator: drafts the continuation of the request's own input (the file being edited).

An edit-merge or compaction output is mostly a copy of spans of the input. The speculator keeps, per sequence, a
cursor into the input (where the copy is expected to continue) and, each step, looks up where the last generated
tokens occur in the input: the candidate with the longest backward match wins, ties go to the cursor, then to the
first occurrence after it (edits walk forward through a file), so repeated n-grams (two identical functions)
follow the copy in progress. When the output leaves the input (a replaced region) nothing matches and it drafts
nothing; once the output is back on original text, the match of its newest tokens jumps the cursor past the
replaced region. The draft length adapts to acceptance: doubling after a fully accepted draft (up to 64), falling
to just past the accepted run after a rejection.
"""

from __future__ import annotations

import numpy as np

from drafters.base import Draft, Drafter, Sequence


class _State:
    def __init__(self, source: list[int], k: int):
        self.source = np.asarray(source, np.int32)
        order = np.argsort(self.source, kind="stable")  # positions grouped by token, ascending in each group
        self._order, self._sorted = order, self.source[order]
        self.cursor = -1  # source index the newest token is expected to sit at, when copying (-1: none)
        self.k = k  # next draft length
        self.last_draft = 0

    def occurrences(self, token: int) -> np.ndarray:
        lo, hi = np.searchsorted(self._sorted, [token, token + 1])
        return self._order[lo:hi]


class ApplySpeculator(Drafter):
    """max_draft: longest draft (64); start_draft: first draft length; min_match: tokens that must match before
    a candidate is trusted (1: any occurrence of the last token); lookback: longest backward match compared."""

    def __init__(self, num_slots: int, *, max_draft: int = 64, start_draft: int = 8, min_match: int = 2,
                 lookback: int = 32):
        if not 1 <= start_draft <= max_draft:
            raise ValueError(f"start_draft must be in 1..max_draft ({max_draft}), got {start_draft}")
        self.num_slots, self.max_draft, self.start_draft = num_slots, max_draft, start_draft
        self.min_match, self.lookback = min_match, lookback
        self.state: dict[int, _State] = {}

    def begin(self, seq: Sequence, features=None) -> None:
        self.state[seq.slot] = _State(seq.tokens[: seq.prompt_len], self.start_draft)

    def end(self, seq: Sequence) -> None:
        self.state.pop(seq.slot, None)

    def propose(self, seqs: list[Sequence], max_lens: dict[int, int]) -> Draft:
        drafts = {}
        for s in seqs:
            st = self.state.get(s.slot)
            if st is None:
                st = self.state[s.slot] = _State(s.tokens[: s.prompt_len], self.start_draft)
            k = min(st.k, max_lens[s.slot], self.max_draft)
            drafts[s.slot] = self.draft(st, s.tokens, k) if k > 0 else []
            st.last_draft = len(drafts[s.slot])
        return Draft.from_lists(self.num_slots, drafts)

    def draft(self, st: _State, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens continuing `tokens` from the source, or [] when its tail is not in the source."""
        src = st.source
        n = len(src)
        cand = st.occurrences(tokens[-1])
        cand = cand[cand < n - 1]  # an occurrence must have a continuation
        if not len(cand):
            st.cursor = -1
            return []
        # backward match length of every candidate: how many of the newest tokens agree with the source there
        tail = np.asarray(tokens[-self.lookback :], np.int32)[::-1]  # newest first
        match = np.ones(len(cand), np.int32)
        alive = np.ones(len(cand), bool)
        for d in range(1, len(tail)):
            at = cand - d
            alive &= at >= 0
            alive[alive] &= src[at[alive]] == tail[d]
            if not alive.any():
                break
            match += alive
        best = int(match.max())
        # early in the output the match may use only what was generated (the prompt's tail is no copy context)
        if best < max(1, min(self.min_match, len(tokens) - len(src))):
            st.cursor = -1
            return []
        top = cand[match == best]
        if st.cursor in top:
            pos = st.cursor
        else:
            after = top[top >= st.cursor]
            pos = int(after[0] if len(after) else top[0])
        st.cursor = pos
        return src[pos + 1 : pos + 1 + k].tolist()

    def observe(self, seqs, draft, accepted, new_tokens, features=None) -> None:
        for s in seqs:
            st = self.state.get(s.slot)
            if st is None:
                continue
            a, d = int(accepted[s.slot]), st.last_draft
            if d:
                st.cursor += a + 1  # where the bonus token sits if it continues the copy; propose re-checks
                st.k = min(2 * st.k, self.max_draft) if a == d else max(2, a + 1)
