"""The input-driven reward baseline and shared workload groups (agents/rl/input_baseline.py):
the curve is the engine's own tree-seconds, the baseline adds up to a constant of the workload
whatever the policy does, a policy equal to the reference gets a return of zero, and groups
replay the same workloads."""

from __future__ import annotations

from collections import OrderedDict

import gymnasium as gym
import numpy as np
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.agents.rl.input_baseline import ReferenceBaseline, SharedWorkloads, TreeSecondsCurve
from servegym.envs.engine.policy import DefaultPolicy
from tests.envs.small import small_kwargs

ID = "servegym/PickNext-v0"


def make(**overrides) -> gym.Env:
    kwargs = {**small_kwargs(ID), **overrides}
    return gym.make(ID, **kwargs)


class Recorder:
    """FCFS that notes the engine's tree-seconds at every decision it answers."""

    def __init__(self) -> None:
        self.inner, self.engine, self.seen = DefaultPolicy(), None, []

    def scores(self, decision):
        self.seen.append((self.engine.now_s, self.engine.tree_seconds))
        return self.inner.scores(decision)


def test_curve_is_the_engines_tree_seconds_at_every_decision() -> None:
    env = make().unwrapped
    engine = env.build_engine(7)
    policy = Recorder()
    policy.engine = engine
    engine.run(policy)
    curve = TreeSecondsCurve.of(engine)
    assert len(policy.seen) > 20
    for now_s, tree_seconds in policy.seen:
        assert curve(now_s) == pytest.approx(tree_seconds, rel=1e-12, abs=1e-9)
    assert curve.total == pytest.approx(engine.tree_seconds, rel=1e-12)
    assert curve(engine.now_s + 100.0) == curve.total and curve(-1.0) == 0.0


def test_curve_refuses_unfinished_or_negative_trees() -> None:
    with pytest.raises(ValueError, match="finish"):
        TreeSecondsCurve(np.array([0.0, 1.0]), np.array([2.0, np.nan]))
    with pytest.raises(ValueError, match="finish"):
        TreeSecondsCurve(np.array([3.0]), np.array([2.0]))


def random_choice(rng: np.random.Generator):
    return lambda _env, mask: int(rng.choice(np.flatnonzero(mask)))


def fcfs_choice(env, mask) -> int:
    """The slot of the call FCFS (DefaultPolicy) picks: the env then runs FCFS exactly."""
    return env.policy_slot(DefaultPolicy())[0]


@pytest.mark.parametrize("workload_seed", [3, 11])
def test_baseline_adds_up_to_the_references_cost_whatever_the_policy(workload_seed: int) -> None:
    raw, shaped = make(), ReferenceBaseline(make(), DefaultPolicy)
    options = {"workload_seed": workload_seed}
    scale = raw.unwrapped.config.time_scale_s
    differences = []
    for policy_seed in (0, 1, 2):
        raw_return, _ = episode_with(raw, random_choice(np.random.default_rng(policy_seed)), options)
        shaped_return, info = episode_with(shaped, random_choice(np.random.default_rng(policy_seed)), options)
        differences.append(shaped_return - raw_return)
        assert info["reference_s"] / scale == pytest.approx(shaped_return - raw_return, rel=1e-9)
    assert np.ptp(differences) < 1e-9 * abs(differences[0])  # a constant of the workload
    assert raw_return != pytest.approx(-differences[0])  # random is not the reference


def episode_with(env: gym.Env, choose, options: dict) -> tuple[float, dict]:
    """Total reward of one episode on ``options``' workload, acting with ``choose(env, mask)``."""
    env.reset(options=options)
    total, info = 0.0, {}
    while True:
        mask = env.unwrapped.action_masks()
        _, reward, terminated, truncated, info = env.step(choose(env.unwrapped, mask))
        total += reward
        if terminated or truncated:
            return total, info


