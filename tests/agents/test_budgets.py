"""BUDGET's baselines (agents/policies/budgets.py), Budget-v0, and the exported BUDGET policy."""

from __future__ import annotations

import json
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.agents.policies.budgets import Budgeting
from servegym.agents.policies.heuristics import PredictedTreeSRPT
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import GLOBAL_FEATURES, Decision, DecisionKind
from tests.agents.conftest import (
    assert_onnx_makes_the_sb3_decisions,
    decision_trace,
    drive_by_rule,
    export_one_choice,
)
from tests.envs.small import small_kwargs

KWARGS = small_kwargs("servegym/Budget-v0")  # max_tokens 16, outputs of 40 on average: budgets bind


def _engine(seed: int, **engine) -> Engine:
    return Engine(KWARGS["workload"].build(seed), engine=replace(KWARGS["engine"], **engine))


class Watch:
    """Wraps a policy and keeps the budgets it gave (in tokens) and the decisions it saw."""

    def __init__(self, policy) -> None:
        self.policy, self.budgets, self.decisions = policy, [], []

    def scores(self, decision: Decision) -> np.ndarray:
        scores = self.policy.scores(decision)
        if decision.kind == DecisionKind.BUDGET:
            allowed = np.flatnonzero(decision.mask)
            choice = int(allowed[np.argmax(scores[allowed])])
            self.budgets.append(int(round(np.expm1(decision.features[choice, 2]))))
            self.decisions.append(decision)
        return scores


def _budgets(policy, seed: int = 1, **engine) -> tuple[list[int], Engine]:
    watch = Watch(policy)
    engine_ = _engine(seed, **engine)
    engine_.run(watch)
    engine_.check_invariants()
    return watch.budgets, engine_


def test_each_rule_picks_its_budget() -> None:
    tree_srpt = PredictedTreeSRPT
    workload, plain = _budgets(Budgeting(tree_srpt(), "workload"))
    assert set(workload) == {16}
    assert plain.metrics().continuations > 0  # outputs of ~40 tokens under a budget of 16
    assert set(_budgets(Budgeting(tree_srpt(), "fixed", multiplier=0.5))[0]) == {8}
    assert set(_budgets(Budgeting(tree_srpt(), "fixed", multiplier=1.5))[0]) == {32}  # the next option up
    oracle, engine = _budgets(Budgeting(tree_srpt(), "oracle"))
    n = engine.calls.size
    truth = engine.calls.true_output_tokens[:n][engine.calls.continues[:n] < 0]
    # the smallest option holding the whole output, or the largest when none does
    options = np.array([4, 8, 16, 32])
    want = [int(options[min(np.searchsorted(options, t), 3)]) for t in truth.tolist()]
    assert sorted(oracle) == sorted(want)
    assert engine.metrics().continuations < plain.metrics().continuations
    predicted = _budgets(Budgeting(tree_srpt(), "predicted", multiplier=2.0))[0]
    assert predicted[0] == 16 and set(predicted) <= {4, 8, 16, 32}  # the workload's until an output is seen
    watch = Watch(Budgeting(tree_srpt(), "workload", tight_below_kv_free=1.0))
    _engine(1).run(watch)
    kv_free = [d.global_features[GLOBAL_FEATURES.index("kv_free_frac")] for d in watch.decisions]
    assert watch.budgets == [4 if free < 1.0 else 16 for free in kv_free] and 4 in watch.budgets
    with pytest.raises(ValueError, match="rule"):
        Budgeting(tree_srpt(), "bogus")
    with pytest.raises(ValueError, match="multiplier"):
        Budgeting(tree_srpt(), "fixed", multiplier=0.0)


def test_the_workload_rule_is_the_default_policy() -> None:
    a = _engine(2).run(Budgeting(PredictedTreeSRPT(), "workload")).as_dict()
    b = _engine(2).run(PredictedTreeSRPT()).as_dict()
    assert repr(a) == repr(b)


def test_budget_env_slots_carry_out_a_rule_and_the_fallback_answers_the_rest() -> None:
    """Driving Budget-v0 with the oracle rule's own slots, tree-SRPT as the fallback, is
    Budgeting(tree-SRPT, oracle)'s run."""
    rule = Budgeting(PredictedTreeSRPT(), "oracle")
    env = gym.make("servegym/Budget-v0", **KWARGS, fallback=PredictedTreeSRPT())
    steps, info = drive_by_rule(env, rule, workload_seed=6)
    assert steps > 10
    want = _engine(6).run(Budgeting(PredictedTreeSRPT(), "oracle"))
    assert info["metrics"]["jct_mean_s"] == want.jct_mean_s


def test_budget_env_sets_the_rule_it_needs() -> None:
    engine = replace(KWARGS["engine"], continue_truncated=False, budget_rule="workload")
    env = gym.make("servegym/Budget-v0", **{**KWARGS, "engine": engine})
    config = env.unwrapped.engine_config
    assert config.budget_rule == "policy" and config.continue_truncated
    obs, _ = env.reset(seed=0)
    assert obs["budgets"].shape == (4, len(obs["budgets"][0])) and obs["mask"].sum() >= 1


@pytest.mark.slow
def test_exported_budget_policy_reproduces_its_decisions(tmp_path) -> None:
    env = gym.make("servegym/Budget-v0", **KWARGS, fallback=PredictedTreeSRPT())
    model, paths = export_one_choice(env, "budget", tmp_path)
    assert json.loads(paths["sidecar"].read_text())["layout"] == ["budgets"]
    assert_onnx_makes_the_sb3_decisions(model, paths, "budget", lambda p: decision_trace(_engine(3), p), 10)
