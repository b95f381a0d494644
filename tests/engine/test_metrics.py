"""Run metrics the evaluation suite reports: fairness, the large model's share, evictions, SLOs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import jain_index, job_completion_s, slo_metrics
from servegym.envs.engine.policy import ROUTE_FEATURES, Decision, DecisionKind
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload

_PARAMS = ROUTE_FEATURES.index("model_params_log10")


def run(num_jobs: int = 8, rate: float = 4.0, policy=None, **engine_kwargs) -> Engine:
    cluster = engine_kwargs.pop("cluster", None)
    workload = Workload(generator=MapReduce(), arrival_rate=rate, num_jobs=num_jobs)
    engine = Engine(workload.build(3), cluster=cluster, engine=EngineConfig(**engine_kwargs))
    engine.run(policy or FCFS())
    return engine


def test_jain_index_equal_one_one_hot_one_over_n() -> None:
    assert jain_index(np.ones(5)) == pytest.approx(1.0)
    assert jain_index(np.array([0.0, 7.0, 0.0])) == pytest.approx(1 / 3)
    assert jain_index(np.zeros(3)) == 1.0
    assert math.isnan(jain_index(np.array([])))


def test_call_and_tree_metrics_agree_with_the_call_table() -> None:
    engine = run()
    m = engine.metrics()
    calls, n = engine.calls, engine.calls.size
    ttft = calls.first_token_s[:n] - calls.ready_s[:n]
    assert m.max_wait_s == pytest.approx(ttft.max()) and m.ttft_mean_s == pytest.approx(ttft.mean())
    assert m.ttft_p50_s <= m.ttft_p95_s <= m.ttft_p99_s <= m.max_wait_s
    assert m.jct_p50_s <= m.jct_p90_s <= m.jct_p95_s <= m.jct_p99_s
    jct = job_completion_s(engine)
    tokens = np.bincount(calls.job[:n], weights=calls.num_output[:n])
    assert m.jct_per_output_token_s == pytest.approx(np.mean(jct / tokens))
    assert m.num_tenants == 1 and m.jain_tenant_jct == 1.0 and m.jain_tenant_service == 1.0
    assert math.isnan(m.large_model_call_share)  # one model size: not applicable


class PreferModel:
    """Routes every call to the largest (or smallest) model; FCFS otherwise."""

    def __init__(self, large: bool) -> None:
        self.large, self.fcfs = large, FCFS()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind != DecisionKind.ROUTE:
            return self.fcfs.scores(decision)
        params = decision.features[:, _PARAMS].astype(np.float64)
        return params if self.large else -params


@pytest.mark.parametrize(("large", "share"), [(True, 1.0), (False, 0.0)])
def test_large_model_call_share(large: bool, share: float) -> None:
    cluster = ClusterConfig(replicas=["llama8b_h100", "llama70b_h100x4"])
    m = run(num_jobs=4, policy=PreferModel(large), cluster=cluster).metrics()
    assert m.large_model_call_share == share


def test_prefix_evictions_counted_only_when_the_cache_is_short() -> None:
    roomy = run(num_jobs=10, rate=0.2).metrics()
    assert roomy.evictions == 0
    # room for one tree's worth of blocks: later trees reclaim earlier trees' cached prefixes
    tight = run(num_jobs=10, rate=0.2, block_size=16, num_gpu_blocks=700).metrics()
    assert tight.evictions > 0 and tight.jobs_completed == 10


def test_slo_attainment_and_goodput() -> None:
    engine = run()
    m = engine.metrics()
    jct = job_completion_s(engine)
    unloaded = jct / 2.0
    met_all = slo_metrics(engine, jct, unloaded, m.makespan_s)  # an SLO equal to the time is met
    assert met_all.slo_attainment == 1.0
    assert met_all.goodput_jobs_per_s == pytest.approx(len(jct) / m.makespan_s)
    assert met_all.slowdown_mean == pytest.approx(2.0) and met_all.jain_job_speed == pytest.approx(1.0)
    half = slo_metrics(engine, np.where(np.arange(len(jct)) % 2 == 0, jct, jct / 2), unloaded, m.makespan_s)
    assert half.slo_attainment == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one value per job"):
        slo_metrics(engine, jct[:-1], unloaded, m.makespan_s)
