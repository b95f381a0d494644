"""Hydra structured-config schemas: the engine, cluster and env dataclasses registered in Hydra's
ConfigStore, so an unknown key or a wrongly typed value in ``conf/`` fails at start-up with the
key named, and ``__post_init__`` range checks run when the config is turned into objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.serving_env import EnvConfig


@dataclass
class EnvSpec:
    """``env:`` group: a registered env id, its ``EnvConfig``, and the policy that answers the
    decisions the agent does not own."""

    id: str = "servegym/Scheduling-v0"
    config: EnvConfig = field(default_factory=EnvConfig)
    fallback: Any = None
    """A Hydra node (``_target_``) of that policy, e.g. ``{_target_: servegym.agents.policies.heuristics.
    PredictedTreeSRPT}`` so a Retention-v0 agent is trained and judged under the admission order
    of the heuristic it is compared with; null: FCFS, newest evicted, round-robin, release
    (``DefaultPolicy``). Training, evaluation during training and the exported sidecar use it."""


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="engine", name="engine_schema", node=EngineConfig)
    store.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    store.store(group="env", name="env_schema", node=EnvSpec)
