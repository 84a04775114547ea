"""The host drafters on their own, teacher-forced against a known output: the apply speculator on edit-merge and
compaction workloads built from real source files, repeated n-grams, the jump past a replaced region; the
suffix-tree speculator's per-request and session trees."""

from pathlib import Path

import numpy as np

from codegen_jax.sampling import SamplingParams
from drafters.apply_speculator import ApplySpeculator
from drafters.base import Sequence
from drafters.suffix_tree import SuffixTreeSpeculator, SuffixTrie

ROOT = Path(__file__).resolve().parent.parent


def teacher_forced(drafter, prompt: list[int], target: list[int], end: bool = True) -> tuple[int, list[int]]:
    """Runs `drafter` as the speculative loop would with a target that outputs `target`: returns (forwards,
    accepted per forward)."""
    seq = Sequence(0, list(prompt), len(prompt), SamplingParams(max_new_tokens=len(target)))
    drafter.begin(seq)
    forwards, accepted = 0, []
    while len(seq.tokens) - len(prompt) < len(target):
        done = len(seq.tokens) - len(prompt)
        draft = drafter.propose([seq], {0: len(target) - done - 1})
        d = draft.tokens[0, : draft.lengths[0]].tolist()
        a = 0
        while a < len(d) and d[a] == target[done + a]:
            a += 1
        new = target[done : done + a + 1]
        seq.tokens.extend(new)
        out = np.zeros((1, a + 1), np.int32)
        out[0] = new
        drafter.observe([seq], draft, np.array([a]), out)
        forwards += 1
        accepted.append(a)
    if end:
        drafter.end(seq)
    return forwards, accepted


def source_tokens(path: str) -> list[int]:
    return list((ROOT / path).read_bytes())  # bytes as tokens: a long, realistic token stream


def edit_workload(path: str) -> tuple[list[int], list[int], list[int]]:
    """(original, snippet, merged) bytes: replace one function's body and add a line near the end, the snippet
    eliding unchanged code with `# ... existing code ...` markers."""
    text = (ROOT / path).read_text()
    lines = text.splitlines(keepends=True)
    a, b = len(lines) // 3, len(lines) // 3 + 6
    new_mid = ["    # rewritten by the edit\n", "    value = compute(x, y)\n", "    return value\n"]
    tail = len(lines) - 5
    merged = lines[:a] + new_mid + lines[b:tail] + ["# appended line\n"] + lines[tail:]
    snippet = ["# ... existing code ...\n", *lines[a - 2 : a], *new_mid, *lines[b : b + 2], "# ... existing code ...\n",
               "# appended line\n", "# ... existing code ...\n"]
    enc = lambda ls: list("".join(ls).encode())
    return enc(lines), enc(snippet), enc(merged)


