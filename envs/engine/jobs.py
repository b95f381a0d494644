"""Per-job (per-tree) engine state: the ``Job`` objects and a table of per-job columns.

A job is one agent tree. The engine numbers jobs in the order it adds them (the job index);
every column here is indexed by it. The numpy columns are what the metrics, the reward and the
features read for many jobs at once, so they are arrays (grown by doubling, like
``CallTable``); the structural per-job data that only the engine walks one job at a time (first
call id, children, replicas) stays in Python lists.

A streaming engine drops a finished tree's ``Job`` and structure (``JobLog.release``,
``JobTable.release``) but keeps its row of columns: arrival, finish, service and counts are all
that per-tree metrics need once a tree is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np

from servegym.envs.workloads.job import Job


class JobLog(Sequence[Job]):
    """``Engine.jobs`` of a streaming run: the jobs in engine order, a finished one dropped
    (``release``) and read again from ``reload()`` (every job, in engine order) if asked for."""

    def __init__(self, reload: Callable[[], Sequence[Job]]) -> None:
        self._jobs: list[Job | None] = []
        self._reload = reload
        self.num_held = 0  # jobs held now (the live trees)

    def append(self, job: Job) -> None:
        self._jobs.append(job)
        self.num_held += 1

    def release(self, index: int) -> None:
        if self._jobs[index] is not None:
            self._jobs[index] = None
            self.num_held -= 1

    def __len__(self) -> int:
        return len(self._jobs)

    @overload
    def __getitem__(self, index: int) -> Job: ...
    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...
    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        job = self._jobs[index]
        return self._reload()[index if index >= 0 else len(self) + index] if job is None else job

    def __iter__(self) -> Iterator[Job]:
        return (self[i] for i in range(len(self)))


def _extended(column: np.ndarray, extra: int, fill: float) -> np.ndarray:
    return np.concatenate([column, np.full(extra, fill, dtype=column.dtype)])


class JobTable:
    """Per-job columns, indexed by engine job index. The numpy columns are longer than
    ``size`` (rows past it hold their fill value), so slice them with ``[:size]``; a column is
    a new array after growing, so hold it in a local only while no job is added."""

    def __init__(self) -> None:
        self.size = 0  # rows in use: the jobs added so far (== len(Engine.jobs))
        self.arrival_s = np.zeros(0)  # (capacity,) float: when the tree arrived
        self.finish_s = np.full(0, np.nan)  # (capacity,) float: when its last call turned terminal, else NaN
        self.service = np.zeros(0)  # (capacity,) float: tokens computed for its calls (attained service)
        self.calls_done = np.zeros(0, dtype=np.int64)  # (capacity,) its calls that are terminal
        self.num_calls = np.zeros(0, dtype=np.int64)  # (capacity,) len(job.calls)
        self.tenant = np.zeros(0, dtype=np.int64)  # (capacity,) tenant id (``OnlineStats.tenants``)
        self.failed = np.zeros(0, dtype=np.bool_)  # (capacity,) a call was rejected and its tree cut
        # Python lists, exactly ``size`` long; a released tree's structure is None
        self.first_call: list[int] = []  # id of its first call (its ids are consecutive); -1 until it arrives
        self.children: list[list[list[int]] | None] = []  # call index -> child call indices
        self.replicas: list[set[int] | None] = []  # replicas its calls were routed to (a route feature)

    def add(self, job: Job, tenant: int) -> int:
        """A row for a new job (not arrived yet: its calls have no ids); returns its index."""
        index = self.size
        if index == len(self.arrival_s):
            self._grow(max(16, index))
        self.size += 1
        self.arrival_s[index] = job.arrival_s
        self.num_calls[index] = len(job.calls)
        self.tenant[index] = tenant
        self.replicas.append(set())
        self.first_call.append(-1)
        self.children.append(job.children())
        return index

    def _grow(self, extra: int) -> None:
        self.arrival_s = _extended(self.arrival_s, extra, 0.0)
        self.finish_s = _extended(self.finish_s, extra, np.nan)
        self.service = _extended(self.service, extra, 0.0)
        self.calls_done = _extended(self.calls_done, extra, 0)
        self.num_calls = _extended(self.num_calls, extra, 0)
        self.tenant = _extended(self.tenant, extra, 0)
        self.failed = _extended(self.failed, extra, False)

    def call_done(self, index: int, now_s: float) -> bool:
        """Count one more terminal call of job ``index``; True (and its finish time set) when
        it was the tree's last."""
        self.calls_done[index] += 1
        if self.calls_done[index] == self.num_calls[index]:
            self.finish_s[index] = now_s
            return True
        return False

    def unfinished(self) -> list[int]:
        """Indices of the jobs whose tree has not finished (or failed) yet."""
        return np.flatnonzero(np.isnan(self.finish_s[: self.size])).tolist()

    def release(self, index: int) -> None:
        """Drop a finished tree's structure (streaming); its row of columns stays."""
        self.children[index] = None
        self.replicas[index] = None
