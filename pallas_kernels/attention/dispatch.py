"""Picks the paged-attention implementation for the device and shape.

Kernels register themselves with `register(name, fn, available)`; `available()` says whether the kernel may be
picked automatically on the current default device (verified there). The reference is always present and is the
fallback wherever no verified kernel exists (the CPU, TPU, unknown GPUs) and for any shape a kernel declines by
raising NotImplementedError at trace time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels import tuning
from pallas_kernels.attention.reference import paged_attention_reference

OP = "paged_attention"  # the name of this op's table in pallas_kernels/tuned/


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


def shape_key(q_shape, k_shape, num_table_pages: int, dtype) -> str:
    """The tuned table's key: every static shape the kernels' plans depend on."""
    B, T, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    return f"B{B}-T{T}-Hq{Hq}-Hkv{Hkv}-D{D}-S{S}-N{num_table_pages}-{jax.numpy.dtype(dtype).name}"


def tuned(q_shape, k_shape, num_table_pages: int, dtype) -> dict | None:
    """The search loop's winner {"impl", "config", ...} for this device and shape, if it ran for them."""
    entry = tuning.lookup(OP, shape_key(q_shape, k_shape, num_table_pages, dtype))
    return entry if entry is not None and entry["impl"] in IMPLEMENTATIONS else None


def paged_attention(
    q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None, impl=None,
    config=None,
):
    """Paged attention; same arguments as `paged_attention_reference`. Without `impl`, the search loop's winner
    for this device and shape, else the first available kernel, else the reference. `impl` (with an optional
    `config` for it) forces an implementation, and then an unsupported shape is an error, not a fallback."""
    name = impl
    if name is None:
        entry = tuned(q.shape, k_pages.shape, page_table.shape[1], q.dtype)
        name, config = (entry["impl"], entry["config"] or None) if entry else (choose(), None)
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r} (known: {', '.join(IMPLEMENTATIONS)})")
    kw = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    try:
        fn = IMPLEMENTATIONS[name][0]
        return fn(q, k_pages, v_pages, page_table, kv_lens, q_lens, **kw, **({"config": config} if config else {}))
    except NotImplementedError:
        if impl is not None:
            raise
        return paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_lens, **kw)
