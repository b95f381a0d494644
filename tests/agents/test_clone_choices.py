"""Cloning a heuristic into a slot policy (PickNext-v0): the teacher drives the env through
``policy_slot``, the env then runs the teacher's schedule, and cross-entropy over the tied-best
slots teaches the policy a choice the presorted table does not already make."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th

from servegym.agents.rl.pretrain import clone_choices, collect_choices
from servegym.agents.rl.train import make_model, make_train_venv
from servegym.envs.engine.policy import CANDIDATE_FEATURES, DecisionKind, DefaultPolicy
from tests.agents.conftest import compose_config

CFG = [
    "experiment=picknext",
    "workload.num_jobs=40",
    "train.n_envs=1",
    "agent.network.hidden=16",
    "env.config.max_candidates=16",
]


class YoungestTreeFirst:
    """A teacher against the table's presort (oldest tree first): the newest tree's calls."""

    def scores(self, decision):
        if decision.kind != DecisionKind.ORDER:
            return np.zeros(len(decision))
        return -decision.features[:, CANDIDATE_FEATURES.index("tree_age_s")].astype(np.float64)


class OrderOnly:
    """The teacher's admission order, FCFS's preemption victims: what the env runs when the
    agent owns ORDER and its fallback (DefaultPolicy) answers EVICT."""

    def __init__(self, teacher) -> None:
        self.teacher, self.fallback = teacher, DefaultPolicy()

    def scores(self, decision):
        return (self.teacher if decision.kind == DecisionKind.ORDER else self.fallback).scores(decision)


def agreement(model, data) -> float:
    """Share of the informative decisions (the teacher does not rate every fitting call alike)
    where the policy's likeliest slot is one the teacher rates best."""
    obs = {key: th.as_tensor(value) for key, value in data["obs"].items()}
    with th.no_grad():
        probs = model.policy.get_distribution(obs, data["valid"]).distribution.probs
    chosen = probs.argmax(-1).numpy()
    informative = data["best"][:, :-1].sum(1) < data["valid"][:, :-1].sum(1)
    return float(data["best"][np.arange(len(chosen)), chosen][informative].mean())


@pytest.mark.slow
def test_cloning_teaches_a_choice_the_presort_does_not_make() -> None:
    th.manual_seed(0)
    cfg = compose_config(CFG)
    venv = make_train_venv(cfg)
    model = make_model(cfg, venv, None)
    train = collect_choices(cfg, YoungestTreeFirst, 400)
    held_out = collect_choices(cfg, YoungestTreeFirst, 200, first_seed=100)
    assert (train["valid"].sum(1) > 1).all() and train["best"][np.arange(400), train["target"]].all()
    before = agreement(model, held_out)
    losses = clone_choices(model.policy, train, epochs=160, batch_size=64, lr=3e-3, seed=0)
    after = agreement(model, held_out)
    venv.close()
    assert losses[-1] < 0.2 * losses[0], losses
    assert before < 0.5 and after > 0.7 and after - before > 0.3, (before, after)


def test_driving_the_env_with_a_teacher_runs_the_teachers_schedule() -> None:
    from servegym.agents.rl.train import heuristic_factory
    from servegym.envs.build import build_engine, build_env

    cfg = compose_config([*CFG, "env.config.max_candidates=128"])  # never cut at K: the same run
    teacher = heuristic_factory(cfg, "program_fcfs")
    env = build_env(cfg).unwrapped
    env.reset(options={"workload_seed": 4})
    policy, info = teacher(), {}
    while True:
        _, _, terminated, truncated, info = env.step(env.policy_slot(policy)[0])
        if terminated or truncated:
            break
    alone = build_engine(cfg, 4).run(OrderOnly(teacher())).as_dict()
    assert info["metrics"]["jct_mean_s"] == alone["jct_mean_s"]
