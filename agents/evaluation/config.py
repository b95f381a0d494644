"""The suite's settings: ``SuiteConfig`` (``suite:`` in ``conf/evaluate.yaml``), its checks, and
the Hydra plumbing that reads it (the ``suite`` schema, ``conf/`` group files, the composed base
config). Kept apart from the runs so that a bad setting fails before anything is built."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The repository's ``conf/`` (editable installs); pass ``conf_dir`` when installed elsewhere."""

BACKENDS = ("process", "ray")
"""Values of ``suite.backend``."""


class SuiteConfigError(ValueError):
    """A suite setting is wrong; the message names the key and what to do."""


@dataclass
class SuiteConfig:
    """``suite:`` in ``conf/evaluate.yaml`` (``conf/suite/*.yaml``), also the Python API's config.

    Engine, cluster and ``time_scale_s`` are not here: they come from the base config (the same
    ``conf/config.yaml`` groups every entry point composes). Which policies and workloads a
    suite runs has no default here: the default suite is ``conf/suite/default.yaml``, the one
    place it is written; every other setting's default is the field's below, and the YAML files
    set only what differs from it.
    """

    policies: list[str]
    """Names of ``conf/agent/*.yaml`` (or of ``extra_policies``), in table order."""
    workloads: list[str]
    """Names of ``conf/workload/*.yaml`` (may be empty when ``traces`` lists some)."""
    traces: list[Any] = field(default_factory=list)
    """Trace files run as workloads after ``workloads``: each a path (``data/a.jsonl``, our JSONL
    format) or a mapping of ``TraceWorkload`` fields (``{path: m.jsonl, format: mooncake, limit:
    500, name: m500}``) on top of ``conf/workload/trace.yaml``. Each is named after its file's stem,
    or its ``name``; names must differ (two ``a.jsonl`` in different folders need a ``name``).
    ``workload_overrides.<name>`` applies to a trace too. On the command line:
    ``suite.workloads=[] suite.traces=[runs/a.jsonl,runs/b.jsonl]``, or with options
    ``'suite.traces=[{path:runs/a.jsonl,resample:bootstrap}]'``. A trace with ``resample: none``
    (the default) runs with the first seed only (see ``servegym.agents.evaluation``)."""
    loads: list[float] = field(default_factory=lambda: [1.0])
    """Multipliers of each workload's offered load (see ``servegym.agents.evaluation``), each > 0."""
    seeds: list[int] = field(default_factory=lambda: [10000, 10001, 10002])
    """Workload seeds; keep them out of the training range (< 10000)."""
    num_jobs: int | None = None
    """Trees per run, overriding the workloads' ``num_jobs`` (a trace's ``limit``); None keeps them."""
    jobs: int = 1
    """Worker processes (1: in this process). With ``backend=ray`` and no ``ray_address``: the
    CPUs of the local Ray instance (one run per CPU at a time); with a ``ray_address`` it is not
    used (the cluster's CPUs set how many runs go at once)."""
    backend: str = "process"
    """Where runs execute: ``process`` (this process, or a pool of ``jobs`` worker processes) or
    ``ray`` (each run a Ray task, one CPU each; needs ``pip install 'servegym[ray]'``). The
    results do not depend on it; see ``servegym.agents.evaluation.ray_backend`` for what differs."""
    ray_address: str | None = None
    """With ``backend=ray``: the cluster to join (``host:port`` of its head, or ``auto`` for the
    one ``ray start`` left on this machine); null starts a local Ray instance for the suite and
    stops it at the end. Every node must have servegym installed (its code is not shipped)."""
    baseline: str = "fcfs"
    """Policy the JCT ratio divides by: a known policy name. When it is not in ``policies`` (one
    cell of a sweep) the ratio column is left out and summary.md says why."""
    slo_scale: float = 5.0
    """A tree's SLO = slo_scale x its unloaded time (unless it or ``slo_fixed_s`` says otherwise)."""
    slo_fixed_s: float | None = None
    """One SLO in seconds for every tree; overrides ``slo_scale`` and the trees' own SLOs."""
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    """Per policy name, keys merged into its agent config, e.g. ``{ppo: {checkpoint: run/policy.zip}}``."""
    workload_overrides: dict[str, Any] = field(default_factory=dict)
    """Per workload name, keys merged into its workload config, e.g. ``{mapreduce: {generator: {fan_out: 8}}}``."""
    kv_timeline_bins: int = 200
    """Time bins of the KV-use-over-time series kept per run (0: keep none)."""
    fail_on_rejected: bool = True
    """A run with rejected calls or failed trees makes ``scripts/evaluate.py`` exit 1 (false:
    report it and exit 0). Either way it is counted in runs.csv, summary.md and the last line."""
    run_timeout_s: float | None = None
    """Wall-clock seconds one run may take (its unloaded replay included); a run past it is
    recorded as failed (error ``RunTimeout`` in failures.csv, exit 1) and the suite goes on.
    None: no limit. Enforced by SIGALRM in the process that runs it (this one with ``jobs=1``,
    each worker process or Ray task otherwise); a run stuck inside one C call is stopped when
    that call returns."""
    resume: bool = False
    """Continue the suite recorded in ``output_dir`` (its ``runs.jsonl``): recorded runs are
    skipped, failed ones run again; refused when the recorded suite config differs (the
    message names the key). False: the output folder must be empty."""

    def check(self, conf_dir: Path, extra_policies: Iterable[str] = ()) -> None:
        """Fail with the offending key named; called by ``run_suite`` before anything runs."""
        extra = set(extra_policies)
        agents = _group_options(conf_dir, "agent")
        workloads = _group_options(conf_dir, "workload")
        for key, group, values, known in (
            ("suite.policies", "agent", self.policies, agents | extra),
            ("suite.workloads", "workload", self.workloads, workloads),
        ):
            if not values and not (key == "suite.workloads" and self.traces):
                raise SuiteConfigError(f"{key} is empty; list at least one of {sorted(known)}")
            for value in values:
                if value not in known:
                    hint = " or pass it in extra_policies" if key == "suite.policies" else ""
                    raise SuiteConfigError(
                        f"{key}: unknown name {value!r}; known: {sorted(known)} "
                        f"(files in {conf_dir / group}/){hint}"
                    )
        if not self.seeds:
            raise SuiteConfigError(
                "suite.seeds is empty; list at least one workload seed, e.g. [10000,10001,10002]"
            )
        if not self.loads:
            raise SuiteConfigError("suite.loads is empty; list at least one load multiplier, e.g. [1.0]")
        lists: dict[str, list[Any]] = {
            "suite.policies": self.policies,
            "suite.workloads": self.workloads,
            "suite.loads": self.loads,
            "suite.seeds": self.seeds,
        }
        for key, values in lists.items():
            if len(set(values)) != len(values):
                raise SuiteConfigError(f"{key} repeats a value: {list(values)}")
        if self.baseline not in agents | extra:
            raise SuiteConfigError(
                f"suite.baseline: unknown policy {self.baseline!r}; the tree-time ratio divides by it: "
                f"name one of suite.policies {list(self.policies)} (a one-policy suite of a sweep may "
                "name a policy another suite runs; summary.md then says the ratio is missing)"
            )
        for load in self.loads:
            if (
                isinstance(load, bool)
                or not isinstance(load, int | float)
                or not (math.isfinite(load) and load > 0)
            ):
                raise SuiteConfigError(
                    f"suite.loads must be finite numbers > 0 (multipliers of the offered load), got {load!r}"
                )
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise SuiteConfigError(f"suite.seeds must be ints >= 0, got {seed!r}")
        if self.num_jobs is not None and (not isinstance(self.num_jobs, int) or self.num_jobs < 1):
            raise SuiteConfigError(f"suite.num_jobs must be an int >= 1 or null, got {self.num_jobs!r}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise SuiteConfigError(f"suite.jobs must be an int >= 1 (worker processes), got {self.jobs!r}")
        self._check_backend()
        if not (math.isfinite(self.slo_scale) and self.slo_scale > 0):
            raise SuiteConfigError(f"suite.slo_scale must be a finite number > 0, got {self.slo_scale!r}")
        if self.slo_fixed_s is not None and not (math.isfinite(self.slo_fixed_s) and self.slo_fixed_s > 0):
            raise SuiteConfigError(f"suite.slo_fixed_s must be > 0 seconds or null, got {self.slo_fixed_s!r}")
        if self.run_timeout_s is not None and (
            isinstance(self.run_timeout_s, bool)
            or not isinstance(self.run_timeout_s, int | float)
            or not (math.isfinite(self.run_timeout_s) and self.run_timeout_s > 0)
        ):
            raise SuiteConfigError(
                f"suite.run_timeout_s must be seconds > 0 or null (no limit), got {self.run_timeout_s!r}"
            )
        trace_names = self.trace_names()
        if len(set(trace_names)) != len(trace_names) or set(trace_names) & set(self.workloads):
            seen = [*self.workloads]
            for name, entry in zip(trace_names, self.traces, strict=True):
                if name in seen:
                    raise SuiteConfigError(
                        f"suite.traces: two workloads are named {name!r} (the second is {entry!r}); "
                        "give one a name, e.g. {path: ..., name: other}"
                    )
                seen.append(name)
        if not isinstance(self.kv_timeline_bins, int) or self.kv_timeline_bins < 0:
            raise SuiteConfigError(
                f"suite.kv_timeline_bins must be an int >= 0, got {self.kv_timeline_bins!r}"
            )
        for key, overrides, names in (
            ("suite.agent_overrides", self.agent_overrides, self.policies),
            ("suite.workload_overrides", self.workload_overrides, [*self.workloads, *trace_names]),
        ):
            for name in overrides:
                if name not in names:
                    raise SuiteConfigError(f"{key}.{name}: {name!r} is not in the suite's list {list(names)}")

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise SuiteConfigError(f"suite.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise SuiteConfigError(
                "suite.backend=ray needs Ray, which is not installed: pip install 'servegym[ray]'"
            )
        if self.ray_address is not None and self.backend != "ray":
            raise SuiteConfigError(
                f"suite.ray_address={self.ray_address!r} is set but suite.backend={self.backend!r}; "
                "add suite.backend=ray to run on that cluster, or drop suite.ray_address"
            )
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise SuiteConfigError(
                f"suite.ray_address must be host:port, 'auto' or null, got {self.ray_address!r}"
            )

    def trace_names(self) -> list[str]:
        """The suite name of each ``traces`` entry: its ``name``, else its file's stem."""
        names = []
        for i, entry in enumerate(self.traces):
            if isinstance(entry, str) and entry:
                names.append(Path(entry).stem)
            elif isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
                names.append(str(entry.get("name") or Path(entry["path"]).stem))
            else:
                raise SuiteConfigError(
                    f"suite.traces[{i}]: expected a trace file path or a mapping with a path "
                    f"(e.g. {{path: runs/a.jsonl, format: jsonl}}), got {entry!r}"
                )
        return names

    def identity(self) -> dict:
        """The settings that change a run's numbers (what ``suite.resume`` compares); jobs,
        resume, run_timeout_s, fail_on_rejected, baseline, backend and ray_address only change
        how a suite runs or reports, so a resumed suite may change them."""
        skip = {"jobs", "resume", "run_timeout_s", "fail_on_rejected", "baseline", "backend", "ray_address"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None or value == "" else value


def _none_if_set(value: Any, default: Any) -> Any:
    return default if value is None or value == "" else None


def register_resolvers() -> None:
    """``${servegym.or:a,b}`` (a unless null, else b) and ``${servegym.unless:a,b}`` (null when a
    is set, else b): conf/evaluate.yaml sends Hydra's run dir to ``output_dir`` and drops its
    ``.hydra`` record there, so ``output_dir=`` is the only place a suite writes."""
    for name, function in (("servegym.or", _or_default), ("servegym.unless", _none_if_set)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


register_resolvers()


def _group_options(conf_dir: Path, group: str) -> set[str]:
    folder = Path(conf_dir) / group
    if not folder.is_dir():
        raise SuiteConfigError(f"no config group folder {folder}; pass conf_dir= the repository's conf/")
    return {path.stem for path in folder.glob("*.yaml")}


def load_option(conf_dir: Path, group: str, name: str, overrides: Any = None) -> dict:
    """``conf/<group>/<name>.yaml`` as a plain (unresolved) dict, with ``overrides`` merged in."""
    path = Path(conf_dir) / group / f"{name}.yaml"
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise SuiteConfigError(f"{path} must be a mapping with a _target_ (a {group} class to instantiate)")
    if "defaults" in node:
        raise SuiteConfigError(
            f"{path} has a defaults list; the suite loads {group} files directly, inline it"
        )
    if overrides:
        node = OmegaConf.merge(node, overrides)
    return cast("dict[str, Any]", OmegaConf.to_container(node, resolve=False))


def compose_config(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` (the world a suite runs in when the
    caller has no Hydra config of its own: engine, cluster, time_scale_s, env, ...)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from servegym.agents.rl.configs import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside a @hydra.main app: its search path
        return compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(
        config_dir=str(Path(conf_dir or DEFAULT_CONF_DIR).resolve()), version_base="1.3"
    ):
        return compose(config_name="config", overrides=list(overrides))


def register_suite_schema() -> None:
    """``SuiteConfig`` as the schema of the ``suite`` group, so a typo in ``suite.*`` fails at start."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="suite", name="suite_schema", node=SuiteConfig)


def suite_from_cfg(node: DictConfig | dict) -> SuiteConfig:
    """The ``suite:`` node as a ``SuiteConfig`` (unknown keys fail, naming the key)."""
    data = (
        cast("dict[str, Any]", OmegaConf.to_container(node, resolve=True))
        if isinstance(node, DictConfig)
        else dict(node)
    )
    names = {f.name for f in dataclasses.fields(SuiteConfig)}
    for key in data:
        if key not in names:
            raise SuiteConfigError(f"suite.{key} is not a suite setting; known: {sorted(names)}")
    return SuiteConfig(**data)
