"""Run metrics: what a serving paper reports for agent workloads (tree completion time and its
tail, per-call TTFT/TPOT, throughput, KV and prefix-cache behaviour, preemption costs, fairness
across tenants, the large model's share of calls) and, given per-tree SLOs, SLO attainment and
goodput (``slo_metrics``). Every ``RunMetrics`` field comes from per-call and per-replica
counters that fast-forwarding and stepping leave identical.

Rejected work is never success: ``jobs_failed`` counts trees with a rejected call (a call that
cannot fit any replica's KV cache is rejected with its whole tree), ``calls_rejected`` the
calls rejected with them, ``jobs_unfinished`` trees neither done nor failed (a stalled or
truncated run), and ``complete`` is True only when every tree of ``jobs_total`` finished.
Tree-time statistics (``jct_*``) cover finished trees only; a failed tree has no completion
time, so a run with failures must be read with its ``jobs_failed``.

Contextual inflation (ReAct and debate trees whose prompt grows with depth) is read from the
calls of finished trees: ``tokens_per_tree_mean`` and ``prompt_tokens_per_tree_mean`` (a tree's
prompt tokens are the sum of its calls' whole prompts, cached or not: what the model attends
over and an API bills; ``prefix_hit_rate`` and ``recomputed_tokens`` say how much of it the
cache saved or preemption cost again), and the growth per level: ``prompt_growth_per_level``
(a ratio) and ``prompt_tokens_added_per_level`` (tokens) average over every step from depth d
to d + 1 inside a tree (the tree's mean prompt at each level), so levels are compared within a
tree, never across trees, and a deep level reached by two trees weighs two steps, not a whole
level. ReAct growth is additive (each step appends its output and a tool result): the tokens
added per level stay about constant while the ratio falls with depth (react_long: ~2x from
level 0 to 1, ~1.05x past level 12), so read the ratio with ``call_depth_max``.
``prompt_tokens_by_depth`` gives the per-level profile itself (not a ``RunMetrics`` field: its
length varies with the workload, and ``RunMetrics`` stays flat scalars)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from servegym.envs.engine.calls import CallState

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _max(values: np.ndarray) -> float:
    return float(values.max()) if len(values) else float("nan")


def jain_index(values: np.ndarray) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2) of non-negative allocations: 1 when all are
    equal, 1/n when one gets everything; NaN for no values, 1 when all are zero."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        return float("nan")
    if (x < 0).any() or not np.isfinite(x).all():
        raise ValueError(f"jain_index needs finite non-negative values, got {x!r}")
    squares = float((x * x).sum())
    return float(x.sum() ** 2 / (len(x) * squares)) if squares > 0 else 1.0


@dataclass
class RunMetrics:
    jobs_completed: int
    jobs_failed: int
    calls_completed: int
    calls_rejected: int
    jct_mean_s: float  # tree completion time (last call done - arrival), over finished trees only
    jct_p50_s: float
    jct_p90_s: float
    jct_p95_s: float
    jct_p99_s: float
    jct_per_output_token_s: float  # mean over trees of tree time / tokens the tree generated
    ttft_mean_s: float  # per call: first token - ready
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    max_wait_s: float  # starvation: the longest any call waited from ready to its first token
    tpot_mean_s: float  # per call with >1 output token: (finish - first token) / (outputs - 1)
    tpot_p50_s: float
    tpot_p95_s: float
    tpot_p99_s: float
    makespan_s: float
    jobs_per_s: float
    tokens_per_s: float  # generated tokens / makespan
    kv_utilization_mean: float  # time-weighted owned-block fraction while replicas were busy
    prefix_hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens admitted
    preemptions: int
    evictions: int  # cached prefix blocks reclaimed for new allocations (prefix-cache evictions)
    recomputed_tokens: int
    swapped_bytes: float
    num_tenants: int
    jain_tenant_jct: float  # Jain's index over tenants of their mean tree time (1: equal)
    jain_tenant_service: float  # Jain's index over tenants of their VTC service (tokens, 1: equal)
    large_model_call_share: float  # finished calls served by the largest model; NaN if one size
    budget_truncations: int  # calls stopped by their role budget before their natural end
    iterations: int
    stalled: bool
    stall_reason: str
    # Added after the fields above (which keep their meaning and values):
    jobs_total: int  # trees in the run: jobs_completed + jobs_failed + jobs_unfinished
    jobs_unfinished: int  # trees neither finished nor failed when the run ended (stall, truncation)
    calls_total: int  # calls of every tree: calls_completed + calls_rejected + calls not run
    complete: bool  # every tree finished: no rejected call, no failed or unfinished tree, no stall
    first_rejection: str  # "<job id> call <i>: <reason>" of the first rejected call, "" if none
    # Contextual inflation, over the calls of finished trees (NaN, and depth 0, if none finished):
    tokens_per_tree_mean: float  # sum over a tree's calls of prompt + output tokens, mean over trees
    prompt_tokens_per_tree_mean: float  # sum over a tree's calls of their whole prompts, mean over trees
    prompt_tokens_root_mean: float  # mean prompt of depth-0 calls (level 0 of prompt_tokens_by_depth)
    prompt_growth_per_level: float  # mean over (tree, d) of the tree's mean prompt at d + 1 / at d
    prompt_tokens_added_per_level: float  # mean over (tree, d) of the same difference, in tokens
    call_depth_max: int  # deepest call (0: single-call trees); the levels are 0..call_depth_max
    # Faults (ClusterConfig.tool_failure_prob, network_jitter_s), over finished calls:
    tool_failures: int  # failed tool attempts (each held its tree for tool_timeout_s)
    # Budgets (EngineConfig.continue_truncated, budget_rule):
    continuations: int  # continuation calls finished (each resumed an output its budget had cut)
    # Outages (ClusterConfig.outages):
    requeued_calls: int  # calls a replica that went down held, requeued to others (counted per outage)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_metrics(engine: Engine) -> RunMetrics:
    calls = engine.calls
    n = calls.size
    state = calls.state[:n]
    finished = state == CallState.FINISHED
    jobs = len(engine.jobs)
    arrival_s, finish_s = engine.job_table.arrival_s[:jobs], engine.job_table.finish_s[:jobs]
    failed = engine.job_table.failed[:jobs]
    done_jobs = _done_jobs(engine)
    jct = (finish_s - arrival_s)[done_jobs]
    ttft = (calls.first_token_s[:n] - calls.ready_s[:n])[finished]
    tree_tokens = np.bincount(
        calls.job[:n][finished], weights=calls.num_output[:n][finished], minlength=jobs
    )[:jobs]
    per_token = jct / np.maximum(tree_tokens[done_jobs], 1.0)
    done_tenant = engine.job_table.tenant[:jobs][done_jobs]
    tenant_jct = [jct[done_tenant == t].mean() for t in np.unique(done_tenant)]
    params = np.array([r.profile.num_params for r in engine.replicas])
    on_large = params[calls.replica[:n][finished]] == params.max()
    large_share = float(on_large.mean()) if params.min() < params.max() and len(on_large) else float("nan")
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
        jct_p95_s=_pct(jct, 95),
        jct_p99_s=_pct(jct, 99),
        jct_per_output_token_s=_mean(per_token),
        ttft_mean_s=_mean(ttft),
        ttft_p50_s=_pct(ttft, 50),
        ttft_p95_s=_pct(ttft, 95),
        ttft_p99_s=_pct(ttft, 99),
        max_wait_s=_max(ttft),
        tpot_mean_s=_mean(tpot),
        tpot_p50_s=_pct(tpot, 50),
        tpot_p95_s=_pct(tpot, 95),
        tpot_p99_s=_pct(tpot, 99),
        makespan_s=makespan,
        jobs_per_s=float(done_jobs.sum() / makespan) if makespan > 0 else float("nan"),
        tokens_per_s=generated / makespan if makespan > 0 else float("nan"),
        kv_utilization_mean=kv_block_s / busy if busy > 0 else 0.0,
        prefix_hit_rate=hits / admitted if admitted else 0.0,
        preemptions=sum(r.num_preemptions for r in engine.replicas),
        evictions=sum(r.blocks.num_evictions for r in engine.replicas),
        recomputed_tokens=int(calls.recomputed_tokens[:n].sum()),
        swapped_bytes=float(sum(r.swap_bytes for r in engine.replicas)),
        num_tenants=len(engine.stats.tenants),
        jain_tenant_jct=jain_index(np.array(tenant_jct)),
        jain_tenant_service=jain_index(engine.stats.tenant_service[: len(engine.stats.tenants)]),
        large_model_call_share=large_share,
        budget_truncations=int((finished & (calls.true_output_tokens[:n] > calls.max_tokens[:n])).sum()),
        iterations=sum(r.num_iterations for r in engine.replicas),
        stalled=engine.stall is not None,
        stall_reason=engine.stall or "",
        jobs_total=jobs,
        jobs_unfinished=int((~done_jobs & ~failed).sum()),
        calls_total=int(n),
        complete=bool(done_jobs.all()) and engine.stall is None,
        first_rejection=_first_rejection(engine),
        **_inflation(engine, done_jobs),
        tool_failures=int(calls.tool_failures[:n][finished].sum()),
        continuations=int((finished & (calls.continues[:n] >= 0)).sum()),
        requeued_calls=engine.num_requeued,
    )


def _finished_tree_calls(engine: Engine, done_jobs: np.ndarray) -> np.ndarray:
    """Ids of the calls of finished trees (every one of them finished)."""
    calls = engine.calls
    return np.flatnonzero(done_jobs[calls.job[: calls.size]]) if len(done_jobs) else np.zeros(0, np.int64)


def _done_jobs(engine: Engine) -> np.ndarray:
    jobs = len(engine.jobs)
    done: np.ndarray = ~np.isnan(engine.job_table.finish_s[:jobs]) & ~engine.job_table.failed[:jobs]
    return done


class _Inflation(TypedDict):
    tokens_per_tree_mean: float
    prompt_tokens_per_tree_mean: float
    prompt_tokens_root_mean: float
    prompt_growth_per_level: float
    prompt_tokens_added_per_level: float
    call_depth_max: int


def _inflation(engine: Engine, done_jobs: np.ndarray) -> _Inflation:
    """The contextual-inflation fields of ``RunMetrics`` (see the module docstring), from the call
    table's prompt tokens, output tokens and depths alone (no ``Job`` is read: a streaming run
    has dropped them)."""
    calls = engine.calls
    ids = _finished_tree_calls(engine, done_jobs)
    jobs = len(done_jobs)
    job, depth = calls.job[ids], calls.depth[ids]
    prompt = calls.prompt_tokens[ids].astype(np.float64)
    tree_prompt = np.bincount(job, weights=prompt, minlength=jobs)[done_jobs]
    tree_output = np.bincount(job, weights=calls.num_output[ids], minlength=jobs)[done_jobs]
    # one row per (tree, depth) present, sorted by tree then depth; a tree's levels run 0..its
    # deepest without a gap (a call at depth d > 0 has a parent at d - 1), so consecutive rows
    # of one tree are a step d -> d + 1
    levels = int(depth.max()) + 1 if len(ids) else 1
    keys, inverse = np.unique(job * levels + depth, return_inverse=True)
    level_mean = np.bincount(inverse, weights=prompt) / np.maximum(np.bincount(inverse), 1)
    step = (keys[1:] // levels == keys[:-1] // levels) & (level_mean[:-1] > 0)
    upper, lower = level_mean[1:][step], level_mean[:-1][step]
    return {
        "tokens_per_tree_mean": _mean(tree_prompt + tree_output),
        "prompt_tokens_per_tree_mean": _mean(tree_prompt),
        "prompt_tokens_root_mean": _mean(prompt[depth == 0]),
        "prompt_growth_per_level": _mean(upper / lower),
        "prompt_tokens_added_per_level": _mean(upper - lower),
        "call_depth_max": int(depth.max()) if len(ids) else 0,
    }


def prompt_tokens_by_depth(engine: Engine) -> np.ndarray:
    """(D + 1,) mean prompt tokens of the calls at depth d = 0..D, over the calls of finished
    trees (D = ``RunMetrics.call_depth_max``; empty when no tree finished): the prompt-growth
    profile of contextual inflation. Level d averages every tree that reaches it, so a deep
    level reflects the few long trees; ``RunMetrics.prompt_growth_per_level`` compares levels
    inside each tree instead."""
    calls = engine.calls
    ids = _finished_tree_calls(engine, _done_jobs(engine))
    if not len(ids):
        return np.zeros(0)
    depth = calls.depth[ids]
    total = np.bincount(depth, weights=calls.prompt_tokens[ids].astype(np.float64))
    return total / np.bincount(depth)


def _first_rejection(engine: Engine) -> str:
    rejections = getattr(engine, "rejections", ())
    if not rejections:
        return ""
    job_id, call, reason = rejections[0]
    return f"{job_id} call {call}: {reason}"


class KvSamples:
    """The engine's KV-use samples, (time_s, replica, owned-block fraction) per scheduled batch,
    in one float64 array grown by doubling: 24 bytes a sample where a list of tuples took ~100
    (a long trace schedules millions of batches)."""

    def __init__(self) -> None:
        self._rows = np.zeros((1024, 3))
        self._size = 0

    def append(self, time_s: float, replica: int, used: float) -> None:
        if self._size == len(self._rows):
            self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
        self._rows[self._size] = (time_s, replica, used)
        self._size += 1

    def __len__(self) -> int:
        return self._size

    def array(self) -> np.ndarray:
        """(T, 3) copy of the samples."""
        return self._rows[: self._size].copy()

    def __iter__(self) -> Iterator[tuple[float, ...]]:
        return iter(map(tuple, self._rows[: self._size].tolist()))


def kv_utilization_timeline(engine: Engine) -> np.ndarray:
    """(T, 3) rows of (time_s, replica, owned-block fraction), one per scheduled iteration or
    folded run: the KV-use-over-time series that evaluation plots."""
    if not len(engine.kv_samples):
        return np.zeros((0, 3))
    samples = engine.kv_samples
    return samples.array() if isinstance(samples, KvSamples) else np.array(samples, dtype=np.float64)


@dataclass
class SloMetrics:
    """Tree-level SLO outcomes of a run, given each tree's SLO and its unloaded time."""

    slo_attainment: float  # trees done within their SLO / all trees (a failed tree misses it)
    goodput_jobs_per_s: float  # trees done within their SLO / makespan (DistServe's goodput, per tree)
    slowdown_mean: float  # tree time / the same tree's unloaded time, mean over completed trees
    slowdown_p99: float
    jain_job_speed: float  # Jain's index over completed trees of unloaded / actual time (1: equal)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_completion_s(engine: Engine) -> np.ndarray:
    """Per job (engine order): finish - arrival, NaN for a job that failed or never finished."""
    jobs = len(engine.jobs)
    jct = engine.job_table.finish_s[:jobs] - engine.job_table.arrival_s[:jobs]
    return np.where(engine.job_table.failed[:jobs], np.nan, jct)


