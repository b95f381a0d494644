"""Triton kernels for paged KV: KV scatter, split-K (flash-decoding) decode, and chunked prefill.

Same cache layout and semantics as ``reference.py`` (read that first). Importing this module needs
``triton``; the launchers take CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how the tests check the kernels
without a GPU. bf16 ``tl.dot`` is wrong in the 3.6 interpreter (numpy has no bf16), so test bf16 on a GPU.

Decode plan (memory bound: every KV byte is read once):
  * grid ``(B, num_kv_heads, num_splits)``: a program owns one KV head of one sequence and one slice of
    its context (split-K over the context), so all ``G = num_heads // num_kv_heads`` query heads of the
    group share each K/V tile it loads (padded to 16 rows for ``tl.dot``);
  * it walks its slice ``BLOCK_N`` tokens at a time, looking up each token's block in the block table
    (a tile may span several KV blocks), with an fp32 online softmax (running max, sum, accumulator);
  * with one split it writes the output directly; otherwise it writes a normalised partial and its
    log-sum-exp, and a second small kernel merges the splits.
  The number of splits comes from the grid size and the table width (no device-to-host sync), so that
  there are several waves of programs over the SMs.

Compiled variants: Triton specialises integer arguments on their value (== 1, divisible by 16) and
pointers on 16-byte alignment, and compiles each variant the first time it meets it. In an engine
the table width, the split count and the offset of the prefill rows (``block_tables[num_decodes:]``)
change every iteration, so those arguments are marked ``do_not_specialize`` and a handful of
variants cover every batch (``ModelRunner`` compiles them before the first timed iteration); a
compile inside a timed iteration would cost the clock ~0.1-1 s of host time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DecodeConfig",
    "decode_config",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv",
]

_LOG2E = 1.4426950408889634
MERGE_MIN_BLOCK_S = 32
"""The merge kernel's split tile: one compiled variant for every split count up to 32 (contexts up
to 8k tokens at the default partition), instead of one per power of two."""


# --------------------------------------------------------------------------------------------- write_kv


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads[:, None] < num_kv_heads) & (slot >= 0)  # a negative slot writes nothing
    src_t = token.to(tl.int64)
    k = tl.load(key_ptr + src_t * stride_key_t + heads[:, None] * stride_key_h + dims[None, :], mask=mask)
    v = tl.load(
        value_ptr + src_t * stride_value_t + heads[:, None] * stride_value_h + dims[None, :], mask=mask
    )
    k_dst = block_id * stride_kc_block + offset * stride_kc_slot + heads[:, None] * stride_kc_head
    v_dst = block_id * stride_vc_block + offset * stride_vc_slot + heads[:, None] * stride_vc_head
    tl.store(k_cache_ptr + k_dst + dims[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + v_dst + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of ``reference.write_kv``."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


# --------------------------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["stride_table_b", "stride_part_b", "stride_part_h", "stride_part_s"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    stride_q_b,
    stride_q_h,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_table_b,
    stride_out_b,
    stride_out_h,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    partition_tokens,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_tokens = tl.load(context_lens_ptr + seq)
    start = split * partition_tokens
    end = tl.minimum(start + partition_tokens, context_tokens)  # end <= start: empty split, loop skipped

    rows = tl.arange(0, BLOCK_H)  # query heads of this KV head's group, padded to BLOCK_H
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq * stride_q_b + heads[:, None] * stride_q_h + dims[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # (BLOCK_H, D)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_b
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # (BLOCK_N,) token positions
        n_mask = pos < end
        block_id = tl.load(table_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_in_block = pos % BLOCK_SIZE
        k_off = block_id[:, None] * stride_kc_block + slot_in_block[:, None] * stride_kc_slot + dims[None, :]
        k = tl.load(k_base + k_off, mask=n_mask[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_H, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = block_id[:, None] * stride_vc_block + slot_in_block[:, None] * stride_vc_slot + dims[None, :]
        v = tl.load(v_base + v_off, mask=n_mask[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # empty context -> zeros, as the reference
    if DIRECT_OUT:
        out = acc / l_safe[:, None]
        out_off = seq * stride_out_b + heads[:, None] * stride_out_h + dims[None, :]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part_mask = row_mask & (start < context_tokens)  # the merge reads only non-empty splits
        part = seq * stride_part_b + heads * stride_part_h + split * stride_part_s  # (BLOCK_H,)
        tl.store(
            part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :],
            acc / l_safe[:, None],
            mask=part_mask[:, None],
        )
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=part_mask)


@triton.jit(do_not_specialize=["stride_part_b", "stride_part_h", "stride_part_s"])
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    context_lens_ptr,
    out_ptr,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    stride_out_b,
    stride_out_h,
    partition_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_tokens = tl.load(context_lens_ptr + seq)
    num_splits = tl.cdiv(context_tokens, partition_tokens)  # splits that saw >= 1 token
    splits = tl.arange(0, BLOCK_S)
    s_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    part = seq * stride_part_b + head * stride_part_h + splits * stride_part_s  # (BLOCK_S,)
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.where(s_mask, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)  # (BLOCK_S,)
    o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)  # (D,)
    tl.store(out_ptr + seq * stride_out_b + head * stride_out_h + dims, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel (``decode_config`` picks one; the bench sweeps them)."""

    num_splits: int
    partition_tokens: int  # context tokens per split, a multiple of block_n
    block_n: int  # tokens per inner-loop tile
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter on CPU tensors: any small number


