"""Rejected work is never success: RunMetrics counts every tree and call, and says whether the
run finished everything."""

from __future__ import annotations

import math

from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import DefaultPolicy
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload


def run(num_gpu_blocks: int | None) -> dict:
    engine = EngineConfig() if num_gpu_blocks is None else EngineConfig(num_gpu_blocks=num_gpu_blocks)
    workload = Workload(generator=MapReduce(), arrival_rate=2.0, num_jobs=4)
    return Engine(workload.build(0), engine=engine).run(DefaultPolicy()).as_dict()


def test_a_complete_run_says_so() -> None:
    metrics = run(None)
    assert metrics["complete"] is True and metrics["first_rejection"] == ""
    assert metrics["jobs_total"] == metrics["jobs_completed"] == 4 and metrics["jobs_unfinished"] == 0
    assert metrics["calls_total"] == metrics["calls_completed"] == 4 * 6


def test_a_run_whose_calls_cannot_fit_counts_every_failure() -> None:
    metrics = run(1)  # one 16-token block: no call fits any replica
    assert metrics["complete"] is False
    assert metrics["jobs_total"] == metrics["jobs_failed"] == 4 and metrics["jobs_completed"] == 0
    assert metrics["calls_total"] == metrics["calls_rejected"] == 4 * 6
    assert metrics["first_rejection"].startswith("j0 call 0: prompt ")
    assert "exceeds the KV cache" in metrics["first_rejection"]
    assert math.isnan(metrics["jct_mean_s"])  # over finished trees only: there are none
