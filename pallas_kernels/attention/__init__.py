"""Paged attention over the engine's page pool: decode (1 new token), verify (k new tokens) and chunked prefill."""

from pallas_kernels.attention.dispatch import IMPLEMENTATIONS, paged_attention, register
from pallas_kernels.attention.reference import paged_attention_reference

__all__ = ["IMPLEMENTATIONS", "paged_attention", "paged_attention_reference", "register"]