@functools.lru_cache(maxsize=256)  # called on every eager decode: keep the host dispatch short
def decode_config(
    batch: int,
    num_kv_heads: int,
    max_context_tokens: int,
    device: torch.device,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs_per_sm: int = 16,
    min_partition_tokens: int = 256,
) -> DecodeConfig:
    """Choose splits so that ``batch * num_kv_heads * num_splits`` fills the SMs several times over.

    Splitting adds one fp32 partial per (head, split) and a merge kernel, so each split keeps at least
    ``min_partition_tokens`` tokens. Explicit arguments override the heuristic.
    """
    block_n = block_n or 64
    max_context_tokens = max(max_context_tokens, 1)
    if num_splits is None:
        wanted = math.ceil(programs_per_sm * _num_sms(device) / max(batch * num_kv_heads, 1))
        num_splits = max(1, min(wanted, math.ceil(max_context_tokens / min_partition_tokens)))
    num_splits = max(1, min(num_splits, math.ceil(max_context_tokens / block_n)))
    partition_tokens = math.ceil(math.ceil(max_context_tokens / num_splits) / block_n) * block_n
    num_splits = math.ceil(max_context_tokens / partition_tokens)
    return DecodeConfig(
        num_splits=num_splits,
        partition_tokens=partition_tokens,
        block_n=block_n,
        num_warps=num_warps or 4,
        num_stages=num_stages or 2,
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.paged_decode_attention``; writes into ``out`` when given.

    The split count is sized from ``block_tables.shape[1] * block_size`` (an upper bound on every
    context), so no device-to-host sync happens; splits past a shorter context exit at once.
    """
    _check_cache(k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = _check_heads(num_heads, num_kv_heads, head_dim)
    q = _last_dim_contiguous(q)
    out = _output(out, q)
    if batch == 0:
        return out
    if config is None:
        config = decode_config(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    direct = config.num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
        part_strides: tuple[int, ...] = (0, 0, 0)
    else:
        part_lse = torch.empty(batch, num_heads, config.num_splits, dtype=torch.float32, device=q.device)
        part_out = torch.empty(
            batch, num_heads, config.num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_strides = part_lse.stride()
    _decode_split_kernel[(batch, num_kv_heads, config.num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *part_strides,
        config.partition_tokens,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        DIRECT_OUT=direct,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not direct:
        block_s = max(MERGE_MIN_BLOCK_S, triton.next_power_of_2(config.num_splits))
        _decode_merge_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            context_lens,
            out,
            *part_strides,
            out.stride(0),
            out.stride(1),
            config.partition_tokens,
            HEAD_DIM=head_dim,
            BLOCK_S=block_s,
            num_warps=4 if head_dim * block_s >= 2048 else 2,
        )
    return out


# --------------------------------------------------------------------------------------------- prefill


@triton.jit(
    do_not_specialize=["stride_table_b"],
    do_not_specialize_on_alignment=["block_tables_ptr", "cu_query_lens_ptr", "context_lens_ptr"],
)
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_query_lens_ptr,
    context_lens_ptr,
    out_ptr,
    scale_log2,
    stride_q_t,
    stride_q_h,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_table_b,
    stride_out_t,
    stride_out_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_query_lens_ptr + seq)
    q_len = tl.load(cu_query_lens_ptr + seq + 1) - q_start
    context_tokens = tl.load(context_lens_ptr + seq)
    m0 = tile * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)  # query index within the chunk
    m_mask = offs_m < q_len
    q_pos = context_tokens - q_len + offs_m  # absolute position of each query
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_t + head * stride_q_h + dims[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )  # (BLOCK_M, D)
    # KV this tile can see: up to its last query's position (nothing when the tile is past the chunk).
    kv_end = tl.where(m0 < q_len, context_tokens - q_len + tl.minimum(m0 + BLOCK_M, q_len), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_b
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < kv_end
        block_id = tl.load(table_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_in_block = pos % BLOCK_SIZE
        k_off = block_id[:, None] * stride_kc_block + slot_in_block[:, None] * stride_kc_slot + dims[None, :]
        k = tl.load(k_base + k_off, mask=n_mask[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        # Causal: position 0 is visible to every query, so each row's max is finite after the first tile.
        visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = block_id[:, None] * stride_vc_block + slot_in_block[:, None] * stride_vc_slot + dims[None, :]
        v = tl.load(v_base + v_off, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_off = q_rows[:, None] * stride_out_t + head * stride_out_h + dims[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


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
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.paged_prefill_attention``; writes into ``out`` when given.

    ``max_query_len`` (the longest chunk) sizes the grid; when not given it is read from
    ``cu_query_lens`` (one device-to-host sync).
    """
    _check_cache(k_cache, v_cache)
    total_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = _check_heads(num_heads, num_kv_heads, head_dim)
    batch = context_lens.shape[0]
    q = _last_dim_contiguous(q)
    out = _output(out, q)
    if total_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_query_lens[1:] - cu_query_lens[:-1]).max())
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_query_lens,
        context_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------- checks


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, last dim contiguous")
    return out


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the Triton kernels need KV caches whose head_dim axis is contiguous (stride 1)")


def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"the Triton kernels take power-of-two head dims >= 16, got {head_dim}; use impl='torch'"
        )
    return num_heads // num_kv_heads
