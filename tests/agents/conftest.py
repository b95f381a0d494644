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
