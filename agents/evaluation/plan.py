"""A checked suite: its config, every run as a picklable ``RunTask`` and its identity (what a
resumed suite must match). Every workload and agent config is built here, so a bad one fails
before anything runs, naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.policy import Policy
from servegym.envs.workloads.workload import TraceWorkload

from . import suite_io
from .config import (
    DEFAULT_CONF_DIR,
    SuiteConfig,
    SuiteConfigError,
    compose_config,
    load_option,
    suite_from_cfg,
)
from .load import apply_load
from .runs import HydraPolicyFactory, RunTask


@dataclass
class SuitePlan:
    """A checked suite: its runs, its workloads' names (suite order) and its identity."""

    config: SuiteConfig
    tasks: list[RunTask]
    order: dict[str, list]
    seedless: list[str]
    identity: dict

    def note(self) -> str:
        """One line about workloads that ignore the seed ("" when none do)."""
        if not self.seedless or len(self.config.seeds) < 2:
            return ""
        return (
            f"{', '.join(map(repr, self.seedless))} {'ignores' if len(self.seedless) == 1 else 'ignore'} "
            "the seed (a trace with resample: none): one run "
            f"per policy and load, seed {self.config.seeds[0]}, instead of {len(self.config.seeds)} "
            "identical ones; their cells have n=1 and no interval"
        )


def plan_suite(
    config: SuiteConfig | DictConfig,
    *,
    extra_policies: dict[str, Callable[[], Policy]] | None = None,
    base_cfg: DictConfig | None = None,
    conf_dir: Path | str | None = None,
) -> SuitePlan:
    """Check the suite and build its runs (every workload is built once here, so a bad one
    fails before anything runs, naming it)."""
    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR)
    extra_policies = dict(extra_policies or {})
    if isinstance(config, DictConfig):
        if "suite" not in config:
            raise SuiteConfigError(
                "run_suite got a config without a suite: node; pass a SuiteConfig or conf/evaluate.yaml"
            )
        base_cfg, config = config, suite_from_cfg(config.suite)
    config.check(conf_dir, extra_policies)
    if base_cfg is None:
        base_cfg = compose_config(conf_dir=conf_dir)
    return _plan(config, base_cfg, conf_dir, extra_policies)


def _seeded(workload: Any) -> bool:
    """False for a workload that builds the same jobs for every seed: a trace without resampling."""
    return not (
        isinstance(workload, TraceWorkload) and getattr(workload, "resample", None) in (None, False, "none")
    )


def _suite_workloads(config: SuiteConfig, base: dict, conf_dir: Path) -> list[tuple[str, dict, bool]]:
    """(name, workload node, seeded) per suite workload, in suite order; each built once."""
    from hydra.utils import instantiate

    entries: list[tuple[str, str, dict, str | None]] = []  # key, option, overrides, trace name
    for name in config.workloads:
        entries.append(("suite.workloads", name, config.workload_overrides.get(name) or {}, None))
    for name, entry in zip(config.trace_names(), config.traces, strict=True):
        fields = {"path": entry} if isinstance(entry, str) else dict(entry)
        merged = OmegaConf.merge(fields, config.workload_overrides.get(name) or {})
        entries.append(
            ("suite.traces", "trace", cast("dict[str, Any]", OmegaConf.to_container(merged)), name)
        )
    built: list[tuple[str, dict, bool]] = []
    for key, option, overrides, trace_name in entries:
        node = load_option(conf_dir, "workload", option, overrides)
        label = trace_name or option
        try:  # fail at start, naming the workload, rather than in every run
            workload = instantiate(OmegaConf.create({**base, "workload": node}).workload)
            apply_load(workload, 1.0, config.num_jobs)
        except Exception as error:
            raise SuiteConfigError(f"{key}: {label!r} does not build: {error}") from error
        if isinstance(workload, TraceWorkload):  # named after its file, or its name:
            label = getattr(workload, "label", None) or Path(workload.path).stem
        if label in [b[0] for b in built]:
            raise SuiteConfigError(
                f"{key}: two workloads of the suite are named {label!r}; traces are named after their "
                "file: give one a name (suite.traces entry {path: ..., name: other})"
            )
        built.append((label, node, _seeded(workload)))
    return built


def _plan(
    config: SuiteConfig, base_cfg: DictConfig, conf_dir: Path, extra_policies: dict[str, Callable[[], Policy]]
) -> SuitePlan:
    base = cast("dict[str, Any]", OmegaConf.to_container(base_cfg, resolve=False))
    base.pop("suite", None)
    engine = _as_object(base_cfg.engine, EngineConfig)
    cluster = _as_object(base_cfg.cluster, ClusterConfig)
    time_scale_s = float(base_cfg.get("time_scale_s", 30.0))
    factories: dict[str, tuple[Callable[..., Policy], bool]] = {}
    for name in config.policies:
        if name in extra_policies:
            factories[name] = (extra_policies[name], False)
            continue
        agent = load_option(conf_dir, "agent", name, config.agent_overrides.get(name))
        missing = sorted(OmegaConf.missing_keys(OmegaConf.create({**base, "agent": agent}).agent))
        if missing:
            raise SuiteConfigError(
                f"suite.agent_overrides.{name}.{missing[0]} is required (??? in conf/agent/{name}.yaml)"
            )
        factories[name] = (HydraPolicyFactory(agent, base), True)
    workloads = _suite_workloads(config, base, conf_dir)
    tasks = [
        RunTask(
            policy=policy,
            workload=workload,
            load=float(load),
            seed=int(seed),
            make_policy=factories[policy][0],
            takes_seed=factories[policy][1],
            workload_node=node,
            base=base,
            engine=engine,
            cluster=cluster,
            time_scale_s=time_scale_s,
            num_jobs=config.num_jobs,
            slo_scale=config.slo_scale,
            slo_fixed_s=config.slo_fixed_s,
            kv_bins=config.kv_timeline_bins,
            seeded=seeded,
            timeout_s=config.run_timeout_s,
        )
        # workload and seed outermost: a worker replays each seed's unloaded trees once
        for workload, node, seeded in workloads
        for seed in (config.seeds if seeded else config.seeds[:1])
        for load in config.loads
        for policy in config.policies
    ]
    identity = suite_io.canonical(
        {
            "kind": "suite",
            "suite": config.identity(),
            "workloads": {name: node for name, node, _ in workloads},
            "agents": {
                name: factory.agent if isinstance(factory, HydraPolicyFactory) else "(extra_policies)"
                for name, (factory, _) in factories.items()
            },
            "engine": dataclasses.asdict(engine),
            "cluster": dataclasses.asdict(cluster),
            "time_scale_s": time_scale_s,
        }
    )
    return SuitePlan(
        config=config,
        tasks=tasks,
        order={"policy": list(config.policies), "workload": [name for name, _, _ in workloads]},
        seedless=[name for name, _, seeded in workloads if not seeded],
        identity=identity,
    )


def _as_object(node: Any, kind: type) -> Any:
    if isinstance(node, kind):
        return node
    if isinstance(node, DictConfig):
        obj: Any = OmegaConf.to_object(node)
        return obj if isinstance(obj, kind) else kind(**obj)
    return kind(**node)
