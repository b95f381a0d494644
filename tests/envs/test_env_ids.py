"""Every registered env id: checkers, seeding, the return's meaning, vector envs, masks and
invalid actions, and a MaskablePPO smoke run on the discrete-choice envs."""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from servegym.envs import ENV_IDS
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    ROUTE_FEATURES,
    DecisionKind,
    DefaultPolicy,
)
from servegym.envs.eviction_env import EvictionEnv
from servegym.envs.routing_env import RoutingEnv
from servegym.envs.serving_env import EnvConfig, SchedulingEnv, ServingEnv
from servegym.envs.workloads.job import Call, Job, Text
from servegym.envs.workloads.source import FixedJobs

from .small import random_action, small_kwargs

G = len(GLOBAL_FEATURES) + len(DecisionKind)
DISCRETE_IDS = ("servegym/Eviction-v0", "servegym/Routing-v0")


def make(env_id: str) -> gym.Env:
    return gym.make(env_id, **small_kwargs(env_id))


def rollout(env: gym.Env, seed: int, policy_seed: int = 0):
    rng = np.random.default_rng(policy_seed)
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    while True:
        obs, reward, terminated, truncated, info = env.step(random_action(env, rng))
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            return observations, rewards, info


def same_obs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


# ---------------------------------------------------------------- API conformance
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_and_sb3_checkers_pass(env_id: str) -> None:
    gym_check_env(make(env_id).unwrapped, skip_render_check=True)
    sb3_check_env(make(env_id).unwrapped, warn=True)


@pytest.mark.parametrize(
    ("env_id", "keys", "kinds"),
    [
        ("servegym/Scheduling-v0", ("global", "candidates", "mask"), ("order", "evict")),
        ("servegym/Eviction-v0", ("global", "candidates", "mask"), ("evict",)),
        ("servegym/Routing-v0", ("global", "replicas", "mask"), ("route",)),
        ("servegym/Serving-v0", ("global", "candidates", "replicas", "mask"), ("order", "evict", "route")),
    ],
)
def test_registered_defaults_have_the_documented_spaces(env_id: str, keys: tuple, kinds: tuple) -> None:
    env = gym.make(env_id)
    spec = gym.spec(env_id)
    assert spec.max_episode_steps is None
    assert set(env.observation_space.spaces) == set(keys)
    assert env.observation_space["global"].shape == (G,)
    assert env.unwrapped.config.decisions == kinds
    k = env.unwrapped.config.max_candidates
    if "candidates" in keys:
        assert env.observation_space["candidates"].shape == (k, len(CANDIDATE_FEATURES))
    if env_id == "servegym/Routing-v0":
        assert env.unwrapped.num_replicas == 3
        assert env.observation_space["replicas"].shape == (3, len(ROUTE_FEATURES))
        assert env.action_space == gym.spaces.Discrete(3)
    elif env_id == "servegym/Eviction-v0":
        assert env.action_space == gym.spaces.Discrete(k)
    else:
        assert env.action_space.shape == (k,)
    if env_id == "servegym/Serving-v0":
        assert env.observation_space["replicas"].shape == (k, len(ROUTE_FEATURES))
    _, info = env.reset(seed=0)
    assert info["decision"] in kinds


# ---------------------------------------------------------------- seeding and the return
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_same_episode_and_return_is_total_tree_time(env_id: str) -> None:
    a, b, c = make(env_id), make(env_id), make(env_id)
    obs_a, rewards_a, info_a = rollout(a, seed=3)
    obs_b, rewards_b, _ = rollout(b, seed=3)
    obs_c, rewards_c, _ = rollout(c, seed=4)
    assert rewards_a == rewards_b and all(same_obs(x, y) for x, y in zip(obs_a, obs_b, strict=True))
    assert rewards_a != rewards_c
    again, rewards_again, _ = rollout(a, seed=3)  # a reset of a used env replays it too
    assert rewards_again == rewards_a and all(same_obs(x, y) for x, y in zip(obs_a, again, strict=True))
    engine = a.unwrapped.engine
    jobs = len(engine.jobs)
    total_tree_s = float((engine.job_table.finish_s[:jobs] - engine.job_table.arrival_s[:jobs]).sum())
    assert sum(rewards_a) == pytest.approx(-total_tree_s / a.unwrapped.config.time_scale_s, rel=1e-9)
    assert info_a["metrics"]["jobs_completed"] == jobs
    assert len(rewards_a) > 5  # the setting really asks the agent


def test_serving_env_asks_every_kind_of_decision() -> None:
    env = make("servegym/Serving-v0")
    rng = np.random.default_rng(0)
    kinds = set()
    for seed in range(3):
        _, info = env.reset(seed=seed)
        done = False
        while not done:
            kinds.add(info["decision"])
            _, _, terminated, truncated, info = env.step(random_action(env, rng))
            done = terminated or truncated
    assert kinds == {"order", "evict", "route"}