def test_apply_edit_merge_from_real_file():
    original, snippet, merged = edit_workload("codegen_jax/engine.py")
    prompt = list(b"<file>\n") + original + list(b"</file>\n<edit>\n") + snippet + list(b"</edit>\n")
    forwards, accepted = teacher_forced(ApplySpeculator(1), prompt, merged)
    assert len(merged) / forwards > 20, len(merged) / forwards  # ~ plain decoding would need len(merged)
    # the copy resumes after the replaced region: full 64-token drafts are accepted late in the file
    assert max(accepted[len(accepted) // 2 :]) == 64


def test_apply_compaction_selects_input():
    lines = (ROOT / "codegen_jax/sampling.py").read_text().splitlines(keepends=True)
    kept = "".join(line for i, line in enumerate(lines) if i % 5 not in (1, 2))  # drop 2 of every 5 lines
    prompt = list("".join(lines).encode())
    forwards, _ = teacher_forced(ApplySpeculator(1), prompt, list(kept.encode()))
    assert len(kept) / forwards > 8, len(kept) / forwards


def test_apply_follows_the_copy_through_repeated_ngrams():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 50, 40).tolist()
    x, y, z = (rng.integers(50, 100, 30).tolist() for _ in range(3))
    source = x + block + y + block + z  # the same block twice
    forwards, accepted = teacher_forced(ApplySpeculator(1, start_draft=64), source, source)
    # a full copy: after the first draft every draft is accepted whole; jumping back to the first copy of the
    # block from inside the second would reject
    assert all(a == 64 for a in accepted[1:-1]), accepted
    assert forwards <= 4


def test_apply_drafts_nothing_off_the_input():
    drafter = ApplySpeculator(1, min_match=2)
    seq = Sequence(0, [1, 2, 3, 4, 5, 6], 6, SamplingParams())
    drafter.begin(seq)
    seq.tokens += [9, 9]  # generated text that is nowhere in the input
    assert drafter.propose([seq], {0: 10}).lengths[0] == 0
    seq.tokens += [2, 3]
    d = drafter.propose([seq], {0: 10})
    assert d.tokens[0, : d.lengths[0]].tolist() == [4, 5, 6][: d.lengths[0]] and d.lengths[0] > 0


def test_suffix_trie_counts_and_drafts_the_most_frequent():
    trie = SuffixTrie(depth=6)
    trie.add([1, 2, 3, 1, 2, 4, 1, 2, 3])
    node, m = trie.match([7, 1, 2])
    assert m == 2 and node.count == 3 and node.children[3].count == 2 and node.children[4].count == 1
    tokens, score = trie.draft([1, 2], 3, min_prob=0.0)
    assert tokens[0] == 3 and score > 0


def reference_draft(texts, depth, tail, k, min_prob):
    """SuffixTrie.draft from plain n-gram counts: every substring of up to `depth` tokens of each text, counted
    where it ends; children in order of first occurrence."""
    counts = {}
    for text in texts:
        for e in range(len(text)):
            for n in range(1, min(depth, e + 1) + 1):
                key = tuple(text[e - n + 1 : e + 1])
                counts[key] = counts.get(key, 0) + 1
    children = lambda p: [(key[-1], c) for key, c in counts.items() if len(key) == len(p) + 1 and key[:-1] == p]
    for m in range(min(len(tail), depth - 1), 0, -1):
        path = tuple(tail[-m:])
        if children(path):
            break
    else:
        return [], 0.0
    out, prob, score = [], 1.0, 0.0
    while len(out) < min(k, depth - m) and (kids := children(path)):
        t, c = max(kids, key=lambda kc: kc[1])
        prob *= c / counts[path]
        if prob < min_prob:
            break
        out.append(t)
        score += prob
        path = (*path, t)
    return out, score


def test_suffix_trie_drafts_as_plain_ngram_counts(rng):
    """Texts added whole, grown token by token, or re-sent with a shared prefix (`skip`): the trie drafts what
    counting every n-gram of the texts gives, ties and all (a vocabulary of 4: many repeats and ties)."""
    depth = 6
    a, b, c = (rng.integers(0, 4, n).tolist() for n in (60, 40, 30))
    trie = SuffixTrie(depth)
    trie.add(a)
    trie.add(a + b, skip=len(a))  # counts b and the n-grams ending in it, as if a + b replaced a
    trie.add(c[:10])
    for i in range(10, len(c), 7):  # the per-request tree: the newest text grows
        trie.extend(c[i : i + 7])
    texts = [a + b, c]
    for _ in range(200):
        tail = rng.integers(0, 4, int(rng.integers(0, 8))).tolist()
        k, min_prob = int(rng.integers(1, 8)), float(rng.choice([0.0, 0.3]))
        tokens, score = trie.draft(tail, k, min_prob)
        want, want_score = reference_draft(texts, depth, tail, k, min_prob)
        assert tokens == want and abs(score - want_score) < 1e-9, (tail, k, min_prob)


def test_suffix_session_tree_replays_earlier_output():
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 1000, 50).tolist()
    output = rng.integers(0, 1000, 120).tolist()
    drafter = SuffixTreeSpeculator(1, max_draft=16)
    first, _ = teacher_forced(drafter, prompt, output)
    assert first > 100  # nothing to draft from the first time
    again, accepted = teacher_forced(drafter, prompt, output)  # the next turn repeats it: the session tree knows
    assert again <= len(output) // 10, accepted


def _counts(node, path=()):
    out = {path: node.count}
    for t, c in node.children.items():
        out.update(_counts(c, (*path, t)))
    return out


def test_suffix_session_tree_counts_a_resent_prefix_once():
    """An agent's next turn re-sends the last one: the session tree after turns A, A+B (C between, sharing a
    few tokens with A) holds the counts of A+B and C added once each, as if nothing had been re-sent."""
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(0, 9, n).tolist() for n in (40, 25, 30))  # a small vocabulary: shared windows
    c = a[:3] + c  # shares 3 < depth tokens with a: a coincidence, counted in full
    drafter = SuffixTreeSpeculator(1, depth=6, max_match=4)
    for text in (a, c, a + b):
        drafter.end(Sequence(0, text, len(text), SamplingParams()))
    want = SuffixTrie(depth=6)
    want.add(a + b)
    want.add(c)
    assert _counts(drafter.global_trie.root) == _counts(want.root)
    drafter.end(Sequence(0, a + b, len(a + b), SamplingParams()))  # the same text again adds nothing
    assert _counts(drafter.global_trie.root) == _counts(want.root)


def test_suffix_request_tree_drafts_repeats_in_the_output():
    rng = np.random.default_rng(2)
    unit = rng.integers(0, 1000, 12).tolist()
    output = unit * 8
    forwards, _ = teacher_forced(SuffixTreeSpeculator(1, max_draft=16), [5, 6, 7], output)
    assert forwards < len(output) // 3
