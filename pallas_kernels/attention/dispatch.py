"""Picks the paged-attention implementation for the platform and shape.

Kernels register themselves with `register(name, fn, platforms)`; the reference is always present and is the
fallback wherever no verified kernel exists (the CPU, and any platform nothing was registered for).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels.attention.reference import paged_attention_reference

# name -> (implementation, platforms it may be picked for automatically)
IMPLEMENTATIONS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "reference": (paged_attention_reference, ()),
}


def register(name: str, fn: Callable, platforms: tuple[str, ...] = ()) -> None:
    IMPLEMENTATIONS[name] = (fn, platforms)


def choose(platform: str) -> str:
    for name, (_, platforms) in IMPLEMENTATIONS.items():
        if platform in platforms:
            return name
    return "reference"


def paged_attention(
    q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None, impl=None
):
    """Paged attention; same arguments as `paged_attention_reference`. `impl` forces an implementation."""
    name = impl or choose(jax.default_backend())
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r} (known: {', '.join(IMPLEMENTATIONS)})")
    fn = IMPLEMENTATIONS[name][0]
    return fn(q, k_pages, v_pages, page_table, kv_lens, q_lens, scale=scale, sliding_window=sliding_window,
              soft_cap=soft_cap)
