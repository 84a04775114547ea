"""Picks the MoE implementation for the device and shape (see pallas_kernels/registry.py). Kernels decline shapes
or weight formats by raising NotImplementedError at trace time (e.g. prefill chunks beyond the Triton kernel's
256 tokens), and the reference takes them.
"""

from __future__ import annotations

import jax

from pallas_kernels.moe.reference import QuantizedWeight, moe_reference
from pallas_kernels.registry import Dispatcher

OP = "moe"  # the name of this op's table in pallas_kernels/tuned/
DISPATCH = Dispatcher(OP, moe_reference)
IMPLEMENTATIONS, register, choose = DISPATCH.implementations, DISPATCH.register, DISPATCH.choose


def shape_key(x_shape, w_gate, top_k: int, dtype) -> str:
    """The tuned table's key: every static shape and format the kernels' plans depend on."""
    T, D = x_shape
    E, _, F = w_gate.shape
    if isinstance(w_gate, QuantizedWeight):
        wfmt = "int8k" if w_gate.k_major else "int8"
    else:
        wfmt = jax.numpy.dtype(w_gate.dtype).name
    return f"T{T}-D{D}-F{F}-E{E}-K{top_k}-{jax.numpy.dtype(dtype).name}-w{wfmt}"


def tuned(x_shape, w_gate, top_k: int, dtype) -> dict | None:
    return DISPATCH.tuned(shape_key(x_shape, w_gate, top_k, dtype))


def moe(x, router, w_gate, w_up, w_down, *, top_k: int, norm_topk_prob: bool, impl: str | None = None,
        config=None):
    """Sparse MoE layer; same arguments as `moe_reference` (weights may be `QuantizedWeight`s). Without `impl`,
    the search loop's winner for this device and shape, else the first available kernel, else the reference.
    `impl` (with an optional `config` for it) forces an implementation, and then an unsupported shape is an
    error, not a fallback."""
    return DISPATCH((x, router, w_gate, w_up, w_down), dict(top_k=top_k, norm_topk_prob=norm_topk_prob),
                    key=shape_key(x.shape, w_gate, top_k, x.dtype), impl=impl, config=config)
