"""The torch reference against a plain dense float64 attention, on random paged layouts.

Tolerances are norm-relative (||out - ref|| / ||ref||): 1e-5 for fp32 inputs, 1e-2 for bf16.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from servegym.kernels import paged_decode_attention, paged_prefill_attention, reference, write_kv

from .helpers import PagedCase, decode_expected, make_case, prefill_expected, rel_err

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    """Block size, GQA shape and ragged context lengths (sometimes exact multiples of the block)."""
    block_size = draw(st.sampled_from([8, 16, 32]))
    lengths = st.one_of(st.integers(1, 3 * block_size + 5), st.integers(1, 4).map(lambda n: n * block_size))
    return {
        "block_size": block_size,
        "num_kv_heads": draw(st.integers(1, 3)),
        "group": draw(st.sampled_from([1, 4, 8])),
        "head_dim": draw(st.sampled_from([64, 128])),
        "context_lens": draw(st.lists(lengths, min_size=1, max_size=4)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def case_of(layout: dict) -> PagedCase:
    return make_case(
        layout["context_lens"],
        block_size=layout["block_size"],
        num_kv_heads=layout["num_kv_heads"],
        head_dim=layout["head_dim"],
        dtype=layout["dtype"],
        seed=layout["seed"],
    )


@given(layout=layouts())
def test_decode_matches_dense(layout: dict) -> None:
    case = case_of(layout)
    num_heads = layout["num_kv_heads"] * layout["group"]
    gen = torch.Generator().manual_seed(layout["seed"] + 1)
    q = torch.randn(len(case.keys), num_heads, layout["head_dim"], generator=gen).to(layout["dtype"])
    scale = layout["head_dim"] ** -0.5
    out = reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, scale
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, decode_expected(q, case, scale)) < TOLERANCE[layout["dtype"]]


@given(layout=layouts(), data=st.data())
def test_prefill_matches_dense(layout: dict, data: st.DataObject) -> None:
    case = case_of(layout)
    # Each chunk is the last q_len tokens of its context: 0 (no chunk), 1, a prefix hit, or everything.
    q_lens = [data.draw(st.integers(0, n)) for n in layout["context_lens"]]
    q_lens[0] = max(q_lens[0], 1)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_heads = layout["num_kv_heads"] * layout["group"]
    gen = torch.Generator().manual_seed(layout["seed"] + 2)
    q = torch.randn(int(cu[-1]), num_heads, layout["head_dim"], generator=gen).to(layout["dtype"])
    scale = layout["head_dim"] ** -0.5
    out = reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, scale
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, prefill_expected(q, cu, case, scale)) < TOLERANCE[layout["dtype"]]


def test_prefill_of_one_token_is_decode() -> None:
    case = make_case([5, 40, 17], block_size=16, num_kv_heads=2, head_dim=64, seed=3)
    q = torch.randn(3, 8, 64)
    cu = torch.arange(4, dtype=torch.int32)
    args = (case.k_cache, case.v_cache, case.block_tables)
    decode = reference.paged_decode_attention(q, *args, case.context_lens, 0.125)
    prefill = reference.paged_prefill_attention(q, *args, cu, case.context_lens, 0.125)
    torch.testing.assert_close(prefill, decode)


def test_empty_context_gives_zeros() -> None:
    case = make_case([0, 9], block_size=16, num_kv_heads=1, head_dim=64)
    q = torch.randn(2, 4, 64)
    out = reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.125
    )
    assert torch.isfinite(out).all() and (out[0] == 0).all()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_round_trips_and_skips_negative_slots(cache_dtype: torch.dtype) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = 5, 16, 2, 64
    gen = torch.Generator().manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([17, -1, 0, 79, 40, -1, 33], dtype=torch.int64)
    key = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)  # fp32 into any cache dtype
    value = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    write_kv(k_cache, v_cache, key, value, slots, impl="torch")

    expected_k, expected_v = k_before.flatten(0, 1), v_before.flatten(0, 1)  # (slots, Hkv, D) copies
    keep = slots >= 0
    expected_k[slots[keep]] = key[keep].to(cache_dtype)
    expected_v[slots[keep]] = value[keep].to(cache_dtype)
    assert torch.equal(k_cache.flatten(0, 1), expected_k)  # written slots hold the new rows ...
    assert torch.equal(v_cache.flatten(0, 1), expected_v)  # ... and every other slot is untouched


def test_write_then_decode_reads_what_was_written() -> None:
    """The two halves agree on the slot layout: block_tables + slot_mapping describe the same cache."""
    block_size, num_kv_heads, head_dim = 16, 2, 64
    table = torch.tensor([[3, 0, 2]], dtype=torch.int32)  # one sequence, non-contiguous blocks
    context_tokens = 40
    pos = torch.arange(context_tokens)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    k_cache = torch.full((4, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    key, value = torch.randn(2, context_tokens, num_kv_heads, head_dim).unbind(0)
    write_kv(k_cache, v_cache, key, value, slots, impl="torch")
    q = torch.randn(1, 8, head_dim)
    out = paged_decode_attention(
        q, k_cache, v_cache, table, torch.tensor([context_tokens], dtype=torch.int32), 0.125
    )
    from .helpers import dense_attention

    expected = dense_attention(q, key, value, torch.tensor([context_tokens - 1]), 0.125)
    assert rel_err(out, expected) < 1e-5


def test_dispatch_picks_torch_on_cpu_and_rejects_unknown_impl() -> None:
    case = make_case([20], block_size=16, num_kv_heads=1, head_dim=64)
    q = torch.randn(1, 2, 64)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.125)
    torch.testing.assert_close(paged_decode_attention(*args), reference.paged_decode_attention(*args))
    cu = torch.tensor([0, 1], dtype=torch.int32)
    prefill_args = (q[:1], case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.125)
    torch.testing.assert_close(
        paged_prefill_attention(*prefill_args), reference.paged_prefill_attention(*prefill_args)
    )
    with pytest.raises(ValueError, match="impl must be"):
        paged_decode_attention(*args, impl="cuda")  # type: ignore[arg-type]
