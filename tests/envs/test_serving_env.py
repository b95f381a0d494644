"""The Gymnasium env: checkers, seeding, the reward's meaning, vector envs, bad actions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import assert_all_terminal
from servegym.envs.serving_env import EnvConfig, SchedulingEnv
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload


def small_env(**env_kwargs) -> SchedulingEnv:
    return SchedulingEnv(
        workload=Workload(generator=MapReduce(fan_out=6, max_tokens=256), arrival_rate=6.0, num_jobs=8),
        engine=EngineConfig(num_gpu_blocks=600, max_num_seqs=8),
        env=EnvConfig(**env_kwargs),
    )


def rollout(env: gym.Env, seed: int, policy_seed: int = 0) -> tuple[list[float], list[np.ndarray], dict]:
    rng = np.random.default_rng(policy_seed)
    obs, _ = env.reset(seed=seed)
    rewards, observations = [], [obs["candidates"].copy()]
    while True:
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
        rewards.append(reward)
        observations.append(obs["candidates"].copy())
        if terminated or truncated:
            return rewards, observations, info


def test_gymnasium_and_sb3_checkers_pass() -> None:
    gym_check_env(small_env(), skip_render_check=True)
    sb3_check_env(small_env(), warn=True)


def test_registered_id_makes_the_env() -> None:
    env = gym.make("servegym/Scheduling-v0", env=EnvConfig(max_candidates=8))
    obs, info = env.reset(seed=0)
    assert obs["candidates"].shape == (8, env.observation_space["candidates"].shape[1])
    assert info["decision"] in ("order", "evict")


def test_same_seed_same_episode_and_return_is_total_tree_time() -> None:
    a, b, c = small_env(), small_env(), small_env()
    rewards_a, obs_a, info_a = rollout(a, seed=3)
    rewards_b, obs_b, _ = rollout(b, seed=3)
    rewards_c, _, _ = rollout(c, seed=4)
    assert rewards_a == rewards_b and all(np.array_equal(x, y) for x, y in zip(obs_a, obs_b, strict=True))
    assert rewards_a != rewards_c
    engine = a.engine
    jobs = len(engine.jobs)
    total_tree_s = float((engine.job_table.finish_s[:jobs] - engine.job_table.arrival_s[:jobs]).sum())
    assert sum(rewards_a) == pytest.approx(-total_tree_s / a.config.time_scale_s, rel=1e-9)
    assert info_a["metrics"]["jobs_completed"] == jobs


def test_random_actions_keep_every_engine_invariant() -> None:
    env = small_env(max_candidates=4)
    steps = 0
    for seed in range(3):
        rewards, _, info = rollout(env, seed=seed, policy_seed=seed)
        steps += len(rewards)
        assert_all_terminal(env.engine)
        for replica in env.engine.replicas:
            replica.blocks.check_invariants()
            assert replica.blocks.num_free_blocks == replica.blocks.num_blocks
        assert not info["metrics"]["stalled"]
    assert steps > 30  # the workload really asks for decisions


def test_more_candidates_than_slots_are_served_after_the_seen_ones() -> None:
    env = small_env(max_candidates=2)
    obs, _ = env.reset(seed=1)
    seen_overflow = False
    done = False
    while not done:
        seen_overflow |= len(env._decision) > 2
        obs, _, terminated, truncated, _ = env.step(np.ones(2, dtype=np.float32))
        done = terminated or truncated
    assert seen_overflow
    assert env.engine.metrics().jobs_completed == len(env.engine.jobs)


def test_vector_env_steps() -> None:
    envs = gym.vector.SyncVectorEnv([small_env, small_env])
    obs, _ = envs.reset(seed=[0, 1])
    assert obs["candidates"].shape[0] == 2
    for _ in range(20):
        obs, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
        assert rewards.shape == (2,) and np.all(rewards <= 0)
    envs.close()


def test_bad_actions_and_configs_fail_clearly() -> None:
    env = small_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(env.action_space.shape, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3, dtype=np.float32))
    env.step(np.full(env.action_space.shape, 7.0, dtype=np.float32))  # clipped, not an error
    with pytest.raises(ValueError, match="env.decisions"):
        EnvConfig(decisions=("order", "reorder"))
    with pytest.raises(ValueError, match="max_candidates"):
        EnvConfig(max_candidates=0)


def test_horizon_truncates() -> None:
    env = small_env(horizon_s=2.0)
    _, _, info = rollout(env, seed=0)
    assert env.engine.now_s >= 2.0
    assert "metrics" in info
