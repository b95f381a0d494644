"""Run metrics: what a serving paper reports for agent workloads (tree completion time and its
tail, per-call TTFT/TPOT, throughput, KV and prefix-cache behaviour, preemption costs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from servegym.envs.engine.calls import CallState

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


@dataclass
class RunMetrics:
    jobs_completed: int
    jobs_failed: int
    calls_completed: int
    calls_rejected: int
    jct_mean_s: float  # job (tree) completion time: last call done - job arrival
    jct_p50_s: float
    jct_p90_s: float
    jct_p99_s: float
    ttft_p50_s: float  # per call: first token - ready
    ttft_p99_s: float
    tpot_p50_s: float  # per call with >1 output token: (finish - first token) / (outputs - 1)
    tpot_p99_s: float
    makespan_s: float
    jobs_per_s: float
    tokens_per_s: float  # generated tokens / makespan
    kv_utilization_mean: float  # time-weighted owned-block fraction while replicas were busy
    prefix_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens admitted
    preemptions: int
    recomputed_tokens: int
    swapped_bytes: float
    budget_truncations: int  # calls stopped by their role budget before their natural end
    iterations: int
    stalled: bool
    stall_reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def collect_metrics(engine: Engine) -> RunMetrics:
    calls = engine.calls
    n = calls.size
    state = calls.state[:n]
    finished = state == CallState.FINISHED
    jobs = len(engine.jobs)
    arrival_s, finish_s = engine.job_arrival_s[:jobs], engine.job_finish_s[:jobs]
    failed = engine.job_failed[:jobs]
    done_jobs = ~np.isnan(finish_s) & ~failed
    jct = (finish_s - arrival_s)[done_jobs]
    ttft = (calls.first_token_s[:n] - calls.ready_s[:n])[finished]
    multi = finished & (calls.num_output[:n] > 1)
    tpot = (calls.finish_s[:n] - calls.first_token_s[:n])[multi] / (calls.num_output[:n][multi] - 1)
    start = float(arrival_s.min()) if jobs else 0.0
    end = float(np.nanmax(calls.finish_s[:n])) if finished.any() else start
    makespan = max(end - start, 0.0)
    busy = sum(r.busy_s for r in engine.replicas)
    kv_block_s = sum(r.kv_used_block_s / r.blocks.num_blocks for r in engine.replicas)
    admitted = sum(r.prompt_tokens_admitted for r in engine.replicas)
    hits = sum(r.prompt_tokens_hit for r in engine.replicas)
    generated = int(calls.num_output[:n][finished].sum())
    return RunMetrics(
        jobs_completed=int(done_jobs.sum()),
        jobs_failed=int(failed.sum()),
        calls_completed=int(finished.sum()),
        calls_rejected=int((state == CallState.REJECTED).sum()),
        jct_mean_s=_mean(jct),
        jct_p50_s=_pct(jct, 50),
        jct_p90_s=_pct(jct, 90),
        jct_p99_s=_pct(jct, 99),
        ttft_p50_s=_pct(ttft, 50),
        ttft_p99_s=_pct(ttft, 99),
        tpot_p50_s=_pct(tpot, 50),
        tpot_p99_s=_pct(tpot, 99),
        makespan_s=makespan,
        jobs_per_s=float(done_jobs.sum() / makespan) if makespan > 0 else float("nan"),
        tokens_per_s=generated / makespan if makespan > 0 else float("nan"),
        kv_utilization_mean=kv_block_s / busy if busy > 0 else 0.0,
        prefix_hit_rate=hits / admitted if admitted else 0.0,
        preemptions=sum(r.num_preemptions for r in engine.replicas),
        recomputed_tokens=int(calls.recomputed_tokens[:n].sum()),
        swapped_bytes=float(sum(r.swap_bytes for r in engine.replicas)),
        budget_truncations=int((finished & (calls.true_output_tokens[:n] > calls.max_tokens[:n])).sum()),
        iterations=sum(r.num_iterations for r in engine.replicas),
        stalled=engine.stall is not None,
        stall_reason=engine.stall or "",
    )


def kv_utilization_timeline(engine: Engine) -> np.ndarray:
    """(T, 3) rows of (time_s, replica, owned-block fraction), one per scheduled iteration or
    folded run: the KV-use-over-time series that evaluation plots."""
    if not engine.kv_samples:
        return np.zeros((0, 3))
    return np.array(engine.kv_samples, dtype=np.float64)
