"""Export parity: the ONNX runtime scores like the SB3 network, and drives the engine to the
same episode, decision for decision."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO

import servegym.envs  # noqa: F401
from servegym.agents.deploy.export import export_policy, max_abs_difference
from servegym.agents.deploy.runtime import OnnxPolicy, ScoreRuntime, SidecarError, sidecar_path
from servegym.agents.rl.learned import SB3Policy
from servegym.agents.rl.networks import SetActorCriticPolicy
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import CANDIDATE_FEATURES, GLOBAL_FEATURES, DecisionKind
from servegym.envs.serving_env import EnvConfig
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload

F = len(CANDIDATE_FEATURES)
SCORE_TOLERANCE = 1e-5  # float32 through two runtimes; observed ~1e-7


def _workload() -> Workload:
    return Workload(generator=MapReduce(), arrival_rate=8.0, num_jobs=12)


@pytest.fixture(scope="module")
def model() -> PPO:
    th.manual_seed(0)
    env = gym.make(
        "servegym/Scheduling-v0",
        workload=_workload(),
        engine=EngineConfig(max_num_seqs=8),
        env=EnvConfig(max_candidates=8),
    )
    model = PPO(
        SetActorCriticPolicy,
        env,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
        policy_kwargs={"hidden": 16, "log_std_init": -1.0},
    )
    model.learn(64)  # move the weights off their initialisation
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_policy(
        model,
        tmp_path_factory.mktemp("export") / "policy.onnx",
        ("order", "evict"),
        env_id="servegym/Scheduling-v0",
        config={"seed": 0},
    )


def _observations(rng: np.random.Generator, batch: int, k: int) -> dict[str, np.ndarray]:
    mask = (rng.random((batch, k)) < 0.8).astype(np.float32)
    return {
        "global": rng.normal(size=(batch, len(GLOBAL_FEATURES) + len(DecisionKind))).astype(np.float32),
        "candidates": rng.normal(size=(batch, k, F)).astype(np.float32) * 3,
        "mask": mask,
    }


@pytest.mark.parametrize("k", [1, 8, 64])
def test_runtime_scores_equal_the_sb3_network(model, exported, k: int) -> None:
    """Any number of candidates, not only the trained K (the candidate axis is dynamic)."""
    observations = _observations(np.random.default_rng(k), 16, k)
    assert max_abs_difference(model, exported["onnx"], observations) < SCORE_TOLERANCE


def test_torchscript_matches_too(model, exported) -> None:
    obs = _observations(np.random.default_rng(3), 4, 8)
    scripted = th.jit.load(str(exported["torchscript"]))
    runtime = ScoreRuntime(exported["onnx"])
    with th.no_grad():
        got = scripted(*(th.as_tensor(obs[key]) for key in ("global", "candidates", "mask"))).numpy()
    np.testing.assert_allclose(
        got, runtime.scores(obs["global"], obs["candidates"], obs["mask"]), atol=SCORE_TOLERANCE
    )


def test_exported_policy_reproduces_the_episode_exactly(model, exported) -> None:
    """Same engine, same seed: the ONNX policy and the SB3 policy make the same decisions, so
    every metric is identical (not merely close)."""

    def run(policy):
        engine = Engine(_workload().build(7), engine=EngineConfig(max_num_seqs=8))
        decisions = []
        while (decision := engine.next_decision()) is not None:
            scores = policy.scores(decision)
            decisions.append(np.argsort(-scores, kind="stable").tolist())
            engine.decide(scores)
        return decisions, engine.metrics().as_dict()

    sb3_decisions, sb3_metrics = run(SB3Policy(model=model, kinds=("order", "evict")))
    onnx_decisions, onnx_metrics = run(OnnxPolicy(str(exported["onnx"])))
    assert len(sb3_decisions) > 20
    assert onnx_decisions == sb3_decisions
    assert json.dumps(onnx_metrics, sort_keys=True, default=str) == json.dumps(
        sb3_metrics, sort_keys=True, default=str
    )


def test_sidecar_describes_the_policy(exported) -> None:
    meta = json.loads(exported["sidecar"].read_text())
    assert meta["action"] == {"type": "scores", "kinds": ["ORDER", "EVICT"], "max_candidates": 8}
    assert meta["env_id"] == "servegym/Scheduling-v0"
    assert len(meta["config_sha256"]) == 64
    assert "true_remaining_output_tokens" not in meta["candidate_features"]  # privileged stays behind
    assert meta["role_vocabulary"][:2] == ["user", "planner"] and meta["format"] == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("feature_schema_version", 999, "schema v999"),
        ("format", 0, "format"),
        ("candidate_features", ["x"], "candidate_features"),
        ("role_vocabulary", ["user", "worker", "planner"], r"differs .* \(from role_id 1\)"),
        ("role_vocabulary", None, "role_vocabulary"),
        ("action", {"type": "bogus", "kinds": ["ORDER"], "max_candidates": 8}, "action.type"),
    ],
)
def test_runtime_rejects_a_mismatched_sidecar(exported, tmp_path, field, value, message) -> None:
    onnx = tmp_path / "policy.onnx"
    onnx.write_bytes(exported["onnx"].read_bytes())
    meta = json.loads(exported["sidecar"].read_text())
    meta[field] = value
    sidecar_path(onnx).write_text(json.dumps(meta))
    with pytest.raises(SidecarError, match=message):
        ScoreRuntime(onnx)


def test_runtime_without_sidecar_is_a_clear_error(exported, tmp_path) -> None:
    onnx = tmp_path / "lonely.onnx"
    onnx.write_bytes(exported["onnx"].read_bytes())
    with pytest.raises(FileNotFoundError, match="sidecar"):
        ScoreRuntime(onnx)


def test_runtime_rejects_wrong_feature_width(exported) -> None:
    runtime = ScoreRuntime(exported["onnx"])
    with pytest.raises(ValueError, match="candidates"):
        runtime.scores(np.zeros(12), np.zeros((3, 19)), np.ones(3))


def test_runtime_needs_neither_torch_nor_sb3_nor_hydra() -> None:
    import subprocess
    import sys

    code = (
        "import sys, servegym.agents.deploy.runtime as r; "
        "print(sorted(m for m in ('torch', 'stable_baselines3', 'hydra') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("env_id", ["servegym/Routing-v0", "servegym/Serving-v0"])
@pytest.mark.slow
def test_replica_table_policies_export_and_reproduce_their_decisions(env_id: str, tmp_path) -> None:
    """Routing (Discrete over replicas) and Serving (both tables side by side) export with their
    layout, and the ONNX policy makes the SB3 policy's decisions in the engine, ROUTE included."""
    from sb3_contrib import MaskablePPO

    from servegym.agents.rl.networks import MaskableSetActorCriticPolicy
    from servegym.envs.engine.config import ClusterConfig

    th.manual_seed(0)
    # replicas of three sizes: two identical idle replicas tie exactly, and torch and
    # onnxruntime may round such a tie apart differently (seen once the schema grew a column)
    cluster = ClusterConfig(replicas=["llama1b_h100", "llama8b_h100", "llama70b_h100x4"])
    env = gym.make(env_id, workload=_workload(), cluster=cluster, env=EnvConfig(max_candidates=8))
    routing = env_id == "servegym/Routing-v0"
    algo, policy = (MaskablePPO, MaskableSetActorCriticPolicy) if routing else (PPO, SetActorCriticPolicy)
    model = algo(policy, env, n_steps=32, batch_size=32, n_epochs=1, seed=0, policy_kwargs={"hidden": 16})
    model.learn(64)
    kinds = ("route",) if routing else ("order", "evict", "route")
    paths = export_policy(model, tmp_path / "policy.onnx", kinds, env_id=env_id)
    meta = json.loads(paths["sidecar"].read_text())
    assert meta["layout"] == (["replicas"] if routing else ["candidates", "replicas"])

    def run(policy):
        engine = Engine(_workload().build(3), cluster=cluster)
        decisions = []
        while (decision := engine.next_decision()) is not None:
            scores = policy.scores(decision)
            decisions.append((decision.kind, np.argsort(-scores, kind="stable").tolist()))
            engine.decide(scores)
        return decisions

    sb3 = run(SB3Policy(model=model, kinds=kinds))
    assert any(kind == DecisionKind.ROUTE for kind, _ in sb3)
    assert run(OnnxPolicy(str(paths["onnx"]))) == sb3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"format": 3, "feature_schema_version"',
            "not valid JSON (Expecting ':' delimiter at line 1 column 39)",
        ),
        ("[1, 2, 3]", "a sidecar is a JSON object (format, feature_schema_version, layout, ...), got a list"),
        ("", "not valid JSON (Expecting value at line 1 column 1)"),
    ],
)
def test_a_truncated_or_non_object_sidecar_names_the_file(exported, tmp_path, text, message) -> None:
    onnx = tmp_path / "policy.onnx"
    onnx.write_bytes(exported["onnx"].read_bytes())
    sidecar_path(onnx).write_text(text)
    with pytest.raises(SidecarError) as info:
        ScoreRuntime(onnx)
    assert str(info.value).startswith(f"{sidecar_path(onnx)}: ") and message in str(info.value)


def test_a_sidecar_of_another_layout_is_refused_at_load(exported, tmp_path) -> None:
    """A Routing-v0 sidecar next to a Scheduling-v0 model: refused when loading, with both
    widths named, instead of failing inside onnxruntime at the first decision."""
    from servegym.agents.deploy.runtime import slot_columns

    onnx = tmp_path / "policy.onnx"
    onnx.write_bytes(exported["onnx"].read_bytes())
    meta = json.loads(exported["sidecar"].read_text())
    meta.update(
        layout=["replicas"], slot_features=list(slot_columns(["replicas"])), env_id="servegym/Routing-v0"
    )
    sidecar_path(onnx).write_text(json.dumps(meta))
    width = len(json.loads(exported["sidecar"].read_text())["slot_features"])
    with pytest.raises(SidecarError) as info:
        ScoreRuntime(onnx)
    assert f"ONNX input 'candidates' has {width} columns, but {sidecar_path(onnx)} describes" in str(
        info.value
    )
    assert "layout ['replicas'], env servegym/Routing-v0" in str(info.value)
