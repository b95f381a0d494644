"""Settings, worlds and tasks: a policy at a static configuration (``Setting``, ``grid``), what
every run shares (``World``, picklable for joblib workers), one run (``Task``, ``run_task``) and
many (``run_tasks``). A run that raises becomes a row with its error, so one bad setting marks a
cell instead of ending a sweep of hundreds of runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from servegym.agents.evaluation.api import HydraPolicyFactory, apply_load, build_source, load_option
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Policy

from .branches import tree_time_until
from .config import BoundsConfig, BoundsConfigError, RolloutConfig
from .rollout import run_policy, run_rollout


@dataclass(frozen=True)
class Setting:
    """A policy at a static configuration: engine field overrides and agent key overrides."""

    policy: str
    engine: tuple[tuple[str, Any], ...] = ()
    agent: tuple[tuple[str, Any], ...] = ()

    @property
    def config(self) -> str:
        """e.g. ``max_num_seqs=128 max_num_batched_tokens=8192 grace_s=4``; "default" when empty."""
        items = [*self.engine, *self.agent]
        return (
            " ".join(
                f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in items
            )
            or "default"
        )


def grid(policy: str, config: BoundsConfig) -> list[Setting]:
    """Every static configuration of ``policy``: the cap grid times its ``agent_grids``."""
    extra = dict(config.agent_grids.get(policy) or {})
    keys = sorted(extra)
    settings = []
    for seqs, tokens in itertools.product(config.max_num_seqs, config.max_num_batched_tokens):
        for values in itertools.product(*(extra[key] for key in keys)):
            settings.append(
                Setting(
                    policy,
                    (("max_num_seqs", int(seqs)), ("max_num_batched_tokens", int(tokens))),
                    tuple(zip(keys, values, strict=True)),
                )
            )
    return settings


@dataclass
class World:
    """What every run shares, picklable for worker processes."""

    base: dict
    engine: EngineConfig
    cluster: ClusterConfig
    time_scale_s: float
    workloads: dict[str, dict]
    agents: dict[str, dict]
    num_jobs: int | None


@dataclass
class Task:
    """One run: a setting on a family, load and seed; ``role`` names its column of the table
    (sweep, fcfs, tuned, rollout, oracle:<name>)."""

    setting: Setting
    family: str
    load: float
    seed: int
    role: str = "sweep"
    count_branchable_k: int = 0
    """Count the ORDER decisions a rollout with this k could branch (``run_policy``)."""
    rollout: RolloutConfig | None = None
    stride: int = 1


def make_world(config: BoundsConfig, base_cfg: DictConfig, conf_dir: Path, policies: Iterable[str]) -> World:
    """Load every workload and agent node once (failing at start on a bad one)."""
    base = cast("dict[str, Any]", OmegaConf.to_container(base_cfg, resolve=False))
    base.pop("bounds", None)
    agents: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(policies):
        if name in config.agents:
            agents[name] = cast(
                "dict[str, Any]", OmegaConf.to_container(OmegaConf.create(config.agents[name]))
            )
        else:
            agents[name] = load_option(conf_dir, "agent", name)
    workloads = {name: load_option(conf_dir, "workload", name) for name in config.families}
    world = World(
        base=base,
        engine=_as(base_cfg.engine, EngineConfig),
        cluster=_as(base_cfg.cluster, ClusterConfig),
        time_scale_s=float(base_cfg.get("time_scale_s", 30.0)),
        workloads=workloads,
        agents=agents,
        num_jobs=config.num_jobs,
    )
    for name in workloads:  # fail at start, naming the family, rather than in every run
        try:
            _workload(world, name, 1.0, 0)
        except Exception as error:
            raise BoundsConfigError(f"bounds.families: {name!r} does not build: {error}") from error
    return world


def _as(node: Any, kind: type) -> Any:
    obj: Any = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    return obj if isinstance(obj, kind) else kind(**obj)


def _workload(world: World, family: str, load: float, seed: int) -> Any:
    from hydra.utils import instantiate

    root = OmegaConf.create({**world.base, "seed": seed, "workload": world.workloads[family]})
    # _convert_=all: conf/workload/mixed.yaml nests generators in lists of lists, which Hydra's
    # default conversion hands to Mixed as configs instead of objects
    workload, compress = apply_load(instantiate(root.workload, _convert_="all"), load, world.num_jobs)
    return build_source(workload, seed, compress)


def build_run(world: World, task: Task) -> tuple[Engine, Policy]:
    """The engine (the task's family, load, seed and engine overrides) and a fresh policy."""
    engine_cfg = dataclasses.replace(world.engine, **dict(task.setting.engine))
    engine = Engine(
        _workload(world, task.family, task.load, task.seed),
        cluster=world.cluster,
        engine=engine_cfg,
        time_scale_s=world.time_scale_s,
    )
    agent = {**world.agents[task.setting.policy], **dict(task.setting.agent)}
    policy = HydraPolicyFactory(agent, world.base)(task.seed)
    return engine, policy


def run_task(world: World, task: Task) -> dict:
    """One run: a row of keys, the setting, tree-time metrics and, for rollouts, their stats."""
    start = time.perf_counter()
    row: dict[str, Any] = {
        "family": task.family,
        "load": task.load,
        "seed": task.seed,
        "policy": task.setting.policy,
        "config": task.setting.config,
        "role": task.role,
    }
    try:
        engine, policy = build_run(world, task)
        if task.rollout is None:
            metrics, branchable = run_policy(engine, policy, task.count_branchable_k)
            row["branchable"] = branchable
        else:
            r = task.rollout
            metrics, stats = run_rollout(
                engine, policy, r.k, r.horizon_s, r.decision_budget, task.stride, r.max_parallel
            )
            row.update({f"rollout_{key}": value for key, value in dataclasses.asdict(stats).items()})
        row.update(
            jct_mean_s=metrics.jct_mean_s,
            jct_p99_s=metrics.jct_p99_s,
            tree_time_s=tree_time_until(engine),
            complete=bool(metrics.complete),
            error=""
            if metrics.complete
            else (metrics.stall_reason or metrics.first_rejection or "incomplete"),
        )
    except Exception as error:  # reported with its setting; the table marks the cell
        row.update(jct_mean_s=math.nan, jct_p99_s=math.nan, tree_time_s=math.nan, complete=False)
        row["error"] = f"{type(error).__name__}: {error}"
    row["wall_s"] = time.perf_counter() - start
    return row


def run_tasks(
    world: World, tasks: Sequence[Task], jobs: int = 1, log: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Run ``tasks`` (in ``jobs`` worker processes); one row each, in task order. ``log`` gets
    a progress line every ~10% of the runs."""
    from joblib import Parallel, delayed

    if jobs == 1:
        results: Iterable[dict] = (run_task(world, task) for task in tasks)
    else:
        results = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(run_task)(world, task) for task in tasks
        )
    start = time.perf_counter()
    rows = []
    step = max(1, len(tasks) // 10)
    for row in results:
        rows.append(row)
        if log and (len(rows) % step == 0 or len(rows) == len(tasks)):
            log(f"  {len(rows)}/{len(tasks)} runs, {time.perf_counter() - start:.0f} s")
    return pd.DataFrame(rows)
