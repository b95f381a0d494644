"""Decode speed of the torch backend's model against the memory roofline, and a correctness line.

python scripts/bench_model.py            # CUDA: Llama-3.2-1B shape in bf16, batch 64, context 2048
python scripts/bench_model.py --quick    # the tiny model, small batch: runs on a CPU in seconds

One decode iteration reads every weight the step uses plus every sequence's K/V, so its floor is
    roofline_s = (weight bytes read + KV bytes read) / copy bandwidth
with the bandwidth measured here (a large device-to-device copy, bytes read + bytes written).
The goal is CUDA-graph replay within 1.5x of that floor. Correctness: paged chunked prefill plus
decodes against the model's plain full-sequence forward, in fp32 (tight) and the bench dtype.

Needs only torch, numpy and servegym's model and kernels (no gymnasium, hydra or SB3).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from servegym import kernels
from servegym.envs.engine.model import LlamaModel, model_config
from servegym.envs.engine.torch_backend import ModelRunner, flat_inputs


class Timer:
    """Seconds per call of ``fn``: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def copy_bandwidth(device: torch.device, num_bytes: int, timer: Timer) -> float:
    """Bytes read + written per second by a large contiguous copy on ``device``."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), iters=10)
    return 2 * num_bytes / seconds


def correctness(preset: str, device: torch.device, prompt_tokens: int, decode_steps: int, **overrides) -> str:
    """Paged chunked prefill (two chunks) then decodes vs the full forward: max |diff|, argmax agreement."""
    model = LlamaModel(model_config(preset, **overrides), seed=0, device=device)
    cfg, bs = model.config, 16
    total = prompt_tokens + decode_steps
    num_blocks = -(-total // bs) + 3
    runner = ModelRunner(model, num_blocks, bs, max_num_seqs=1, cuda_graphs=False)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (total,), generator=gen)
    table = np.random.default_rng(2).permutation(num_blocks)[: -(-total // bs)].tolist()  # scattered blocks
    with torch.inference_mode():
        full = model(tokens.to(device)).float()  # (total, vocab)
    half = prompt_tokens // 2
    steps = [(0, half), (half, prompt_tokens - half)] + [(prompt_tokens + i, 1) for i in range(decode_steps)]
    worst, agree = 0.0, 0
    for start, n in steps:
        arrays = flat_inputs(
            [table], np.array([start]), np.array([n]), [tokens[start : start + n].numpy()], bs
        )
        logits = runner.execute(arrays, num_decodes=int(n == 1))[0].float()
        ref = full[start + n - 1]
        worst = max(worst, float((logits - ref).abs().max()))
        agree += int(logits.argmax() == ref.argmax())
    scale = float(full.std())
    return (
        f"{preset} {cfg.dtype} {cfg.num_layers} layers: max |paged - full| = {worst:.2e} "
        f"(logit std {scale:.2f}, ratio {worst / scale:.1e}); argmax agrees {agree}/{len(steps)}"
    )


def engine_check(device: torch.device) -> str:
    """The engine end to end on ``device`` with the tiny fp32 model: a few map-reduce trees on a
    tight KV cache (prefix hits, chunked prefill, swap preemption; decode-only steps replay CUDA
    graphs on a GPU); every sampled logit row vs the full forward of the call's tokens."""
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.engine import Engine, assert_all_terminal
    from servegym.envs.engine.torch_backend import TorchBackendFactory
    from servegym.envs.workloads.generators import MapReduce
    from servegym.envs.workloads.workload import Workload

    generator = MapReduce(
        fan_out=3,
        system_tokens=16,
        input_tokens_mean=20.0,
        tool_tokens_mean=8.0,
        output_tokens_mean=16.0,
        max_tokens=20,
        max_context_tokens=240,
    )
    source = Workload(generator=generator, arrival_rate=1e4, num_jobs=6).build(7)
    cfg = EngineConfig(
        profile="tiny_cpu",
        block_size=4,
        num_gpu_blocks=64,
        max_num_batched_tokens=32,
        preemption_mode="swap",
        swap_space_bytes=1e7,
    )
    factory = TorchBackendFactory(cfg, device=str(device), record_logits=True)
    engine = Engine(source, engine=cfg, backend_factory=factory)
    t0 = time.perf_counter()
    metrics = engine.run(FCFS())
    wall_s = time.perf_counter() - t0
    assert_all_terminal(engine)
    engine.replicas[0].blocks.check_invariants()
    backend = engine.replicas[0].backend
    calls, store, worst, rows = engine.calls, factory.tokens, 0.0, 0
    for call in range(calls.size):
        prompt = store.prompt(call, calls.segments[call])
        sequence = torch.from_numpy(np.concatenate([prompt, store.outputs[call]])).to(device)
        with torch.inference_mode():
            full = backend.model(sequence[:-1]).float().cpu().numpy()
        for context, logits in backend.logits[call]:
            worst = max(worst, float(np.abs(logits - full[context - 1]).max()))
            rows += 1
    return (
        f"{metrics.calls_completed} calls, {metrics.preemptions} preemptions "
        f"({backend.num_swapped_in_blocks} blocks swapped in), prefix hit rate {metrics.prefix_hit_rate:.2f}, "
        f"{metrics.iterations} iterations ({backend.runner.num_graph_replays} graph replays) in {wall_s:.1f} s; "
        f"max |paged - full| over {rows} sampled rows = {worst:.2e} "
        f"({'OK' if worst <= 1e-3 else 'TOO LARGE'}: <= 1e-3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 4, context 64 (CPU is fine)")
    parser.add_argument(
        "--preset", default=None, help="model preset (default: llama1b, or tiny with --quick)"
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence incl. the new one")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    preset = args.preset or ("tiny" if args.quick else "llama1b")
    batch = args.batch or (4 if args.quick else 64)
    context = args.context or (64 if args.quick else 2048)
    iters = args.iters or (5 if args.quick else 50)
    bs = args.block_size
    timer = Timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; triton kernels: {kernels.triton_available()}")

    # correctness first: a wrong fast model is not worth timing
    print(
        "correctness:",
        correctness(preset, device, 40 if args.quick else 300, 8, dtype="float32", num_layers=2),
    )
    print("correctness:", correctness(preset, device, 40 if args.quick else 300, 8))
    print("engine:", engine_check(device))

    model = LlamaModel(model_config(preset), seed=0, device=device)
    cfg = model.config
    blocks_per_seq = -(-context // bs)
    num_blocks = batch * blocks_per_seq + 1
    t0 = time.perf_counter()
    runner = ModelRunner(model, num_blocks, bs, max_num_seqs=batch, graph_max_context_tokens=context)
    setup_s = time.perf_counter() - t0
    runner.kv_cache.normal_(0.0, 1.0)  # finite, realistic-scale K/V to read
    perm = np.random.default_rng(0).permutation(num_blocks)[: batch * blocks_per_seq].reshape(batch, -1)
    rng = np.random.default_rng(1)
    arrays = flat_inputs(
        perm.tolist(),
        np.full(batch, context - 1),
        np.ones(batch, dtype=np.int64),
        [rng.integers(0, cfg.vocab_size, 1) for _ in range(batch)],
        bs,
    )

    # every weight is read once, except an untied embedding table (a lookup reads B rows of it)
    unread = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weight_bytes = (cfg.num_params - unread) * cfg.torch_dtype.itemsize
    kv_bytes = batch * context * cfg.kv_bytes_per_token
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20), timer)
    roofline_s = (weight_bytes + kv_bytes) / bandwidth
    print(
        f"model {preset} ({cfg.dtype}, {cfg.num_params / 1e9:.3f}B params); decode batch {batch}, context {context}: "
        f"weights read {weight_bytes / 1e6:.1f} MB + KV read {kv_bytes / 1e6:.1f} MB"
    )
    print(
        f"copy bandwidth (read + written): {bandwidth / 1e9:.0f} GB/s -> decode roofline {roofline_s * 1e3:.3f} ms"
    )

    def report(label: str, seconds: float) -> None:
        print(f"{label:<34} {seconds * 1e3:8.3f} ms   {seconds / roofline_s:5.2f}x roofline")

    eager_s = timer(lambda: runner.execute(arrays, batch, eager=True), iters)
    report("eager forward", eager_s)
    if runner.graphs:
        report("graph: inputs + replay", timer(lambda: runner.execute(arrays, batch), iters))
        size = next(b for b in runner.graphs if b >= batch)
        graph = runner.graphs[size][0]
        replay_s = timer(graph.replay, iters)
        report(f"graph: replay only (size {size})", replay_s)
        print(f"graph speed-up over eager: {eager_s / replay_s:.2f}x; capture took {setup_s:.1f} s")
        print(f"goal (replay within 1.5x roofline): {'MET' if replay_s <= 1.5 * roofline_s else 'NOT MET'}")
    else:
        print(f"no CUDA graphs: {runner.graph_fallback or 'not on a GPU'}")


if __name__ == "__main__":
    main()
