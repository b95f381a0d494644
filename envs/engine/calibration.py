"""Calibration: time real iterations of the torch backend, fit the cost model to them, and write
the fitted profile (``scripts/calibrate.py`` is the entry point).

Three steps, each usable alone:

* ``profile_points(backend, specs)``: run each batch composition (``BatchSpec``: per sequence, its
  cached tokens and the tokens it computes now) through ``TorchBackend.iteration_time_s`` itself,
  over a stand-in replica, so the times are the ones the engine's clock would advance by (host
  input preparation, the paged forward, CUDA-graph replay for decode-only batches, sampling);
* ``fit(base, features, times_s)``: the constants of ``CostModel.iteration_time_s``. The model
  is linear in ``theta = (overhead_s, comm_s_per_token, prefill_overhead_s, s_per_flop,
  s_per_byte)`` except for the roofline's ``max``, whose branch is a threshold on arithmetic
  intensity (FLOPs / bytes); so every split of the points sorted by intensity is tried, each as a
  non-negative least-squares problem on relative error (rows weighted by 1 / measured time, then
  twice by 1 / fitted time, so noisy single measurements do not bias the fit low), and
  the split whose parameters fit best under the true ``max`` wins (then a few re-assignments);
* ``write_profile(profile, path, header)``: a YAML the sim loads with ``load_profile(path)``.

Isolated batches miss what a running engine meets (ragged contexts, the decode-graph ladder's
padding, every kernel variant and host path a run takes), so ``engine_points`` turns the
iterations a torch-backend engine recorded (``TorchBackend(record_iterations=True)``) into points
the fit can use too, and ``breakdown`` / ``outliers`` say where a profile misses on a real run.

Only numpy (no scipy), so the fit runs on any machine; torch is imported by the profiling
functions alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from servegym.envs.engine.cost_model import CostModel, ModelProfile

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from servegym.envs.engine.backend import Batch
    from servegym.envs.engine.torch_backend import TimedIteration, TorchBackend

PARAMS = (
    "overhead_s",
    "comm_s_per_token",
    "prefill_overhead_s",
    "s_per_flop",
    "s_per_weight_byte",
    "s_per_kv_byte",
)
"""The fitted unknowns; the last three are 1 / effective FLOP rate, 1 / effective bandwidth for
weights and 1 / effective bandwidth for KV bytes."""
NUM_LINEAR = 3  # the first three enter outside the max


# ------------------------------------------------------------------------------ batch compositions
@dataclass(frozen=True)
class BatchSpec:
    """One iteration's batch: ``computed[i]`` cached tokens of sequence i and ``new[i]`` tokens it
    computes now (1: a decode; > 1: a prefill chunk)."""

    label: str
    computed: tuple[int, ...]
    new: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.computed) != len(self.new) or not self.new:
            raise ValueError(f"BatchSpec {self.label!r}: computed and new need one entry per sequence")
        if min(self.new) < 1 or min(self.computed) < 0:
            raise ValueError(f"BatchSpec {self.label!r}: new >= 1 and computed >= 0 per sequence")

    @property
    def num_seqs(self) -> int:
        return len(self.new)

    @property
    def context_tokens(self) -> np.ndarray:
        return np.asarray(self.computed, dtype=np.int64) + np.asarray(self.new, dtype=np.int64)

    def features(self) -> dict[str, float]:
        """The cost model's inputs for this batch, exactly as ``Batch.from_calls`` derives them."""
        computed = np.asarray(self.computed, dtype=np.int64)
        new = np.asarray(self.new, dtype=np.int64)
        decode = new == 1
        pn, pc = new[~decode], computed[~decode]
        return {
            "prefill_tokens": float(pn.sum()),
            "prefill_attn_tokens": float((pn * (pc + (pn + 1) / 2)).sum()),
            "decode_seqs": float(decode.sum()),
            "kv_read_tokens": float((computed[decode] + 1).sum() + pc.sum()),
        }


def decode_spec(batch: int, context: int) -> BatchSpec:
    return BatchSpec(f"decode b={batch} ctx={context}", (context - 1,) * batch, (1,) * batch)


def prefill_spec(chunk: int, cached: int = 0, seqs: int = 1) -> BatchSpec:
    return BatchSpec(f"prefill {seqs}x{chunk} cached={cached}", (cached,) * seqs, (chunk,) * seqs)


def mixed_spec(batch: int, context: int, chunk: int, cached: int = 0) -> BatchSpec:
    return BatchSpec(
        f"mixed b={batch} ctx={context} + chunk {chunk} cached={cached}",
        (context - 1,) * batch + (cached,),
        (1,) * batch + (chunk,),
    )


