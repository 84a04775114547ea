"""Paged attention over the engine's page pool: decode (1 new token), verify (k new tokens) and chunked prefill."""

from pallas_kernels.attention.dispatch import IMPLEMENTATIONS, is_hopper, paged_attention, register
from pallas_kernels.attention.mosaic_paged import paged_attention_mosaic
from pallas_kernels.attention.reference import paged_attention_reference
from pallas_kernels.attention.triton_paged import paged_attention_triton, triton_available

# Mosaic GPU (Hopper): picked automatically there once verified natively (benchmarks/mosaic_attention_check.py).
register("mosaic", paged_attention_mosaic, is_hopper)
# Triton (other NVIDIA GPUs): until measured on Hopper, Hopper keeps Mosaic (benchmarks/attention.py times both).
register("triton", paged_attention_triton, triton_available)

__all__ = ["IMPLEMENTATIONS", "paged_attention", "paged_attention_mosaic", "paged_attention_reference",
           "paged_attention_triton", "register"]
