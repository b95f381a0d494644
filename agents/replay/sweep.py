"""Replays of one workload over seeds x loads, one after another, into key-tagged tables: the
evaluation's keys (policy = what the server runs, workload, load, seed), so ``summarise``,
``to_markdown`` and the plots read them as they read a suite's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from servegym.agents.replay.config import ReplayConfig
from servegym.agents.replay.runner import ReplayResult, replay
from servegym.agents.replay.tables import calls_frame, jobs_frame, run_row
from servegym.envs.workloads.workload import TraceWorkload


@dataclass
class ReplayTables:
    runs: pd.DataFrame
    jobs: pd.DataFrame
    calls: pd.DataFrame

    @property
    def num_failed_trees(self) -> int:
        return int(self.runs.jobs_failed.sum()) if len(self.runs) else 0


def replay_sweep(
    workload: Any,
    workload_name: str,
    config: ReplayConfig,
    seeds: Sequence[int],
    loads: Sequence[float],
    num_jobs: int | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> ReplayTables:
    """Replay ``workload`` (a ``Workload`` or ``TraceWorkload``) at each load, for each seed,
    through ``config``'s server; ``on_run`` gets each runs.csv row as it finishes."""
    from servegym.agents.evaluation.api import apply_load, build_source

    if not seeds or not loads:
        raise ValueError("seeds and loads must each list at least one value")
    if any(not load > 0 for load in loads):
        raise ValueError(f"loads must be > 0, got {list(loads)}")
    seeded = not (isinstance(workload, TraceWorkload) and workload.resample == "none")
    runs, jobs, calls = [], [], []
    for load in loads:
        loaded, compress = apply_load(workload, float(load), num_jobs)
        for seed in seeds:
            result: ReplayResult = replay(build_source(loaded, int(seed), compress), config)
            keys = {"policy": config.label, "workload": workload_name, "load": float(load), "seed": int(seed)}
            call_table, job_table = calls_frame(result), jobs_frame(result)
            row = {**keys, **run_row(result, call_table, job_table), "workload_seeded": seeded}
            runs.append(row)
            jobs.append(job_table.assign(**keys))
            calls.append(call_table.assign(**keys))
            if on_run is not None:
                on_run(row)
    return ReplayTables(
        pd.DataFrame(runs), pd.concat(jobs, ignore_index=True), pd.concat(calls, ignore_index=True)
    )
