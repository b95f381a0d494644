"""Benchmark the paged-attention kernels against the copy-bandwidth roofline and torch SDPA.

Decode rows: each (batch, context) pair times the paged kernel (Triton on CUDA, the torch reference on
CPU), torch ``scaled_dot_product_attention`` over the same KV laid out contiguously (built outside the
timing; GQA by folding each KV head's query heads into query rows, so K/V are read once), and the naive paged baseline (gather by block table,
then SDPA). Bandwidth = KV bytes read / time, as a fraction of the device-to-device copy bandwidth
measured here (a large ``dst.copy_(src)``, bytes read + written). Prefill rows report TFLOP/s.

Times are medians: ``triton.testing.do_bench(return_mode="median")`` on CUDA (it also flushes L2 before
every call), wall-clock medians on CPU. Inputs that fit in L2 rotate among several copies. On CUDA each
call is captured in a CUDA graph and ``time_us`` times its replay: the GPU time, as the engine's graph
decode sees it. ``call_us`` times the plain eager call, which includes the host-side dispatch (our
Python, Triton's launcher: 60-160 us per decode call on the 2026-11-26 H100 host). That dispatch, not
the kernel, set the ~110 us floor of the first H100 table, because do_bench's timed region starts
before the host has issued the kernels.

    python scripts/bench_kernels.py            # CUDA sweep (bf16, 32 q / 8 kv heads, head dim 128, block 16)
    python scripts/bench_kernels.py --quick    # tiny CPU sweep of the torch reference (a smoke test)
    python scripts/bench_kernels.py --tune     # also sweep decode launch configs at 64x4096 and 8x4096

Imports only torch (+ triton on CUDA): it runs on a bare GPU machine with ``servegym.kernels`` on the path.
The table prints last; with ``$OUT`` set (or ``--out DIR``) it also writes kernels_bench.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from servegym.kernels import ops

L2_BYTES = 50 * 2**20  # H100: 50 MB; inputs smaller than ~3x this rotate among copies


@dataclass
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


@dataclass
class Row:
    kind: str  # decode | prefill | tune
    batch: int
    context_tokens: int
    query_tokens: int
    impl: str
    time_us: float
    kv_gbytes: float
    bandwidth_gbs: float
    copy_fraction: float
    tflops: float
    vs_sdpa: float  # SDPA time / our time (>1: we are faster)
    vs_naive: float  # naive gather+SDPA time / our time
    note: str = ""
    call_us: float = float("nan")  # eager call, host dispatch included (CUDA; = time_us on CPU)


# ------------------------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds per call of ``fn``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_median(fn, reps)
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cuda_event_median(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(reps, 20)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (its replay), so a timing leaves out the host-side dispatch; ``fn``
    itself on CPU. ``fn`` must not sync with the host (none of the timed calls does)."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()  # warm-up off the capture: compiles the kernels, allocates
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that cycles through ``fns`` (each on its own copy of the inputs)."""
    counter = itertools.count()
    return lambda: fns[next(counter) % len(fns)]()


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src), device, reps)


# ------------------------------------------------------------------------------------------- inputs


def make_decode_inputs(batch: int, context_tokens: int, shape: Shape, device: torch.device, seed: int):
    """A paged cache (shuffled block ids) with ``batch`` sequences of ``context_tokens`` each."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = math.ceil(context_tokens / shape.block_size)
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=shape.dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=shape.dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    context_lens = torch.full((batch,), context_tokens, dtype=torch.int32, device=device)
    q = torch.randn(batch, shape.num_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype)
    return q, k_cache, v_cache, block_tables, context_lens


def contiguous_kv(k_cache: torch.Tensor, block_tables: torch.Tensor, context_tokens: int) -> torch.Tensor:
    """(B, Hkv, L, D) copy of the paged cache, for the SDPA baseline."""
    return k_cache[block_tables.long()].flatten(1, 2)[:, :context_tokens].transpose(1, 2).contiguous()


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, D) over contiguous k/v (B, Hkv, L, D).

    GQA without copying K/V: the G query heads of a KV head become G query rows of one MHA head
    (decode needs no mask), so SDPA reads each KV byte once, as our kernel does.
    """
    batch, num_heads, head_dim = q.shape
    q_rows = q.view(batch, k.shape[1], num_heads // k.shape[1], head_dim)  # (B, Hkv, G, D)
    return F.scaled_dot_product_attention(q_rows, k, v, scale=scale).view(batch, num_heads, head_dim)


def naive_paged_decode(q, k_cache, v_cache, block_tables, context_tokens: int, scale: float):
    """Gather by block table, then SDPA: what a paged cache costs without a paged kernel."""
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :context_tokens].transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :context_tokens].transpose(1, 2)
    return sdpa_decode(q, k, v, scale)


