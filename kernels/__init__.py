"""Paged-attention kernels over a block-table KV cache: Triton on GPU, a torch reference elsewhere.

``write_kv``, ``paged_decode_attention`` and ``paged_prefill_attention`` dispatch (``impl=`` forces one
path); ``reference`` holds the torch versions by name. See ``kernels/BENCHMARKS.md`` for performance.
"""

from . import reference
from .ops import Impl, paged_decode_attention, paged_prefill_attention, triton_available, write_kv

__all__ = [
    "Impl",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reference",
    "triton_available",
    "write_kv",
]
