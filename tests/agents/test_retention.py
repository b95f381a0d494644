"""RETAIN: KV retention across tool pauses as a decision (engine.pin_ttl_rule=policy), its
rules (agents/policies/retention.py), Retention-v0, and the exported policy with its sidecar fallback."""

from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.agents.deploy.export import export_policy
from servegym.agents.deploy.runtime import OnnxPolicy, SidecarError, build_target, check_sidecar
from servegym.agents.policies.heuristics import FCFS, PredictedTreeSRPT, ProgramFCFS, ProgramFCFSPinning
from servegym.agents.policies.retention import Retaining, option_scores
from servegym.agents.rl.learned import SB3Policy
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import DecisionKind
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.workload import Workload
from tests.agents.conftest import (
    TREE_SRPT,
    assert_onnx_makes_the_sb3_decisions,
    decision_trace,
    drive_by_rule,
    export_one_choice,
    tiny_maskable_model,
)
from tests.envs.small import TINY

MENU = [0.0, 0.5, 2.0, 8.0]


def _workload(num_jobs: int = 8) -> Workload:
    return Workload(generator=ReactChain(turns_mean=5.0, **TINY), arrival_rate=4.0, num_jobs=num_jobs)


def _config(**changes) -> EngineConfig:
    base = EngineConfig(
        profile="tiny_cpu", block_size=4, num_gpu_blocks=300, max_num_seqs=4, retain_ttls_s=MENU
    )
    return dataclasses.replace(base, **changes)


def _run(policy, seed: int = 0, **changes) -> tuple[dict, list]:
    engine = Engine(_workload().build(seed), engine=_config(**changes))
    engine.apply_retention(policy)
    kinds = []
    while (decision := engine.next_decision()) is not None:
        kinds.append(decision.kind)
        engine.decide(policy.scores(decision))
    engine.check_invariants()
    return engine.metrics().as_dict(), kinds


def test_option_scores_take_the_smallest_ttl_at_least_the_target() -> None:
    ttls = np.array(MENU)
    assert int(np.argmax(option_scores(ttls, 0.0))) == 0
    assert int(np.argmax(option_scores(ttls, 0.3))) == 1
    assert int(np.argmax(option_scores(ttls, 2.0))) == 2
    assert int(np.argmax(option_scores(ttls, 99.0))) == 3  # past the menu: the longest


def test_release_under_policy_is_exactly_no_pinning() -> None:
    """The default answer (vLLM's release) under pin_ttl_rule=policy is the engine without pins."""
    asked, kinds = _run(FCFS(), pin_ttl_rule="policy")
    plain, plain_kinds = _run(FCFS(), pin_ttl_rule="off")
    assert DecisionKind.RETAIN in kinds and DecisionKind.RETAIN not in plain_kinds
    np.testing.assert_equal(asked, plain)  # NaN-safe, exact


@pytest.mark.parametrize("ttl", [0.5, 2.0, 8.0])
def test_a_fixed_rule_as_retain_answers_equals_the_engine_rule(ttl: float) -> None:
    """Retaining(rule=fixed) over a menu holding its TTL makes exactly the engine's fixed pins."""
    asked, _ = _run(Retaining(ProgramFCFS(), rule="fixed", grace_s=ttl))
    engine_rule, _ = _run(ProgramFCFS(), pin_ttl_rule="fixed", pin_ttl_s=ttl)
    np.testing.assert_equal(asked, engine_rule)
    released, _ = _run(ProgramFCFS())
    assert asked["jct_mean_s"] != released["jct_mean_s"]  # the pins changed the run


def test_retaining_sets_the_policy_rule_and_keeps_other_hints() -> None:
    from servegym.agents.policies.heuristics import KVFlow

    wrapped = Retaining(KVFlow(), rule="tool_mean")
    assert wrapped.retention == {"prefix_eviction": "workflow", "pin_ttl_rule": "policy"}
    with pytest.raises(ValueError, match="pins by its own rule"):
        Retaining(ProgramFCFSPinning())
    with pytest.raises(ValueError, match="rule must be one of"):
        Retaining(FCFS(), rule="forever")
    with pytest.raises(ValueError, match="grace_s > 0"):
        Retaining(FCFS(), rule="fixed", grace_s=0.0)