# ------------------------------------------------------------------------------------------- cases


def decode_sets(batch, context_tokens, shape, device) -> list[tuple]:
    """Input copies to rotate through: enough that together they overflow L2 (one on CPU)."""
    kv_bytes = 2 * batch * context_tokens * shape.num_kv_heads * shape.head_dim * shape.dtype.itemsize
    num_sets = min(16, max(1, math.ceil(3 * L2_BYTES / kv_bytes))) if device.type == "cuda" else 1
    return [make_decode_inputs(batch, context_tokens, shape, device, seed) for seed in range(num_sets)]


def decode_row(batch, context_tokens, shape, device, impl, copy_bw, reps, config=None, sets=None) -> Row:
    kv_bytes = 2 * batch * context_tokens * shape.num_kv_heads * shape.head_dim * shape.dtype.itemsize
    sets = sets or decode_sets(batch, context_tokens, shape, device)
    scale = shape.head_dim**-0.5

    def paged(s):
        if config is not None:
            from servegym.kernels import triton_paged

            return lambda: triton_paged.paged_decode_attention(*s, scale, config=config)
        return lambda: ops.paged_decode_attention(*s, scale, impl=impl)

    # the torch reference reads context lengths back (a sync), so only the Triton path is graphed
    graph_ours = device.type == "cuda" and (config is not None or _impl_name(impl, device) == "triton")
    t_ours = bench(
        rotating([graphed(paged(s), device) if graph_ours else paged(s) for s in sets]), device, reps
    )
    if config is not None:  # tuning rows: our kernel only
        t_sdpa = t_naive = t_call = float("nan")
    else:
        t_call = bench(rotating([paged(s) for s in sets]), device, reps) if device.type == "cuda" else t_ours
        dense = [
            (s[0], contiguous_kv(s[1], s[3], context_tokens), contiguous_kv(s[2], s[3], context_tokens))
            for s in sets
        ]
        sdpa = [graphed(lambda d=d: sdpa_decode(*d, scale), device) for d in dense]
        t_sdpa = bench(rotating(sdpa), device, reps)
        del dense, sdpa
        naive = [lambda s=s: naive_paged_decode(s[0], s[1], s[2], s[3], context_tokens, scale) for s in sets]
        t_naive = bench(rotating([graphed(f, device) for f in naive]), device, reps)
    bw = kv_bytes / t_ours
    return Row(
        "tune" if config else "decode",
        batch,
        context_tokens,
        1,
        _impl_name(impl, device),
        t_ours * 1e6,
        kv_bytes / 1e9,
        bw / 1e9,
        bw / copy_bw,
        float("nan"),
        t_sdpa / t_ours,
        t_naive / t_ours,
        _config_note(config),
        t_call * 1e6,
    )


def prefill_row(batch, prefix_tokens, chunk_tokens, shape, device, impl, copy_bw, reps) -> Row:
    context_tokens = prefix_tokens + chunk_tokens
    _, k_cache, v_cache, block_tables, context_lens = make_decode_inputs(
        batch, context_tokens, shape, device, seed=0
    )
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(
        batch * chunk_tokens, shape.num_heads, shape.head_dim, generator=gen, device=device, dtype=shape.dtype
    )
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk_tokens
    scale = shape.head_dim**-0.5

    def fn() -> torch.Tensor:  # the longest chunk given: no read-back, so the call can be graphed
        return ops.paged_prefill_attention(
            q, k_cache, v_cache, block_tables, cu, context_lens, scale, max_query_len=chunk_tokens, impl=impl
        )

    t = bench(graphed(fn, device) if _impl_name(impl, device) == "triton" else fn, device, reps)
    t_call = bench(fn, device, reps) if device.type == "cuda" else t
    # Query j of a chunk sees prefix + j + 1 keys: QK^T and PV are 2 flops per multiply-add each.
    visible = batch * (chunk_tokens * prefix_tokens + chunk_tokens * (chunk_tokens + 1) / 2)
    flops = 4 * shape.num_heads * shape.head_dim * visible
    kv_bytes = 2 * batch * context_tokens * shape.num_kv_heads * shape.head_dim * shape.dtype.itemsize
    bw = kv_bytes / t
    return Row(
        "prefill",
        batch,
        context_tokens,
        chunk_tokens,
        _impl_name(impl, device),
        t * 1e6,
        kv_bytes / 1e9,
        bw / 1e9,
        bw / copy_bw,
        flops / t / 1e12,
        float("nan"),
        float("nan"),
        call_us=t_call * 1e6,
    )


def _impl_name(impl: str, device: torch.device) -> str:
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" and ops.triton_available() else "torch"