def test_acting_as_the_reference_scores_zero_at_every_step() -> None:
    env = ReferenceBaseline(make(env=small_kwargs(ID)["env"].__class__(max_candidates=64)), DefaultPolicy)
    env.reset(options={"workload_seed": 5})
    steps = 0
    while True:
        mask = env.unwrapped.action_masks()
        _, reward, terminated, truncated, _ = env.step(fcfs_choice(env.unwrapped, mask))
        assert reward == pytest.approx(0.0, abs=1e-9)  # the same schedule: the same tree-seconds
        steps += 1
        if terminated or truncated:
            break
    assert terminated and steps > 10


def test_reference_runs_are_cached_per_workload() -> None:
    runs = []

    def counting_policy():
        runs.append(1)
        return DefaultPolicy()

    env = ReferenceBaseline(make(), counting_policy, cache_size=2)
    for seed in (1, 2, 1, 2, 3, 1):
        env.reset(options={"workload_seed": seed})
    assert len(runs) == 4  # 1, 2 computed; 1, 2 cached; 3 evicts 1; 1 again
    shared: OrderedDict = OrderedDict()
    copies = [ReferenceBaseline(make(), counting_policy, curves=shared) for _ in range(2)]
    runs.clear()
    for env in copies:
        env.reset(options={"workload_seed": 7})
    assert len(runs) == 1  # copies of a group compute a workload's reference once


def test_shared_workloads_replay_the_same_stream_per_group() -> None:
    def seeds(group_seed: int, env_seed: int) -> list[int]:
        env = SharedWorkloads(make(), group_seed=group_seed)
        out = []
        for i in range(4):
            env.reset(seed=env_seed if i == 0 else None)
            out.append(env.unwrapped.workload_seed)
        return out

    assert seeds(0, env_seed=1) == seeds(0, env_seed=2)  # copies differ in seed, not in workload
    assert seeds(0, env_seed=1) != seeds(1, env_seed=1)
    assert len(set(seeds(0, env_seed=1))) == 4
    env = SharedWorkloads(make(), group_seed=0)
    env.reset(options={"workload_seed": 99})
    assert env.unwrapped.workload_seed == 99


def test_wrappers_refuse_a_non_engine_env() -> None:
    with pytest.raises(TypeError, match="not a servegym engine env"):
        SharedWorkloads(gym.make("CartPole-v1"), group_seed=0)


PICKNEXT_TINY = [
    "experiment=picknext",
    "workload.num_jobs=6",
    "train.n_envs=2",
    "train.vec_env=dummy",
    "agent.hyperparams.n_steps=32",
    "agent.hyperparams.batch_size=32",
    "agent.network.hidden=16",
]


def test_training_envs_share_workloads_and_subtract_the_reference() -> None:
    from servegym.agents.rl.train import make_train_venv
    from tests.agents.conftest import compose_config

    cfg = compose_config([*PICKNEXT_TINY, "train.group_size=2", "train.reward_baseline=fcfs"])
    venv = make_train_venv(cfg)
    venv.reset()
    seeds = venv.get_attr("workload_seed")
    assert seeds[0] == seeds[1]  # one group of two copies: the same workload
    assert all(isinstance(env, ReferenceBaseline) for env in venv.envs)
    assert venv.envs[0]._curves is venv.envs[1]._curves  # one cache per group
    venv.close()
    cfg = compose_config([*PICKNEXT_TINY, "train.group_size=1"])
    venv = make_train_venv(cfg)
    venv.reset()
    assert len(set(venv.get_attr("workload_seed"))) == 2
    venv.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.reward_baseline=fcfs", "agent.hyperparams.gamma=0.99"], "needs agent.hyperparams.gamma=1.0"),
        (["train.group_size=3"], "train.group_size must be >= 1 and divide train.n_envs=2"),
        (["train.reward_baseline=nosuch"], "no conf/agent/nosuch.yaml"),
    ],
)
def test_bad_baseline_settings_are_refused_by_name(overrides: list[str], message: str) -> None:
    from servegym.agents.rl.configs import train_config
    from servegym.agents.rl.train import make_train_venv
    from tests.agents.conftest import compose_config

    cfg = compose_config([*PICKNEXT_TINY, *overrides])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_config(cfg)
        make_train_venv(cfg)