@pytest.mark.parametrize("rule", ["release", "tool_mean", "oracle", "fixed"])
def test_every_rule_drains_with_invariants(rule: str) -> None:
    metrics, kinds = _run(Retaining(PredictedTreeSRPT(), rule=rule, grace_s=1.0, min_kv_free=0.05))
    assert metrics["jobs_completed"] == 8 and metrics["calls_rejected"] == 0
    assert DecisionKind.RETAIN in kinds


@pytest.mark.parametrize(
    ("menu", "message"),
    [([], "non-empty"), ([0.0, 2.0, 1.0], "strictly ascending"), ([0.0, -1.0], "retain_ttls_s\\[1\\]")],
)
def test_a_bad_menu_is_refused(menu, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(retain_ttls_s=menu)


def test_retention_env_mask_and_invalid_action() -> None:
    env = gym.make(
        "servegym/Retention-v0", workload=_workload(4), engine=_config(pin_ttl_rule="off")
    )  # the env sets pin_ttl_rule=policy itself
    obs, info = env.reset(seed=0)
    assert info["decision"] == "retain"
    assert obs["options"].shape == (len(MENU), len(obs["options"][0])) and obs["mask"].all()
    _, _, _, _, info = env.step(len(MENU))  # out of range: the fallback's release, flagged
    assert info["invalid_action"]
    _, _, _, _, info = env.step(1)
    assert not info["invalid_action"]


def test_the_env_fallback_answers_admission() -> None:
    """Retention-v0 with a tree-SRPT fallback runs the same episode as Retaining(tree-SRPT)
    answering RETAIN with the same options: the env's other decisions come from the fallback."""
    env = gym.make(
        "servegym/Retention-v0", workload=_workload(), engine=_config(), fallback=PredictedTreeSRPT()
    )
    rule = Retaining(PredictedTreeSRPT(), rule="fixed", grace_s=2.0)
    env.reset(seed=0, options={"workload_seed": 5})
    done = False
    while not done:
        decision = env.unwrapped._decision
        _, _, terminated, truncated, info = env.step(int(np.argmax(rule.scores(decision))))
        done = terminated or truncated
    direct, _ = _run(Retaining(PredictedTreeSRPT(), rule="fixed", grace_s=2.0), seed=5)
    assert info["metrics"]["jct_mean_s"] == direct["jct_mean_s"]


@pytest.mark.slow
def test_exported_retain_policy_reproduces_its_decisions_with_the_sidecar_fallback(tmp_path) -> None:
    """MaskablePPO on Retention-v0 under a tree-SRPT fallback: the exported ONNX policy, which
    rebuilds that fallback from its sidecar, makes the SB3 policy's decisions, RETAIN included."""
    env = gym.make(
        "servegym/Retention-v0", workload=_workload(), engine=_config(), fallback=PredictedTreeSRPT()
    )
    model, paths = export_one_choice(env, "retain", tmp_path)
    meta = json.loads(paths["sidecar"].read_text())
    assert meta["layout"] == ["options"] and meta["fallback"] == TREE_SRPT
    with pytest.raises(SidecarError, match="fallback must be null"):  # a sidecar is data, not code
        check_sidecar({**meta, "fallback": {"_target_": "os.system", "command": "true"}})
    onnx = OnnxPolicy(str(paths["onnx"]))
    assert isinstance(onnx.fallback, PredictedTreeSRPT) and onnx.retention == {"pin_ttl_rule": "policy"}

    def run(policy):  # the policy's retention hints make the engine ask
        return decision_trace(Engine(_workload().build(3), engine=_config(pin_ttl_rule="off")), policy)

    assert_onnx_makes_the_sb3_decisions(model, paths, "retain", run, 6)


def test_a_sidecar_fallback_is_built_without_hydra() -> None:
    node = {
        "_target_": "servegym.agents.policies.retention.Retaining",
        "policy": {"_target_": "servegym.agents.policies.heuristics.ProgramFCFS"},
        "rule": "fixed",
        "grace_s": 2.0,
    }
    policy = build_target(node)
    assert isinstance(policy, Retaining) and isinstance(policy.policy, ProgramFCFS)
    assert policy.rule == "fixed" and policy.grace_s == 2.0


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("servegym.agents.no_such_module.FCFS", "there is no module servegym.agents.no_such_module"),
        ("servegym.agents.policies.heuristics.NoSuchPolicy", "heuristics has no NoSuchPolicy"),
    ],
)
def test_a_sidecar_fallback_naming_a_missing_class_says_how_to_fix_it(target: str, why: str) -> None:
    """A sidecar written before a module moved names its old path: the error says so and what
    to do, rather than a bare ModuleNotFoundError from inside the runtime."""
    with pytest.raises(SidecarError, match="names no class") as error:
        build_target({"_target_": target})
    assert why in str(error.value) and "re-export it" in str(error.value)