def ragged_decode_spec(batch: int, max_context: int, seed: int) -> BatchSpec:
    """Decodes of uneven contexts (a real batch): uniform in [max_context / 8, max_context]."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(max(max_context // 8, 2), max_context + 1, size=batch)
    return BatchSpec(
        f"ragged decode b={batch} ctx<={max_context}", tuple(int(c) - 1 for c in ctx), (1,) * batch
    )


def default_grid(model: str, quick: bool) -> list[BatchSpec]:
    """Batch compositions to time: decodes over batch sizes and contexts, prefill chunks with and
    without a cached prefix, mixed batches, ragged decodes. ``tiny`` stays small (2 CPU cores);
    ``llama1b`` spans what an H100 serves (decodes up to 256 x 4k, chunks up to 4k tokens)."""
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    chunks: tuple[int, ...]
    if model == "tiny":
        batches, contexts = (
            ((1, 4, 16, 32) if quick else (1, 2, 4, 8, 16, 32, 64)),
            ((32, 256, 1024) if quick else (16, 64, 256, 1024, 2048)),
        )
        chunks, cached = ((16, 64, 256, 512) if quick else (8, 32, 64, 128, 256, 512, 1024)), (0, 512)
        mixed = [(4, 256, 32), (16, 256, 128), (8, 1024, 64), (32, 64, 256)]
        ragged = [(8, 512), (32, 1024)]
        max_kv_tokens = 64 * 2048
    else:
        batches = (1, 8, 32, 64, 128, 256) if quick else (1, 4, 16, 32, 64, 128, 256)
        contexts = (128, 1024, 4096) if quick else (128, 512, 1024, 2048, 4096)
        chunks = (32, 128, 512, 1024, 2048, 4096) if quick else (16, 64, 128, 256, 512, 1024, 2048, 4096)
        cached = (0, 2048)
        mixed = [(16, 1024, 64), (64, 1024, 512), (64, 2048, 2048), (128, 512, 256), (32, 4096, 1024)]
        ragged = [(32, 2048), (128, 4096)]
        max_kv_tokens = 256 * 2048
    specs = [decode_spec(b, c) for b in batches for c in contexts if b * c <= max_kv_tokens]
    specs += [prefill_spec(n, c) for n in chunks for c in cached]
    specs += [prefill_spec(chunks[-2] // 2, 0, seqs=2), prefill_spec(chunks[1], cached[-1], seqs=4)]
    specs += [mixed_spec(b, c, n) for b, c, n in mixed]
    specs += [ragged_decode_spec(b, c, seed=i) for i, (b, c) in enumerate(ragged)]
    return specs


# ------------------------------------------------------------------------------ profiling
@dataclass
class Point:
    """One timed batch composition: its cost-model features and every measured repeat."""

    label: str
    num_seqs: int
    prefill_tokens: float
    prefill_attn_tokens: float
    decode_seqs: float
    kv_read_tokens: float
    times_s: list[float] = field(default_factory=list)
    held_out: bool = False

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s))

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy this point's repeats were."""
        q1, q3 = np.percentile(self.times_s, [25, 75])
        return float((q3 - q1) / np.median(self.times_s))


