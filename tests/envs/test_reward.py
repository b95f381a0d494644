"""The optional reward terms: an SLO miss costs its penalty exactly once per late tree, and the
fairness term costs nothing with equal tenants and something with unequal ones."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.envs.engine.config import EngineConfig
from servegym.envs.serving_env import EnvConfig, SchedulingEnv
from servegym.envs.workloads.generators import MapReduce, Mixed
from servegym.envs.workloads.workload import Workload


def _episode(env: SchedulingEnv, seed: int = 0) -> tuple[float, dict]:
    env.reset(seed=seed)
    total, done, info = 0.0, False, {}
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        done = terminated or truncated
    return total, info


def _env(**reward) -> SchedulingEnv:
    workload = Workload(generator=MapReduce(), arrival_rate=8.0, num_jobs=15)
    env = SchedulingEnv(workload=workload, engine=EngineConfig(max_num_seqs=8), env=EnvConfig(**reward))
    env.action_space.seed(0)
    return env


def test_slo_penalty_counts_each_late_tree_once() -> None:
    base_return, _ = _episode(_env())
    env = _env(slo_s=28.0, slo_miss_penalty=0.5)
    slo_return, info = _episode(env)
    engine = env.engine
    n = len(engine.jobs)
    late = int(((engine.job_table.finish_s[:n] - engine.job_table.arrival_s[:n]) > 28.0).sum())
    assert 0 < late < n  # the setting has both kinds of tree
    assert slo_return == pytest.approx(base_return - 0.5 * late, rel=1e-9)
    assert info["metrics"]["jobs_completed"] == n


def test_fairness_term_is_zero_for_one_tenant_and_negative_for_unequal_ones() -> None:
    base_return, _ = _episode(_env())
    fair_return, _ = _episode(_env(fairness_weight=3.0))
    assert fair_return == base_return  # one tenant: Jain's index is 1
    workload = Workload(generator=Mixed(), arrival_rate=4.0, num_jobs=20)
    plain = SchedulingEnv(workload=workload, env=EnvConfig())
    weighted = SchedulingEnv(workload=workload, env=EnvConfig(fairness_weight=3.0))
    for env in (plain, weighted):
        env.action_space.seed(0)
    (plain_return, _), (weighted_return, _) = _episode(plain), _episode(weighted)
    assert len(weighted.engine.stats.tenant_service) > 1
    assert weighted_return < plain_return


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"slo_miss_penalty": 1.0}, "needs env.slo_s"),
        ({"slo_s": -1.0}, "slo_s"),
        ({"fairness_weight": -0.1}, "fairness_weight"),
        ({"fairness_weight": float("nan")}, "fairness_weight"),
    ],
)
def test_bad_reward_settings_fail_with_the_key_named(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnvConfig(**fields)


def test_default_return_is_still_minus_total_tree_time() -> None:
    env = _env()
    total, _ = _episode(env)
    assert total == pytest.approx(-env.engine.tree_seconds / env.config.time_scale_s)
    assert np.isfinite(total)


def test_reward_group_sets_the_env_terms() -> None:
    from tests.agents.conftest import compose_config

    cfg = compose_config(["reward=slo"])
    assert cfg.env.config.slo_s == 60.0 and cfg.env.config.slo_miss_penalty == 1.0
    assert compose_config([]).env.config.slo_miss_penalty == 0.0
