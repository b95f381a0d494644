"""Triton kernels == the torch reference (itself checked against dense float64 in test_reference.py).

Runs on CUDA when present, or on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` was
set before triton was imported (test_triton_interpreter.py starts such a run in a subprocess); skipped
otherwise. The oracle is the reference run in float64 on the same inputs. Outputs are poisoned with NaN
before each launch so that an element the kernel never writes fails the test.
Tolerances (norm-relative): fp32 1e-5, fp16 2e-3, bf16 1e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICE = "cuda"
elif INTERPRET:
    DEVICE = "cpu"
    from . import interpreter_shim  # noqa: F401  (patches the interpreter before any launch)
else:
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter", allow_module_level=True)

from servegym.kernels import reference, triton_paged  # noqa: E402

from .helpers import make_case, rel_err  # noqa: E402

# bf16 tl.dot is wrong in the 3.6 interpreter (numpy has no bf16), so the interpreter checks fp16; on
# the GPU, bf16 replaces fp16 (the same code path) to keep the number of compiled variants down.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ON_GPU = DEVICE == "cuda"


def _as64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in tensors]


# (context_lens, block_size, num_kv_heads, group, head_dim): ragged, block-aligned, GQA 1/4/8, D 64/128.
DECODE_LAYOUTS = [
    ([1, 37, 100, 16], 16, 2, 4, 64),
    ([33, 64, 5], 32, 1, 1, 128),
    ([70, 3], 16, 1, 8, 64),
    ([17, 96], 32, 2, 2, 128),
]
if ON_GPU:
    DECODE_LAYOUTS += [
        ([4096, 1, 2000, 333, 4095, 16, 17, 3000], 16, 8, 4, 128),
        ([1500] * 3 + [7], 32, 4, 8, 128),
        ([129, 257, 1], 16, 32, 1, 64),
    ]


@pytest.mark.parametrize("layout", DECODE_LAYOUTS, ids=lambda x: f"{x[1]}bs-{x[2]}kv-g{x[3]}-d{x[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 3], ids=lambda s: f"splits{s}")
def test_decode_matches_reference(layout: tuple, dtype: torch.dtype, num_splits: int | None) -> None:
    context_lens, block_size, num_kv_heads, group, head_dim = layout
    case = make_case(
        context_lens,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=DEVICE,
        seed=len(context_lens),
    )
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    config = None
    if num_splits is not None:
        max_tokens = case.block_tables.shape[1] * block_size
        block_n = 64 if ON_GPU else 16
        config = triton_paged.decode_config(
            len(context_lens), num_kv_heads, max_tokens, q.device, num_splits=num_splits, block_n=block_n
        )
    out = torch.full_like(q, float("nan"))
    triton_paged.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, scale, config=config, out=out
    )
    expected = reference.paged_decode_attention(
        *_as64(q, case.k_cache, case.v_cache), case.block_tables, case.context_lens, scale
    )
    assert out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]


PREFILL_LAYOUTS = [
    # (context_lens, q_lens, block_size, num_kv_heads, group, head_dim)
    ([40, 9, 23], [40, 1, 7], 16, 1, 4, 64),  # full prefill, decode-like, prefix hit
    ([50, 20], [0, 20], 32, 2, 1, 128),  # an empty chunk beside a full one
]
if ON_GPU:
    PREFILL_LAYOUTS += [
        ([2048, 700, 1], [512, 700, 1], 16, 8, 4, 128),
        ([300, 1000], [300, 129], 32, 2, 8, 64),
    ]


@pytest.mark.parametrize("layout", PREFILL_LAYOUTS, ids=lambda x: f"{x[2]}bs-{x[3]}kv-g{x[4]}-d{x[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_reference(layout: tuple, dtype: torch.dtype) -> None:
    context_lens, q_lens, block_size, num_kv_heads, group, head_dim = layout
    case = make_case(
        context_lens,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=DEVICE,
        seed=3,
    )
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    tiles = {} if ON_GPU else {"block_m": 16, "block_n": 16}
    out = torch.full_like(q, float("nan"))
    triton_paged.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, scale, out=out, **tiles
    )
    expected = reference.paged_prefill_attention(
        *_as64(q, case.k_cache, case.v_cache), case.block_tables, cu, case.context_lens, scale
    )
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
def test_write_kv_matches_reference(cache_dtype: torch.dtype) -> None:
    shape = (6, 16, 2, 64)  # (num_blocks, block_size, Hkv, D)
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype).to(DEVICE)
    slots = torch.tensor([17, -1, 0, 95, 40, -1, 33], dtype=torch.int64, device=DEVICE)
    # key/value as strided views of a fused qkv buffer, in fp32: the kernel converts to the cache dtype.
    qkv = torch.randn(len(slots), 3, 2, 64, generator=gen).to(DEVICE)
    key, value = qkv[:, 1], qkv[:, 2]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv(k_ref, v_ref, key, value, slots)
    triton_paged.write_kv(k_cache, v_cache, key, value, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: -inf - -inf
def test_empty_context_gives_zeros() -> None:
    case = make_case([0, 9], block_size=16, num_kv_heads=1, head_dim=64, device=DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE)
    for num_splits in (1, 2):
        config = triton_paged.decode_config(2, 1, 32, q.device, num_splits=num_splits, block_n=16)
        out = triton_paged.paged_decode_attention(
            q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.125, config=config
        )
        assert torch.isfinite(out).all() and (out[0] == 0).all()


@pytest.mark.skipif(not ON_GPU, reason="the dispatcher routes CPU tensors to the reference")
def test_dispatch_uses_triton_on_cuda() -> None:
    from servegym.kernels import ops

    assert ops._backend("auto", torch.zeros(1, device=DEVICE)) is triton_paged
