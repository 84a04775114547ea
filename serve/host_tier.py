"""Host-RAM tier: KV pages evicted from the device wait here, in numpy, until a prefix hit brings them back.

Copies out are asynchronous: `store` dispatches the device-side gather and starts the device-to-host transfer
(JAX async dispatch), so the scheduler goes on while the bytes move; `materialize` lands them in the numpy pool,
and runs only when the host needs the data (a load, a flush) or after a step's sync, when the device is idle
anyway. Copies in are a device_put plus an in-place scatter, both dispatched ahead of the prefill that reads
them.
"""

from __future__ import annotations

import jax
import numpy as np


class HostTier:
    def __init__(self, capacity: int, page_shape: tuple[int, ...], dtype):
        """capacity: pages held; page_shape: one page of every layer, (L, 2, Hkv, S, D)."""
        if capacity < 0:
            raise ValueError(f"host tier capacity must be >= 0 pages, got {capacity}")
        self.capacity = capacity
        self.page_shape = tuple(page_shape)
        self.data = np.zeros((capacity, *page_shape), dtype)  # [N, L, 2, Hkv, S, D]
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self._pending: list[tuple[list[int], jax.Array]] = []

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def page_bytes(self) -> int:
        return self.data[0].nbytes if self.capacity else 0

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free), f"host allocate({n}) with {len(self.free)} free"
        return [self.free.pop() for _ in range(n)]

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def store(self, slots: list[int], pages: jax.Array) -> None:
        """slots [n] <- pages [L, 2, Hkv, m, S, D], m >= n (a device array still being computed; rows past n,
        `read_pages`' padding, are dropped)."""
        pages.copy_to_host_async()
        self._pending.append((list(slots), pages))

    def materialize(self) -> None:
        """Waits for outstanding copies and writes them into the pool, oldest first (a reused slot ends with
        its newest contents)."""
        pending, self._pending = self._pending, []
        for slots, pages in pending:
            self.data[slots] = np.moveaxis(np.asarray(pages)[:, :, :, : len(slots)], 3, 0)

    def load(self, slots: list[int]) -> np.ndarray:
        """Pages held in `slots` as [L, 2, Hkv, n, S, D]."""
        if self._pending:
            self.materialize()
        return np.moveaxis(self.data[slots], 0, 3)

    def check(self, held: set[int]) -> None:
        """Invariant: every slot is either free or held (by a radix-cache node), never both."""
        free = set(self.free)
        assert len(free) == len(self.free), "a host slot is free twice"
        assert not free & held, f"host slots both free and held: {sorted(free & held)[:5]}"
        assert len(free) + len(held) == self.capacity, "host slots leaked"
