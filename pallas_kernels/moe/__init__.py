"""Fused MoE layer for decode, verify and small prefill chunks."""

from pallas_kernels.moe.dispatch import IMPLEMENTATIONS, moe, register
from pallas_kernels.moe.mosaic_moe import MosaicMoEConfig, moe_mosaic, mosaic_available
from pallas_kernels.moe.reference import QuantizedWeight, moe_reference, quantize_int8
from pallas_kernels.moe.triton_moe import TritonMoEConfig, moe_triton, triton_available

# Triton (NVIDIA, Ampere and newer, Hopper included): benchmarks/moe.py checks it against the reference before
# timing it on the device.
register("triton", moe_triton, triton_available)
# Mosaic GPU (Hopper only), after Triton: Triton stays the default on Hopper (it also takes T up to 256 and int8,
# where a declined shape would otherwise fall to the reference) until the tuned table records a mosaic winner for
# a shape (benchmarks/moe.py checks it against the reference before timing it).
register("mosaic", moe_mosaic, mosaic_available)

__all__ = ["IMPLEMENTATIONS", "MosaicMoEConfig", "QuantizedWeight", "TritonMoEConfig", "moe", "moe_mosaic",
           "moe_reference", "moe_triton", "quantize_int8", "register"]
