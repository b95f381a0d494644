"""Every workload option in conf/workload/ composes and builds jobs (a Hydra config that only
fails when a run starts is a trap: workload=mixed once handed its generators over as dicts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from servegym.agents.evaluation.api import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "workload").glob("*.yaml") if p.stem != "trace")


@pytest.mark.parametrize("name", OPTIONS)
def test_workload_option_builds_jobs(name: str) -> None:
    cfg = compose_config([f"workload={name}", "workload.num_jobs=3"], CONF)
    source = instantiate(cfg.workload).build(0)
    jobs = list(source.initial_jobs())
    assert jobs and all(job.calls for job in jobs)


# ---------------------------------------------------------------- scenario families (issue 14)
# mixed_bursty: non-stationary (MMPP calm/burst states); react_long: KV-tight on llama8b_h100.
FAMILIES = ["mixed_bursty", "react_long"]


def build_workload(name: str, *overrides: str):
    return instantiate(compose_config([f"workload={name}", *overrides], CONF).workload)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_deterministic_under_a_seed(name: str) -> None:
    workload = build_workload(name, "workload.num_jobs=12")
    first, again, other = (list(workload.build(s).initial_jobs()) for s in (3, 3, 4))
    assert first == again and first != other


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_every_call_of_every_tree_exactly_once(name: str) -> None:
    """A short run on the default engine (llama8b_h100) drains: every call finished once, every
    block back, no rejection (react_long's longest contexts fit the 8B/H100 cache)."""
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.build import build_engine
    from servegym.envs.engine.calls import CallState

    num_jobs = 6
    cfg = compose_config([f"workload={name}", f"workload.num_jobs={num_jobs}"], CONF)
    engine = build_engine(cfg, seed=10000)
    metrics = engine.run(FCFS())
    engine.check_invariants()
    n, jobs = engine.calls.size, engine.jobs
    assert metrics.complete and not metrics.stalled and metrics.calls_rejected == 0
    assert len(jobs) == num_jobs == metrics.jobs_completed
    assert n == sum(len(job.calls) for job in jobs) == metrics.calls_completed
    assert (engine.calls.state[:n] == CallState.FINISHED).all()
    assert engine.job_table.calls_done[:num_jobs].tolist() == [len(job.calls) for job in jobs]


def test_mixed_bursty_alternates_calm_and_burst_states_at_the_documented_ratio() -> None:
    """The MMPP's busy state brings 25x the calm state's rate (measured over the state path),
    the long-run mean is arrival_rate, and the gaps' CV is Mooncake's 3.0 at load 4."""
    from servegym.agents.evaluation.api import apply_load
    from servegym.envs.workloads.arrivals import MMPP

    workload = build_workload("mixed_bursty")
    process = workload.arrival_process()
    assert isinstance(process, MMPP) and process.rate_ratio == pytest.approx(25.0)
    assert (process.rate_low + process.rate_high) / 2 == pytest.approx(workload.arrival_rate)
    times, visits = process.trajectory(np.random.default_rng(0), 50_000)
    assert np.array_equal(times, process.times(np.random.default_rng(0), 50_000))
    state_of = visits[np.searchsorted(visits[:, 1], times), 2]
    dwell_s = visits[:, 1] - visits[:, 0]
    rate = {s: (state_of == s).sum() / dwell_s[visits[:, 2] == s].sum() for s in (0, 1)}
    assert rate[1] / rate[0] == pytest.approx(25.0, rel=0.15)
    assert dwell_s.mean() == pytest.approx(workload.mmpp_dwell_s, rel=0.1)
    assert len(times) / times[-1] == pytest.approx(workload.arrival_rate, rel=0.1)
    loaded = apply_load(workload, 4.0)[0].arrival_process()
    gaps = np.diff(loaded.times(np.random.default_rng(1), 100_000))
    assert loaded.gap_cv() == pytest.approx(3.0, abs=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(loaded.gap_cv(), rel=0.1)
    # a 200-tree run at load 4 sees several calm/burst alternations
    _, run_visits = loaded.trajectory(np.random.default_rng(2), workload.num_jobs)
    assert len(run_visits) >= 4 and set(run_visits[:, 2]) == {0.0, 1.0}


def test_mmpp_gap_cv_matches_simulation_and_poisson() -> None:
    from servegym.envs.workloads.arrivals import MMPP

    assert MMPP(1.0, 1.0, 10.0).gap_cv() == pytest.approx(1.0)
    for process in (MMPP(0.2, 3.8, 30.0), MMPP(0.0, 2.0, 5.0)):
        gaps = np.diff(process.times(np.random.default_rng(0), 200_000))
        assert gaps.std() / gaps.mean() == pytest.approx(process.gap_cv(), rel=0.05)


def test_react_long_contexts_outgrow_the_8b_kv_cache() -> None:
    """react_long's trees reach tens of thousands of tokens of context (SWE-bench-like: ~11
    turns, ~2.6K new tokens a turn), so a few dozen live trees fill llama8b_h100's cache,
    against hundreds for workload=react."""
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.cost_model import load_profile

    profile = load_profile(EngineConfig().profile)
    cache_tokens = profile.kv_budget_bytes / profile.kv_bytes_per_token
    final = {}
    for name in ("react_long", "react"):
        jobs = list(build_workload(name, "workload.num_jobs=300").build(0).initial_jobs())
        final[name] = np.array([job.prompt_tokens(job.calls[-1].call_id) for job in jobs])
        turns = np.array([len(job.calls) for job in jobs])
        if name == "react_long":
            assert turns.mean() == pytest.approx(10.9, rel=0.1)
            assert all(c.tool_latency_s > 0 for job in jobs for c in job.calls[:-1])
    assert 20_000 < final["react_long"].mean() < 45_000 and final["react_long"].max() > 45_000
    assert cache_tokens / final["react_long"].mean() < 25 < 50 < cache_tokens / final["react"].mean()
