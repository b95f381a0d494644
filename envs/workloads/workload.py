"""A workload = a tree generator + an arrival pattern, built into a seeded ``JobSource``.

Open loop (Poisson, Gamma, MMPP) fixes every arrival up front, so overload builds queues without
bound, which is what stresses a scheduler. Closed loop (N users who each wait for their job, think,
then send the next) caps the load at N jobs in flight, like interactive agent users; it has to hear
about completions, hence ``ClosedLoop`` implements ``on_job_finished``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from servegym.envs.workloads.arrivals import MAX_ARRIVAL_SPAN_S, MMPP, Gamma, Poisson
from servegym.envs.workloads.generators import Generator, ReactChain
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import FixedJobs, JobSource, StreamedJobs


class ClosedLoop:
    """``num_users`` users: each sends a first job at U(0, think_time_s), then its next job an
    exponential think time (mean ``think_time_s``) after the previous one finished, until
    ``num_jobs`` jobs in all. Each user draws think times and job contents from its own rng,
    so its jobs do not depend on how other users' jobs were timed. Single use: build a fresh
    one per episode (``Workload.build``).
    """

    def __init__(
        self,
        generator: Generator,
        num_users: int,
        num_jobs: int,
        think_time_s: float,
        seed: int | np.random.SeedSequence,
    ) -> None:
        if not isinstance(num_users, int) or num_users < 1:
            raise ValueError(f"ClosedLoop.num_users must be an int >= 1, got {num_users!r}")
        if not isinstance(num_jobs, int) or num_jobs < 0:
            raise ValueError(f"ClosedLoop.num_jobs must be an int >= 0, got {num_jobs!r}")
        if not (np.isfinite(think_time_s) and think_time_s >= 0):
            raise ValueError(f"ClosedLoop.think_time_s must be a finite time >= 0, got {think_time_s!r}")
        self.generator = generator
        self.num_jobs = num_jobs
        self.think_time_s = think_time_s
        sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        self._rngs = [np.random.default_rng(s) for s in sequence.spawn(num_users)]
        self._user_of: dict[str, int] = {}
        self._initial = [
            self._release(user, float(rng.uniform(0.0, think_time_s)))
            for user, rng in enumerate(self._rngs[: min(num_users, num_jobs)])
        ]

    def _release(self, user: int, arrival_s: float) -> Job:
        job_id = f"j{len(self._user_of)}"
        self._user_of[job_id] = user
        return self.generator.sample(self._rngs[user], job_id, arrival_s)

    def initial_jobs(self) -> Iterable[Job]:
        return list(self._initial)

    def on_job_finished(self, job: Job, now_s: float) -> Iterable[Job]:
        user = self._user_of.get(job.job_id)
        if user is None:
            raise ValueError(f"ClosedLoop: job {job.job_id!r} was not released by this source")
        if len(self._user_of) >= self.num_jobs:
            return ()
        return (self._release(user, now_s + float(self._rngs[user].exponential(self.think_time_s))),)


ARRIVAL_KINDS = ("poisson", "gamma", "mmpp", "closed")


@dataclass
class Workload:
    """The workload config (what ``conf/workload/*.yaml`` instantiates): which trees, how they arrive.

    ``build(seed)`` returns a fresh ``JobSource``; the same seed gives identical jobs.
    """

    generator: Generator = field(default_factory=ReactChain)
    """Tree generator (any class in ``generators.GENERATORS``)."""
    arrival: str = "poisson"
    """Arrival pattern: poisson | gamma | mmpp (open loop) or closed (users with think time)."""
    arrival_rate: float = 1.0
    """Mean open-loop jobs per second (sweep it; Mooncake's conversation trace runs 3.4 requests/s)."""
    burstiness_cv: float = 3.0
    """Gamma inter-arrival CV; 3.0 is the Mooncake conversation trace's."""
    num_jobs: int = 200
    """Jobs per episode."""
    num_users: int = 16
    """Concurrent users of the closed loop."""
    think_time_s: float = 5.0
    """Mean closed-loop think time between a job finishing and the user's next job."""
    mmpp_rate_ratio: float = 7.0
    """MMPP busy/quiet rate ratio (mean rate stays ``arrival_rate``); a chosen default, no anchor."""
    mmpp_dwell_s: float = 60.0
    """MMPP mean time in each state; a chosen default, no anchor."""

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVAL_KINDS:
            raise ValueError(f"Workload.arrival must be one of {ARRIVAL_KINDS}, got {self.arrival!r}")
        for name in ("arrival_rate", "burstiness_cv", "mmpp_rate_ratio", "mmpp_dwell_s"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"Workload.{name} must be a finite number > 0, got {value!r}")
        if self.mmpp_rate_ratio < 1:
            raise ValueError(f"Workload.mmpp_rate_ratio must be >= 1, got {self.mmpp_rate_ratio!r}")
        for name in ("num_jobs", "num_users"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be an int >= 1, got {value!r}")
        if not (np.isfinite(self.think_time_s) and self.think_time_s >= 0):
            raise ValueError(f"Workload.think_time_s must be a finite time >= 0, got {self.think_time_s!r}")
        span_s = self.num_jobs * (
            self.think_time_s / self.num_users if self.arrival == "closed" else 1.0 / self.arrival_rate
        )
        if span_s > MAX_ARRIVAL_SPAN_S:
            what = (
                f"think_time_s={self.think_time_s!r} with num_users={self.num_users}"
                if self.arrival == "closed"
                else f"arrival_rate={self.arrival_rate!r}/s"
            )
            raise ValueError(
                f"Workload.{what} spreads num_jobs={self.num_jobs} arrivals over ~{span_s:.3g} s, past "
                f"the {MAX_ARRIVAL_SPAN_S:.0e} s the engine's float64 clock resolves to a microsecond "
                "(every latency would round to 0); check the unit: the rate is jobs per second"
            )
        if self.arrival != "closed":
            self.arrival_process()  # an open-loop process checks its parameters now, not per run

    def arrival_process(self) -> Poisson | Gamma | MMPP:
        """The open-loop process for ``arrival`` at mean rate ``arrival_rate``."""
        if self.arrival == "poisson":
            return Poisson(self.arrival_rate)
        if self.arrival == "gamma":
            return Gamma(self.arrival_rate, self.burstiness_cv)
        if self.arrival == "mmpp":
            low = 2 * self.arrival_rate / (1 + self.mmpp_rate_ratio)
            return MMPP(low, low * self.mmpp_rate_ratio, self.mmpp_dwell_s)
        raise ValueError(f"Workload.arrival={self.arrival!r} is a closed loop; it has no arrival process")

    def build(self, seed: int) -> JobSource:
        """A fresh source; generator and arrival rngs come from ``SeedSequence(seed).spawn(2)``."""
        generator_seed, arrival_seed = np.random.SeedSequence(seed).spawn(2)
        if self.arrival == "closed":
            return ClosedLoop(
                self.generator, self.num_users, self.num_jobs, self.think_time_s, generator_seed
            )
        times = self.arrival_process().times(np.random.default_rng(arrival_seed), self.num_jobs)
        if len(times) and times[-1] > MAX_ARRIVAL_SPAN_S:  # a heavy-tailed draw (Gamma, large cv)
            raise ValueError(
                f"Workload(arrival={self.arrival!r}, arrival_rate={self.arrival_rate!r}, "
                f"burstiness_cv={self.burstiness_cv!r}) seed {seed}: the last arrival is at "
                f"{times[-1]:.3g} s, past {MAX_ARRIVAL_SPAN_S:.0e} s; lower burstiness_cv or raise the rate"
            )
        rng = np.random.default_rng(generator_seed)
        return FixedJobs([self.generator.sample(rng, f"j{i}", float(t)) for i, t in enumerate(times)])


TRACE_FORMATS = ("jsonl", "mooncake", "azure", "burstgpt")


TRACE_RESAMPLES = ("none", "bootstrap")


@dataclass
class TraceWorkload:
    """Replay a trace: our own JSONL (``traces.save_jobs``) or a public serving trace.

    Seeds. With ``resample="none"`` (the default) the seed is unused: a trace is the same
    workload every time, and a suite over several seeds of it repeats one run. With
    ``resample="bootstrap"`` seed ``s`` replays a resampled copy of the trace, so seeds are
    samples of "workloads like this trace". The trace has N jobs with arrivals
    ``t_0 = 0 <= t_1 <= ... <= t_{N-1}`` (after ``limit``); let ``g`` be the mean gap
    ``t_{N-1} / (N - 1)`` (0 for N = 1) and ``P = t_{N-1} + g`` the period. Drawing from
    ``numpy.random.default_rng(s)``:

    1. Time shift (the arrival process, kept): a start slot ``j`` uniform in 0..N-1; slot ``k``
       of the copy arrives at ``t_{(j+k) mod N} - t_j``, plus ``P`` for the slots that wrap
       around, so the copy starts at 0, keeps every inter-arrival gap of the trace in order
       (rotated, with one gap of ``g`` where it wraps) and has the same rate and bursts.
    2. Session bootstrap (the contents): slot ``k`` gets the tree of job ``i_k``, ``i_k``
       uniform in 0..N-1 drawn independently (with replacement): a whole job (every call of
       its tree or Mooncake session, its tenant, kind, SLO and meta) moved to the slot's time,
       with the id ``<original id>#<k>`` so ids stay unique.

    Then N jobs again, the same arrival-process shape, trees repeated or left out as a
    bootstrap draws them; ``resample`` reads the whole trace (the draw needs every job) and so
    does not stream.

    Load. ``load`` in an evaluation suite (``agents/evaluation/load.py``, ``apply_load``) divides every
    arrival time by the load (2.0 doubles the arrival rate) and leaves each tree as it is: the
    tool gaps inside a tree (``tool_latency_s``, including a Mooncake session's think times)
    and the token lengths do not shrink, so load packs more trees together without making any
    tree faster. Compressing arrivals reads the whole trace (it needs every job).

    Streaming. ``stream=True`` (the default) reads a JSONL trace, and a single-call public one,
    as the engine's clock reaches each arrival and lets go of finished trees, so a long trace's
    memory follows its live work (``traces.iter_jobs``, ``importers.iter_import``): arrivals
    must be in order up to ``reorder_window_s`` seconds. Mooncake with ``group_sessions`` (a
    session's later turns come later in the file) and ``resample="bootstrap"`` read the whole
    file; so does ``stream=False``, which accepts any arrival order.
    """

    path: str
    format: str = "jsonl"
    """jsonl | mooncake | azure | burstgpt"""
    limit: int | None = None
    """Keep only the first N jobs (JSONL lines, or usable rows of a public trace); reading stops there."""
    group_sessions: bool = False
    """Mooncake only: chain requests that extend an earlier prompt into multi-call jobs."""
    name: str | None = None
    """The workload's name in suite tables and folders; None: the file's stem (``label``)."""
    resample: str = "none"
    """none (the trace as it is; the seed is unused) | bootstrap (per-seed time shift and session
    bootstrap, defined above)."""
    stream: bool = True
    """Read jobs as the clock reaches them and drop finished trees (memory follows live work);
    False: load the whole file first (any arrival order)."""
    reorder_window_s: float = 60.0
    """Streaming: how far back in trace time arrivals may step (see ``traces.iter_jobs``)."""

    def __post_init__(self) -> None:
        if self.format not in TRACE_FORMATS:
            raise ValueError(f"TraceWorkload.format must be one of {TRACE_FORMATS}, got {self.format!r}")
        if not Path(self.path).is_file():
            raise ValueError(f"TraceWorkload.path: no trace file {self.path!r} (workload.path=...)")
        if self.limit is not None and (
            not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 0
        ):
            raise ValueError(f"TraceWorkload.limit must be an int >= 0 or null, got {self.limit!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"TraceWorkload.name must be a non-empty string or null, got {self.name!r}")
        if self.resample not in TRACE_RESAMPLES:
            raise ValueError(
                f"TraceWorkload.resample must be one of {TRACE_RESAMPLES}, got {self.resample!r}"
            )
        if not isinstance(self.stream, bool):
            raise ValueError(f"TraceWorkload.stream must be true or false, got {self.stream!r}")
        window = self.reorder_window_s
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not (np.isfinite(window) and window >= 0)
        ):
            raise ValueError(
                f"TraceWorkload.reorder_window_s must be a finite number of seconds >= 0, got {window!r}"
            )

    @property
    def label(self) -> str:
        """``name``, or the trace file's stem when it has none."""
        return self.name or Path(self.path).stem

    def build(self, seed: int) -> JobSource:
        if self.resample == "bootstrap":
            return FixedJobs(bootstrap_jobs(self.read_all(), seed))
        if self.stream and not (self.format == "mooncake" and self.group_sessions):
            return StreamedJobs(self.open_stream)
        return FixedJobs(self.read_all())

    def open_stream(self) -> Iterator[Job]:
        """The trace's jobs in arrival order, read as they are pulled."""
        from servegym.envs.workloads import importers, traces

        if self.format == "jsonl":
            return traces.iter_jobs(self.path, limit=self.limit, reorder_window_s=self.reorder_window_s)
        return importers.iter_import(
            self.path, self.format, limit=self.limit, reorder_window_s=self.reorder_window_s
        )

    def read_all(self) -> list[Job]:
        """Every job of the trace (after ``limit``), read at once."""
        from servegym.envs.workloads import importers, traces

        if self.format == "jsonl":
            return traces.load_jobs(self.path, limit=self.limit)
        load: Callable[..., importers.ImportResult] = getattr(importers, f"import_{self.format}")
        return load(self.path, group_sessions=self.group_sessions, limit=self.limit).jobs


def bootstrap_jobs(jobs: Sequence[Job], seed: int) -> list[Job]:
    """``TraceWorkload``'s ``resample="bootstrap"`` copy of ``jobs`` for ``seed`` (defined in
    its docstring): the arrival slots rotated to a random start, each filled with a tree drawn
    with replacement."""
    ordered = sorted(jobs, key=lambda job: job.arrival_s)
    n = len(ordered)
    if n == 0:
        return []
    times = np.array([job.arrival_s for job in ordered], dtype=np.float64)
    gap_s = times[-1] / (n - 1) if n > 1 else 0.0
    period_s = times[-1] + gap_s
    rng = np.random.default_rng(seed)
    start = int(rng.integers(n))
    picks = rng.integers(n, size=n)
    slots = np.roll(times, -start) - times[start]
    slots[n - start :] += period_s  # the slots that wrapped around
    return [
        dataclasses.replace(ordered[int(pick)], job_id=f"{ordered[int(pick)].job_id}#{k}", arrival_s=float(t))
        for k, (pick, t) in enumerate(zip(picks, slots, strict=True))
    ]
