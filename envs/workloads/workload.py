"""A workload = a tree generator + an arrival pattern, built into a seeded ``JobSource``.

Open loop (Poisson, Gamma, MMPP) fixes every arrival up front, so overload builds queues without
bound, which is what stresses a scheduler. Closed loop (N users who each wait for their job, think,
then send the next) caps the load at N jobs in flight, like interactive agent users; it has to hear
about completions, hence ``ClosedLoop`` implements ``on_job_finished``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from servegym.envs.workloads.arrivals import MAX_ARRIVAL_SPAN_S, MMPP, Gamma, Poisson
from servegym.envs.workloads.generators import Generator, ReactChain
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import FixedJobs, JobSource


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


@dataclass
class TraceWorkload:
    """Replay a trace: our own JSONL (``traces.save_jobs``) or a public serving trace.

    The seed is unused: a trace is the same workload every time.
    """

    path: str
    format: str = "jsonl"
    """jsonl | mooncake | azure | burstgpt"""
    limit: int | None = None
    """Keep only the first N usable rows of a public trace."""
    group_sessions: bool = False
    """Mooncake only: chain requests that extend an earlier prompt into multi-call jobs."""

    def __post_init__(self) -> None:
        if self.format not in TRACE_FORMATS:
            raise ValueError(f"TraceWorkload.format must be one of {TRACE_FORMATS}, got {self.format!r}")
        if not Path(self.path).is_file():
            raise ValueError(f"TraceWorkload.path: no trace file {self.path!r} (workload.path=...)")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ValueError(f"TraceWorkload.limit must be an int >= 0 or null, got {self.limit!r}")

    def build(self, seed: int) -> JobSource:
        from servegym.envs.workloads import importers, traces

        if self.format == "jsonl":
            jobs = traces.load_jobs(self.path)
            return FixedJobs(jobs if self.limit is None else jobs[: self.limit])
        load = getattr(importers, f"import_{self.format}")
        return FixedJobs(load(self.path, group_sessions=self.group_sessions, limit=self.limit).jobs)