def make_backend_replica(
    backend: TorchBackend, specs: list[BatchSpec], block_size: int, max_num_seqs: int
) -> SimpleNamespace:
    """Attach ``backend`` to a stand-in replica whose KV cache holds the largest spec: the
    fields ``TorchBackend`` reads (call table, block size, block count) and nothing else."""
    most_seqs = max(s.num_seqs for s in specs)
    most_blocks = max(int((-(-s.context_tokens // block_size)).sum()) for s in specs)
    longest = int(max(s.context_tokens.max() for s in specs))
    calls = SimpleNamespace(
        num_computed=np.zeros(most_seqs, dtype=np.int64),
        segments=[[(0, longest)] for _ in range(most_seqs)],  # one shared text, as long as any context
        blocks=[[] for _ in range(most_seqs)],
    )
    replica = SimpleNamespace(
        calls=calls,
        config=SimpleNamespace(block_size=block_size, max_num_seqs=max_num_seqs),
        blocks=SimpleNamespace(num_blocks=most_blocks + 1),
    )
    backend.attach(replica, {"calibration/text": 0})  # type: ignore[arg-type]  # a stand-in Replica
    return replica


def _batch_for(replica: SimpleNamespace, spec: BatchSpec, block_perm: np.ndarray) -> Batch:
    from servegym.envs.engine.backend import Batch

    bs = replica.config.block_size
    new = np.asarray(spec.new, dtype=np.int64)
    computed = np.asarray(spec.computed, dtype=np.int64)
    replica.calls.num_computed[: spec.num_seqs] = computed
    start = 0
    for i, ctx in enumerate(spec.context_tokens.tolist()):
        num = -(-ctx // bs)
        replica.calls.blocks[i] = block_perm[start : start + num].tolist()  # scattered, like a real pool
        start += num
    f = spec.features()
    return Batch(
        calls=np.arange(spec.num_seqs, dtype=np.int64),
        num_new_tokens=new,
        remaining_tokens=new.copy(),  # every row samples, as when each chunk ends its prompt
        num_decodes=int(f["decode_seqs"]),
        prefill_tokens=int(f["prefill_tokens"]),
        prefill_attn_tokens=f["prefill_attn_tokens"],
        kv_read_tokens=int(f["kv_read_tokens"]),
    )


def profile_points(
    backend: TorchBackend,
    specs: list[BatchSpec],
    repeats: int,
    block_size: int = 16,
    max_num_seqs: int = 256,
    warmup: int = 2,
    seed: int = 0,
    budget_s: float | None = None,
    log: Callable[[str], object] | None = None,
) -> list[Point]:
    """Time every spec ``repeats`` times through ``backend.iteration_time_s`` (the engine's own
    timing: CUDA events on a GPU, perf_counter on CPU). Repeats go round-robin over the specs in
    a shuffled order, so slow drift (other processes, clocks) spreads over all points instead of
    biasing a few. ``budget_s`` stops adding rounds once spent (at least 3 rounds run)."""
    replica = make_backend_replica(backend, specs, block_size, max_num_seqs)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(replica.blocks.num_blocks)
    points = [
        Point(label=s.label, num_seqs=s.num_seqs, **s.features())  # type: ignore[arg-type]
        for s in specs
    ]
    outputs = backend.tokens.outputs
    t0 = time.perf_counter()
    for spec in specs:  # warm-up: allocator, kernel compiles, graph pools
        for _ in range(warmup):
            backend.iteration_time_s(_batch_for(replica, spec, perm))
            outputs.clear()
    for round_ in range(repeats):
        for index in rng.permutation(len(specs)).tolist():
            dt = backend.iteration_time_s(_batch_for(replica, specs[index], perm))
            outputs.clear()
            points[index].times_s.append(dt)
        if log is not None:
            log(f"round {round_ + 1}/{repeats} done at {time.perf_counter() - t0:.1f} s")
        if budget_s is not None and round_ >= 2 and time.perf_counter() - t0 > budget_s:
            break
    return points


def split_held_out(points: list[Point], fraction: float = 0.25, seed: int = 0) -> None:
    """Mark a seeded ``fraction`` of the points as held out (never fewer than one, nor all)."""
    n = len(points)
    num = min(max(int(round(fraction * n)), 1), n - 1)
    for i in np.random.default_rng(seed).permutation(n)[:num].tolist():
        points[i].held_out = True


def engine_points(iterations: Sequence[TimedIteration], label: str = "engine") -> list[Point]:
    """One point per iteration a running engine executed, labelled by kind and index."""
    return [
        Point(
            label=f"{label} #{i} {it.kind}",
            num_seqs=it.num_seqs,
            prefill_tokens=float(it.prefill_tokens),
            prefill_attn_tokens=float(it.prefill_attn_tokens),
            decode_seqs=float(it.decode_seqs),
            kv_read_tokens=float(it.kv_read_tokens),
            times_s=[it.time_s],
        )
        for i, it in enumerate(iterations)
    ]


def _predicted_and_measured(
    profile: ModelProfile, iterations: Sequence[TimedIteration]
) -> tuple[list[Point], np.ndarray, np.ndarray]:
    points = engine_points(iterations)
    return (
        points,
        profile_times_s(profile, feature_arrays(points)),
        np.array([it.time_s for it in iterations]),
    )


def breakdown(profile: ModelProfile, iterations: Sequence[TimedIteration]) -> list[dict[str, float | str]]:
    """Per kind of iteration (and in total): how many, the measured and predicted seconds summed
    (what a run's clock adds up to), and the per-iteration MAPE. Sums, not means, decide tree times."""
    _, pred, true = _predicted_and_measured(profile, iterations)
    kinds = np.array([it.kind for it in iterations])
    rows = []
    for kind in [*sorted(set(kinds.tolist())), "all"]:
        m = np.ones(len(kinds), dtype=bool) if kind == "all" else kinds == kind
        rows.append(
            {
                "kind": kind,
                "n": int(m.sum()),
                "measured_s": float(true[m].sum()),
                "predicted_s": float(pred[m].sum()),
                "sum_err_pct": float(100 * (pred[m].sum() - true[m].sum()) / true[m].sum()),
                **errors(pred[m], true[m]),
            }
        )
    return rows


def outliers(profile: ModelProfile, iterations: Sequence[TimedIteration], k: int = 8) -> list[dict[str, Any]]:
    """The ``k`` iterations whose measured time exceeds the prediction by the most seconds (a
    one-off stall such as a kernel compile shows up here, not in a MAPE)."""
    points, pred, true = _predicted_and_measured(profile, iterations)
    worst = np.argsort(pred - true, kind="stable")[:k]
    return [
        {"label": points[i].label, "measured_s": float(true[i]), "predicted_s": float(pred[i])}
        for i in worst.tolist()
    ]


# ------------------------------------------------------------------------------ fitting
def feature_arrays(points: list[Point]) -> dict[str, np.ndarray]:
    return {
        name: np.array([getattr(p, name) for p in points], dtype=np.float64)
        for name in ("prefill_tokens", "prefill_attn_tokens", "decode_seqs", "kv_read_tokens")
    }


def _design(base: ModelProfile, f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(linear columns (n, 3), FLOPs (n,), bytes (n, 2): weights, KV) of the cost model for a
    profile's shape, per GPU."""
    tokens = f["prefill_tokens"] + f["decode_seqs"]
    flops = (
        2.0 * base.num_params * tokens
        + 4.0 * base.num_layers * base.num_q_heads * base.head_dim * f["prefill_attn_tokens"]
    )
    kv = base.kv_bytes_per_token * (f["kv_read_tokens"] + tokens)
    nbytes = np.stack([np.full_like(tokens, base.weight_bytes), kv], axis=1)
    linear = np.stack([np.ones_like(tokens), tokens, (f["prefill_tokens"] > 0).astype(np.float64)], axis=1)
    return linear, flops / base.tensor_parallel, nbytes / base.tensor_parallel


def predict(theta: np.ndarray, linear: np.ndarray, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    predicted_s: np.ndarray = linear @ theta[:NUM_LINEAR] + np.maximum(theta[3] * flops, nbytes @ theta[4:])
    return predicted_s


def _nnls(a: np.ndarray, b: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares by trying every subset of the ``free`` columns (<= 6 of them):
    the optimum is the unconstrained solution on its own support, so the best feasible subset is it."""
    best, best_cost = np.zeros(a.shape[1]), float(b @ b)
    cols = np.flatnonzero(free)
    for k in range(1, len(cols) + 1):
        for subset in itertools.combinations(cols.tolist(), k):
            x, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (x < 0).any():
                continue
            r = a[:, subset] @ x - b
            cost = float(r @ r)
            if cost < best_cost:
                best_cost, best = cost, np.zeros(a.shape[1])
                best[list(subset)] = x
    return best, best_cost


def fit_theta(
    linear: np.ndarray,
    flops: np.ndarray,
    nbytes: np.ndarray,
    times_s: np.ndarray,
    free: np.ndarray | None = None,
    scale_s: np.ndarray | None = None,
    lower: np.ndarray | None = None,
) -> np.ndarray:
    """``theta`` (``PARAMS`` order) >= ``lower`` (default 0) minimising the squared error of
    ``predict`` relative to ``scale_s`` (default: the measured times themselves); ``free`` masks
    which parameters may move off their lower bound."""
    n = len(times_s)
    free = np.ones(len(PARAMS), dtype=bool) if free is None else np.asarray(free, dtype=bool)
    lower = np.zeros(len(PARAMS)) if lower is None else np.asarray(lower, dtype=np.float64)
    w = 1.0 / (times_s if scale_s is None else scale_s)
    b = times_s * w
    order = np.argsort(flops / nbytes.sum(axis=1))  # ascending intensity: memory-bound first

    def solve(compute_bound: np.ndarray) -> np.ndarray:
        a = np.concatenate(
            [linear, (flops * compute_bound)[:, None], nbytes * ~compute_bound[:, None]], axis=1
        )
        a = a * w[:, None]
        theta: np.ndarray = lower + _nnls(a, b - a @ lower, free)[0]  # lower + a non-negative step
        return theta

    def cost(theta: np.ndarray) -> float:
        # a relative residual below ~1e-9 per point is an exact fit: rounding noise must not
        # choose between exact fits (it differs between LAPACK builds)
        r = (predict(theta, linear, flops, nbytes) - times_s) * w
        c = float(r @ r)
        return 0.0 if c < 1e-18 * n else c

    starts = []
    for k in range(n + 1):  # points order[k:] compute-bound
        compute_bound = np.zeros(n, dtype=bool)
        compute_bound[order[k:]] = True
        theta = solve(compute_bound)
        starts.append((cost(theta), k, theta))
    # among equally good fits, the one with the fewest compute-bound points: a rate the data
    # cannot identify is left to ``profile_from_theta`` rather than fitted to noise
    starts.sort(key=lambda item: (item[0], -item[1]))
    best_cost, _, best = starts[0]
    for c, _, theta in starts[:6]:  # re-assign each point to the branch its fitted max takes, refit
        for _ in range(20):
            nxt = solve(theta[3] * flops >= nbytes @ theta[4:])
            c_next = cost(nxt)
            if not c_next < c * (1 - 1e-12):
                break
            theta, c = nxt, c_next
        if c < best_cost:
            best, best_cost = theta, c
    return best


def profile_from_theta(
    base: ModelProfile, theta: np.ndarray, flops: np.ndarray, nbytes: np.ndarray, name: str, source: str
) -> tuple[ModelProfile, list[str]]:
    """The fitted profile, and notes on what was not identified by the data.

    A rate whose roofline branch never binds on the points (its coefficient fitted to 0) keeps
    the base profile's value if that still never binds, else the largest value that does not;
    an efficiency above 1 (the datasheet peak is not the right peak, e.g. on a CPU) raises the
    peak to the fitted rate and sets the efficiency to 1."""
    notes = []
    u, v, vk = float(theta[3]), float(theta[4]), float(theta[5])
    base_u = 1.0 / (base.peak_flops_per_gpu * base.flops_efficiency)
    base_v = 1.0 / (base.hbm_bytes_per_s_per_gpu * base.bandwidth_efficiency)
    if u <= 0 and v <= 0 and vk <= 0:
        u, v, vk = base_u, base_v, base_v
        notes.append("no roofline rate was identified: all kept from the base profile")
    if v <= 0:  # weights cost nothing beyond the overhead: stream them at the datasheet rate
        v = 1.0 / base.hbm_bytes_per_s_per_gpu
        notes.append("weight bandwidth fitted to 0: weights stream at hbm_bytes_per_s_per_gpu (efficiency 1)")
    if vk <= 0:
        vk = v
        notes.append("KV bandwidth not identified (fitted 0): set to the weight bandwidth")
    if u <= 0:  # the slowest FLOP rate that never binds on the points, within (base, peak)
        bound = float(np.min((nbytes @ np.array([v, vk])) / flops))
        u = max(1.0 / base.peak_flops_per_gpu, min(base_u, bound))
        notes.append("compute never binds on these points: FLOP rate set so that it (nearly) does not")
    peak_flops, flops_eff = base.peak_flops_per_gpu, 1.0 / (u * base.peak_flops_per_gpu)
    if flops_eff > 1:
        peak_flops, flops_eff = 1.0 / u, 1.0
        notes.append(f"fitted FLOP rate exceeds peak_flops_per_gpu: peak raised to {peak_flops:.4g}")
    hbm = base.hbm_bytes_per_s_per_gpu
    if 1.0 / min(v, vk) > hbm:
        hbm = 1.0 / min(v, vk)
        notes.append(f"fitted bandwidth exceeds hbm_bytes_per_s_per_gpu: raised to {hbm:.4g}")
    profile = dataclasses.replace(
        base,
        name=name,
        peak_flops_per_gpu=peak_flops,
        flops_efficiency=flops_eff,
        hbm_bytes_per_s_per_gpu=hbm,
        bandwidth_efficiency=1.0 / (v * hbm),
        kv_bandwidth_efficiency=1.0 / (vk * hbm),
        overhead_s=float(theta[0]),
        comm_s_per_token=float(theta[1]),
        prefill_overhead_s=float(theta[2]),
        source=source,
    )
    return profile, notes


def profile_times_s(profile: ModelProfile, f: dict[str, np.ndarray]) -> np.ndarray:
    """What the sim predicts for the points: ``CostModel.iteration_time_s`` itself."""
    return np.asarray(
        CostModel(profile).iteration_time_s(
            f["prefill_tokens"], f["prefill_attn_tokens"], f["decode_seqs"], f["kv_read_tokens"]
        ),
        dtype=np.float64,
    )


def errors(pred_s: np.ndarray, true_s: np.ndarray) -> dict[str, float]:
    """MAPE, p90 and max absolute percentage error (in %)."""
    ape = 100.0 * np.abs(pred_s - true_s) / true_s
    return {
        "mape_pct": float(ape.mean()),
        "p90_ape_pct": float(np.percentile(ape, 90)),
        "max_ape_pct": float(ape.max()),
        "n": int(len(ape)),
    }


@dataclass
class FitResult:
    profile: ModelProfile
    theta: dict[str, float]
    train: dict[str, float]
    held_out: dict[str, float]
    base_held_out: dict[str, float]
    notes: list[str]


def fit(
    base: ModelProfile, points: list[Point], name: str, source: str = "", cap_at_peak: bool = False
) -> FitResult:
    """Fit on the points not held out (medians), score the fitted profile's ``CostModel`` on both
    sets, and the base (unfitted) profile on the held-out set for comparison.

    ``cap_at_peak`` keeps the fitted FLOP rate and bandwidths at or below the base profile's
    datasheet peaks (a GPU's are real; a CPU profile's are placeholders). Where host time grows
    with batch size too, the fit can otherwise trade compute for a per-token cost and land on a
    rate no chip reaches."""
    train = [p for p in points if not p.held_out]
    test = [p for p in points if p.held_out] or train
    f_train, f_test = feature_arrays(train), feature_arrays(test)
    t_train = np.array([p.median_s for p in train])
    t_test = np.array([p.median_s for p in test])
    linear, flops, nbytes = _design(base, f_train)
    lower = None
    if cap_at_peak:
        hbm = 1.0 / base.hbm_bytes_per_s_per_gpu
        lower = np.array([0.0, 0.0, 0.0, 1.0 / base.peak_flops_per_gpu, hbm, hbm])
    theta = fit_theta(linear, flops, nbytes, t_train, lower=lower)
    for _ in range(2):  # relative to the model, not to noisy single measurements (which biases low)
        scale = np.maximum(predict(theta, linear, flops, nbytes), 0.05 * t_train)
        theta = fit_theta(linear, flops, nbytes, t_train, scale_s=scale, lower=lower)
    _, flops_all, nbytes_all = _design(base, feature_arrays(points))
    profile, notes = profile_from_theta(base, theta, flops_all, nbytes_all, name, source)
    return FitResult(
        profile=profile,
        theta=dict(zip(PARAMS, theta.tolist(), strict=True)),
        train=errors(profile_times_s(profile, f_train), t_train),
        held_out=errors(profile_times_s(profile, f_test), t_test),
        base_held_out=errors(profile_times_s(base, f_test), t_test),
        notes=notes,
    )


# ------------------------------------------------------------------------------ output
_COMMENTS = {
    "peak_flops_per_gpu": "base profile's peak (raised to the fitted rate if that exceeds it)",
    "hbm_bytes_per_s_per_gpu": "base profile's bandwidth (raised to the fitted rate if that exceeds it)",
    "overhead_s": "fitted: fixed cost of every iteration",
    "flops_efficiency": "fitted: effective FLOP rate / peak",
    "bandwidth_efficiency": "fitted: effective bandwidth for weights / peak",
    "kv_bandwidth_efficiency": "fitted: effective bandwidth for KV bytes / peak",
    "comm_s_per_token": "fitted: per-token cost outside the roofline (host input prep, sampling)",
    "prefill_overhead_s": "fitted: extra fixed cost of an iteration with prefill (eager vs CUDA graph)",
}


def profile_yaml(profile: ModelProfile, header: list[str]) -> str:
    """The profile as YAML in ``ModelProfile`` field order, ``header`` as leading comments."""
    lines = [f"# {h}" for h in header]
    for f in dataclasses.fields(ModelProfile):
        value = getattr(profile, f.name)
        if isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a YAML string
        elif isinstance(value, int):
            text = str(value)
        else:
            text = repr(float(value))  # every digit; YAML needs a dot in a float with an exponent
            if "e" in text and "." not in text:
                text = text.replace("e", ".0e")
        comment = _COMMENTS.get(f.name)
        lines.append(f"{f.name}: {text}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def write_profile(profile: ModelProfile, path: str | Path, header: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_yaml(profile, header))
    return path
