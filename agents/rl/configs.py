"""Structured configs of the training side (``train:`` and the ``logger`` group), and one
``register_configs()`` that every entry point calls, so every group it composes is typed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from hydra.core.config_store import ConfigStore

from servegym.envs.configs import register_configs as register_env_configs

VEC_ENVS = ("dummy", "subproc")
"""``train.vec_env`` names: SB3's ``DummyVecEnv`` and ``SubprocVecEnv`` (``agents/rl/train.py``)."""
LOGGERS = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    """``train:`` in conf/config.yaml: the schema, and the one place each default is written
    (``conf/config.yaml`` and the experiments set only what differs). Hydra does not run
    ``__post_init__`` on a structured config; ``train_config(cfg)`` does."""

    total_timesteps: int = 20_000
    n_envs: int = 2
    vec_env: str = "dummy"  # dummy | subproc (measured: see README)
    torch_threads: int = 1  # per process; the env processes need the other cores
    eval_every: int = 5_000  # env steps between comparisons with the baseline (0: never)
    eval_seeds: list[int] = field(default_factory=lambda: [1000, 1001, 1002])
    test_seeds: list[int] = field(default_factory=lambda: [10000, 10001, 10002, 10003, 10004])
    baseline: str = "program_fcfs"  # conf/agent name of the heuristic to beat
    compare_with: list[str] = field(
        default_factory=lambda: ["fcfs", "lpm", "sjf_oracle", "plas", "atlas", "program_fcfs"]
    )  # heuristics of the final held-out comparison (scripts/train.py), on train.test_seeds
    checkpoint_every: int = 10_000  # env steps (0: never)
    pretrain_teacher: str | None = None  # conf/agent name to behaviour-clone first (agents/rl/pretrain.py)
    pretrain_decisions: int = 4_000
    pretrain_epochs: int = 20
    pretrain_log_std: float = -2.0  # exploration after cloning: small reorderings around the teacher
    reward_baseline: str | None = None  # conf/agent heuristic run on each episode's workload and
    # subtracted from the reward: an input-driven baseline (agents/rl/input_baseline.py); needs gamma 1
    group_size: int = 1  # envs per workload group: a group's copies play the same workloads
    resume_from: str | None = None  # a checkpoint .zip; continues its run (steps, W&B run)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("total_timesteps", "n_envs", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.vec_env not in VEC_ENVS:
            raise ValueError(f"train.vec_env must be one of {list(VEC_ENVS)}, got {self.vec_env!r}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("train.eval_every and train.checkpoint_every must be >= 0")
        if self.pretrain_decisions < 1 or self.pretrain_epochs < 0:
            raise ValueError("train.pretrain_decisions must be >= 1 and train.pretrain_epochs >= 0")
        if self.group_size < 1 or self.n_envs % self.group_size:
            raise ValueError(
                f"train.group_size must be >= 1 and divide train.n_envs={self.n_envs}, got {self.group_size!r}"
            )
        if self.eval_every and not self.eval_seeds:
            raise ValueError("train.eval_seeds must not be empty when train.eval_every > 0")


@dataclass
class LoggerConfig:
    """``logger:`` group: where training metrics go."""

    kind: str = "none"  # none | tensorboard | wandb
    project: str = "servegym"
    entity: str | None = None
    mode: str = "offline"  # wandb: offline (no network, no account) | online | disabled
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LOGGERS:
            raise ValueError(f"logger.kind must be one of {LOGGERS}, got {self.kind!r}")
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {self.mode!r}")


def train_config(cfg: Any) -> TrainConfig:
    """The composed ``train:`` node checked (``TrainConfig.__post_init__``): raises ValueError
    naming the key, e.g. ``train.n_envs must be >= 1, got 0``."""
    from omegaconf import OmegaConf

    return TrainConfig(**cast("dict[str, Any]", OmegaConf.to_container(cfg.train, resolve=True)))


def config_error_message(error: BaseException) -> str | None:
    """The message to print for a bad config, value or input file, without a traceback; None
    for anything else (a bug keeps its traceback). A Hydra instantiation error is unwrapped to
    its cause, with the config key it came from."""
    from hydra.errors import InstantiationException

    if isinstance(error, InstantiationException):
        cause = error.__cause__ or error
        key = next(
            (
                line.split(":", 1)[1].strip()
                for line in str(error).splitlines()
                if line.startswith("full_key:")
            ),
            "",
        )
        where = f"{key}: " if key else ""
        return (
            f"{where}{cause}" if isinstance(cause, ValueError) else f"{where}{type(cause).__name__}: {cause}"
        )
    if isinstance(error, ValueError | FileNotFoundError):
        return str(error)
    return None


def exit_on_config_error(error: BaseException, what: str = "bad config") -> None:
    """Print ``what: <message>`` on stderr and exit 2 when ``error`` is a config error (see
    ``config_error_message``); otherwise return so the caller re-raises it."""
    import sys

    message = config_error_message(error)
    if message is None:
        return
    print(f"{what}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def register_configs() -> None:
    """Every schema the entry points compose: engine, cluster and env (``servegym.envs.configs``)
    plus training and logging."""
    register_env_configs()
    store = ConfigStore.instance()
    store.store(group="logger", name="logger_schema", node=LoggerConfig)
    store.store(name="train_schema", node={"train": TrainConfig})
