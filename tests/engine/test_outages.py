"""Replica outages (``ClusterConfig.outages``): a replica that goes down loses its KV and its
calls are requeued to the replicas that are up; nothing is lost, only recomputed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS, PredictedTreeSRPT
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.config import ClusterConfig, EngineConfig, Outage
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TINY

ENGINE = EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=300, max_num_seqs=4)
WORKLOAD = Workload(generator=ReactChain(turns_mean=5.0, **TINY), arrival_rate=100.0, num_jobs=24)


class Watch:
    """FCFS that records, at every decision, which calls each replica holds."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.fcfs, self.held = engine, FCFS(), []

    def scores(self, decision) -> np.ndarray:
        for replica in self.engine.replicas:
            self.held.append((self.engine.now_s, replica.index, len(replica.running) + len(replica.waiting)))
        return self.fcfs.scores(decision)


def _run(cluster: ClusterConfig, config: EngineConfig = ENGINE, policy=None, seed: int = 0) -> Engine:
    engine = Engine(WORKLOAD.build(seed), cluster=cluster, engine=config)
    engine.run(policy or FCFS())
    engine.check_invariants()  # drained: every call terminal and counted once, every block back
    assert_all_terminal(engine)
    return engine


def test_an_outage_requeues_a_replicas_calls_and_loses_nothing() -> None:
    window = Outage(replica=0, start_s=0.1, duration_s=1.5)
    engine = Engine(WORKLOAD.build(0), cluster=ClusterConfig(num_replicas=2, outages=[window]), engine=ENGINE)
    watch = Watch(engine)
    metrics = engine.run(watch)
    engine.check_invariants()
    assert_all_terminal(engine)
    plain = _run(ClusterConfig(num_replicas=2))
    assert metrics.jobs_completed == 24 and metrics.calls_completed == plain.metrics().calls_completed
    assert (engine.calls.state[: engine.calls.size] == CallState.FINISHED).all()
    assert metrics.requeued_calls > 0 and engine.replicas[0].num_outages == 1
    assert metrics.recomputed_tokens > plain.metrics().recomputed_tokens  # the lost KV was recomputed
    # while down, replica 0 holds nothing and nothing is enqueued there
    assert all(n == 0 for t, r, n in watch.held if r == 0 and window.start_s <= t < window.end_s)
    calls, n = engine.calls, engine.calls.size
    on_zero = calls.replica[:n] == 0
    assert not (
        on_zero & (calls.enqueue_s[:n] >= window.start_s) & (calls.enqueue_s[:n] < window.end_s)
    ).any()
    samples = engine.kv_samples.array()
    during = (samples[:, 0] >= window.start_s) & (samples[:, 0] < window.end_s)
    assert not (during & (samples[:, 1] == 0)).any()  # it ran no iteration
    assert (during & (samples[:, 1] == 1)).any()
    assert metrics.jct_mean_s >= plain.metrics().jct_mean_s * 0.95


def test_with_every_replica_down_calls_wait_for_the_first_back() -> None:
    window = Outage(replica=0, start_s=0.1, duration_s=1.0)
    engine = _run(ClusterConfig(outages=[window]))
    samples = engine.kv_samples.array()
    assert not ((samples[:, 0] >= window.start_s) & (samples[:, 0] < window.end_s)).any()
    calls, n = engine.calls, engine.calls.size
    started = calls.first_token_s[:n]
    assert not ((started > window.start_s) & (started < window.end_s)).any()
    assert engine.metrics().jobs_completed == 24 and engine.metrics().requeued_calls > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_outages_are_deterministic_and_compose_with_pins_and_faults(mode: str) -> None:
    cluster = ClusterConfig(
        num_replicas=2,
        outages=[Outage(0, 0.1, 1.5), Outage(1, 0.5, 1.0), Outage(0, 3.0, 0.5)],
        tool_failure_prob=0.2,
        tool_timeout_s=0.5,
        network_delay_s=0.01,
    )
    config = dataclasses.replace(
        ENGINE, preemption_mode=mode, num_gpu_blocks=160, pin_ttl_rule="tool_mean", swap_space_bytes=1e6
    )
    a = _run(cluster, config, PredictedTreeSRPT())
    b = _run(cluster, config, PredictedTreeSRPT())
    assert repr(a.metrics().as_dict()) == repr(b.metrics().as_dict())
    assert a.metrics().requeued_calls > 0 and sum(r.num_outages for r in a.replicas) == 3


def test_outage_config_is_checked() -> None:
    with pytest.raises(ValueError, match="overlap"):
        ClusterConfig(num_replicas=2, outages=[Outage(0, 0.0, 2.0), Outage(0, 1.0, 1.0)])
    with pytest.raises(ValueError, match="does not exist"):
        ClusterConfig(num_replicas=2, outages=[{"replica": 2, "start_s": 0.0, "duration_s": 1.0}])
    with pytest.raises(ValueError, match="duration_s"):
        Outage(0, 0.0, 0.0)
