"""Train with RLlib's PPO (new API stack) on a Ray cluster instead of SB3 on this machine.

``python scripts/train.py experiment=routing +trainer=rllib`` trains the same agent config
(``agent=maskable_ppo``: its hyperparameters and network) on the same env, built from the same
config groups, with RLlib's env runners spread over a Ray cluster; the result is exported by
the same ONNX exporter and compared by the same held-out suite as the SB3 path (scripts/train.py).

What maps to what (``conf/trainer/rllib.yaml`` holds only what RLlib adds):

* ``agent.hyperparams``: learning_rate -> lr, n_epochs -> num_epochs, batch_size ->
  minibatch_size, gamma, gae_lambda -> lambda_, clip_range -> clip_param, ent_coef ->
  entropy_coeff, vf_coef -> vf_loss_coeff, max_grad_norm -> grad_clip; n_steps x
  ``train.n_envs`` env steps per PPO update (train_batch_size), as SB3 collects.
* ``agent.network.hidden`` -> the ``SetRLModule``'s width; ``train.total_timesteps`` -> train
  until that many env steps were sampled; ``seed`` -> RLlib's seed.
* ``trainer.num_env_runners`` x ``trainer.num_envs_per_env_runner`` envs collect in parallel
  (one Ray actor of one CPU per runner); the learner runs in this process.
* ``logger=wandb``: the same W&B run as the SB3 path (``train_rllib``).

Not wired yet: SB3's periodic evaluation during training and best-model choice, and the
workload groups and reward baseline (``train.group_size``, ``train.reward_baseline``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import torch as th
from omegaconf import DictConfig, OmegaConf

ENV_NAME = "servegym-rllib"
"""The name RLlib knows the env by (registered with ``ray.tune.register_env`` per training run)."""


@dataclass
class RLlibTrainerConfig:
    """``trainer:`` in ``conf/trainer/rllib.yaml`` (``+trainer=rllib``)."""

    name: str = "rllib"
    ray_address: str | None = None
    """The cluster to train on (``host:port`` of its head or ``auto``); null starts a local Ray
    instance of ``num_env_runners + 1`` CPUs on 127.0.0.1 and stops it afterwards."""
    num_env_runners: int = 1
    """Ray actors that step envs (one CPU each); 0 steps them in this process."""
    num_envs_per_env_runner: int = 1
    """Envs each runner steps, vectorised."""

    def __post_init__(self) -> None:
        if self.name != "rllib":
            raise ValueError(f"trainer.name must be rllib for the RLlib trainer, got {self.name!r}")
        for key in ("num_env_runners", "num_envs_per_env_runner"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if key == "num_env_runners" else 1)
            ):
                raise ValueError(
                    f"trainer.{key} must be an int >= {0 if key == 'num_env_runners' else 1}, got {value!r}"
                )


class EnvCreator:
    """A picklable "new env" for RLlib's runners: the config's env over copies of the workload,
    cluster and engine built once in this process (so no runner needs Hydra or ``conf/``)."""

    def __init__(self, cfg: DictConfig) -> None:
        from hydra.utils import instantiate

        self.env_id = str(cfg.env.id)
        self.kwargs = {
            "workload": instantiate(cfg.workload),
            "cluster": OmegaConf.to_object(cfg.cluster),
            "engine": OmegaConf.to_object(cfg.engine),
            "env": OmegaConf.to_object(cfg.env.config),
        }

    def __call__(self, env_config: Any = None) -> gym.Env:
        import servegym.envs  # noqa: F401 - registers the ids in this (runner) process

        return gym.make(self.env_id, **copy.deepcopy(self.kwargs))


def trainer_config(cfg: DictConfig) -> RLlibTrainerConfig:
    """``cfg.trainer`` checked, and the agent settings it trains with (before Ray starts)."""
    if cfg.agent.get("algo") != "maskable_ppo":
        raise ValueError(
            f"+trainer=rllib trains slot actions with the agent=maskable_ppo settings; got agent.algo="
            f"{cfg.agent.get('algo')!r}: add agent=maskable_ppo (or experiment=routing)"
        )
    data = cast("dict[str, Any]", OmegaConf.to_container(cfg.trainer, resolve=True))
    known = set(RLlibTrainerConfig.__dataclass_fields__)
    for key in data:
        if key not in known:
            raise ValueError(f"trainer.{key} is not an RLlib trainer setting; known: {sorted(known)}")
    return RLlibTrainerConfig(**data)


def ppo_config(cfg: DictConfig, trainer: RLlibTrainerConfig) -> Any:
    """RLlib's ``PPOConfig`` for the composed config (see the module docstring for the mapping)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from servegym.agents.rl.rllib_module import SetRLModule

    hyper = cast("dict[str, Any]", OmegaConf.to_container(cfg.agent.hyperparams, resolve=True))
    hidden = int(cfg.agent.network.get("hidden", 64))
    register_env(ENV_NAME, EnvCreator(cfg))
    return (
        PPOConfig()
        .environment(ENV_NAME)
        .env_runners(
            num_env_runners=trainer.num_env_runners,
            num_envs_per_env_runner=trainer.num_envs_per_env_runner,
            num_cpus_per_env_runner=1,
        )
        .training(
            train_batch_size_per_learner=int(hyper["n_steps"]) * int(cfg.train.n_envs),
            minibatch_size=int(hyper["batch_size"]),
            num_epochs=int(hyper["n_epochs"]),
            lr=float(hyper["learning_rate"]),
            gamma=float(hyper["gamma"]),
            lambda_=float(hyper["gae_lambda"]),
            clip_param=float(hyper["clip_range"]),
            entropy_coeff=float(hyper["ent_coef"]),
            vf_loss_coeff=float(hyper["vf_coef"]),
            grad_clip=float(hyper["max_grad_norm"]),
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=SetRLModule, model_config={"hidden": hidden}))
        .debugging(seed=int(cfg.seed))
    )


