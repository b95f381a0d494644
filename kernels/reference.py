"""Torch reference for the paged-KV kernels: written to be read, and the CPU path of the torch backend.

Cache layout (shared with the Triton kernels): ``k_cache``/``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``p`` of a sequence lives in block
``block_tables[seq, p // block_size]`` at offset ``p % block_size``. Query head ``h`` reads KV head
``h // (num_heads // num_kv_heads)`` (grouped-query attention, as ``repeat_interleave`` would lay it out).

Each function gathers the sequences' blocks into contiguous ``[B, L, num_kv_heads, head_dim]`` tensors and
runs one batched, masked attention over them (no per-token Python loop). Scores and softmax run in fp32
(fp64 for fp64 inputs). A row whose context is empty (``context_len == 0``) returns zeros, as the Triton
kernels do.
"""

from __future__ import annotations

import torch

__all__ = ["gather_kv", "paged_decode_attention", "paged_prefill_attention", "write_kv"]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[T, num_kv_heads, head_dim]`` into the caches at ``slot_mapping`` ``[T]``.

    ``slot = block_id * block_size + offset``; a negative slot skips that token (padding).
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0  # (T,)
    slots = slot_mapping[keep].long()  # (T_kept,)
    block_ids, offsets = slots // block_size, slots % block_size
    # Index the 4-D caches directly (not a flattened view) so that any cache strides work.
    k_cache[block_ids, offsets] = key[keep].to(k_cache.dtype)
    v_cache[block_ids, offsets] = value[keep].to(v_cache.dtype)


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous copies of each sequence's KV: ``k, v`` ``[B, L, num_kv_heads, head_dim]`` and ``valid`` ``[B, L]``.

    ``L`` is the longest context rounded up to whole blocks; ``valid[b, p]`` is ``p < context_lens[b]``,
    and K/V are zero where it is False.
    Table entries past a row's last needed block are never dereferenced (they may hold any value).
    """
    batch = block_tables.shape[0]
    block_size = k_cache.shape[1]
    device = k_cache.device
    context_lens = context_lens.to(device=device, dtype=torch.long)  # (B,)
    max_context_tokens = int(context_lens.max()) if batch else 0
    num_blocks = -(-max_context_tokens // block_size)
    table = block_tables[:, :num_blocks].to(device=device, dtype=torch.long)  # (B, nb)
    needed_blocks = -(-context_lens // block_size)  # (B,)
    block_index = torch.arange(num_blocks, device=device)  # (nb,)
    table = torch.where(block_index[None, :] < needed_blocks[:, None], table, 0)  # padding -> block 0
    k = k_cache[table].flatten(1, 2)  # (B, L, Hkv, D)
    v = v_cache[table].flatten(1, 2)  # (B, L, Hkv, D)
    positions = torch.arange(num_blocks * block_size, device=device)  # (L,)
    valid = positions[None, :] < context_lens[:, None]  # (B, L)
    # Slots past a context's end may hold anything, NaN included (a fresh cache is uninitialised):
    # zero them so that a masked-out NaN cannot leak through 0 * NaN in the weighted sum.
    k = k.masked_fill(~valid[:, :, None, None], 0.0)
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    return k, v, valid


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its whole paged context: ``q`` ``[B, H, D]`` -> ``[B, H, D]``."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    k, v, valid = gather_kv(k_cache, v_cache, block_tables, context_lens)  # (B, L, Hkv, D) x2, (B, L)
    qg = q.reshape(batch, num_kv_heads, group, head_dim).to(cdt)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.to(cdt)) * scale  # (B, Hkv, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G, L); NaN rows only where context is empty
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.to(cdt)).reshape(batch, num_heads, head_dim)
    has_context = (valid.any(dim=1))[:, None, None]  # (B, 1, 1)
    return torch.where(has_context, out, 0.0).to(q.dtype)


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
) -> torch.Tensor:
    """Chunked prefill: ``q`` ``[T, H, D]`` holds B query chunks back to back (``cu_query_lens`` ``[B+1]``).

    Query ``j`` of sequence ``i`` sits at position ``context_lens[i] - q_len_i + j`` and attends to every
    KV position up to and including its own (the chunk's K/V are already in the cache).
    ``max_query_len`` (>= the longest chunk) pads the chunks without reading ``cu_query_lens`` back.
    """
    total_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    batch = context_lens.shape[0]
    device = q.device
    if total_tokens == 0 or batch == 0:
        return q.new_zeros(total_tokens, num_heads, head_dim)
    cdt = _compute_dtype(q.dtype)
    cu = cu_query_lens.to(device=device, dtype=torch.long)  # (B+1,)
    q_lens = cu[1:] - cu[:-1]  # (B,)
    max_q_tokens = int(q_lens.max()) if max_query_len is None else max_query_len
    # Pad the ragged chunks into (B, Mq): token t is query j_of[t] of sequence seq_of[t].
    seq_of = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=total_tokens)
    j_of = torch.arange(total_tokens, device=device) - cu[seq_of]  # (T,)
    q_pad = q.new_zeros(batch, max_q_tokens, num_heads, head_dim)  # (B, Mq, H, D)
    q_pad[seq_of, j_of] = q
    q_pad = q_pad.reshape(batch, max_q_tokens, num_kv_heads, group, head_dim).to(cdt)  # (B, Mq, Hkv, G, D)

    k, v, valid = gather_kv(k_cache, v_cache, block_tables, context_lens)  # (B, L, Hkv, D) x2, (B, L)
    ctx = context_lens.to(device=device, dtype=torch.long)
    q_pos = ctx[:, None] - q_lens[:, None] + torch.arange(max_q_tokens, device=device)  # (B, Mq)
    kv_pos = torch.arange(k.shape[1], device=device)  # (L,)
    allowed = valid[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])  # (B, Mq, L)

    scores = torch.einsum("bmhgd,blhd->bhgml", q_pad, k.to(cdt)) * scale  # (B, Hkv, G, Mq, L)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # padded query rows attend to the whole context: no NaN
    out = torch.einsum("bhgml,blhd->bmhgd", probs, v.to(cdt))  # (B, Mq, Hkv, G, D)
    out = out.reshape(batch, max_q_tokens, num_heads, head_dim)[seq_of, j_of]  # (T, H, D)
    has_context = allowed[seq_of, j_of].any(dim=-1)[:, None, None]  # (T, 1, 1)
    return torch.where(has_context, out, 0.0).to(q.dtype)