# ---------------------------------------------------------------- observations and actions
@pytest.mark.parametrize("env_id", DISCRETE_IDS)
def test_action_masks_match_the_observed_mask(env_id: str) -> None:
    env = make(env_id)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(15):
        mask = env.unwrapped.action_masks()
        assert mask.dtype == bool and mask.shape == (env.action_space.n,)
        assert np.array_equal(mask, obs["mask"].astype(bool)) and mask.any()
        obs, _, terminated, truncated, _ = env.step(random_action(env, rng))
        if terminated or truncated:
            obs, _ = env.reset()


def test_eviction_valid_slot_preempts_that_call() -> None:
    env = make("servegym/Eviction-v0").unwrapped
    env.reset(seed=0)
    decision = env._decision
    slot = min(len(decision), env.action_space.n) - 1
    victim = int(decision.candidates[slot])
    preemptions = int(env.engine.calls.num_preemptions[victim])
    _, _, _, _, info = env.step(slot)
    assert info["invalid_action"] is False
    assert env.engine.calls.num_preemptions[victim] == preemptions + 1


def _first_decision_with_room(env: gym.Env, seed: int) -> list[int]:
    """Step with slot 0 until a decision leaves a masked slot; returns the actions taken."""
    env.reset(seed=seed)
    actions = []
    while env.action_masks().all():
        actions.append(0)
        _, _, terminated, truncated, _ = env.step(0)
        assert not (terminated or truncated), "no decision with a masked slot in this episode"
    return actions


@pytest.mark.parametrize("bad", ["masked", "above", "negative"])
def test_eviction_invalid_action_is_the_fallback_choice(bad: str) -> None:
    env, twin = make("servegym/Eviction-v0").unwrapped, make("servegym/Eviction-v0").unwrapped
    actions = _first_decision_with_room(env, 0)
    twin.reset(seed=0)
    for action in actions:
        twin.step(action)
    decision = env._decision
    k = env.action_space.n
    invalid = {"masked": k - 1, "above": k + 5, "negative": -1}[bad]
    fallback_slot = int(np.argmin(DefaultPolicy().scores(decision)))  # the newest running call
    obs, reward, _, _, info = env.step(invalid)
    twin_obs, twin_reward, _, _, twin_info = twin.step(fallback_slot)
    assert info["invalid_action"] is True and twin_info["invalid_action"] is False
    assert reward == twin_reward and same_obs(obs, twin_obs)


def _model_pinned_jobs() -> list[Job]:
    """Calls pinned to the tiny_cpu model: the llama1b_h100 replica is never eligible."""
    prompt = lambda j: (Text("sys", 32), Text(f"q{j}", 16))  # noqa: E731
    return [
        Job(f"j{j}", 0.01 * j, (Call(0, "worker", prompt(j), 8, 16, model="tiny_cpu"),)) for j in range(6)
    ]


class PinnedWorkload:
    """A workload (anything with ``build(seed)``) of fixed model-pinned jobs."""

    def build(self, seed: int) -> FixedJobs:
        return FixedJobs(_model_pinned_jobs())


def pinned_routing_env() -> RoutingEnv:
    return RoutingEnv(
        workload=PinnedWorkload(),
        cluster=ClusterConfig(replicas=["tiny_cpu", "tiny_cpu", "llama1b_h100"]),
        engine=EngineConfig(profile="tiny_cpu"),
    )


def test_routing_masks_ineligible_replicas_and_routes_where_told() -> None:
    env = pinned_routing_env()
    obs, _ = env.reset(seed=0)
    assert obs["mask"].tolist() == [1.0, 1.0, 0.0]
    assert env.action_masks().tolist() == [True, True, False]
    call = env._decision.call
    _, _, _, _, info = env.step(1)
    assert info["invalid_action"] is False and env.engine.calls.replica[call] == 1


@pytest.mark.parametrize("bad", [2, 3, -1])
def test_routing_invalid_action_is_round_robin(bad: int) -> None:
    env = pinned_routing_env()
    env.reset(seed=0)
    routed = []
    for _ in range(4):
        call = env._decision.call
        _, _, _, _, info = env.step(bad)
        assert info["invalid_action"] is True
        routed.append(int(env.engine.calls.replica[call]))
    assert routed == [0, 1, 0, 1]  # the fallback's round-robin over the eligible replicas