def _pick_retain_env(**kwargs):
    from servegym.envs.serving_env import EnvConfig

    config = _config(admission="pick")
    return gym.make(
        "servegym/PickRetain-v0",
        workload=_workload(),
        engine=config,
        env=EnvConfig(max_candidates=8),
        **kwargs,
    )


def test_pick_retain_env_driven_by_a_heuristic_reproduces_its_run() -> None:
    """Driving PickRetain-v0 with a heuristic's own answers (``policy_slot``) makes the run the
    heuristic makes through the engine: both levers go through the env's slots faithfully."""
    heuristic = Retaining(PredictedTreeSRPT(), rule="fixed", grace_s=2.0)
    env = _pick_retain_env()
    env.reset(seed=0, options={"workload_seed": 4})
    kinds, done = set(), False
    while not done:
        inner = env.unwrapped
        if inner._decision is not None:
            kinds.add(inner._decision.kind)
        slot, _ = inner.policy_slot(heuristic)
        _, _, terminated, truncated, info = env.step(slot)
        assert not info["invalid_action"]
        done = terminated or truncated
    assert kinds == {DecisionKind.ORDER, DecisionKind.RETAIN}
    direct, _ = _run(Retaining(PredictedTreeSRPT(), rule="fixed", grace_s=2.0), seed=4, admission="pick")
    assert info["metrics"]["jct_mean_s"] == direct["jct_mean_s"]


@pytest.mark.slow
def test_exported_pick_retain_policy_makes_the_sb3_decisions(tmp_path) -> None:
    env = _pick_retain_env()
    model = tiny_maskable_model(env)
    kinds = ("order", "retain")
    paths = export_policy(model, tmp_path / "policy.onnx", kinds, env_id="servegym/PickRetain-v0")
    meta = json.loads(paths["sidecar"].read_text())
    assert meta["layout"] == ["candidates", "options"] and meta["action"]["stop"]

    def run(policy):
        engine = Engine(_workload().build(2), engine=_config(admission="pick", pin_ttl_rule="policy"))
        decisions = []
        while (decision := engine.next_decision()) is not None:
            scores = policy.scores(decision)
            decisions.append((decision.kind, np.round(scores, 6).tolist()))
            engine.decide(scores)
        return decisions

    sb3 = run(SB3Policy(model=model, kinds=kinds))
    assert {kind for kind, _ in sb3} == {DecisionKind.ORDER, DecisionKind.RETAIN}
    assert run(OnnxPolicy(str(paths["onnx"]))) == sb3


def test_retention_env_policy_slot_carries_out_a_rule() -> None:
    """Driving Retention-v0 with a rule's own slots (what cloning learns from) is that rule's run."""
    rule = Retaining(PredictedTreeSRPT(), rule="tool_mean", grace_s=1.0)
    env = gym.make(
        "servegym/Retention-v0", workload=_workload(), engine=_config(), fallback=PredictedTreeSRPT()
    )
    _, info = drive_by_rule(env, rule, workload_seed=6)
    direct, _ = _run(Retaining(PredictedTreeSRPT(), rule="tool_mean", grace_s=1.0), seed=6)
    assert info["metrics"]["jct_mean_s"] == direct["jct_mean_s"]
