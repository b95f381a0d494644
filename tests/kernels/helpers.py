"""Random paged-KV cases and a plain dense float64 attention to check every kernel against."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    """A KV cache holding B sequences in shuffled, non-contiguous blocks, plus their dense copies."""

    k_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D), unused blocks hold random junk
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with -1 and junk ids
    context_lens: torch.Tensor  # (B,) int32
    keys: list[torch.Tensor]  # per sequence (context_len, Hkv, D), the cache's contents
    values: list[torch.Tensor]


def make_case(
    context_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    spare_table_cols: int = 2,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Junk everywhere first: a kernel that reads a padded slot or a spare block gets a wrong answer.
    k_cache = torch.randn(shape, generator=gen).mul_(3.0).to(dtype)
    v_cache = torch.randn(shape, generator=gen).mul_(3.0).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq, default=0) + spare_table_cols
    tables = torch.randint(-1, num_blocks, (len(context_lens), max_blocks), generator=gen)
    tables[:, -1] = 10**6  # far out of range: must never be dereferenced
    keys, values = [], []
    used = 0
    for i, (n, nb) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        ids = perm[used : used + nb]
        used += nb
        tables[i, :nb] = ids
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        k_cache[ids[pos // block_size], pos % block_size] = k
        v_cache[ids[pos // block_size], pos % block_size] = v
        keys.append(k)
        values.append(v)
    return PagedCase(
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=tables.to(torch.int32).to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        keys=keys,
        values=values,
    )


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """float64 causal attention of ``q`` (M, H, D) at ``q_positions`` (M,) over ``k``/``v`` (L, Hkv, D)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (x.double().cpu() for x in (q, k, v))
    k = k.repeat_interleave(group, dim=1)  # (L, H, D)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q, k) * scale  # (H, M, L)
    visible = torch.arange(k.shape[0])[None, :] <= q_positions.cpu()[:, None]  # (M, L)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hml,lhd->mhd", torch.softmax(scores, dim=-1), v)


def decode_expected(q: torch.Tensor, case: PagedCase, scale: float) -> torch.Tensor:
    """(B, H, D) float64: sequence b's query sits at its last position."""
    rows = []
    for b, (k, v) in enumerate(zip(case.keys, case.values, strict=True)):
        pos = torch.tensor([k.shape[0] - 1])
        rows.append(dense_attention(q[b : b + 1], k, v, pos, scale)[0])
    return torch.stack(rows)


def prefill_expected(
    q: torch.Tensor, cu_query_lens: torch.Tensor, case: PagedCase, scale: float
) -> torch.Tensor:
    """(T, H, D) float64: chunk i's queries sit at the last q_len_i positions of sequence i."""
    cu = cu_query_lens.tolist()
    rows = []
    for b, (k, v) in enumerate(zip(case.keys, case.values, strict=True)):
        q_len = cu[b + 1] - cu[b]
        pos = torch.arange(k.shape[0] - q_len, k.shape[0])
        rows.append(dense_attention(q[cu[b] : cu[b + 1]], k, v, pos, scale))
    return torch.cat(rows)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error ||out - ref|| / ||ref||, in float64."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())
