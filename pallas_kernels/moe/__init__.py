"""Fused MoE layer for decode, verify and small prefill chunks."""

from pallas_kernels.moe.reference import moe_reference

moe = moe_reference  # the kernel issue puts a dispatcher here

__all__ = ["moe", "moe_reference"]
