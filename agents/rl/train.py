"""Train a scheduler with stable-baselines3 from a composed Hydra config.

``train(cfg)`` builds vectorised envs from the same config groups as ``simulate.py``, trains
PPO (score actions) or MaskablePPO (slot actions) with the permutation-equivariant policy of
``networks.py``, compares the policy with a heuristic on held-out seeds as it trains, saves
checkpoints and the best model, and can resume a run from a checkpoint. Loggers: none,
TensorBoard, or Weights & Biases through its SB3 integration (offline unless told otherwise).

Seeds: training envs draw workloads from ``cfg.seed``; evaluation during training uses
``train.eval_seeds`` (1000+), and the final comparison ``train.test_seeds`` (10000+), so no
evaluated workload was trained on.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch as th
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common import vec_env as sb3_vec_env
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.monitor import Monitor

from servegym.agents.evaluation.api import DEFAULT_CONF_DIR, HydraPolicyFactory, load_option
from servegym.agents.rl import configs
from servegym.agents.rl.configs import train_config
from servegym.agents.rl.input_baseline import ReferenceBaseline, SharedWorkloads
from servegym.agents.rl.learned import ALGORITHMS, SB3Policy
from servegym.agents.rl.networks import MaskableSetActorCriticPolicy, SetActorCriticPolicy
from servegym.agents.rl.pretrain import behaviour_clone, clone_choices, collect, collect_choices
from servegym.envs.build import build_engine, build_env, env_fallback
from servegym.envs.engine.policy import Policy


def vec_env_class(name: str) -> type:
    """SB3's vector env for a ``train.vec_env`` name (``configs.VEC_ENVS``: dummy, subproc)."""
    if name not in configs.VEC_ENVS:
        raise ValueError(f"train.vec_env must be one of {list(configs.VEC_ENVS)}, got {name!r}")
    return getattr(sb3_vec_env, f"{name.capitalize()}VecEnv")


VEC_ENVS = {name: vec_env_class(name) for name in configs.VEC_ENVS}
"""The SB3 class of each ``train.vec_env`` name, derived from the one list in ``configs``."""


def mean_tree_time(cfg: DictConfig, make_policy, seeds: list[int]) -> float:
    """Mean tree completion time over ``seeds`` with a fresh policy per run."""
    times = [build_engine(cfg, seed).run(make_policy()).as_dict()["jct_mean_s"] for seed in seeds]
    return float(np.mean(times))


def heuristic_factory(cfg: DictConfig, name: str):
    """Fresh instances of ``conf/agent/<name>.yaml`` (a heuristic to compare with or clone),
    built as the evaluation suite builds them, in the scope of ``cfg``."""
    if not (DEFAULT_CONF_DIR / "agent" / f"{name}.yaml").exists():
        raise FileNotFoundError(f"no conf/agent/{name}.yaml (train.baseline / train.pretrain_teacher)")
    factory = HydraPolicyFactory(
        load_option(DEFAULT_CONF_DIR, "agent", name), cast("dict[str, Any]", OmegaConf.to_container(cfg))
    )
    return lambda: factory(cfg.seed)


