"""Fused MoE layer for decode, verify and small prefill chunks."""

from pallas_kernels.moe.dispatch import IMPLEMENTATIONS, moe, register
from pallas_kernels.moe.reference import QuantizedWeight, moe_reference, quantize_int8
from pallas_kernels.moe.triton_moe import TritonMoEConfig, moe_triton, triton_available

# Triton (NVIDIA, Ampere and newer, Hopper included): benchmarks/moe.py checks it against the reference before
# timing it on the device.
register("triton", moe_triton, triton_available)

__all__ = ["IMPLEMENTATIONS", "QuantizedWeight", "TritonMoEConfig", "moe", "moe_reference", "moe_triton",
           "quantize_int8", "register"]
