"""Device ops: each public op sits beside its pure-JAX reference; a dispatcher picks the implementation."""

from pallas_kernels.attention import paged_attention, paged_attention_reference
from pallas_kernels.moe import moe, moe_reference

__all__ = ["moe", "moe_reference", "paged_attention", "paged_attention_reference"]
