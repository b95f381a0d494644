"""Train a scheduler, export it, and compare the exported policy with the heuristics on held-out
seeds: the README's main job.

python scripts/train.py experiment=quick                                   # the README's main job
python scripts/train.py agent=ppo env=scheduling workload=mapreduce        # any composed world
python scripts/train.py experiment=quick logger=wandb                      # offline W&B run
python scripts/train.py experiment=quick train.resume_from=outputs/.../checkpoints/policy_10000_steps.zip
python scripts/train.py -m agent.hyperparams.learning_rate=1e-4,3e-4        # a sweep
python scripts/train.py experiment=routing +trainer=rllib                  # RLlib on Ray (servegym[ray])

The comparison runs the *exported* ONNX policy (``agents/deploy/runtime.py``), so the table describes
what a serving engine would load, on ``train.test_seeds`` (10000+; training never sees them).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from servegym.agents.deploy.export import export_policy
from servegym.agents.deploy.runtime import OnnxPolicy
from servegym.agents.evaluation.api import SuiteConfig, evaluate
from servegym.agents.rl.configs import exit_on_config_error, register_configs, train_config
from servegym.agents.rl.learned import load_model
from servegym.agents.rl.train import train
from servegym.envs.build import build_env

register_configs()
LEARNED = "learned"


def compare(cfg: DictConfig, make_policy, out_dir: Path, workload_name: str) -> str:
    """The learned policy and ``train.compare_with`` on the training world, held-out seeds."""
    suite = SuiteConfig(
        policies=[*cfg.train.compare_with, LEARNED],
        workloads=[workload_name],
        loads=[1.0],
        seeds=list(cfg.train.test_seeds),
        num_jobs=cfg.workload.get("num_jobs"),
        workload_overrides={workload_name: OmegaConf.to_container(cfg.workload, resolve=True)},
        baseline="fcfs" if "fcfs" in cfg.train.compare_with else cfg.train.compare_with[0],
    )
    if out_dir.exists():  # a rerun into this run dir: its new policy replaces the old comparison
        shutil.rmtree(out_dir)
    result = evaluate(
        suite, out_dir, extra_policies={LEARNED: make_policy}, base_cfg=cfg, progress=cfg.train.progress
    )
    return (
        (out_dir / "summary.md").read_text() if result.failures.empty else f"failed runs: {result.failures}"
    )


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console = Console()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        train_config(cfg)  # a bad train.* value fails here, naming the key, before any env is built
        build_env(cfg).close()  # and a bad workload, engine or env config too
    except Exception as error:
        exit_on_config_error(error)
        raise
    if cfg.get("trainer") is not None and cfg.trainer.get("name") == "rllib":  # +trainer=rllib
        from servegym.agents.rl.rllib_module import exportable
        from servegym.agents.rl.rllib_train import train_rllib

        result = train_rllib(cfg, run_dir)
        model = exportable(result.pop("module"))
    else:
        result = train(cfg, run_dir)
        best = result["best_model"]
        checkpoint = best if best and Path(best).exists() else result["final_model"]
        model = load_model(checkpoint)
    kinds = tuple(cfg.env.config.decisions)
    config = OmegaConf.to_container(cfg, resolve=True)
    paths = export_policy(model, run_dir / "policy.onnx", kinds, env_id=cfg.env.id, config=config)
    make_policy = functools.partial(OnnxPolicy, str(paths["onnx"]))
    console.print(
        f"trained {result['timesteps']} steps in {result['train_seconds']:.0f} s; run dir {run_dir}"
    )
    for row in result["eval_history"]:
        console.print(
            f"  step {int(row['timesteps'])}: mean tree time {row['jct_mean_s']:.2f} s on eval seeds, "
            f"{row['ratio_to_baseline']:.3f}x {cfg.train.baseline}"
        )
    table = compare(cfg, make_policy, run_dir / "eval", hydra_cfg.runtime.choices.get("workload", "workload"))
    wandb_run = result["wandb_run"]
    if wandb_run is not None:
        import wandb

        artifact = wandb.Artifact("policy", type="model")
        for path in paths.values():
            artifact.add_file(str(path))
        wandb_run.log_artifact(artifact)
        wandb_run.log({"eval/summary": wandb.Table(dataframe=_read_summary(run_dir / "eval"))})
        for png in sorted((run_dir / "eval" / "plots").glob("*.png")):
            wandb_run.log({f"eval/{png.stem}": wandb.Image(str(png))})
        wandb_run.finish()
    console.print(
        f"\nHeld-out comparison (seeds {list(cfg.train.test_seeds)}; '{LEARNED}' is the exported ONNX policy):"
    )
    print(table)
    console.print(
        f"exported policy: {paths['onnx']} (+ {paths['sidecar'].name}, {paths['torchscript'].name})"
    )
    console.print(f"tables and plots: {run_dir / 'eval'}")
    summary = {k: v for k, v in result.items() if k not in ("model", "wandb_run")}
    print(json.dumps({**summary, "onnx": str(paths["onnx"]), "eval_dir": str(run_dir / "eval")}, default=str))
    sys.stdout.flush()


def _read_summary(folder: Path):
    import pandas as pd

    return pd.read_csv(folder / "summary.csv")


if __name__ == "__main__":
    main()
