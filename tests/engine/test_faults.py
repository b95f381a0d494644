"""Tool failures (timeout and retry) and network jitter (ClusterConfig): a call's faults are
drawn from (fault_seed, job index, call index) alone, so every policy meets the same ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS, PredictedTreeSRPT
from servegym.envs.engine.config import ClusterConfig, EngineConfig, Slowdown
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TINY

ENGINE = EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=300, max_num_seqs=4)


def _run(policy, cluster: ClusterConfig, seed: int = 0) -> Engine:
    workload = Workload(generator=ReactChain(turns_mean=5.0, **TINY), arrival_rate=4.0, num_jobs=10)
    engine = Engine(workload.build(seed), cluster=cluster, engine=ENGINE)
    engine.run(policy)
    engine.check_invariants()
    assert_all_terminal(engine)
    return engine


def _tools(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    calls, n = engine.calls, engine.calls.size
    return calls.tool_latency_s[:n].copy(), calls.tool_failures[:n].copy()


def test_every_policy_meets_the_same_faults() -> None:
    cluster = ClusterConfig(tool_failure_prob=0.4, tool_timeout_s=3.0, network_jitter_s=0.5, fault_seed=7)
    a, b = _run(FCFS(), cluster), _run(PredictedTreeSRPT(), cluster)
    order_a = np.lexsort((a.calls.call_in_job[: a.calls.size], a.calls.job[: a.calls.size]))
    order_b = np.lexsort((b.calls.call_in_job[: b.calls.size], b.calls.job[: b.calls.size]))
    for x, y in zip(_tools(a), _tools(b), strict=True):
        np.testing.assert_array_equal(x[order_a], y[order_b])
    assert a.metrics().tool_failures == b.metrics().tool_failures > 0
    other = _run(FCFS(), dataclasses.replace(cluster, fault_seed=8))
    assert not np.array_equal(_tools(other)[0], _tools(a)[0])  # the seed is what draws them


def test_a_tool_that_always_fails_costs_every_timeout_and_the_tree_goes_on() -> None:
    plain = _run(FCFS(), ClusterConfig())
    failing = _run(FCFS(), ClusterConfig(tool_failure_prob=1.0, tool_timeout_s=2.0, tool_retries=2))
    latency, failures = _tools(plain)[0], _tools(failing)[1]
    tools = latency > 0
    assert tools.any() and (failures[tools] == 3).all() and (failures[~tools] == 0).all()
    np.testing.assert_allclose(_tools(failing)[0][tools], 6.0)  # three timeouts, no latency
    assert failing.metrics().tool_failures == 3 * int(tools.sum())
    assert failing.metrics().jobs_completed == plain.metrics().jobs_completed == 10
    assert failing.metrics().jct_mean_s > plain.metrics().jct_mean_s


def test_failure_and_jitter_rates() -> None:
    """Over many calls: failures ~ Binomial (truncated at the retries), jitter ~ Exp(mean)."""
    p, jitter = 0.25, 0.3
    engine = _run(FCFS(), ClusterConfig(tool_failure_prob=p, tool_retries=0, tool_timeout_s=1.0))
    latency, failures = _tools(_run(FCFS(), ClusterConfig()))[0], _tools(engine)[1]
    rate = failures[latency > 0].mean()
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / (latency > 0).sum())
    jittered = _tools(_run(FCFS(), ClusterConfig(network_jitter_s=jitter)))[0]
    extra = jittered - latency
    assert (extra > 0).all() and abs(extra.mean() - jitter) < 4 * jitter / np.sqrt(len(extra))


def test_no_faults_is_the_engine_as_before() -> None:
    """Probability 0 and no jitter draw nothing: the run equals one without the fault keys."""
    base = _run(FCFS(), ClusterConfig()).metrics().as_dict()
    off = _run(FCFS(), ClusterConfig(tool_failure_prob=0.0, tool_timeout_s=99.0, fault_seed=3)).metrics()
    np.testing.assert_equal(off.as_dict(), base)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tool_failure_prob", 1.5),
        ("tool_failure_prob", -0.1),
        ("tool_timeout_s", -1.0),
        ("tool_retries", -1),
        ("network_jitter_s", float("nan")),
        ("fault_seed", -2),
    ],
)
def test_bad_fault_settings_are_refused(key: str, value) -> None:
    with pytest.raises(ValueError, match=f"cluster.{key}"):
        ClusterConfig(**{key: value})


def test_a_slowdown_window_slows_only_what_runs_in_it() -> None:
    plain = _run(FCFS(), ClusterConfig())
    end = float(np.nanmax(plain.calls.finish_s[: plain.calls.size]))
    late = _run(FCFS(), ClusterConfig(slowdowns=[Slowdown(0, start_s=end + 1.0, duration_s=5.0)]))
    np.testing.assert_equal(late.metrics().as_dict(), plain.metrics().as_dict())  # after the work: nothing
    slow = _run(FCFS(), ClusterConfig(slowdowns=[Slowdown(0, start_s=0.0, duration_s=end, factor=4.0)]))
    assert slow.replicas[0].busy_s > 2.5 * plain.replicas[0].busy_s  # compute, not tool pauses
    assert slow.metrics().jct_mean_s > plain.metrics().jct_mean_s
    assert slow.metrics().jobs_completed == 10


@pytest.mark.parametrize("fast_forward", [True, False])
def test_slowdown_equals_under_stepping_and_folding(fast_forward: bool) -> None:
    """A window opening in the middle of a folded decode run cuts it there: folding and
    stepping give the same clock, bit for bit."""
    cluster = ClusterConfig(slowdowns=[Slowdown(0, start_s=0.137, duration_s=0.31, factor=3.0)])
    workload = Workload(generator=ReactChain(turns_mean=5.0, **TINY), arrival_rate=4.0, num_jobs=10)

    def finish(ff: bool) -> np.ndarray:
        engine = Engine(
            workload.build(1), cluster=cluster, engine=dataclasses.replace(ENGINE, fast_forward=ff)
        )
        engine.run(FCFS())
        return engine.calls.finish_s[: engine.calls.size]

    np.testing.assert_array_equal(finish(fast_forward), finish(False))


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        ([Slowdown(0, 1.0, 2.0), Slowdown(0, 2.5, 1.0)], "overlap"),
        ([Slowdown(3, 1.0, 2.0)], "does not exist"),
    ],
)
def test_bad_slowdowns_are_refused(windows, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(num_replicas=2, slowdowns=windows)
    with pytest.raises(ValueError, match="factor"):
        Slowdown(0, 0.0, 1.0, factor=0.5)