def train_rllib(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train until ``train.total_timesteps`` env steps; returns the trained ``module``
    (``SetRLModule``, on the CPU), ``timesteps``, ``train_seconds``, ``history`` (per
    iteration: env steps so far and the mean episode return of that iteration's episodes), and
    the keys scripts/train.py reads of SB3's result (``eval_history``, ``wandb_run``).

    ``logger=wandb`` opens the run as the SB3 path does (``start_wandb``: same project, tags,
    config and offline default, under ``run_dir``) and logs each iteration's mean episode return
    as ``rollout/ep_rew_mean`` at its env-step count (SB3's name for the same curve), so both
    trainers' runs plot on one chart; scripts/train.py then adds the exported policy and the
    held-out tables to it. ``logger=tensorboard`` writes nothing extra here."""
    from servegym.agents.evaluation.ray_backend import LOCAL_NODE_IP, import_ray

    trainer = trainer_config(cfg)
    ray = import_ray()
    th.set_num_threads(int(cfg.train.get("torch_threads", 1)))
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"logging_level": "WARNING", "include_dashboard": False}
        if trainer.ray_address is None:
            options.update(num_cpus=trainer.num_env_runners + 1, _node_ip_address=LOCAL_NODE_IP)
        ray.init(address=trainer.ray_address, **options)
    wandb_run = None
    if cfg.logger.kind == "wandb":
        if run_dir is None:
            raise ValueError("logger=wandb needs the run directory: train_rllib(cfg, run_dir)")
        from servegym.agents.rl.train import start_wandb

        wandb_run = start_wandb(cfg, run_dir)
    algo = None
    try:
        algo = ppo_config(cfg, trainer).build_algo()
        history, steps, start = [], 0, time.perf_counter()
        while steps < int(cfg.train.total_timesteps):
            runners = algo.train()["env_runners"]
            steps = int(runners["num_env_steps_sampled_lifetime"])
            history.append({"timesteps": steps, "episode_return_mean": runners.get("episode_return_mean")})
            if wandb_run is not None:
                row = {"time/total_timesteps": steps, "time/seconds": time.perf_counter() - start}
                if runners.get("episode_return_mean") is not None:
                    row["rollout/ep_rew_mean"] = float(runners["episode_return_mean"])
                wandb_run.log(row, step=steps)
        seconds = time.perf_counter() - start
        module = _learner_module(algo)
    finally:
        if algo is not None:
            algo.stop()
        if started:
            ray.shutdown()
    if wandb_run is not None:
        wandb_run.summary.update({"timesteps": steps, "train_seconds": seconds})
    return {
        "module": module,
        "timesteps": steps,
        "train_seconds": seconds,
        "history": history,
        "eval_history": [],  # no evaluation during training yet (the module docstring)
        "wandb_run": wandb_run,
    }


def _learner_module(algo: Any) -> Any:
    """The learner's weights in a runner's module (a runner's copy may lag one update behind)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    module = algo.get_module(DEFAULT_MODULE_ID)
    module.set_state(algo.learner_group.get_weights([DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID])
    return module.eval()