def slo_metrics(engine: Engine, slo_s: np.ndarray, unloaded_s: np.ndarray, makespan_s: float) -> SloMetrics:
    """SLO outcomes; ``slo_s`` and ``unloaded_s`` hold one value per job in ``engine.jobs``
    order (how a suite picks the SLO is its business, see ``servegym.agents.evaluation.api``)."""
    jct = job_completion_s(engine)
    slo_s, unloaded_s = np.asarray(slo_s, dtype=np.float64), np.asarray(unloaded_s, dtype=np.float64)
    if slo_s.shape != jct.shape or unloaded_s.shape != jct.shape:
        raise ValueError(
            f"slo_s and unloaded_s need one value per job ({len(jct)}), got {slo_s.shape}, {unloaded_s.shape}"
        )
    met = np.zeros(len(jct), dtype=bool)
    done = ~np.isnan(jct)
    met[done] = jct[done] <= slo_s[done]
    slowdown = (jct / unloaded_s)[done & (unloaded_s > 0)]
    return SloMetrics(
        slo_attainment=float(met.mean()) if len(met) else float("nan"),
        goodput_jobs_per_s=float(met.sum() / makespan_s) if makespan_s > 0 else float("nan"),
        slowdown_mean=_mean(slowdown),
        slowdown_p99=_pct(slowdown, 99),
        jain_job_speed=jain_index(1.0 / slowdown) if len(slowdown) else float("nan"),
    )
