"""Where the engine gets its jobs from.

Open-loop workloads know every arrival up front; a closed loop (N users, each sending the next
job a think time after the previous one finished) needs to hear about completions. One small
protocol covers both, so the engine never cares which it is fed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from servegym.envs.workloads.job import Job


class JobSource(Protocol):
    def initial_jobs(self) -> Iterable[Job]:
        """Jobs whose arrival times are known before the run starts."""
        ...

    def on_job_finished(self, job: Job, now_s: float) -> Iterable[Job]:
        """Jobs released by ``job`` finishing at ``now_s`` (arrival_s >= now_s)."""
        ...


class FixedJobs:
    """An open-loop source over a list of jobs (a generated workload or a replayed trace)."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        ids = [job.job_id for job in jobs]
        if len(set(ids)) != len(ids):
            raise ValueError("job ids must be unique within a workload")
        self.jobs = sorted(jobs, key=lambda job: job.arrival_s)

    def initial_jobs(self) -> Iterable[Job]:
        return self.jobs

    def on_job_finished(self, job: Job, now_s: float) -> Iterable[Job]:
        return ()
