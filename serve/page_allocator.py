"""Reference-counted pages over the engine's KV pool.

A page is held by every running request whose page table names it and by the radix-cache node that stores it;
it returns to the free list when the last holder lets go. Page 0 is the engine's scratch page: never handed out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        # popped from the end: low page ids first, which keeps small tests readable
        self.free: list[int] = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with one reference (the caller's)."""
        assert n <= len(self.free), f"allocate({n}) with {len(self.free)} free"
        pages = [self.free.pop() for _ in range(n)]
        self.refs[pages] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            assert self.refs[p] > 0, f"incref of free page {p}"
            self.refs[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drops one reference per page; returns how many pages became free."""
        freed = 0
        for p in pages:
            assert p != 0 and self.refs[p] > 0, f"decref of free page {p}"
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)
                freed += 1
        return freed

    def check(self, holders: Counter | None = None) -> None:
        """Asserts the invariants: scratch page untouched, free pages unreferenced and listed once, every page
        either free or referenced; with `holders` (page -> number of holders, counted by the caller from page
        tables and cache nodes), reference counts equal holders exactly, so nothing leaked or is freed twice."""
        free = set(self.free)
        assert len(free) == len(self.free), "a page is on the free list twice"
        assert 0 not in free and self.refs[0] == 0, "scratch page 0 was handed out"
        assert all(self.refs[p] == 0 for p in free), "a free page still has references"
        assert (self.refs >= 0).all(), "negative reference count"
        used = int((self.refs > 0).sum())
        assert used + len(free) == self.capacity, f"{self.capacity - used - len(free)} pages neither free nor held"
        if holders is not None:
            for p in range(1, self.num_pages):
                assert self.refs[p] == holders.get(p, 0), f"page {p}: {self.refs[p]} refs, {holders.get(p, 0)} holders"
