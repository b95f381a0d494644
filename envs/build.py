"""The composition root every entry point shares: a Hydra config in, an engine or env out.

``cfg`` is ``conf/config.yaml`` composed (groups workload, engine, cluster, env, ...), so
``simulate.py``, ``train.py`` and ``evaluate.py`` build identical worlds from identical configs.
"""

from __future__ import annotations

from typing import cast

import gymnasium as gym
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Policy


def build_engine(cfg: DictConfig, seed: int | None = None) -> Engine:
    """The engine of ``cfg`` with the workload drawn from ``seed`` (default ``cfg.seed``)."""
    workload = instantiate(cfg.workload)
    return Engine(
        workload.build(cfg.seed if seed is None else seed),
        # the ConfigStore schemas (envs/configs.py) make these nodes their dataclasses
        cluster=cast(ClusterConfig, OmegaConf.to_object(cfg.cluster)),
        engine=cast(EngineConfig, OmegaConf.to_object(cfg.engine)),
        time_scale_s=cfg.time_scale_s,
    )


def env_fallback(cfg: DictConfig) -> Policy | None:
    """A fresh instance of ``cfg.env.fallback`` (the policy for the decisions the agent does not
    own), or None for the env's default."""
    node = cfg.env.get("fallback")
    return None if node is None else instantiate(node)


def build_env(cfg: DictConfig) -> gym.Env:
    """The Gymnasium env ``cfg.env.id`` over the config's workload, engine and cluster."""
    import servegym.envs  # noqa: F401 - registers the ids

    return gym.make(
        cfg.env.id,
        workload=instantiate(cfg.workload),
        cluster=OmegaConf.to_object(cfg.cluster),
        engine=OmegaConf.to_object(cfg.engine),
        env=OmegaConf.to_object(cfg.env.config),
        fallback=env_fallback(cfg),
    )
