"""Picks the paged-attention implementation for the device and shape (see pallas_kernels/registry.py)."""

from __future__ import annotations

import jax

from pallas_kernels.attention.reference import paged_attention_reference
from pallas_kernels.registry import Dispatcher

OP = "paged_attention"  # the name of this op's table in pallas_kernels/tuned/
DISPATCH = Dispatcher(OP, paged_attention_reference)
IMPLEMENTATIONS, register, choose = DISPATCH.implementations, DISPATCH.register, DISPATCH.choose


def is_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100, H200)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def shape_key(q_shape, k_shape, num_table_pages: int, dtype) -> str:
    """The tuned table's key: every static shape the kernels' plans depend on."""
    B, T, Hq, D = q_shape
    Hkv, _, S, _ = k_shape
    return f"B{B}-T{T}-Hq{Hq}-Hkv{Hkv}-D{D}-S{S}-N{num_table_pages}-{jax.numpy.dtype(dtype).name}"


def tuned(q_shape, k_shape, num_table_pages: int, dtype) -> dict | None:
    return DISPATCH.tuned(shape_key(q_shape, k_shape, num_table_pages, dtype))


def paged_attention(
    q, k_pages, v_pages, page_table, kv_lens, q_lens, *, scale, sliding_window=None, soft_cap=None, impl=None,
    config=None,
):
    """Paged attention; same arguments as `paged_attention_reference`. Without `impl`, the search loop's winner
    for this device and shape, else the first available kernel, else the reference. `impl` (with an optional
    `config` for it) forces an implementation, and then an unsupported shape is an error, not a fallback."""
    return DISPATCH((q, k_pages, v_pages, page_table, kv_lens, q_lens),
                    dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap),
                    key=shape_key(q.shape, k_pages.shape, page_table.shape[1], q.dtype), impl=impl, config=config)
