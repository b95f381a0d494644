"""The set policy is permutation-equivariant: slot order is not information."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from hypothesis import given
from hypothesis import strategies as st
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO

import servegym.envs  # noqa: F401
from servegym.agents.rl.networks import MaskableSetActorCriticPolicy, ScoreNetwork, SetActorCriticPolicy
from servegym.envs.engine.policy import CANDIDATE_FEATURES

K = 8
F = len(CANDIDATE_FEATURES)


def _obs_space() -> gym.spaces.Dict:
    box = gym.spaces.Box
    return gym.spaces.Dict(
        {
            "global": box(-1e6, 1e6, (12,), np.float32),
            "candidates": box(-1e6, 1e6, (K, F), np.float32),
            "mask": box(0.0, 1.0, (K,), np.float32),
        }
    )


class _Dummy(gym.Env):
    def __init__(self, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = _obs_space(), action_space


@pytest.fixture(scope="module")
def ppo_policy() -> SetActorCriticPolicy:
    th.manual_seed(0)
    model = PPO(
        SetActorCriticPolicy,
        _Dummy(gym.spaces.Box(-1, 1, (K,), np.float32)),
        n_steps=8,
        batch_size=8,
        policy_kwargs={"hidden": 16, "ortho_init": False},
    )
    return model.policy


@pytest.fixture(scope="module")
def maskable_policy() -> MaskableSetActorCriticPolicy:
    th.manual_seed(0)
    model = MaskablePPO(
        MaskableSetActorCriticPolicy,
        _Dummy(gym.spaces.Discrete(K)),
        n_steps=8,
        batch_size=8,
        policy_kwargs={"hidden": 16, "ortho_init": False},
    )
    return model.policy


def _random_obs(rng: np.random.Generator, batch: int, k: int = K) -> dict[str, th.Tensor]:
    mask = (rng.random((batch, k)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    return {
        "global": th.as_tensor(rng.normal(size=(batch, 12)).astype(np.float32)),
        "candidates": th.as_tensor(rng.normal(size=(batch, k, F)).astype(np.float32)),
        "mask": th.as_tensor(mask),
    }


def _permute(obs: dict[str, th.Tensor], perm: np.ndarray) -> dict[str, th.Tensor]:
    return {"global": obs["global"], "candidates": obs["candidates"][:, perm], "mask": obs["mask"][:, perm]}


@given(seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_permuting_slots_permutes_scores_and_keeps_the_value(ppo_policy, seed: int) -> None:
    rng = np.random.default_rng(seed)
    obs, perm = _random_obs(rng, 4), rng.permutation(K)
    # SB3 distributions are one mutable object per policy: read each result before the next call
    with th.no_grad():
        dist = ppo_policy.get_distribution(obs)
        mean, std, actions = dist.distribution.mean, dist.distribution.stddev, dist.distribution.sample()
        log_prob = dist.log_prob(actions)
        dist_p = ppo_policy.get_distribution(_permute(obs, perm))
        value, value_p = ppo_policy.predict_values(obs), ppo_policy.predict_values(_permute(obs, perm))
    th.testing.assert_close(dist_p.distribution.mean, mean[:, perm], atol=1e-5, rtol=1e-5)
    th.testing.assert_close(dist_p.distribution.stddev, std[:, perm])
    th.testing.assert_close(value_p, value, atol=1e-5, rtol=1e-5)
    th.testing.assert_close(dist_p.log_prob(actions[:, perm]), log_prob, atol=1e-4, rtol=1e-5)


@given(seed=st.integers(0, 2**31 - 1))
@pytest.mark.slow
def test_maskable_logits_are_equivariant(maskable_policy, seed: int) -> None:
    rng = np.random.default_rng(seed)
    obs, perm = _random_obs(rng, 3), rng.permutation(K)
    with th.no_grad():
        logits = maskable_policy.get_distribution(obs).distribution.logits
        logits_p = maskable_policy.get_distribution(_permute(obs, perm)).distribution.logits
        value, value_p = (
            maskable_policy.predict_values(obs),
            maskable_policy.predict_values(_permute(obs, perm)),
        )
    th.testing.assert_close(logits_p, logits[:, perm], atol=1e-5, rtol=1e-5)
    th.testing.assert_close(value_p, value, atol=1e-5, rtol=1e-5)


def test_padded_slots_do_not_move_real_scores_or_log_prob(ppo_policy) -> None:
    """What sits in a masked slot is invisible: real slots' scores, the value and the
    log-probability of the real slots' actions do not change."""
    rng = np.random.default_rng(1)
    obs = _random_obs(rng, 2)
    noisy = {**obs, "candidates": obs["candidates"].clone()}
    padded = obs["mask"] < 0.5
    noisy["candidates"][padded] = 100.0
    real = ~padded
    with th.no_grad():
        dist = ppo_policy.get_distribution(obs)
        mean = dist.distribution.mean
        log_prob = dist.log_prob(mean)
        dist_n = ppo_policy.get_distribution(noisy)
        th.testing.assert_close(dist_n.distribution.mean[real], mean[real])
        th.testing.assert_close(ppo_policy.predict_values(noisy), ppo_policy.predict_values(obs))
        # any action in a padded slot: the log-probability of the real slots alone
        th.testing.assert_close(dist_n.log_prob(th.where(real, mean, th.full_like(mean, 5.0))), log_prob)


def test_score_network_runs_on_any_number_of_candidates(ppo_policy) -> None:
    """The exported part is the policy mean, for K other than the training K too."""
    net = ScoreNetwork(ppo_policy).eval()
    rng = np.random.default_rng(2)
    obs = _random_obs(rng, 2)
    with th.no_grad():
        th.testing.assert_close(
            net(obs["global"], obs["candidates"], obs["mask"]),
            ppo_policy.get_distribution(obs).distribution.mean,
        )
        big = _random_obs(rng, 1, k=50)
        assert net(big["global"], big["candidates"], big["mask"]).shape == (1, 50)


def test_missing_observation_key_is_a_clear_error() -> None:
    space = _obs_space()
    del space.spaces["mask"]

    class Env(gym.Env):
        observation_space, action_space = space, gym.spaces.Box(-1, 1, (K,), np.float32)

    with pytest.raises(ValueError, match="missing"):
        PPO(SetActorCriticPolicy, Env(), n_steps=8, batch_size=8)
