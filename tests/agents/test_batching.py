"""CONFIG's baselines (agents/policies/batching.py), Config-v0, and the exported CONFIG policy."""

from __future__ import annotations

import json
from dataclasses import replace

import gymnasium as gym
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.agents.policies.batching import Batching
from servegym.agents.policies.heuristics import PredictedTreeSRPT
from servegym.envs.engine.engine import Engine
from tests.agents.conftest import (
    assert_onnx_makes_the_sb3_decisions,
    decision_trace,
    drive_by_rule,
    export_one_choice,
)
from tests.envs.small import small_kwargs

KWARGS = small_kwargs("servegym/Config-v0")


def _run(policy, seed: int) -> dict:
    engine = Engine(KWARGS["workload"].build(seed), engine=KWARGS["engine"])
    return engine.run(policy).as_dict()


def test_config_env_slots_carry_out_a_rule_and_the_fallback_answers_the_rest() -> None:
    """Driving Config-v0 with kv_fit's own slots (what cloning learns from), tree-SRPT as the
    fallback, is Batching(tree-SRPT, kv_fit)'s run."""
    rule = Batching(PredictedTreeSRPT(), "kv_fit")
    env = gym.make("servegym/Config-v0", **KWARGS, fallback=PredictedTreeSRPT())
    steps, info = drive_by_rule(env, rule, workload_seed=6)
    assert steps > 3
    assert (
        info["metrics"]["jct_mean_s"] == _run(Batching(PredictedTreeSRPT(), "kv_fit"), seed=6)["jct_mean_s"]
    )


def test_fixed_and_keep_rules() -> None:
    with pytest.raises(ValueError, match="rule"):
        Batching(PredictedTreeSRPT(), "bogus")
    keep = _run(Batching(PredictedTreeSRPT(), "keep"), seed=2)
    plain = _run(PredictedTreeSRPT(), seed=2)  # a heuristic keeps the cap by itself
    assert (keep["jct_mean_s"], keep["jct_p99_s"]) == (plain["jct_mean_s"], plain["jct_p99_s"])
    launched = replace(KWARGS["engine"], config_every_s=0.0, max_num_seqs=2, max_num_batched_tokens=64)
    static = Engine(KWARGS["workload"].build(2), engine=launched).run(PredictedTreeSRPT()).as_dict()
    fixed = _run(Batching(PredictedTreeSRPT(), "fixed", max_num_seqs=2, max_num_batched_tokens=64), seed=2)
    assert fixed["jct_mean_s"] == pytest.approx(static["jct_mean_s"], rel=1e-12)


@pytest.mark.slow
def test_exported_config_policy_reproduces_its_decisions(tmp_path) -> None:
    env = gym.make("servegym/Config-v0", **KWARGS, fallback=PredictedTreeSRPT())
    model, paths = export_one_choice(env, "config", tmp_path)
    assert json.loads(paths["sidecar"].read_text())["layout"] == ["configs"]

    def run(policy):
        return decision_trace(Engine(KWARGS["workload"].build(3), engine=KWARGS["engine"]), policy)

    assert_onnx_makes_the_sb3_decisions(model, paths, "config", run, 4)
