"""The paged KV cache: a page pool per layer on the device, page tables and lengths per slot on the host."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from codegen_jax.config import ModelConfig


class OutOfPages(RuntimeError):
    pass


def _bucket_ids(ids) -> np.ndarray:
    """Pads page ids to a power of two with page 0 (scratch), so copies compile once per size class."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    out = np.zeros(1 << max(0, len(ids) - 1).bit_length(), np.int32)
    out[: len(ids)] = ids
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """x's contents in a (read-only) numpy array, copied through the device's pinned host memory. np.asarray of
    a device array holds the GIL for the whole copy, stopping every other Python thread of the server (the engine
    thread too: a 12,288-token spill to the host tier stalled a Redis hit's admission 464 ms). A device_put into
    pinned host memory is a DMA that waits with the GIL released, and numpy then reads that memory. H200, 704 MB
    (`python benchmarks/host_copy.py`, benchmarks/results/host_copy.json): np.asarray 474 ms at 1.5 GB/s with a
    407 ms stall of another thread; this 14.5 ms at 48.6 GB/s. On the CPU np.asarray is the copy (usually none at
    all); so it is where pinned host memory is not offered."""
    return np.asarray(x) if next(iter(x.devices())).platform == "cpu" else via_pinned_host(x)


def via_pinned_host(x: jax.Array) -> np.ndarray:
    """to_host's copy on an accelerator (any sharding: the shards meet in host memory)."""
    try:
        sharding = x.sharding.with_memory_kind("pinned_host")
    except (ValueError, NotImplementedError):
        return np.asarray(x)
    return np.asarray(jax.device_put(x, sharding))


@jax.jit
def _gather_pages(pages, ids):
    # pages: L x (k, v) [K, P, S, D]; ids [n] -> [n, L, 2, K, S, D]: page-major, so each page's bytes are one
    # contiguous run on the host (the tiers copy and checksum whole pages; the transpose is free on the device)
    return jnp.moveaxis(jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in pages]), 3, 0)


@partial(jax.jit, donate_argnums=0)
def _scatter_pages(pages, ids, data):
    # data [n, L, 2, K, S, D]; padded ids point at the scratch page, so their rows land there
    data = jnp.moveaxis(data, 0, 3)  # [L, 2, K, n, S, D]
    return tuple((k.at[:, ids].set(data[i, 0].astype(k.dtype)), v.at[:, ids].set(data[i, 1].astype(v.dtype)))
                 for i, (k, v) in enumerate(pages))


class PagedKVCache:
    """Pool of `num_pages` pages of `page_size` tokens per layer; page 0 is a scratch page that padding tokens
    write to and no sequence owns. A slot's KV is its page-table row up to `lengths[slot]` tokens: rolling back
    rejected tokens is only a length change."""

    def __init__(self, cfg: ModelConfig, *, num_slots: int, page_size: int, num_pages: int, max_seq_len: int,
                 dtype=jnp.bfloat16):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
        shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)  # [K, P, S, D]
        self.pages = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
        self.page_size = page_size
        self.max_pages = math.ceil(max_seq_len / page_size)
        self.page_table = np.zeros((num_slots, self.max_pages), np.int32)
        self.lengths = np.zeros(num_slots, np.int32)
        self.owned: list[list[int]] = [[] for _ in range(num_slots)]
        self.free: list[int] = list(range(num_pages - 1, 0, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    def pages_needed(self, slot: int, n_tokens: int) -> int:
        return max(0, math.ceil(n_tokens / self.page_size) - len(self.owned[slot]))

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Makes sure `slot` has pages for its first n_tokens tokens."""
        need = self.pages_needed(slot, n_tokens)
        if len(self.owned[slot]) + need > self.max_pages:
            raise OutOfPages(f"{n_tokens} tokens exceed the per-sequence limit of {self.max_pages * self.page_size}")
        if need > len(self.free):
            raise OutOfPages(f"need {need} free pages, have {len(self.free)}")
        for _ in range(need):
            page = self.free.pop()
            self.page_table[slot, len(self.owned[slot])] = page
            self.owned[slot].append(page)

    def release(self, slot: int) -> None:
        self.free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []
        self.page_table[slot] = 0
        self.lengths[slot] = 0

    # ---- page copies for the serving tiers (host RAM, remote store) -----------------------------------------

    def read_pages(self, ids) -> jax.Array:
        """Copies pages `ids` [n] of every layer into one device array [m, L, 2, Hkv, S, D], m >= n the power of
        two `n` pads to: the first n follow `ids`, the rest are the scratch page. The caller drops them once on the
        host (a slice on the device would compile once per n). Dispatched, not awaited: a later step that
        reuses the pages is ordered after the copy, so callers may free them at once."""
        return _gather_pages(self.pages, _bucket_ids(ids))

    def write_pages(self, ids, data) -> None:
        """pages[ids] <- data [n, L, 2, Hkv, S, D] (numpy or device) in every layer, in place (pool donated).
        data may come padded to the size class already (n rows and then any, written to the scratch page)."""
        n = data.shape[0]
        padded = _bucket_ids(ids)
        if not len(ids) <= n <= len(padded):
            raise ValueError(f"write_pages: {len(ids)} page ids for {n} pages of data")
        if len(padded) != n:
            pad = [(0, len(padded) - n)] + [(0, 0)] * 5
            data = np.pad(data, pad) if isinstance(data, np.ndarray) else jnp.pad(data, pad)
        self.pages = _scatter_pages(self.pages, padded, data)
