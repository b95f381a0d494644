"""Model-size routing with role constraints (``ClusterConfig.role_min_params``): a role that
needs a large model runs only there (hard), or pays more output tokens below it (soft)."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS, LlumnixRouting, ThresholdModelRouting
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.workloads.generators import PlanExecuteCritique
from servegym.envs.workloads.job import role_id
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TINY

LARGE = 1e9  # llama1b_h100 has 1.24B parameters, tiny_cpu 0.75M
REPLICAS = ["tiny_cpu", "tiny_cpu", "llama1b_h100"]
ENGINE = EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=400, max_num_seqs=8)
WORKLOAD = Workload(generator=PlanExecuteCritique(**TINY), arrival_rate=50.0, num_jobs=12)


def _run(policy, **cluster) -> Engine:
    engine = Engine(WORKLOAD.build(1), ClusterConfig(replicas=REPLICAS, **cluster), ENGINE)
    engine.run(policy)
    engine.check_invariants()
    assert_all_terminal(engine)
    return engine


def _planner_replicas(engine: Engine) -> np.ndarray:
    calls, n = engine.calls, engine.calls.size
    return calls.replica[:n][calls.role[:n] == role_id("planner")]


@pytest.mark.parametrize("policy", [FCFS, LlumnixRouting, ThresholdModelRouting])
def test_a_hard_minimum_keeps_a_role_on_large_models(policy) -> None:
    free = _run(policy())
    assert (_planner_replicas(free) < 2).any()  # unconstrained, some planners land on a tiny replica
    engine = _run(policy(), role_min_params={"planner": LARGE})
    assert len(_planner_replicas(engine)) == 12 and (_planner_replicas(engine) == 2).all()
    calls, n = engine.calls, engine.calls.size
    assert (calls.replica[:n] != 2).any()  # other roles still use the small replicas
    assert engine.metrics().jobs_completed == 12


def test_a_minimum_no_replica_meets_rejects_the_tree_with_a_reason() -> None:
    engine = _run(FCFS(), role_min_params={"critic": 1e12})
    metrics = engine.metrics()
    assert metrics.jobs_failed == 12 and not metrics.stalled
    assert "no replica has the 1e+12 parameters role 'critic' needs" in metrics.first_rejection


def test_below_the_minimum_a_soft_constraint_costs_output_tokens() -> None:
    factor = 0.5
    engine = _run(FCFS(), role_min_params={"planner": LARGE}, below_min_output_factor=factor)
    calls, n = engine.calls, engine.calls.size
    planners = np.flatnonzero(calls.role[:n] == role_id("planner"))
    small = planners[calls.replica[planners] < 2]
    assert len(small) and (calls.replica[planners] == 2).any()  # round-robin: some of each
    for call in planners.tolist():
        spec = engine.trees.spec(call)
        want = (
            int(np.ceil(spec.output_tokens * (1 + factor))) if calls.replica[call] < 2 else spec.output_tokens
        )
        assert calls.true_output_tokens[call] == want
        assert calls.num_output[call] == min(want, spec.max_tokens)
    # a router told the constraint pays it only when it must: never here (a large replica is up)
    aware = _run(
        ThresholdModelRouting(role_min_params={"planner": LARGE}),
        role_min_params={"planner": LARGE},
        below_min_output_factor=factor,
    )
    assert (_planner_replicas(aware) == 2).all()


def test_role_constraints_are_checked() -> None:
    with pytest.raises(ValueError, match="role_min_params"):
        ClusterConfig(role_min_params={"planner": 0.0})
    with pytest.raises(ValueError, match="below_min_output_factor"):
        ClusterConfig(below_min_output_factor=-1.0)
