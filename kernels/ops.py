"""The public kernel entry points: each picks the Triton kernel or the torch reference.

``impl="auto"`` (the default) runs Triton when the tensors are on CUDA and ``triton`` imports, and the
torch reference otherwise (saying so once if CUDA tensors fall back). ``impl="torch"`` or
``impl="triton"`` forces one path (tests, benches); ``"triton"`` on CPU tensors works only under
Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Literal

import torch

from . import reference

Impl = Literal["auto", "torch", "triton"]

__all__ = [
    "Impl",
    "paged_decode_attention",
    "paged_prefill_attention",
    "triton_available",
    "write_kv",
]


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        from . import triton_paged
    except ImportError:  # triton not installed (the CPU default)
        return None
    return triton_paged


def triton_available() -> bool:
    """True when the Triton kernels can be imported (the ``triton`` package is installed)."""
    return _triton_module() is not None


@functools.lru_cache(maxsize=1)
def _warn_fallback_once() -> None:
    warnings.warn(
        "servegym.kernels: CUDA tensors but triton is not installed, so paged attention runs the slow "
        "torch reference; `pip install 'servegym[triton]'` for the Triton kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def _backend(impl: Impl, x: torch.Tensor) -> ModuleType:
    if impl == "torch":
        return reference
    if impl == "triton":
        module = _triton_module()
        if module is None:
            raise RuntimeError("impl='triton' needs the triton package: pip install 'servegym[triton]'")
        return module
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if x.is_cuda:
        module = _triton_module()
        if module is not None:
            return module
        _warn_fallback_once()
    return reference


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> None:
    """Write ``key``/``value`` ``[T, num_kv_heads, head_dim]`` into the paged caches in place.

    Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``; ``slot_mapping`` ``[T]`` (int64) holds
    ``block_id * block_size + offset`` per token, and a negative slot skips the token.
    """
    _backend(impl, key).write_kv(k_cache, v_cache, key, value, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV.

    Args:
        q: ``[B, num_heads, head_dim]``; ``num_heads`` is a multiple of ``num_kv_heads`` (GQA).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_tables: ``[B, max_blocks]`` int32; only the first ``ceil(context_len / block_size)``
            entries of a row are read.
        context_lens: ``[B]`` int32, tokens in the cache per sequence including the current one.
        scale: softmax scale, usually ``head_dim ** -0.5``.

    Returns ``[B, num_heads, head_dim]`` in ``q``'s dtype (scores and softmax accumulate in fp32).
    """
    backend = _backend(impl, q)
    return backend.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Causal attention of prefill chunks over paged KV (chunked prefill with a cached prefix).

    Args:
        q: ``[T_total, num_heads, head_dim]``, the chunks of B sequences back to back.
        cu_query_lens: ``[B+1]`` int32 prefix sums of the chunk lengths.
        context_lens: ``[B]`` int32, cached prefix + this chunk (the chunk's K/V already written).
        max_query_len: the longest chunk, when the caller knows it on the host (it must be at least
            that). ``None`` reads it from ``cu_query_lens``: a device-to-host sync on every call.

    Query ``j`` of sequence ``i`` sits at position ``context_lens[i] - q_len_i + j`` and attends to every
    KV position up to its own. Returns ``[T_total, num_heads, head_dim]`` in ``q``'s dtype.
    """
    backend = _backend(impl, q)
    return backend.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, scale, max_query_len=max_query_len
    )
