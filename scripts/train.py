"""Train a scheduler, compare it with the heuristics on held-out seeds, export it.

python scripts/train.py agent=ppo env=scheduling workload=mapreduce        # train -> evaluate -> export
python scripts/train.py experiment=quick                                   # the README's main job
python scripts/train.py experiment=quick logger=wandb                      # offline W&B run
python scripts/train.py experiment=quick train.resume_from=outputs/.../checkpoints/policy_10000_steps.zip
python scripts/train.py -m agent.hyperparams.learning_rate=1e-4,3e-4        # a sweep
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from servegym.agents.configs import register_configs
from servegym.agents.export import export_policy
from servegym.agents.train import train

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console = Console()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(cfg, run_dir)
    model = result["model"]
    kinds = tuple(cfg.env.config.decisions)
    paths = export_policy(
        model,
        run_dir / "policy.onnx",
        kinds,
        env_id=cfg.env.id,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if result["wandb_run"] is not None:
        import wandb

        artifact = wandb.Artifact("policy", type="model")
        for path in paths.values():
            artifact.add_file(str(path))
        result["wandb_run"].log_artifact(artifact)
        result["wandb_run"].finish()
    console.print(
        f"trained {result['timesteps']} steps in {result['train_seconds']:.0f} s; run dir {run_dir}"
    )
    for row in result["eval_history"]:
        console.print(
            f"  step {int(row['timesteps'])}: mean tree time {row['jct_mean_s']:.2f} s, "
            f"{row['ratio_to_baseline']:.3f}x {cfg.train.baseline}"
        )
    console.print(f"exported {paths['onnx']} (+ {paths['sidecar'].name})")
    print(json.dumps({k: v for k, v in result.items() if k not in ("model", "wandb_run")}, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
