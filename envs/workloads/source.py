"""Where the engine gets its jobs from.

Open-loop workloads know every arrival up front; a closed loop (N users, each sending the next
job a think time after the previous one finished) needs to hear about completions. One small
protocol covers both, so the engine never cares which it is fed.

A source may also stream (``streaming = True``, e.g. ``StreamedJobs`` over a trace file): its
``initial_jobs()`` is then an iterator in arrival order, which the engine pulls one job ahead of
its clock, and the engine lets go of a finished job's tree (see ``Engine``), so a long replay
holds memory for its live trees only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from servegym.envs.workloads.job import Job


class JobSource(Protocol):
    def initial_jobs(self) -> Iterable[Job]:
        """Jobs whose arrival times are known before the run starts: any order, taken at once;
        or, for a source with ``streaming = True``, an iterator in non-decreasing arrival
        order, pulled as the clock reaches each arrival."""
        ...

    def on_job_finished(self, job: Job, now_s: float) -> Iterable[Job]:
        """Jobs released by ``job`` finishing at ``now_s`` (arrival_s >= now_s)."""
        ...


class FixedJobs:
    """An open-loop source over a list of jobs (a generated workload or a replayed trace)."""

    streaming = False

    def __init__(self, jobs: Sequence[Job]) -> None:
        ids = [job.job_id for job in jobs]
        if len(set(ids)) != len(ids):
            raise ValueError("job ids must be unique within a workload")
        self.jobs = sorted(jobs, key=lambda job: job.arrival_s)

    def initial_jobs(self) -> Iterable[Job]:
        return self.jobs

    def on_job_finished(self, job: Job, now_s: float) -> Iterable[Job]:
        return ()


class StreamedJobs(FixedJobs):
    """An open-loop source that reads its jobs as the engine's clock reaches them.

    ``open_jobs()`` returns a fresh iterator of the jobs in non-decreasing arrival order with
    unique ids (``traces.iter_jobs``, ``importers.iter_import``); each ``initial_jobs()`` call
    opens one, so a source replays any number of times. ``jobs`` is the whole list, read on
    first use and kept: what code that needs every tree at once (arrival compression, per-tree
    analysis after a run) gets, at the memory cost of a whole-file load. It is a ``FixedJobs``,
    so such code treats both alike.
    """

    streaming = True

    def __init__(self, open_jobs: Callable[[], Iterator[Job]]) -> None:
        self._open_jobs = open_jobs
        self._jobs: list[Job] | None = None

    @property
    def jobs(self) -> list[Job]:  # type: ignore[override]
        if self._jobs is None:
            self._jobs = list(self._open_jobs())
        return self._jobs

    def initial_jobs(self) -> Iterator[Job]:
        return self._open_jobs()
