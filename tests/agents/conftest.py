"""Small training configs composed from conf/, as the entry points compose them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from servegym.agents.rl.configs import register_configs

register_configs()
REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_TRAINING = [
    "experiment=quick",
    "workload.num_jobs=8",
    "train.total_timesteps=128",
    "train.n_envs=1",
    "train.eval_every=64",
    "train.eval_seeds=[1000]",
    "train.checkpoint_every=64",
    "train.progress=false",
    "train.pretrain_teacher=null",  # the quick preset clones program-FCFS first: minutes, not seconds
    "train.test_seeds=[10000]",
    "train.compare_with=[fcfs]",
    "agent.hyperparams.n_steps=64",
    "agent.hyperparams.batch_size=32",
    "agent.hyperparams.n_epochs=1",
    "agent.network.hidden=16",
]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def tiny_training_cfg() -> DictConfig:
    return compose_config(TINY_TRAINING)


def tiny_suite(**changes):
    """2 policies x 1 workload x 2 loads x 2 seeds of 6 map-reduce trees: well under a second.
    ``changes`` replace any SuiteConfig field."""
    from servegym.agents.evaluation.api import SuiteConfig

    fields = dict(
        policies=["fcfs", "program_fcfs"],
        workloads=["mapreduce"],
        loads=[1.0, 8.0],
        seeds=[0, 1],
        num_jobs=6,
        kv_timeline_bins=20,
    )
    return SuiteConfig(**{**fields, **changes})


def tiny_maskable_model(env):
    """A MaskablePPO set policy trained 64 steps (weights off their initialisation), for the
    export parity tests of the one-choice envs (Retention-v0, Config-v0)."""
    import torch as th
    from sb3_contrib import MaskablePPO

    from servegym.agents.rl.networks import MaskableSetActorCriticPolicy

    th.manual_seed(0)
    model = MaskablePPO(
        MaskableSetActorCriticPolicy,
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
        policy_kwargs={"hidden": 16},
    )
    model.learn(64)
    return model


def decision_trace(engine, policy) -> list:
    """Run ``engine`` under ``policy`` (its retention hints applied) and return each decision's
    (kind, chosen row): what an exported policy must reproduce of the SB3 policy it came from."""
    import numpy as np

    engine.apply_retention(policy)
    decisions = []
    while (decision := engine.next_decision()) is not None:
        scores = policy.scores(decision)
        decisions.append((decision.kind, int(np.argmax(scores))))
        engine.decide(scores)
    return decisions


TREE_SRPT = {"_target_": "servegym.agents.policies.heuristics.PredictedTreeSRPT"}
"""The fallback the one-choice export tests train under, as a sidecar names it."""


def export_one_choice(env, kind: str, tmp_path):
    """A tiny MaskablePPO trained on the one-choice ``env`` (made with a tree-SRPT fallback) and
    exported with that fallback in its sidecar: (model, export paths)."""
    from servegym.agents.deploy.export import export_policy

    model = tiny_maskable_model(env)
    paths = export_policy(
        model, tmp_path / "policy.onnx", (kind,), env_id=env.spec.id, config={"env": {"fallback": TREE_SRPT}}
    )
    return model, paths


def assert_onnx_makes_the_sb3_decisions(model, paths, kind: str, run, at_least: int) -> None:
    """``run(policy)`` (a ``decision_trace``) is the same for the SB3 model answering ``kind``
    under a tree-SRPT fallback and for its exported ONNX copy, which rebuilds that fallback from
    its sidecar; the run asks at least ``at_least`` decisions of ``kind``."""
    from servegym.agents.deploy.runtime import OnnxPolicy
    from servegym.agents.policies.heuristics import PredictedTreeSRPT
    from servegym.agents.rl.learned import SB3Policy
    from servegym.envs.engine.policy import DecisionKind

    sb3 = run(SB3Policy(model=model, kinds=(kind,), fallback=PredictedTreeSRPT()))
    assert sum(k == DecisionKind[kind.upper()] for k, _ in sb3) >= at_least
    assert run(OnnxPolicy(str(paths["onnx"]))) == sb3


def drive_by_rule(env, rule, workload_seed: int) -> tuple[int, dict]:
    """Play one episode of a one-choice env with ``rule``'s own slots (``policy_slot``: what
    cloning learns from) on workload ``workload_seed``; each slot must be one of the rule's
    tied best and valid. Returns (steps, the last step's info, which holds the run's metrics)."""
    env.reset(seed=0, options={"workload_seed": workload_seed})
    done, steps, info = False, 0, {}
    while not done:
        slot, best = env.unwrapped.policy_slot(rule)
        assert best[slot] and env.unwrapped.action_masks()[slot]
        _, _, terminated, truncated, info = env.step(slot)
        done, steps = terminated or truncated, steps + 1
    return steps, info
