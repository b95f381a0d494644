"""Arrival processes keep their rate and burstiness; workloads are seeded; closed loops cap load."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servegym.envs.workloads.arrivals import MMPP, Gamma, Poisson
from servegym.envs.workloads.generators import MapReduce, ReactChain
from servegym.envs.workloads.source import FixedJobs
from servegym.envs.workloads.workload import ClosedLoop, Workload

PROCESSES = [Poisson(2.0), Gamma(2.0, cv=3.0), MMPP(0.5, 3.5, mean_dwell_s=20.0)]


def gap_cv(times: np.ndarray) -> float:
    gaps = np.diff(times, prepend=0.0)
    return float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
def test_empirical_rate_is_the_configured_mean_rate(process) -> None:
    times = process.times(np.random.default_rng(0), 20000)
    assert abs(len(times) / times[-1] - 2.0) < 0.2


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_jobs=st.integers(0, 300))
def test_times_are_absolute_sorted_and_after_zero(process, seed: int, num_jobs: int) -> None:
    times = process.times(np.random.default_rng(seed), num_jobs)
    assert times.shape == (num_jobs,) and np.all(np.diff(times) >= 0)
    assert num_jobs == 0 or times[0] > 0
    assert np.array_equal(times, process.times(np.random.default_rng(seed), num_jobs))


def test_gamma_is_burstier_than_poisson() -> None:
    poisson = gap_cv(Poisson(1.0).times(np.random.default_rng(0), 20000))
    gamma = gap_cv(Gamma(1.0, cv=3.0).times(np.random.default_rng(0), 20000))
    assert abs(poisson - 1.0) < 0.05 and abs(gamma - 3.0) < 0.3


def test_mmpp_counts_are_overdispersed() -> None:
    times = MMPP(0.2, 3.8, mean_dwell_s=30.0).times(np.random.default_rng(0), 20000)
    counts = np.bincount((times // 10.0).astype(int))
    poisson_counts = np.bincount((Poisson(2.0).times(np.random.default_rng(0), 20000) // 10.0).astype(int))
    assert counts.var() / counts.mean() > 5 * poisson_counts.var() / poisson_counts.mean()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Poisson(0.0), "Poisson.rate_per_s"),
        (lambda: Poisson(float("inf")), "Poisson.rate_per_s"),
        (lambda: Gamma(1.0, cv=0.0), "Gamma.cv"),
        (lambda: Gamma(-1.0), "Gamma.rate_per_s"),
        (lambda: MMPP(2.0, 1.0, 10.0), "MMPP.rate_low"),
        (lambda: MMPP(0.0, 1.0, 0.0), "MMPP.mean_dwell_s"),
        (lambda: Poisson(1.0).times(np.random.default_rng(0), -1), "num_jobs"),
        (lambda: Workload(arrival="uniform"), "Workload.arrival"),
        (lambda: Workload(arrival_rate=0.0), "Workload.arrival_rate"),
        (lambda: Workload(num_jobs=0), "Workload.num_jobs"),
        (lambda: Workload(think_time_s=-1.0), "Workload.think_time_s"),
        (lambda: ClosedLoop(ReactChain(), 0, 10, 1.0, 0), "ClosedLoop.num_users"),
    ],
)
def test_bad_parameters_fail_with_a_message_naming_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def run_closed_loop(source, num_users: int) -> list:
    """Serve each job for 1 s per call (a stand-in engine); check the in-flight bound as we go."""
    released = list(source.initial_jobs())
    finishing = [(job.arrival_s + len(job.calls), job.job_id, job) for job in released]
    heapq.heapify(finishing)
    while finishing:
        assert len(finishing) <= num_users  # released and not yet finished
        now_s, _, job = heapq.heappop(finishing)
        for new in source.on_job_finished(job, now_s):
            assert new.arrival_s >= now_s
            released.append(new)
            heapq.heappush(finishing, (new.arrival_s + len(new.calls), new.job_id, new))
    return released


@pytest.mark.parametrize(("num_users", "num_jobs"), [(1, 5), (4, 50), (10, 3)])
def test_closed_loop_caps_jobs_in_flight_and_releases_all(num_users: int, num_jobs: int) -> None:
    workload = Workload(
        MapReduce(), arrival="closed", num_jobs=num_jobs, num_users=num_users, think_time_s=2.0
    )
    released = run_closed_loop(workload.build(3), num_users)
    assert sorted(job.job_id for job in released) == sorted(f"j{i}" for i in range(num_jobs))
    assert all(job.arrival_s >= 0 for job in released)
    assert [(j.job_id, j.arrival_s) for j in run_closed_loop(workload.build(3), num_users)] == [
        (j.job_id, j.arrival_s) for j in released
    ]


def test_closed_loop_rejects_jobs_it_did_not_release() -> None:
    source = ClosedLoop(ReactChain(), 2, 4, 1.0, 0)
    stranger = ReactChain().sample(np.random.default_rng(0), "x9", 0.0)
    with pytest.raises(ValueError, match="not released"):
        source.on_job_finished(stranger, 1.0)


@pytest.mark.parametrize("arrival", ["poisson", "gamma", "mmpp", "closed"])
def test_same_seed_same_jobs_different_seed_different_jobs(arrival: str) -> None:
    workload = Workload(ReactChain(), arrival=arrival, arrival_rate=2.0, num_jobs=30, num_users=4)
    first, second, other = (list(workload.build(seed).initial_jobs()) for seed in (5, 5, 6))
    assert first == second and first != other
    if arrival != "closed":
        source = workload.build(5)
        assert isinstance(source, FixedJobs) and [j.job_id for j in first] == [f"j{i}" for i in range(30)]
        times = [j.arrival_s for j in first]
        assert times == sorted(times) and times[0] > 0


# --- degenerate settings fail at construction, naming the value ---------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"arrival_rate": 1e-300},
            r"Workload.arrival_rate=1e-300/s spreads num_jobs=200 arrivals over ~2e\+302 s",
        ),
        ({"arrival_rate": 1e-7, "arrival": "gamma"}, r"arrival_rate=1e-07/s spreads"),
        (
            {"arrival": "closed", "think_time_s": 1e300},
            r"Workload.think_time_s=1e\+300 with num_users=16 spreads",
        ),
        ({"arrival": "mmpp", "mmpp_dwell_s": 1e-9}, r"MMPP.mean_dwell_s=1e-09 .* arrivals per state visit"),
        ({"arrival": "gamma", "burstiness_cv": 1e6}, r"Gamma.cv=1000000.0 is above 30.0: .* arrive at once"),
    ],
)
def test_degenerate_workload_settings_are_config_errors(changes: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        Workload(**changes)


def test_a_heavy_tailed_draw_past_the_clock_span_is_an_error() -> None:
    # mean span 200 / 3e-7 = 6.7e8 s is allowed, but Gamma's heavy tail puts seed 0's last job at 1.3e9 s
    workload = Workload(arrival="gamma", arrival_rate=3e-7, burstiness_cv=10.0, num_jobs=200)
    with pytest.raises(ValueError, match=r"seed 0: the last arrival is at .* s, past 1e\+09 s"):
        workload.build(0)


def test_the_largest_allowed_span_still_resolves_a_microsecond() -> None:
    from servegym.envs.workloads.arrivals import MAX_ARRIVAL_SPAN_S

    assert np.spacing(MAX_ARRIVAL_SPAN_S) < 1e-6
    Workload(arrival_rate=200 / MAX_ARRIVAL_SPAN_S)  # exactly at the limit: allowed
