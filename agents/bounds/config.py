"""The ``bounds:`` config: which families, loads, seeds, heuristics, oracles and static grid
the headroom table sweeps, and what a rollout may spend. Checked once at start
(``BoundsConfig.check``) so a misspelt name or an overlap of training and held-out seeds fails
before hours of runs, with the key named."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf


class BoundsConfigError(ValueError):
    """A ``bounds.*`` setting is wrong; the message names the key and what to do."""


@dataclass
class RolloutConfig:
    """``bounds.rollout``: the cost of the rollout-improved policy is bounded by these."""

    k: int = 3
    """Candidates tried per branched decision: the base policy's top-k among those that fit."""
    horizon_s: float | None = None
    """Virtual seconds each branch simulates ahead; null: until the workload drains (then the
    result is never worse than the base policy)."""
    decision_budget: int = 8
    """Most ORDER decisions branched per run, spread evenly over the branchable ones."""
    max_parallel: int = 2
    """Forked branches alive at once."""


@dataclass
class BoundsConfig:
    """``bounds:`` in ``conf/bounds.yaml``; also the Python API's config (the package docstring)."""

    families: list[str] = field(default_factory=lambda: ["mapreduce", "debate"])
    """Names of ``conf/workload/*.yaml``."""
    loads: list[float] = field(default_factory=lambda: [0.5, 8.0])
    """Multipliers of each family's offered load."""
    train_seeds: list[int] = field(default_factory=lambda: [0])
    """Workload seeds the configurations are chosen on (keep them below 10000)."""
    test_seeds: list[int] = field(default_factory=lambda: [10000, 10001, 10002, 10003, 10004])
    """Held-out workload seeds every reported number comes from (the evaluation's 10000+)."""
    num_jobs: int | None = None
    """Trees per run, overriding the families' ``num_jobs``; null keeps them (200)."""
    heuristics: list[str] | None = None
    """Policies swept for the best tuned heuristic; null: ``conf/suite/default.yaml``'s policies
    minus ``clairvoyant``."""
    clairvoyant: list[str] = field(default_factory=lambda: ["sjf_oracle", "tree_srpt"])
    """Oracle policies (they read true lengths), each swept over the caps."""
    baseline: str = "fcfs"
    """The untuned reference, run at the base engine config."""
    max_num_seqs: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Grid of ``engine.max_num_seqs``."""
    max_num_batched_tokens: list[int] = field(default_factory=lambda: [2048, 8192])
    """Grid of ``engine.max_num_batched_tokens``."""
    agent_grids: dict[str, Any] = field(
        default_factory=lambda: {"program_fcfs_pinning": {"grace_s": [0.0, 4.0]}}
    )
    """Per policy, extra agent keys and their grids, e.g. ``{program_fcfs_pinning: {grace_s: [0, 4]}}``."""
    agents: dict[str, Any] = field(
        default_factory=lambda: {"tree_srpt": {"_target_": "servegym.agents.bounds.TreeSRPT"}}
    )
    """Agent configs not in ``conf/agent/`` (name -> node with a ``_target_``), e.g. tree_srpt."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    jobs: int = 1
    """Worker processes for the grid and held-out runs (results do not depend on it)."""

    def check(self, conf_dir: Path) -> None:
        """Fail with the offending key named."""
        known_agents = _group_options(conf_dir, "agent") | set(self.agents)
        known_workloads = _group_options(conf_dir, "workload")
        for key, values, known in (
            ("bounds.families", self.families, known_workloads),
            ("bounds.clairvoyant", self.clairvoyant, known_agents),
            ("bounds.heuristics", self.heuristics or [], known_agents),
            ("bounds.baseline", [self.baseline], known_agents),
        ):
            for value in values:
                if value not in known:
                    raise BoundsConfigError(f"{key}: unknown name {value!r}; known: {sorted(known)}")
        for key in (
            "families",
            "loads",
            "train_seeds",
            "test_seeds",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            values = getattr(self, key)
            if not values:
                raise BoundsConfigError(f"bounds.{key} is empty; list at least one value")
            if len(set(values)) != len(values):
                raise BoundsConfigError(f"bounds.{key} repeats a value: {list(values)}")
        if overlap := sorted(set(self.train_seeds) & set(self.test_seeds)):
            raise BoundsConfigError(
                f"bounds.train_seeds and bounds.test_seeds share {overlap}: configurations must be "
                "chosen on seeds the table does not report"
            )
        for load in self.loads:
            if not (isinstance(load, int | float) and math.isfinite(load) and load > 0):
                raise BoundsConfigError(f"bounds.loads must be finite numbers > 0, got {load!r}")
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, key)):
                raise BoundsConfigError(f"bounds.{key} must be ints >= 1, got {getattr(self, key)}")
        for name, grid in self.agent_grids.items():
            if name not in known_agents:
                raise BoundsConfigError(f"bounds.agent_grids.{name}: unknown policy {name!r}")
            for key, values in dict(grid).items():
                if not isinstance(values, list | tuple) or not values:
                    raise BoundsConfigError(f"bounds.agent_grids.{name}.{key} must be a non-empty list")
        r = self.rollout
        if not isinstance(r.k, int) or r.k < 1:
            raise BoundsConfigError(f"bounds.rollout.k must be an int >= 1, got {r.k!r}")
        if not isinstance(r.decision_budget, int) or r.decision_budget < 0:
            raise BoundsConfigError(
                f"bounds.rollout.decision_budget must be an int >= 0, got {r.decision_budget!r}"
            )
        if r.horizon_s is not None and not (math.isfinite(r.horizon_s) and r.horizon_s > 0):
            raise BoundsConfigError(
                f"bounds.rollout.horizon_s must be > 0 seconds or null, got {r.horizon_s!r}"
            )
        if not isinstance(r.max_parallel, int) or r.max_parallel < 1:
            raise BoundsConfigError(
                f"bounds.rollout.max_parallel must be an int >= 1, got {r.max_parallel!r}"
            )
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise BoundsConfigError(f"bounds.jobs must be an int >= 1, got {self.jobs!r}")

    def tuned_policies(self, conf_dir: Path) -> list[str]:
        """The heuristics swept for the best tuned one (see ``heuristics``)."""
        if self.heuristics is not None:
            return list(self.heuristics)
        suite = OmegaConf.load(Path(conf_dir) / "suite" / "default.yaml")
        return [name for name in suite.policies if name not in self.clairvoyant]


def bounds_from_cfg(node: DictConfig | dict | None) -> BoundsConfig:
    """The ``bounds:`` node as a ``BoundsConfig``; a misspelt key or a wrong type fails, named."""
    schema = OmegaConf.structured(BoundsConfig)
    try:
        merged = OmegaConf.merge(schema, node or {})
    except Exception as error:  # omegaconf's errors name the key
        raise BoundsConfigError(f"bounds: {error}") from error
    return cast(BoundsConfig, OmegaConf.to_object(merged))  # the schema makes it one


def _group_options(conf_dir: Path, group: str) -> set[str]:
    return {path.stem for path in (Path(conf_dir) / group).glob("*.yaml")}