@pytest.mark.parametrize("env_id", DISCRETE_IDS)
def test_discrete_actions_that_are_not_one_integer_fail_clearly(env_id: str) -> None:
    env = make(env_id)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="integer"):
        env.unwrapped.step(1.5)
    with pytest.raises(ValueError, match="one integer"):
        env.unwrapped.step(np.array([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        env.unwrapped.step(float("nan"))
    _, _, _, _, info = env.unwrapped.step(np.array([0]))  # a one-element array is a slot
    assert "invalid_action" in info


def test_serving_route_scores_pick_the_highest_eligible_replica() -> None:
    env = make("servegym/Serving-v0").unwrapped
    obs, info = env.reset(seed=0)
    checked = 0
    rng = np.random.default_rng(0)
    while checked < 5:
        if info["decision"] == "route":
            r = env.num_replicas
            assert obs["mask"][:r].any() and not obs["mask"][r:].any()
            assert not obs["candidates"].any() and obs["replicas"][:r].any()
            assert obs["global"][len(GLOBAL_FEATURES) + DecisionKind.ROUTE] == 1.0
            action = np.full(env.action_space.shape, -1.0, dtype=np.float32)
            target = int(rng.choice(np.flatnonzero(obs["mask"])))
            action[target] = 1.0
            call = env._decision.call
            obs, _, _, _, info = env.step(action)
            assert env.engine.calls.replica[call] == target
            checked += 1
        else:
            assert not obs["replicas"].any() and obs["candidates"].any()
            obs, _, terminated, truncated, info = env.step(env.action_space.sample())
            assert not (terminated or truncated)


def test_decisions_each_env_may_own_are_checked() -> None:
    with pytest.raises(ValueError, match="Serving-v0"):
        SchedulingEnv(env=EnvConfig(decisions=("order", "route")))
    with pytest.raises(ValueError, match="evict"):
        EvictionEnv(env=EnvConfig(decisions=("order",)))
    with pytest.raises(ValueError, match="route"):
        RoutingEnv(env=EnvConfig(decisions=("evict",)))
    with pytest.raises(ValueError, match="max_candidates"):
        ServingEnv(env=EnvConfig(max_candidates=2))  # three replicas need 3 slots
    env = ServingEnv(**{**small_kwargs("servegym/Serving-v0"), "env": EnvConfig(decisions=("route",))})
    _, info = env.reset(seed=0)
    assert info["decision"] == "route"


def test_an_episode_with_no_agent_decision_ends_at_its_first_step() -> None:
    """A roomy cache never asks for a victim: reset shows an empty decision, the step ends it."""
    kwargs = small_kwargs("servegym/Eviction-v0")
    env = EvictionEnv(**{**kwargs, "engine": EngineConfig(profile="tiny_cpu")})
    obs, info = env.reset(seed=0)
    assert info["decision"] is None and not obs["mask"].any()
    assert env.action_masks().tolist() == [True] + [False] * (env.action_space.n - 1)
    _, reward, terminated, _, info = env.step(5)
    assert terminated and info["invalid_action"] is False
    jobs = len(env.engine.jobs)
    total_tree_s = float((env.engine.job_table.finish_s[:jobs] - env.engine.job_table.arrival_s[:jobs]).sum())
    assert reward == pytest.approx(-total_tree_s / env.config.time_scale_s) and reward < 0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


# ---------------------------------------------------------------- vector envs and SB3
@pytest.mark.parametrize("vector", ["sync", "async"])
def test_gymnasium_vector_envs_step(vector: str) -> None:
    for env_id in ENV_IDS:
        fns = [partial(gym.make, env_id, **small_kwargs(env_id))] * 2
        envs = gym.vector.SyncVectorEnv(fns) if vector == "sync" else gym.vector.AsyncVectorEnv(fns)
        try:
            obs, _ = envs.reset(seed=[0, 1])
            assert obs["global"].shape == (2, G)
            for _ in range(10):
                obs, rewards, _, _, _ = envs.step(envs.action_space.sample())
                assert rewards.shape == (2,) and np.all(rewards <= 0)
        finally:
            envs.close()


def _subproc_steps(env_id: str, start_method: str) -> None:
    envs = SubprocVecEnv([partial(gym.make, env_id, **small_kwargs(env_id))] * 2, start_method=start_method)
    try:
        envs.seed(0)
        obs = envs.reset()
        assert obs["global"].shape == (2, G)
        for _ in range(10):
            actions = np.stack([envs.action_space.sample() for _ in range(2)])
            obs, rewards, _, _ = envs.step(actions)
            assert rewards.shape == (2,)
        if env_id in DISCRETE_IDS:
            masks = envs.env_method("action_masks")
            assert len(masks) == 2 and all(m.dtype == bool and m.any() for m in masks)
    finally:
        envs.close()
    assert envs.closed


@pytest.mark.slow
def test_sb3_subproc_vec_env_steps_and_closes() -> None:
    for env_id in ENV_IDS:
        _subproc_steps(env_id, "fork")
    # SB3's default start method on Linux: workers unpickle the env factory in a fresh interpreter
    _subproc_steps("servegym/Routing-v0", "forkserver")


@pytest.fixture
def one_torch_thread():
    """PPO's tiny networks on a loaded machine: torch's thread pool only adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("env_id", DISCRETE_IDS)
@pytest.mark.slow
def test_maskable_ppo_learns_a_few_hundred_steps(env_id: str, one_torch_thread) -> None:
    envs = DummyVecEnv([partial(gym.make, env_id, **small_kwargs(env_id))] * 2)
    model = MaskablePPO("MultiInputPolicy", envs, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    obs = envs.reset()
    masks = np.stack(envs.env_method("action_masks"))
    actions, _ = model.predict(obs, action_masks=masks, deterministic=True)
    assert all(masks[i, a] for i, a in enumerate(actions))
    envs.close()