class CompareWithBaseline(BaseCallback):
    """At the start and every ``every`` env steps: mean tree time of the deterministic policy on
    held-out seeds, its ratio to the baseline heuristic's on the same seeds (below 1 beats it),
    and the best model so far saved to ``best_path``. The start counts, so a policy that PPO only
    makes worse (after cloning a teacher, say) is exported as it started, not as its least bad
    later point."""

    def __init__(self, cfg: DictConfig, every: int, best_path: Path, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.cfg, self.every, self.best_path = cfg, every, best_path
        self.seeds = list(cfg.train.eval_seeds)
        self.baseline_s = mean_tree_time(cfg, heuristic_factory(cfg, cfg.train.baseline), self.seeds)
        self.best_s = float("inf")
        self.history: list[dict[str, float]] = []
        self._last = 0

    def evaluate(self) -> dict[str, float]:
        policy_s = mean_tree_time(self.cfg, lambda: trained_policy(self.model, self.cfg), self.seeds)
        row = {
            "timesteps": float(self.num_timesteps),
            "jct_mean_s": policy_s,
            "baseline_jct_mean_s": self.baseline_s,
            "ratio_to_baseline": policy_s / self.baseline_s,
        }
        for key, value in row.items():
            if key != "timesteps":
                self.logger.record(f"eval/{key}", value)
        if policy_s < self.best_s:
            self.best_s = policy_s
            self.model.save(self.best_path)
        self.history.append(row)
        return row

    def _on_training_start(self) -> None:
        self._last = self.num_timesteps
        self.evaluate()

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last >= self.every:
            self._last = self.num_timesteps
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        if self._last != self.num_timesteps:
            self.evaluate()


def make_train_env(cfg: DictConfig, rank: int, curves: OrderedDict | None = None) -> gym.Env:
    """Training env ``rank``: the config's env, monitored (episode statistics of the raw reward),
    in its workload group (``train.group_size``) and with the reward baseline
    (``train.reward_baseline``, its reference curves cached in ``curves``, which the copies of a
    group share when they live in one process) when configured; see ``agents/rl/input_baseline.py``."""
    env = build_env(cfg)
    env.action_space.seed(cfg.seed + rank)
    env = Monitor(env)
    if cfg.train.group_size > 1:
        env = SharedWorkloads(env, group_seed=cfg.seed * 100_003 + rank // cfg.train.group_size)
    if cfg.train.reward_baseline:
        env = ReferenceBaseline(env, heuristic_factory(cfg, cfg.train.reward_baseline), curves=curves)
    return env


def make_train_venv(cfg: DictConfig):
    """The vector env of ``train.n_envs`` training envs, seeded as SB3's ``make_vec_env`` seeds
    them (env ``rank``: action space and first reset from ``seed + rank``), which cannot tell an
    env its rank, and a workload group needs it."""
    gamma = cfg.agent.get("hyperparams", {}).get("gamma", 1.0)
    if cfg.train.reward_baseline and gamma != 1.0:
        raise ValueError(
            f"train.reward_baseline={cfg.train.reward_baseline} needs agent.hyperparams.gamma=1.0 (got "
            f"{gamma}): with discounting the baseline no longer adds up to a constant of the workload"
        )
    group = cfg.train.group_size
    # one per workload group
    caches: list[OrderedDict] = [OrderedDict() for _ in range(cfg.train.n_envs // group)]
    envs = [partial(make_train_env, cfg, rank, caches[rank // group]) for rank in range(cfg.train.n_envs)]
    venv = vec_env_class(cfg.train.vec_env)(envs)
    venv.seed(cfg.seed)
    return venv


def make_model(cfg: DictConfig, venv, tensorboard_dir: str | None):
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    algo = cfg.agent.get("algo")
    if algo not in ALGORITHMS:
        raise ValueError(
            f"agent={cfg.agent.get('_target_', '?')} is not trainable; use agent=ppo or agent=maskable_ppo"
        )
    hyper = cast("dict[str, Any]", OmegaConf.to_container(cfg.agent.hyperparams, resolve=True))
    network = cast("dict[str, Any]", OmegaConf.to_container(cfg.agent.network, resolve=True))
    policy = SetActorCriticPolicy if algo == "ppo" else MaskableSetActorCriticPolicy
    cls = PPO if algo == "ppo" else MaskablePPO
    if cfg.train.resume_from:
        return cls.load(cfg.train.resume_from, env=venv, device="cpu", tensorboard_log=tensorboard_dir)
    return cls(
        policy,  # type: ignore[arg-type]  # the policy class matching cls: both follow algo
        venv,
        policy_kwargs=network,
        seed=cfg.seed,
        device="cpu",
        tensorboard_log=tensorboard_dir,
        verbose=0,
        **hyper,
    )


def start_wandb(cfg: DictConfig, run_dir: Path):
    import wandb

    resumed = None
    if cfg.train.resume_from:
        id_file = Path(cfg.train.resume_from).resolve().parent.parent / "wandb_run_id"
        resumed = id_file.read_text().strip() if id_file.exists() else None
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=cfg.logger.mode,
        tags=list(cfg.logger.tags),
        config=cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True)),
        dir=str(run_dir),
        sync_tensorboard=True,
        id=resumed,
        resume="allow" if resumed else None,
    )
    (run_dir / "wandb_run_id").write_text(run.id)
    return run


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, compare, checkpoint. Returns a summary (paths, timings, evaluation history).
    A bad ``train.*`` value raises ValueError naming the key before anything is built."""
    train_config(cfg)
    th.set_num_threads(cfg.train.torch_threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    kind = cfg.logger.kind
    tensorboard_dir = str(run_dir / "tensorboard") if kind in ("tensorboard", "wandb") else None
    wandb_run = start_wandb(cfg, run_dir) if kind == "wandb" else None

    venv = make_train_venv(cfg)
    model = make_model(cfg, venv, tensorboard_dir)
    pretrain = None
    if cfg.train.pretrain_teacher and not cfg.train.resume_from:
        pretrain = warm_start(cfg, model)
    callbacks: list[BaseCallback] = []
    if cfg.train.checkpoint_every:
        every = max(cfg.train.checkpoint_every // cfg.train.n_envs, 1)
        callbacks.append(CheckpointCallback(every, str(run_dir / "checkpoints"), name_prefix="policy"))
    compare = None
    if cfg.train.eval_every:
        compare = CompareWithBaseline(cfg, cfg.train.eval_every, run_dir / "best_model.zip")
        callbacks.append(compare)
    if wandb_run is not None:
        from wandb.integration.sb3 import WandbCallback

        callbacks.append(WandbCallback(verbose=0))

    remaining = cfg.train.total_timesteps - (model.num_timesteps if cfg.train.resume_from else 0)
    start = time.perf_counter()
    model.learn(
        max(remaining, 0),
        callback=CallbackList(callbacks),
        progress_bar=cfg.train.progress,
        reset_num_timesteps=not cfg.train.resume_from,
    )
    seconds = time.perf_counter() - start
    model.save(run_dir / "final_model.zip")
    venv.close()
    summary = {
        "run_dir": str(run_dir),
        "final_model": str(run_dir / "final_model.zip"),
        "best_model": str(run_dir / "best_model.zip") if compare else None,
        "timesteps": int(model.num_timesteps),
        "train_seconds": seconds,
        "baseline": cfg.train.baseline,
        "baseline_jct_mean_s": compare.baseline_s if compare else None,
        "eval_history": compare.history if compare else [],
        "pretrain": pretrain,
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return {**summary, "model": model, "wandb_run": wandb_run}


def warm_start(cfg: DictConfig, model) -> dict[str, Any]:
    """Behaviour-clone ``train.pretrain_teacher`` into the policy, then narrow its noise."""
    start = time.perf_counter()
    teacher = heuristic_factory(cfg, cfg.train.pretrain_teacher)
    if isinstance(model.action_space, gym.spaces.Discrete):  # a slot policy: cross-entropy
        data = collect_choices(cfg, teacher, cfg.train.pretrain_decisions)
        losses = clone_choices(model.policy, data, cfg.train.pretrain_epochs, seed=cfg.seed)
        decisions = len(data["target"])
    else:  # a score policy: regress the mean on the teacher's ranks
        data = collect(cfg, teacher, cfg.train.pretrain_decisions)
        losses = behaviour_clone(model.policy, data, cfg.train.pretrain_epochs, seed=cfg.seed)
        decisions = len(data["mask"])
    if hasattr(model.policy, "log_std"):
        with th.no_grad():
            model.policy.log_std.fill_(cfg.train.pretrain_log_std)
    return {
        "teacher": cfg.train.pretrain_teacher,
        "decisions": decisions,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "seconds": time.perf_counter() - start,
    }


def trained_policy(model, cfg: DictConfig) -> Policy:
    """The model as a Policy, with the env's fallback for the decisions it does not own."""
    return SB3Policy(model=model, kinds=tuple(cfg.env.config.decisions), fallback=env_fallback(cfg))
