"""Compile the Triton kernels for an H100 (sm_90) without a GPU and inspect the PTX.

Catches what the interpreter cannot (code generation, types, constexpr branches) before GPU time is
spent, and checks the decode kernel's K/V loads are 16-byte vectors (cp.async of 16 bytes, or
ld.global.v4) and that both attention kernels use tensor-core mma. Arguments get the specialisation a
real launch gives (16-divisible pointers and strides). Needs triton (its bundled ptxas), not a GPU.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from servegym.kernels import triton_paged  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def _compile(fn: object, dtype: str, constexprs: dict, num_warps: int = 4, num_stages: int = 2) -> object:
    names = fn.arg_names  # type: ignore[attr-defined]
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            elem = "i32" if "lens" in name or "tables" in name else "fp32" if "part" in name else dtype
            signature[name] = "i64" if name == "slot_ptr" else elem
            signature[name] = "*" + signature[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale_log2":
            signature[name] = "fp32"
        else:  # strides and counts: multiples of 16 in any realistic layout
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    return compile(source, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def _compile_ptx(fn: object, dtype: str, constexprs: dict) -> str:
    return _compile(fn, dtype, constexprs).asm["ptx"]


def _vector_loads(ptx: str) -> int:
    return len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*0x10", ptx)) + len(
        re.findall(r"ld\.global[.a-z]*\.v4\.b32", ptx)
    )


@pytest.mark.parametrize("direct_out", [False, True])
def test_decode_kernel_compiles_with_16_byte_kv_loads(direct_out: bool) -> None:
    consts = dict(
        GROUP=4,
        BLOCK_H=16,
        HEAD_DIM=128,
        BLOCK_SIZE=16,
        BLOCK_N=64,
        DIRECT_OUT=direct_out,
        DOT_PRECISION="tf32",
    )
    ptx = _compile_ptx(triton_paged._decode_split_kernel, "bf16", consts)
    # 64 tokens x 128 dims x 2 B = 16 KB per K (and V) tile, 16 B per load, 128 threads: 8 loads each.
    assert _vector_loads(ptx) >= 16
    assert re.search(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", ptx)


def test_merge_prefill_and_write_kernels_compile() -> None:
    merge = _compile_ptx(triton_paged._decode_merge_kernel, "bf16", dict(HEAD_DIM=128, BLOCK_S=8))
    assert "ld.global" in merge
    prefill = _compile_ptx(
        triton_paged._prefill_kernel,
        "bf16",
        dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32"),
    )
    assert re.search(r"mma\.sync|wgmma", prefill)
    write = _compile_ptx(
        triton_paged._write_kv_kernel, "bf16", dict(BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_HEADS=8)
    )
    assert "st.global" in write


def test_fp32_decode_uses_exact_products() -> None:
    consts = dict(
        GROUP=8, BLOCK_H=16, HEAD_DIM=64, BLOCK_SIZE=32, BLOCK_N=32, DIRECT_OUT=False, DOT_PRECISION="ieee"
    )
    ptx = _compile_ptx(triton_paged._decode_split_kernel, "fp32", consts)
    assert "tf32" not in ptx  # ieee: fp32 FMAs, not tf32 tensor cores


H100_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_default_tiles_fit_h100_shared_memory(dtype: str) -> None:
    """Out-of-resources only shows at launch on a GPU: check the widest default tiles (head dim 128) here."""
    precision = "ieee" if dtype == "fp32" else "tf32"
    prefill = _compile(
        triton_paged._prefill_kernel,
        dtype,
        dict(GROUP=8, HEAD_DIM=128, BLOCK_SIZE=32, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION=precision),
    )
    decode = _compile(
        triton_paged._decode_split_kernel,
        dtype,
        dict(
            GROUP=8,
            BLOCK_H=16,
            HEAD_DIM=128,
            BLOCK_SIZE=32,
            BLOCK_N=64,
            DIRECT_OUT=False,
            DOT_PRECISION=precision,
        ),
    )
    assert prefill.metadata.shared <= H100_SHARED_BYTES
    assert decode.metadata.shared <= H100_SHARED_BYTES