def _config_note(config) -> str:
    if config is None:
        return ""
    return (
        f"splits={config.num_splits} part={config.partition_tokens} n={config.block_n} "
        f"w={config.num_warps} s={config.num_stages}"
    )


def tune_rows(shape, device, copy_bw, reps, deadline: float) -> list[Row]:
    """Decode launch configs around the heuristic, at the two target cases (until ``deadline``)."""
    from servegym.kernels import triton_paged

    rows = []
    for batch in (64, 8):
        base = triton_paged.decode_config(batch, shape.num_kv_heads, 4096, device)
        sets = decode_sets(batch, 4096, shape, device)
        split_choices = sorted(
            {base.num_splits, 1, 2, 4, 8, 16} if batch == 64 else {base.num_splits, 8, 16, 32}
        )
        for block_n, warps, stages in [
            (64, 4, 2),
            (64, 4, 3),
            (32, 4, 3),
            (128, 8, 2),
            (64, 8, 2),
            (128, 4, 2),
        ]:
            for splits in split_choices:
                if time.monotonic() > deadline:
                    print("tune: time budget spent, stopping the sweep")
                    return rows
                config = triton_paged.decode_config(
                    batch,
                    shape.num_kv_heads,
                    4096,
                    device,
                    num_splits=splits,
                    block_n=block_n,
                    num_warps=warps,
                    num_stages=stages,
                )
                try:
                    rows.append(decode_row(batch, 4096, shape, device, "triton", copy_bw, reps, config, sets))
                except Exception as exc:  # a config that does not compile (shared memory): note it, go on
                    print(f"tune {batch}x4096 {_config_note(config)}: {type(exc).__name__}: {exc}"[:300])
    return rows


# ------------------------------------------------------------------------------------------- output


def print_table(rows: list[Row], copy_bw: float, device_name: str) -> None:
    print(f"\ndevice: {device_name}; copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")
    header = (
        f"{'kind':8} {'B':>4} {'ctx':>6} {'q':>5} {'impl':7} {'time_us':>10} {'GB':>7} {'GB/s':>8} "
        f"{'of_copy':>7} {'TFLOP/s':>7} {'vs_sdpa':>7} {'vs_naive':>8} {'call_us':>8}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.kind:8} {r.batch:4d} {r.context_tokens:6d} {r.query_tokens:5d} {r.impl:7} {r.time_us:10.1f} "
            f"{r.kv_gbytes:7.3f} {r.bandwidth_gbs:8.1f} {r.copy_fraction:7.1%} {r.tflops:7.1f} "
            f"{r.vs_sdpa:7.2f} {r.vs_naive:8.2f} {r.call_us:8.1f}  {r.note}"
        )


def write_outputs(rows: list[Row], out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "kernels_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out_dir / "kernels_bench.json").write_text(
        json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sweep (the CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--tune", action="store_true", help="sweep decode launch configs (CUDA + triton)")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="stop the --tune sweep after this")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for CSV/JSON (default $OUT)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.quick:
        shape = Shape(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
        batches, contexts, reps, copy_bytes = (1, 4), (64, 256), 3, 2**24
        prefill_cases = [(1, 128, 64)]
    else:
        shape = Shape(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
        batches, contexts, reps, copy_bytes = (1, 8, 32, 64, 128), (512, 2048, 4096, 8192), 20, 2**31
        prefill_cases = [(1, 0, 2048), (1, 2048, 512), (4, 1536, 512)]  # (batch, prefix, chunk)
    if device.type != "cuda":
        shape.dtype = torch.float32  # CPU matmuls in bf16 are slow and not what the torch backend runs

    deadline = time.monotonic() + args.budget_s
    copy_bw = copy_bandwidth(device, copy_bytes, reps)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[Row] = []
    for batch, context_tokens in itertools.product(batches, contexts):
        rows.append(decode_row(batch, context_tokens, shape, device, args.impl, copy_bw, reps))
        print(
            f"decode {batch}x{context_tokens}: {rows[-1].time_us:.1f} us (graph replay), "
            f"{rows[-1].copy_fraction:.1%} of copy; eager call {rows[-1].call_us:.1f} us",
            flush=True,
        )
    if not args.no_prefill:
        for batch, prefix, chunk in prefill_cases:
            rows.append(prefill_row(batch, prefix, chunk, shape, device, args.impl, copy_bw, reps))
    if args.tune and device.type == "cuda" and ops.triton_available():
        rows += tune_rows(shape, device, copy_bw, reps, deadline)
    if args.out:
        meta = {
            "device": device_name,
            "copy_bandwidth_gbs": copy_bw / 1e9,
            "dtype": str(shape.dtype),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "shape": str(shape),
        }
        write_outputs(rows, Path(args.out), meta)
    print_table(rows, copy_bw, device_name)


if __name__ == "__main__":
    main()
