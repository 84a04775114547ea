"""Paged attention over the engine's page pool: decode (1 new token), verify (k new tokens) and chunked prefill."""

from pallas_kernels.attention.dispatch import IMPLEMENTATIONS, is_hopper, paged_attention, register
from pallas_kernels.attention.mosaic_paged import paged_attention_mosaic
from pallas_kernels.attention.reference import paged_attention_reference
from pallas_kernels.attention.triton_paged import paged_attention_triton, triton_available


def _triton_auto() -> bool:
    return triton_available() or is_hopper()


def _triton_calls(q=None, *_) -> bool:
    """Every call on other NVIDIA GPUs; decode (one new token) on Hopper, where the Triton kernel was ahead of
    the Mosaic one on most of benchmarks/attention.py's decode grid (H200, bf61016) and Mosaic's wgmma kernel
    stays far ahead for verify and prefill chunks."""
    return not is_hopper() or (q is not None and q.shape[1] == 1)


# Triton: NVIDIA GPUs without Mosaic GPU, and Hopper's decode calls (registered first, so it is tried first).
register("triton", paged_attention_triton, _triton_auto, when=_triton_calls)
# Mosaic GPU (Hopper): every other call there, verified natively (benchmarks/mosaic_attention_check.py).
register("mosaic", paged_attention_mosaic, is_hopper)

__all__ = ["IMPLEMENTATIONS", "paged_attention", "paged_attention_mosaic", "paged_attention_reference",
           "paged_attention_triton", "register"]
