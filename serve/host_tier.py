"""Host-RAM tier: KV pages evicted from the device wait here, in numpy, until a prefix hit brings them back.

Copies out overlap compute: `store` takes the device-side gather (dispatched, not awaited) and hands it to a
lander thread, which copies it to the host (through pinned memory: `to_host`) and into the numpy pool (each page
one contiguous run: the gather is page-major) while the engine thread goes on. No copy out may hold the GIL: on
the H200, `copy_to_host_async()` on the engine thread blocked until the gather had run (405 ms a call on average
over the 7B agent trace probe's 36 evictions), and np.asarray on the lander held the GIL as long, stopping the
engine thread all the same (464 ms in a 12,288-token eviction). A load, a flush or a check waits for the copies
still on their way (`materialize`). Copies in are a device_put plus an in-place scatter, both dispatched ahead of
the prefill that reads them.
"""

from __future__ import annotations

import logging
import queue
import threading

import jax
import numpy as np

from codegen_jax.kv_cache import to_host

log = logging.getLogger(__name__)


class HostTier:
    def __init__(self, capacity: int, page_shape: tuple[int, ...], dtype):
        """capacity: pages held; page_shape: one page of every layer, (L, 2, Hkv, S, D)."""
        if capacity < 0:
            raise ValueError(f"host tier capacity must be >= 0 pages, got {capacity}")
        self.capacity = capacity
        self.page_shape = tuple(page_shape)
        self.data = np.zeros((capacity, *page_shape), dtype)  # [N, L, 2, Hkv, S, D]
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self._pending: queue.Queue = queue.Queue()  # (slots, device pages) for the lander, oldest first
        self._lander: threading.Thread | None = None  # started by the first store
        self._failed: BaseException | None = None

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
        """slots [n] <- pages [m, L, 2, Hkv, S, D], m >= n (a device array still being computed; rows past n,
        `read_pages`' padding, are dropped). Returns at once: the lander thread lands them."""
        if self._lander is None:
            self._lander = threading.Thread(target=self._land_loop, name="kv-host-lander", daemon=True)
            self._lander.start()
        self._pending.put((list(slots), pages))

    def _land_loop(self) -> None:
        while True:
            slots, pages = self._pending.get()
            try:
                host = to_host(pages)  # waits for the gather and the transfer, the GIL released
                for i, s in enumerate(slots):  # in order: a slot stored twice ends with its newest contents
                    self.data[s] = host[i]  # one contiguous page: a memcpy without the GIL
            except Exception as e:  # stale bytes in those slots: the next load or flush raises, never reads them
                log.exception("host tier: landing %d pages failed", len(slots))
                self._failed = e
            finally:
                self._pending.task_done()

    def materialize(self) -> None:
        """Waits until every stored page has landed in the pool."""
        self._pending.join()
        if self._failed is not None:
            raise RuntimeError("the host tier lost pages on their way from the device") from self._failed

    def load(self, slots: list[int]) -> np.ndarray:
        """Pages held in `slots` as [n, L, 2, Hkv, S, D]."""
        self.materialize()
        return self.data[slots]

    def check(self, held: set[int]) -> None:
        """Invariant: every slot is either free or held (by a radix-cache node), never both."""
        free = set(self.free)
        assert len(free) == len(self.free), "a host slot is free twice"
        assert not free & held, f"host slots both free and held: {sorted(free & held)[:5]}"
        assert len(free) + len(held) == self.capacity, "host slots leaked"
