"""Training from a composed config: it runs, it resumes, it logs offline, it fails early on bad
configs. Sizes are tiny: these check the wiring, the README's main job checks the learning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from servegym.agents.rl.configs import TrainConfig
from servegym.agents.rl.pretrain import rank_targets
from servegym.agents.rl.train import train
from servegym.envs.engine.policy import DecisionKind
from tests.agents.conftest import REPO_ROOT, TINY_TRAINING, compose_config


@pytest.mark.slow
def test_train_checkpoints_compares_and_saves(tiny_training_cfg, tmp_path: Path) -> None:
    result = train(tiny_training_cfg, tmp_path)
    assert result["timesteps"] >= 128
    assert (tmp_path / "final_model.zip").exists() and (tmp_path / "best_model.zip").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[:1] == [
        "policy_128_steps.zip"
    ] or any((tmp_path / "checkpoints").iterdir())
    history = result["eval_history"]
    assert [row["timesteps"] for row in history] == sorted({row["timesteps"] for row in history})
    assert all(row["ratio_to_baseline"] == row["jct_mean_s"] / row["baseline_jct_mean_s"] for row in history)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["timesteps"] == result["timesteps"]


@pytest.mark.slow
def test_resume_continues_the_step_count(tiny_training_cfg, tmp_path: Path) -> None:
    first = train(tiny_training_cfg, tmp_path / "first")
    checkpoint = sorted((tmp_path / "first" / "checkpoints").iterdir())[0]
    cfg = tiny_training_cfg.copy()
    cfg.train.resume_from = str(checkpoint)
    cfg.train.total_timesteps = 256
    resumed = train(cfg, tmp_path / "second")
    assert first["timesteps"] >= 128
    assert resumed["timesteps"] >= 256  # counted on from the checkpoint's steps, not from 0
    assert resumed["timesteps"] < 256 + 128


@pytest.mark.slow
def test_same_seed_same_training(tiny_training_cfg, tmp_path: Path) -> None:
    cfg = tiny_training_cfg.copy()
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    a, b = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    for pa, pb in zip(a["model"].policy.parameters(), b["model"].policy.parameters(), strict=True):
        assert np.array_equal(pa.detach().numpy(), pb.detach().numpy())


@pytest.mark.slow
def test_behaviour_cloning_moves_the_policy_toward_the_teacher(tiny_training_cfg, tmp_path: Path) -> None:
    cfg = compose_config([*TINY_TRAINING, "workload.num_jobs=30"])  # queues of many trees to rank
    cfg.train.pretrain_teacher = "program_fcfs"
    cfg.train.pretrain_decisions = 200
    cfg.train.pretrain_epochs = 80  # 40 halved the loss until schema v4 widened the global input
    result = train(cfg, tmp_path)
    pretrain = result["pretrain"]
    assert pretrain["decisions"] == 200
    assert pretrain["loss_last"] < 0.5 * pretrain["loss_first"]


def test_rank_targets_keep_the_teacher_order() -> None:
    targets = rank_targets(np.array([0.3, 5.0, -1.0, 0.3]), DecisionKind.ORDER)
    np.testing.assert_allclose(targets, [0.0, 0.9, -0.9, 0.0], atol=1e-12)  # ties share their mean target
    np.testing.assert_allclose(rank_targets(np.array([3.0, 1.0, 2.0]), DecisionKind.EVICT), [0.9, -0.9, 0.0])
    assert rank_targets(np.array([2.0]), DecisionKind.EVICT).tolist() == [1.0]


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files(tmp_path: Path) -> None:
    cfg = compose_config([*TINY_TRAINING, "logger=wandb", "train.eval_every=0", "train.checkpoint_every=0"])
    result = train(cfg, tmp_path)
    result["wandb_run"].finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].rglob("*.wandb"))
    assert (tmp_path / "wandb_run_id").read_text().strip() in runs[0].name


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("train.vec_env=threads", "train.vec_env"),
        ("train.total_timesteps=0", "train.total_timesteps"),
        ("logger.mode=sometimes", "logger.mode"),
    ],
)
def test_bad_values_fail_with_the_key_named(override: str, error: str) -> None:
    cfg = compose_config([*TINY_TRAINING, override])
    with pytest.raises(ValueError, match=error):
        OmegaConf.to_object(cfg.train) if override.startswith("train") else OmegaConf.to_object(cfg.logger)


def test_unknown_key_and_group_fail_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config([*TINY_TRAINING, "train.totl_timesteps=5"])
    with pytest.raises(ConfigCompositionException):
        compose_config([*TINY_TRAINING, "agent=ppo2"])
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose_config([*TINY_TRAINING, "train.n_envs=two"])


def test_a_heuristic_agent_is_not_trainable(tmp_path: Path) -> None:
    cfg = compose_config([*(o for o in TINY_TRAINING if not o.startswith("agent.")), "agent=fcfs"])
    with pytest.raises(ValueError, match="not trainable"):
        train(cfg, tmp_path)


def test_train_config_defaults_validate() -> None:
    TrainConfig()


PICKNEXT_EXTRAS = [  # cloning into the slot policy, then PPO against the input-driven baseline
    "train.pretrain_teacher=program_fcfs",
    "train.pretrain_decisions=64",
    "train.pretrain_epochs=2",
    "train.reward_baseline=program_fcfs",
]


@pytest.mark.parametrize("experiment", ["quick", "routing", "picknext"])
@pytest.mark.slow
def test_train_script_runs_train_export_and_prints_json(experiment: str, tmp_path: Path) -> None:
    """The entry point, end to end, as the README runs it (tiny sizes), for a score policy over
    the candidate table, a slot policy over the replica table and a pick-next policy cloned and
    trained against a reference; run twice into one folder, the second replaces the first."""
    overrides = [o for o in TINY_TRAINING if not o.startswith("experiment=")]
    extras = PICKNEXT_EXTRAS if experiment == "picknext" else []
    for _ in range(2 if experiment == "routing" else 1):
        proc = subprocess.run(
            [
                sys.executable,
                "scripts/train.py",
                f"experiment={experiment}",
                *overrides,
                *extras,
                f"hydra.run.dir={tmp_path}",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["timesteps"] >= 128
    assert (tmp_path / "eval" / "summary.md").exists()
    assert (tmp_path / "policy.onnx").exists() and (tmp_path / "policy.json").exists()
    layout = json.loads((tmp_path / "policy.json").read_text())["layout"]
    assert layout == (["replicas"] if experiment == "routing" else ["candidates"])
    if experiment == "picknext":
        assert summary["pretrain"]["decisions"] == 64


@pytest.mark.parametrize(
    ("world", "algo"),
    [
        (["experiment=eviction"], "MaskablePPO"),
        (["experiment=routing"], "MaskablePPO"),
        (["experiment=quick", "env=serving", "cluster=hetero"], "PPO"),
    ],
)
@pytest.mark.slow
def test_every_env_trains_and_is_compared_through_the_engine(
    world: list[str], algo: str, tmp_path: Path
) -> None:
    """The same set network over Discrete(K) slots (Eviction-v0), replicas (Routing-v0) and both
    tables (Serving-v0); the comparison drives the engine with the trained policy, so the
    observation layout the policy was trained on must be rebuilt from each decision."""
    overrides = [o for o in TINY_TRAINING if not o.startswith(("experiment=", "workload.num_jobs"))]
    cfg = compose_config([*world, *overrides, "workload.num_jobs=6", "train.baseline=fcfs"])
    result = train(cfg, tmp_path)
    assert result["timesteps"] >= 128
    assert type(result["model"]).__name__ == algo
    assert result["eval_history"] and all(np.isfinite(r["jct_mean_s"]) for r in result["eval_history"])


# ---------------------------------------------------------------- one source of truth
def test_train_defaults_are_written_once() -> None:
    """TrainConfig holds every train.* default; conf/config.yaml does not repeat them, and the
    vector-env names live in configs.VEC_ENVS alone (train.VEC_ENVS is derived from them)."""
    from omegaconf import OmegaConf

    from servegym.agents.evaluation.api import DEFAULT_CONF_DIR
    from servegym.agents.rl import configs, train

    assert "train" not in OmegaConf.load(DEFAULT_CONF_DIR / "config.yaml")
    assert tuple(train.VEC_ENVS) == configs.VEC_ENVS
    assert [cls.__name__ for cls in train.VEC_ENVS.values()] == ["DummyVecEnv", "SubprocVecEnv"]


def test_train_config_checks_the_composed_node(tiny_training_cfg) -> None:
    from omegaconf import open_dict

    from servegym.agents.rl.configs import TrainConfig, train_config

    assert isinstance(train_config(tiny_training_cfg), TrainConfig)
    for key, value, message in (
        ("n_envs", 0, "train.n_envs must be >= 1, got 0"),
        ("vec_env", "x", "train.vec_env"),
    ):
        cfg = tiny_training_cfg.copy()
        with open_dict(cfg):
            cfg.train[key] = value
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            train_config(cfg)
