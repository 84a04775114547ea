"""Picks the MoE implementation for the device and shape.

Kernels register with `register(name, fn, available)`; `available()` says whether the kernel may be picked
automatically on the current default device. The reference is always present and is the fallback wherever no
kernel is available (the CPU, TPU) and for any shape or weight format a kernel declines by raising
NotImplementedError at trace time (e.g. prefill chunks beyond the Triton kernel's 256 tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels import tuning
from pallas_kernels.moe.reference import QuantizedWeight, moe_reference

OP = "moe"  # the name of this op's table in pallas_kernels/tuned/


def _never() -> bool:
    return False


# name -> (implementation, may it be picked automatically on this device?)
IMPLEMENTATIONS: dict[str, tuple[Callable, Callable[[], bool]]] = {
    "reference": (moe_reference, _never),
}


def register(name: str, fn: Callable, available: Callable[[], bool] = _never) -> None:
    IMPLEMENTATIONS[name] = (fn, available)


def choose() -> str:
    for name, (_, available) in IMPLEMENTATIONS.items():
        if name != "reference" and available():
            return name
    return "reference"


def shape_key(x_shape, w_gate, top_k: int, dtype) -> str:
    """The tuned table's key: every static shape and format the kernels' plans depend on."""
    T, D = x_shape
    E, _, F = w_gate.shape
    wfmt = "int8" if isinstance(w_gate, QuantizedWeight) else jax.numpy.dtype(w_gate.dtype).name
    return f"T{T}-D{D}-F{F}-E{E}-K{top_k}-{jax.numpy.dtype(dtype).name}-w{wfmt}"


def tuned(x_shape, w_gate, top_k: int, dtype) -> dict | None:
    """The search loop's winner {"impl", "config", ...} for this device and shape, if it ran for them."""
    entry = tuning.lookup(OP, shape_key(x_shape, w_gate, top_k, dtype))
    return entry if entry is not None and entry["impl"] in IMPLEMENTATIONS else None


def moe(x, router, w_gate, w_up, w_down, *, top_k: int, norm_topk_prob: bool, impl: str | None = None,
        config=None):
    """Sparse MoE layer; same arguments as `moe_reference` (weights may be `QuantizedWeight`s). Without `impl`,
    the search loop's winner for this device and shape, else the first available kernel, else the reference.
    `impl` (with an optional `config` for it) forces an implementation, and then an unsupported shape is an
    error, not a fallback."""
    name = impl
    if name is None:
        entry = tuned(x.shape, w_gate, top_k, x.dtype)
        name, config = (entry["impl"], entry["config"] or None) if entry else (choose(), None)
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown MoE implementation {name!r} (known: {', '.join(IMPLEMENTATIONS)})")
    kw = dict(top_k=top_k, norm_topk_prob=norm_topk_prob)
    try:
        fn = IMPLEMENTATIONS[name][0]
        return fn(x, router, w_gate, w_up, w_down, **kw, **({"config": config} if config else {}))
    except NotImplementedError:
        if impl is not None:
            raise
        return moe_reference(x, router, w_gate, w_up, w_down, **kw)
