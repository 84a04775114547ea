"""Picks the paged-attention implementation for the device and shape.

Kernels register themselves with `register(name, fn, available)`; `available()` says whether the kernel may be
picked automatically on the current default device (verified there). The reference is always present and is the
fallback wherever no verified kernel exists (the CPU, TPU, unknown GPUs) and for any shape a kernel declines by
raising NotImplementedError at trace time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels.attention.reference import paged_attention_reference


def _never() -> bool:
    return False


# name -> (implementation, may it be picked automatically on this device?)
IMPLEMENTATIONS: dict[str, tuple[Callable, Callable[[], bool]]] = {
    "reference": (paged_attention_reference, _never),
}


def register(name: str, fn: Callable, available: Callable[[], bool] = _never) -> None:
    IMPLEMENTATIONS[name] = (fn, available)


def is_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100, H200)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def choose() -> str:
    for name, (_, available) in IMPLEMENTATIONS.items():
        if name != "reference" and available():
            return name
    return "reference"


def paged_attention(
    q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None, impl=None
):
    """Paged attention; same arguments as `paged_attention_reference`. `impl` forces an implementation (and then
    an unsupported shape is an error, not a fallback)."""
    name = impl or choose()
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r} (known: {', '.join(IMPLEMENTATIONS)})")
    kw = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    try:
        return IMPLEMENTATIONS[name][0](q, k_pages, v_pages, page_table, kv_lens, q_lens, **kw)
    except NotImplementedError:
        if impl is not None:
            raise
        return paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_lens, **kw)
