"""RLlib training (``+trainer=rllib``): the set network as an RLModule with action masking,
exported through the SB3 path's ONNX exporter (parity), and a few PPO iterations on Routing-v0
on the two-node loopback cluster whose exported policy then runs through the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th

pytest.importorskip("ray.rllib")

from ray.rllib.core.columns import Columns  # noqa: E402

from servegym.agents.deploy.export import export_policy, max_abs_difference  # noqa: E402
from servegym.agents.deploy.runtime import OnnxPolicy, ScoreRuntime  # noqa: E402
from servegym.agents.rl.rllib_module import MASKED_LOGIT, SetRLModule, exportable  # noqa: E402
from servegym.agents.rl.rllib_train import train_rllib  # noqa: E402
from servegym.envs.build import build_engine, build_env  # noqa: E402
from tests.agents.conftest import compose_config  # noqa: E402

ROUTING = ["experiment=routing", "workload.num_jobs=8", "agent.network.hidden=16"]
SCORE_TOLERANCE = 1e-5  # float32 through torch and onnxruntime, as tests/agents/test_export.py


def logits(module: SetRLModule, obs: dict[str, np.ndarray]) -> np.ndarray:
    batch = {Columns.OBS: {key: th.as_tensor(value[None]) for key, value in obs.items()}}
    with th.no_grad():
        return module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS][0].numpy()


def test_the_exported_module_makes_its_decisions(tmp_path) -> None:
    """Driven by its own argmax through a Routing-v0 episode, the module and its ONNX export
    agree on every real slot's logit and so on every decision; masked slots are never chosen."""
    th.manual_seed(0)
    env = build_env(compose_config(ROUTING))
    module = SetRLModule(
        observation_space=env.observation_space, action_space=env.action_space, model_config={"hidden": 16}
    ).eval()
    paths = export_policy(
        exportable(module), tmp_path / "policy.onnx", ("route",), env_id="servegym/Routing-v0"
    )
    runtime = ScoreRuntime(paths["onnx"])
    obs, _ = env.reset(seed=10000)
    steps, done, stacked = 0, False, []
    while not done:
        mine = logits(module, obs)
        real = obs["mask"] > 0.5
        assert (mine[~real] == MASKED_LOGIT).all()
        theirs = runtime.scores(obs["global"][None], obs["replicas"][None], obs["mask"][None])[0]
        action = int(np.argmax(mine))
        assert real[action] and action == int(np.argmax(np.where(real, theirs, -np.inf)))
        stacked.append(obs)
        obs, _, terminated, truncated, _ = env.step(action)
        steps, done = steps + 1, terminated or truncated
    assert steps > 20
    batch = {
        "global": np.stack([o["global"] for o in stacked]),
        "candidates": np.stack([o["replicas"] for o in stacked]),
        "mask": np.stack([o["mask"] for o in stacked]),
    }
    assert max_abs_difference(exportable(module), paths["onnx"], batch) < SCORE_TOLERANCE


def test_the_rllib_trainer_needs_the_maskable_agent_settings() -> None:
    cfg = compose_config(["experiment=routing", "agent=ppo", "+trainer=rllib", "trainer.num_env_runners=0"])
    with pytest.raises(ValueError, match=r"agent=maskable_ppo"):
        train_rllib(cfg)


@pytest.mark.slow
def test_ppo_on_the_cluster_trains_exports_and_serves(ray_cluster, tmp_path) -> None:
    cfg = compose_config(
        [
            *ROUTING,
            "+trainer=rllib",
            f"trainer.ray_address='{ray_cluster.address}'",
            "trainer.num_env_runners=1",
            "train.n_envs=1",
            "train.total_timesteps=256",
            "agent.hyperparams.n_steps=128",
            "agent.hyperparams.batch_size=64",
            "agent.hyperparams.n_epochs=1",
            "logger=wandb",  # offline: the same W&B run as the SB3 path
        ]
    )
    before = SetRLModule(
        observation_space=build_env(cfg).observation_space,
        action_space=build_env(cfg).action_space,
        model_config={"hidden": 16},
    )
    result = train_rllib(cfg, tmp_path)
    assert [row["timesteps"] for row in result["history"]] == [128, 256]
    run = result["wandb_run"]
    assert run.summary["timesteps"] == 256 and run.summary["time/total_timesteps"] == 256
    run.finish()
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(offline.rglob("*.wandb")) and (tmp_path / "wandb_run_id").read_text().strip() in offline.name
    module = result["module"]
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in before.parameters())
    paths = export_policy(exportable(module), tmp_path / "policy.onnx", ("route",), env_id=cfg.env.id)
    metrics = build_engine(cfg, 10000).run(OnnxPolicy(str(paths["onnx"])))
    assert not metrics.stalled and metrics.as_dict()["jobs_completed"] == 8
