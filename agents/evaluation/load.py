"""A workload at a suite load, and each tree's unloaded time (the yardstick of SLOs and slowdown);
definitions in ``servegym.agents.evaluation``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import job_completion_s
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import FixedJobs, JobSource
from servegym.envs.workloads.workload import Workload

from .config import SuiteConfigError


def apply_load(workload: Any, load: float, num_jobs: int | None = None) -> tuple[Any, float]:
    """The workload at ``load`` x its offered load, and the factor by which to compress the built
    source's arrival times (1 when the workload itself carried the load)."""
    if isinstance(workload, Workload):
        changes: dict[str, Any] = {} if num_jobs is None else {"num_jobs": num_jobs}
        if workload.arrival == "closed":
            changes["num_users"] = max(1, round(workload.num_users * load))
        else:
            changes["arrival_rate"] = workload.arrival_rate * load
        return dataclasses.replace(workload, **changes), 1.0
    if num_jobs is not None and hasattr(workload, "limit"):
        workload = dataclasses.replace(workload, limit=num_jobs)
    return workload, load


def build_source(workload: Any, seed: int, compress: float = 1.0) -> JobSource:
    """``workload.build(seed)``, with arrival times divided by ``compress`` (trace replay speed)."""
    source = workload.build(seed)
    if compress == 1.0:
        return source
    if not isinstance(source, FixedJobs):
        raise SuiteConfigError(
            f"load {compress} on a {type(workload).__name__}: only generated workloads and fixed traces scale"
        )
    return FixedJobs([dataclasses.replace(job, arrival_s=job.arrival_s / compress) for job in source.jobs])


_UNLOADED_GAP_S = 1.0e6
_unloaded_cache: dict[tuple, np.ndarray] = {}


def unloaded_completion_s(
    jobs: Sequence[Job], engine: EngineConfig, cluster: ClusterConfig, time_scale_s: float = 30.0
) -> np.ndarray:
    """Each tree's completion time alone on an idle cluster under FCFS (see ``servegym.agents.evaluation``).
    Cached per process by tree contents, so the policies and loads of a seed share one replay.
    The replay asks no CONFIG decisions (FCFS would keep the configured cap anyway, and the
    trees sit ``_UNLOADED_GAP_S`` apart, so a decision every few seconds would be millions)."""
    from servegym.agents.policies.heuristics import FCFS

    key = (repr(engine), repr(cluster), time_scale_s, tuple((job.calls, job.tenant) for job in jobs))
    if key in _unloaded_cache:
        return _unloaded_cache[key]
    spaced = [
        dataclasses.replace(job, job_id=f"u{i}", arrival_s=i * _UNLOADED_GAP_S) for i, job in enumerate(jobs)
    ]
    static = dataclasses.replace(engine, config_every_s=0.0)
    replay = Engine(FixedJobs(spaced), cluster=cluster, engine=static, time_scale_s=time_scale_s)
    replay.run(FCFS())
    order = {job.job_id: i for i, job in enumerate(replay.jobs)}
    unloaded = job_completion_s(replay)[[order[f"u{i}"] for i in range(len(jobs))]]
    if np.nanmax(unloaded, initial=0.0) >= _UNLOADED_GAP_S:
        raise RuntimeError("a tree ran longer alone than the replay gap; raise _UNLOADED_GAP_S")
    if len(_unloaded_cache) > 64:
        _unloaded_cache.clear()
    _unloaded_cache[key] = unloaded
    return unloaded
