"""Policies with a known order, exported with servegym's own exporter, and a tiny random Llama
(``tiny_llama``: nothing downloaded), for the vLLM adapter tests.

``export_length_policy`` builds the set network of ``SetActorCriticPolicy`` and sets its weights by
hand so that a candidate's score is ``tanh(0.25 * silu(silu(silu(prompt_tokens_log))))``: strictly
increasing in the prompt length and blind to every other column, the global features, the decision
kind and the rest of the set. The longest prompt is admitted first; the shortest running request
is evicted first."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3 import PPO

import servegym.envs  # noqa: F401
from servegym.agents.deploy.export import export_policy
from servegym.agents.rl.networks import SetActorCriticPolicy
from servegym.envs.engine.policy import column
from servegym.envs.serving_env import EnvConfig

MAX_CANDIDATES = 16
TINY_VOCAB = 1000
"""The tiny Llama's vocabulary: word-level tokens w4..w999 (0-3 special), as the replay's prompt words."""
HIDDEN = 8
HEAD_GAIN = 0.25  # keeps tanh far from saturation, so scores of different lengths differ in float32


def length_model() -> PPO:
    env = gym.make("servegym/Scheduling-v0", env=EnvConfig(max_candidates=MAX_CANDIDATES))
    model = PPO(
        SetActorCriticPolicy, env, n_steps=16, batch_size=16, seed=0, policy_kwargs={"hidden": HIDDEN}
    )
    policy = model.policy
    trunk, head = policy.mlp_extractor, policy.action_net
    with th.no_grad():
        for parameter in [*trunk.parameters(), *head.parameters()]:
            parameter.zero_()
        trunk.encode[0].weight[0, column("prompt_tokens_log")] = 1.0  # unit 0 carries the length
        trunk.encode[2].weight[0, 0] = 1.0
        trunk.join[0].weight[0, 0] = 1.0
        head.linear.weight[0, 0] = HEAD_GAIN
    return model


def export_length_policy(path: Path, kinds: tuple[str, ...] = ("order", "evict")) -> Path:
    paths = export_policy(length_model(), path, kinds, env_id="servegym/Scheduling-v0", torchscript=False)
    return paths["onnx"]


@pytest.fixture(scope="session")
def length_policy(tmp_path_factory) -> Path:
    """An ORDER+EVICT policy: longest prompt first, shortest running request evicted."""
    return export_length_policy(tmp_path_factory.mktemp("length") / "policy.onnx")


@pytest.fixture(scope="session")
def evict_only_policy(tmp_path_factory) -> Path:
    """The same network answering EVICT only (ORDER falls back to FCFS)."""
    return export_length_policy(tmp_path_factory.mktemp("evict") / "policy.onnx", ("evict",))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama and a word-level tokenizer, saved locally: nothing is downloaded."""
    from servegym.agents.replay.vllm_server import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), TINY_VOCAB)
