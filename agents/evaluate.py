"""The evaluation suite: policies x workload families x load levels x seeds, one engine run each,
then a tidy table, a summary with confidence intervals and plots.

Command line (Hydra, ``conf/evaluate.yaml`` + ``conf/suite/*.yaml``)::

    python scripts/evaluate.py                                   # suite=default: conf/suite/default.yaml
    python scripts/evaluate.py suite.policies=[fcfs,lpm,plas,program_fcfs] suite.workloads=[mapreduce,debate] \\
        suite.loads=[0.5,1.0,1.5] suite.seeds=[0,1,2] suite.jobs=2
    python scripts/evaluate.py suite.policies=[fcfs,ppo] +suite.agent_overrides.ppo.checkpoint=run/policy.zip

Python (what a train -> evaluate -> export job calls with a policy it just trained)::

    from servegym.agents.evaluate import SuiteConfig, evaluate, run_suite, summarise, to_markdown
    df = run_suite(SuiteConfig(policies=["fcfs", "plas"], workloads=["mapreduce"]),
                   extra_policies={"ppo": lambda: SB3Policy(...)})     # a factory per run
    print(to_markdown(summarise(df)))
    evaluate(SuiteConfig(...), out_dir="eval/")   # runs.csv, jobs.csv, summary.md, plots/*.png

Definitions
-----------
* **Policies** are names of ``conf/agent/*.yaml`` (each a ``_target_`` Policy class, built with
  Hydra's ``instantiate``, a fresh instance per run) or keys of ``extra_policies``.
* **Workloads** are names of ``conf/workload/*.yaml``; engine and cluster come from the same
  groups ``simulate.py`` uses (``engine=``, ``cluster=``).
* **Load** multiplies the workload's offered load: the open-loop ``arrival_rate`` (jobs/s) of a
  generated workload, the number of users of a closed loop (rounded, at least 1), or the replay
  speed of a trace (arrival times divided by the load). With the same seed the trees are the
  same at every load (the generator and the arrivals draw from separate seed streams), so loads
  of a workload differ only in when trees arrive.
* **Seeds** are workload seeds. Evaluation seeds are held out from training by range: training
  episodes and its periodic evaluations use seeds below 10000 (``train.eval_seeds`` 1000+), the
  suite defaults to 10000+ (``train.test_seeds``).
* **Unloaded time** of a tree: its completion time when it runs alone on an idle cluster of the
  same engine under FCFS (trees replayed one at a time, far apart, in one engine run, so shared
  system prompts may be warm in the prefix cache, as on a long-running server).
* **SLO** of a tree, in this order: ``slo_fixed_s`` seconds if set; else the tree's own
  ``slo_s`` if its workload declares one; else ``slo_scale`` x its unloaded time (default 5x).
  SLO attainment = trees done within their SLO / all trees; goodput = those trees / makespan
  (trees per second). Slowdown = tree time / unloaded time.
* **Confidence intervals**: 95% Student-t intervals over seeds (n - 1 degrees of freedom) of the
  per-run values, cut to the metric's range: every suite metric is a time, count, rate or
  fraction, so an interval never goes below 0 (and a fraction's never above 1); ``summary.csv``
  holds the symmetric half-width (``<m>_ci``) and the cut interval (``<m>_lo``, ``<m>_hi``).
  "JCT / FCFS" is the ratio of a policy's mean tree time to the baseline's in the same
  (workload, load) cell; its interval is a t-interval on the log scale of the per-seed ratios
  (paired: a seed gives both policies the same trees and arrivals), exponentiated back, so it is
  always > 0 and as wide below 1 as above (x/2 and x2 are equally far).
* **Traces** are suite members like generated workloads: ``suite.traces`` lists trace files (or
  mappings of ``TraceWorkload`` fields), each named after its file (its stem) or its ``name:``,
  so several traces share a suite; ``suite.workloads=[trace]`` with
  ``suite.workload_overrides.trace.path=...`` works too and is named after its file the same way.
  A trace with ``resample: none`` (the default) replays the same trees for every seed, so the
  suite runs it once per (policy, load), with the first seed: its cells have n = 1 and no
  interval (shown as —, and summary.md says why), rather than n identical runs and a zero-width
  interval that would look like certainty. ``resample: bootstrap`` makes seed s a resampled copy
  of the trace (``TraceWorkload`` defines it), and the suite runs every seed as for a generator.

Outputs (``evaluate`` / the script, into the Hydra run dir or ``output_dir=``, the only place
anything is written): ``runs.csv`` (one row per run: policy, workload, load, seed, every
metric), ``jobs.csv`` (one row per tree), ``kv_timeline.csv`` (KV use over time, binned),
``summary.csv`` and ``summary.md`` (mean and CI per cell), ``failures.csv`` / ``failures.log`` when a run raised, stalled or ran past
``suite.run_timeout_s``, ``plots/*.png``.

Interruption and resuming
-------------------------
A suite's folder holds one suite (``servegym.agents.suite_io`` describes the files). Each run is
appended to ``runs.jsonl`` (with its trees and KV bins) and fsynced as it finishes, so Ctrl-C,
a crash or a killed job loses only the runs in flight; Ctrl-C prints one line (how many runs
were kept, where, how to continue) and the script exits 130. ``suite.resume=true`` with the same
``output_dir`` continues: runs already recorded are skipped, failed ones are run again, and a
suite config that differs from the recorded one is refused, naming the first differing key.
Tables and plots are written when the suite ends, each by temporary file and rename;
``report.json`` is removed first and written last, so a folder without it holds no complete
report. The folder must be empty (or absent) for a new suite: a folder with other files, or
another suite's, is refused (exit 2) rather than overwritten file by file, so old and new
tables never mix.

Scale
-----
``suite.jobs=N`` runs the runs of one suite in N worker processes (joblib/loky; results do not
depend on N). To spread a suite over machines, sweep one-cell suites with Hydra's multirun and
merge the folders afterwards::

    python scripts/evaluate.py -m hydra/launcher=joblib suite.policies=[fcfs],[plas] suite.workloads=[mapreduce],[debate]
    python scripts/evaluate.py collect=multirun/2026-05-01/12-00-00     # one summary + plots of all
    # on SLURM (pip install hydra-submitit-launcher): the same sweep with
    python scripts/evaluate.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=cpu \\
        hydra.launcher.cpus_per_task=4 suite.jobs=4 suite.policies=[fcfs],[plas] ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import job_completion_s, kv_utilization_timeline, slo_metrics
from servegym.envs.engine.policy import Policy
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import FixedJobs, JobSource
from servegym.envs.workloads.workload import TraceWorkload, Workload

from . import suite_io
from .suite_io import OutputFolderError

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The repository's ``conf/`` (editable installs); pass ``conf_dir`` when installed elsewhere."""

KEYS = ("policy", "workload", "load", "seed")
"""Columns that identify a run; every other column of ``runs.csv`` is a metric."""

HEADLINE_METRICS: dict[str, str] = {
    "jct_mean_s": "tree time mean (s)",
    "jct_p99_s": "tree time p99 (s)",
    "jobs_failed": "failed trees",
    "goodput_jobs_per_s": "goodput (trees/s)",
    "slo_attainment": "SLO attained",
    "ttft_p99_s": "TTFT p99 (s)",
    "max_wait_s": "max wait (s)",
    "prefix_hit_rate": "prefix hit",
    "preemptions": "preemptions",
    "kv_utilization_mean": "KV use",
}
"""Metrics shown in ``summary.md`` (``summary.csv`` holds every metric)."""

_NOT_METRICS = ("stalled", "stall_reason", "wall_s", "complete", "first_rejection", "workload_seeded")

FRACTION_METRICS = frozenset(
    {
        "slo_attainment",
        "prefix_hit_rate",
        "kv_utilization_mean",
        "jain_tenant_jct",
        "jain_job_speed",
        "large_model_call_share",
    }
)
"""Metrics in [0, 1]; every other metric is >= 0 (a time, count or rate): intervals are cut there."""

INCOMPLETE_COLUMNS = ("calls_rejected", "jobs_failed", "jobs_unfinished")
"""A run with any of these > 0 did not finish its work: its tree times cover finished trees only."""


class SuiteConfigError(ValueError):
    """A suite setting is wrong; the message names the key and what to do."""


class SuiteInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a suite; ``str()`` is one line saying what was kept and how to continue."""

    def __init__(self, message: str, kept: int = 0) -> None:
        super().__init__(message)
        self.message, self.kept = message, kept

    def __str__(self) -> str:
        return self.message


class RunTimeout(Exception):
    """A run took longer than ``suite.run_timeout_s``."""


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
    (the default) runs with the first seed only (see the module docstring)."""
    loads: list[float] = field(default_factory=lambda: [1.0])
    """Multipliers of each workload's offered load (see the module docstring), each > 0."""
    seeds: list[int] = field(default_factory=lambda: [10000, 10001, 10002])
    """Workload seeds; keep them out of the training range (< 10000)."""
    num_jobs: int | None = None
    """Trees per run, overriding the workloads' ``num_jobs`` (a trace's ``limit``); None keeps them."""
    jobs: int = 1
    """Worker processes (1: in this process)."""
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
    each worker otherwise); a run stuck inside one C call is stopped when that call returns."""
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
        lists = {
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
        resume, run_timeout_s, fail_on_rejected and baseline only change how a suite runs or
        reports, so a resumed suite may change them."""
        skip = {"jobs", "resume", "run_timeout_s", "fail_on_rejected", "baseline"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


# ---------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile; NaN without a degree of freedom."""
    return float(stats.t.ppf(p, df)) if df >= 1 else float("nan")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval; half-width NaN for fewer than 2 values.
    NaN values (a metric a run could not measure) are left out."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not len(x):
        return float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan")
    half = t_quantile(0.5 + confidence / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, half


def metric_range(metric: str) -> tuple[float, float]:
    """(low, high) a metric can take: [0, 1] for fractions, [0, inf) for every other suite metric."""
    return (0.0, 1.0) if metric in FRACTION_METRICS else (0.0, math.inf)


def bounded_interval(mean: float, half: float, metric: str) -> tuple[float, float]:
    """``mean -+ half`` cut to ``metric_range(metric)`` (NaN, NaN when there is no interval)."""
    if not (np.isfinite(mean) and np.isfinite(half)):
        return float("nan"), float("nan")
    low, high = metric_range(metric)
    return max(mean - half, low), min(mean + half, high)


def ratio_interval(ratios: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of a t-interval on the log scale of positive ratios, exponentiated back: always
    > 0. Ratios that are not finite and > 0 are left out; NaN, NaN for fewer than 2."""
    x = np.asarray(ratios, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    mean, half = t_interval(np.log(x), confidence)
    if not np.isfinite(half):
        return float("nan"), float("nan")
    return float(np.exp(mean - half)), float(np.exp(mean + half))


# ---------------------------------------------------------------------------- configs
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
    return OmegaConf.to_container(node, resolve=False)


def compose_config(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` (the world a suite runs in when the
    caller has no Hydra config of its own: engine, cluster, time_scale_s, env, ...)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from servegym.agents.configs import register_configs

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
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in dataclasses.fields(SuiteConfig)}
    for key in data:
        if key not in names:
            raise SuiteConfigError(f"suite.{key} is not a suite setting; known: {sorted(names)}")
    return SuiteConfig(**data)


# ---------------------------------------------------------------------------- workloads and load
def apply_load(workload: Any, load: float, num_jobs: int | None = None) -> tuple[Any, float]:
    """The workload at ``load`` x its offered load, and the factor by which to compress the built
    source's arrival times (1 when the workload itself carried the load)."""
    if isinstance(workload, Workload):
        changes: dict[str, Any] = {} if num_jobs is None else {"num_jobs": num_jobs}
        if workload.arrival == "closed":
            changes["num_users"] = max(1, round(workload.num_users * load))
        else:
            changes["arrival_rate"] = workload.arrival_rate * load
        return dataclasses.replace(workload, **changes), 1.0
    if num_jobs is not None and hasattr(workload, "limit"):
        workload = dataclasses.replace(workload, limit=num_jobs)
    return workload, load


def build_source(workload: Any, seed: int, compress: float = 1.0) -> JobSource:
    """``workload.build(seed)``, with arrival times divided by ``compress`` (trace replay speed)."""
    source = workload.build(seed)
    if compress == 1.0:
        return source
    if not isinstance(source, FixedJobs):
        raise SuiteConfigError(
            f"load {compress} on a {type(workload).__name__}: only generated workloads and fixed traces scale"
        )
    return FixedJobs([dataclasses.replace(job, arrival_s=job.arrival_s / compress) for job in source.jobs])


_UNLOADED_GAP_S = 1.0e6
_unloaded_cache: dict[tuple, np.ndarray] = {}


def unloaded_completion_s(
    jobs: Sequence[Job], engine: EngineConfig, cluster: ClusterConfig, time_scale_s: float = 30.0
) -> np.ndarray:
    """Each tree's completion time alone on an idle cluster under FCFS (see the module docstring).
    Cached per process by tree contents, so the policies and loads of a seed share one replay."""
    from servegym.agents.heuristics import FCFS

    key = (repr(engine), repr(cluster), time_scale_s, tuple((job.calls, job.tenant) for job in jobs))
    if key in _unloaded_cache:
        return _unloaded_cache[key]
    spaced = [
        dataclasses.replace(job, job_id=f"u{i}", arrival_s=i * _UNLOADED_GAP_S) for i, job in enumerate(jobs)
    ]
    replay = Engine(FixedJobs(spaced), cluster=cluster, engine=engine, time_scale_s=time_scale_s)
    replay.run(FCFS())
    order = {job.job_id: i for i, job in enumerate(replay.jobs)}
    unloaded = job_completion_s(replay)[[order[f"u{i}"] for i in range(len(jobs))]]
    if np.nanmax(unloaded, initial=0.0) >= _UNLOADED_GAP_S:
        raise RuntimeError("a tree ran longer alone than the replay gap; raise _UNLOADED_GAP_S")
    if len(_unloaded_cache) > 64:
        _unloaded_cache.clear()
    _unloaded_cache[key] = unloaded
    return unloaded


# ---------------------------------------------------------------------------- one run
class HydraPolicyFactory:
    """A picklable "new policy" callable: instantiate an agent config in the base config's scope
    (so ``${seed}``, ``${time_scale_s}``, ``${env...}`` interpolations resolve)."""

    def __init__(self, agent: dict, base: dict) -> None:
        self.agent, self.base = agent, base

    def __call__(self, seed: int) -> Policy:
        from hydra.utils import instantiate

        root = OmegaConf.create({**self.base, "seed": seed, "agent": self.agent})
        return instantiate(root.agent)


@dataclass
class RunTask:
    """Everything one run needs, picklable for a worker process."""

    policy: str
    workload: str
    load: float
    seed: int
    make_policy: Callable[..., Policy]
    takes_seed: bool  # Hydra factories take the run seed; extra_policies factories take nothing
    workload_node: dict
    base: dict
    engine: EngineConfig
    cluster: ClusterConfig
    time_scale_s: float
    num_jobs: int | None
    slo_scale: float
    slo_fixed_s: float | None
    kv_bins: int
    seeded: bool = True  # False: the workload ignores the seed (a trace without resampling)
    timeout_s: float | None = None

    @property
    def keys(self) -> dict:
        return {"policy": self.policy, "workload": self.workload, "load": self.load, "seed": self.seed}


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise ``RunTimeout`` in this thread after ``seconds`` (SIGALRM); a no-op for None, and
    (with a warning, once) where SIGALRM cannot reach the code: off the main thread, Windows."""
    if seconds is None:
        yield
        return
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        warnings.warn(
            "suite.run_timeout_s is not enforced here: runs execute off the main thread (or without "
            "SIGALRM); use suite.jobs>1 or call the suite from the main thread",
            RuntimeWarning,
            stacklevel=3,
        )
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise RunTimeout(f"the run took longer than suite.run_timeout_s={seconds:g} s and was stopped")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def run_in_worker(task: RunTask) -> dict:
    """``run_one`` in a worker process: Ctrl-C goes to the suite's process alone, which stops the
    workers (so a worker does not die mid-run printing its own traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return run_one(task)


def run_one(task: RunTask) -> dict:
    """One run; returns {"row", "jobs", "kv"} or, if it raised, stalled or ran past
    ``task.timeout_s``, {"failure"}."""
    start = time.perf_counter()
    try:
        with _deadline(task.timeout_s):
            return _run(task, start)
    except Exception as error:  # a failing run is reported with its config; the suite goes on
        return {
            "failure": {
                **task.keys,
                "error": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exc(),
            }
        }


def _run(task: RunTask, start: float) -> dict:
    """The body of ``run_one`` (exceptions reach its handler)."""
    from hydra.utils import instantiate

    root = OmegaConf.create({**task.base, "seed": task.seed, "workload": task.workload_node})
    workload, compress = apply_load(instantiate(root.workload), task.load, task.num_jobs)
    engine = Engine(
        build_source(workload, task.seed, compress),
        cluster=task.cluster,
        engine=task.engine,
        time_scale_s=task.time_scale_s,
    )
    policy = task.make_policy(task.seed) if task.takes_seed else task.make_policy()
    metrics = engine.run(policy)
    if metrics.stalled:
        return {
            "failure": {**task.keys, "error": "stalled", "message": metrics.stall_reason, "traceback": ""}
        }
    unloaded = unloaded_completion_s(engine.jobs, task.engine, task.cluster, task.time_scale_s)
    slo = _job_slos(engine.jobs, unloaded, task.slo_scale, task.slo_fixed_s)
    slo_row = slo_metrics(engine, slo, unloaded, metrics.makespan_s).as_dict()
    row = {**task.keys, **metrics.as_dict(), **slo_row}
    row.pop("stall_reason")  # always empty here: a stalled run is a failure
    row["workload_seeded"] = task.seeded
    row["wall_s"] = time.perf_counter() - start
    return {"row": row, "jobs": _job_rows(task, engine, unloaded, slo), "kv": _kv_rows(task, engine)}


def _job_slos(jobs: Sequence[Job], unloaded: np.ndarray, scale: float, fixed_s: float | None) -> np.ndarray:
    if fixed_s is not None:
        return np.full(len(jobs), float(fixed_s))
    own = np.array([np.nan if job.slo_s is None else job.slo_s for job in jobs], dtype=np.float64)
    return np.where(np.isnan(own), scale * unloaded, own)


def _job_rows(task: RunTask, engine: Engine, unloaded: np.ndarray, slo: np.ndarray) -> pd.DataFrame:
    jct = job_completion_s(engine)
    n = len(engine.jobs)
    calls = engine.calls
    outputs = np.bincount(calls.job[: calls.size], weights=calls.num_output[: calls.size], minlength=n)[:n]
    frame = pd.DataFrame(
        {
            "job_id": [job.job_id for job in engine.jobs],
            "tenant": [job.tenant for job in engine.jobs],
            "num_calls": [len(job.calls) for job in engine.jobs],
            "output_tokens": outputs.astype(np.int64),
            "arrival_s": engine.job_arrival_s[:n],
            "jct_s": jct,
            "unloaded_s": unloaded,
            "slo_s": slo,
            "met_slo": ~np.isnan(jct) & (jct <= slo),
        }
    )
    for i, (name, value) in enumerate(task.keys.items()):
        frame.insert(i, name, value)
    return frame


def _kv_rows(task: RunTask, engine: Engine) -> pd.DataFrame | None:
    """Time-weighted mean KV use per time bin and replica (each sample holds until the next)."""
    samples = kv_utilization_timeline(engine)
    if not task.kv_bins or not len(samples):
        return None
    end_s = float(np.nanmax(engine.job_finish_s[: len(engine.jobs)], initial=samples[:, 0].max()))
    edges = np.linspace(0.0, max(end_s, samples[:, 0].max()) + 1e-9, task.kv_bins + 1)
    frames = []
    for replica in np.unique(samples[:, 1]).astype(int):
        mine = samples[samples[:, 1] == replica]
        knots = np.append(mine[:, 0], edges[-1])
        area = np.concatenate([[0.0], np.cumsum(mine[:, 2] * np.diff(knots))])
        mean = np.diff(np.interp(edges, knots, area)) / np.diff(edges)
        frames.append(
            pd.DataFrame({"replica": replica, "time_s": 0.5 * (edges[1:] + edges[:-1]), "kv_used_frac": mean})
        )
    frame = pd.concat(frames, ignore_index=True)
    for i, (name, value) in enumerate(task.keys.items()):
        frame.insert(i, name, value)
    return frame


# ---------------------------------------------------------------------------- the suite
@dataclass
class SuiteResult:
    """Everything a suite produced; ``runs`` is what ``run_suite`` returns."""

    runs: pd.DataFrame
    jobs: pd.DataFrame
    kv: pd.DataFrame
    failures: pd.DataFrame
    markdown: str = ""
    """summary.md's text, once ``report`` (or ``evaluate``) wrote it."""

    def incomplete(self) -> pd.DataFrame:
        """The runs that rejected work (rows of ``runs`` with rejected calls, failed or
        unfinished trees): they ran, but their tree times cover finished trees only."""
        return incomplete_runs(self.runs)


def incomplete_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of a runs table with rejected calls, failed or unfinished trees."""
    present = [c for c in INCOMPLETE_COLUMNS if c in runs]
    if runs.empty or not present:
        return runs.iloc[0:0]
    return runs[(runs[present].fillna(0) > 0).any(axis=1)]


def rejected_work_line(runs: pd.DataFrame) -> str:
    """One line saying how much work a suite's runs rejected ("" when none did)."""
    bad = incomplete_runs(runs)
    if bad.empty:
        return ""
    total = lambda column: int(bad[column].sum()) if column in bad else 0  # noqa: E731
    return (
        f"{len(bad)} of {len(runs)} runs rejected work: {total('calls_rejected')} calls rejected, "
        f"{total('jobs_failed')} trees failed, {total('jobs_unfinished')} unfinished; their tree "
        "times cover finished trees only"
    )


def run_suite(
    config: SuiteConfig | DictConfig,
    *,
    extra_policies: dict[str, Callable[[], Policy]] | None = None,
    base_cfg: DictConfig | None = None,
    conf_dir: Path | str | None = None,
    progress: bool = True,
    console: Any = None,
) -> pd.DataFrame:
    """Run every (policy, workload, load, seed); one row per successful run.

    ``config``: a ``SuiteConfig``, or a composed ``conf/evaluate.yaml`` (its ``suite:`` node is the
    suite, the rest is the base config). ``base_cfg``: engine, cluster, time_scale_s and whatever
    agent configs interpolate (default: ``conf/config.yaml`` composed). ``extra_policies``: name
    -> factory of a fresh Policy per run (picklable by cloudpickle when ``jobs > 1``).

    Failed runs are not rows: they are listed in ``df.attrs["failures"]`` (a list of dicts with
    the run's keys, the error and its traceback). Use ``run_suite_full`` for the per-tree and
    KV tables too.
    """
    result = run_suite_full(
        config,
        extra_policies=extra_policies,
        base_cfg=base_cfg,
        conf_dir=conf_dir,
        progress=progress,
        console=console,
    )
    result.runs.attrs["failures"] = result.failures.to_dict("records")
    return result.runs


def run_suite_full(
    config: SuiteConfig | DictConfig,
    *,
    extra_policies: dict[str, Callable[[], Policy]] | None = None,
    base_cfg: DictConfig | None = None,
    conf_dir: Path | str | None = None,
    progress: bool = True,
    console: Any = None,
) -> SuiteResult:
    """``run_suite`` with every table: runs, jobs (one row per tree), kv (binned KV use), failures.
    Nothing is written; ``evaluate`` is the same with a journal and the tables in a folder."""
    plan = plan_suite(config, extra_policies=extra_policies, base_cfg=base_cfg, conf_dir=conf_dir)
    records = execute(plan, plan.tasks, progress=progress, console=console)
    return assemble(records, plan.order)


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


def execute(
    plan: SuitePlan,
    tasks: Sequence[RunTask],
    *,
    progress: bool = True,
    console: Any = None,
    journal: suite_io.RunJournal | None = None,
    kept: int = 0,
) -> list[dict]:
    """Run ``tasks`` (in ``plan.config.jobs`` processes), appending each finished run to
    ``journal``; returns one record per run ({"row", "jobs", "kv"} or {"failure"}). Ctrl-C raises
    ``SuiteInterrupted`` (its ``kept``: ``kept`` + the runs finished here) after stopping the workers."""
    from joblib import Parallel, delayed
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    config = plan.config
    if plan.note():
        console.print(f"note: {plan.note()}", highlight=False, markup=False, soft_wrap=True)
    records: list[dict] = []
    failed = 0
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results: Any = None
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            track = bar.add_task("suite", total=len(tasks))
            if config.jobs == 1:
                results = (run_one(t) for t in tasks)
            else:
                results = Parallel(n_jobs=config.jobs, return_as="generator_unordered")(
                    delayed(run_in_worker)(t) for t in tasks
                )
            for result in results:
                record = _record(result, journal is not None)
                if journal is not None:
                    journal.append(record)
                records.append(record)
                failed += "failure" in result
                _say(bar.console, result)
                bar.update(track, advance=1, description=f"suite ({failed} failed)" if failed else "suite")
                done = len(records)
                if (
                    progress
                    and not console.is_terminal
                    and (done % max(1, len(tasks) // 10) == 0 or done == len(tasks))
                ):
                    console.print(  # a log line per ~10% where no live bar can render (SLURM, CI)
                        f"suite: {done}/{len(tasks)} runs, {failed} failed, {time.perf_counter() - start:.0f} s",
                        highlight=False,
                    )
    except KeyboardInterrupt:
        if results is not None and hasattr(results, "close"):
            with contextlib.suppress(BaseException):  # joblib stops and ends its workers here
                results.close()
        total = kept + len(records)
        raise SuiteInterrupted(
            f"interrupted: {total} of {kept + len(tasks)} runs finished; not saved (no output folder)",
            kept=total,
        ) from None
    return records


def _say(console: Any, result: dict) -> None:
    """The line a failed run or a run that rejected work gets on the console."""
    if "failure" in result:
        failure = result["failure"]
        console.print(
            f"run failed: policy={failure['policy']} workload={failure['workload']} "
            f"load={failure['load']} seed={failure['seed']}: {failure['error']}: {failure['message']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return
    row = result["row"]
    if any(row.get(column, 0) for column in INCOMPLETE_COLUMNS):
        console.print(
            f"run rejected work: policy={row['policy']} workload={row['workload']} "
            f"load={row['load']} seed={row['seed']}: {row['calls_rejected']} of "
            f"{row['calls_total']} calls rejected, {row['jobs_failed']} of {row['jobs_total']} "
            f"trees failed; first: {row['first_rejection'] or '-'}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _record(result: dict, plain: bool) -> dict:
    """A run's result as a journal record (tables as column lists when ``plain``)."""
    if "failure" in result or not plain:
        return result
    kv = result["kv"]
    return {
        "row": result["row"],
        "jobs": result["jobs"].to_dict("list"),
        "kv": None if kv is None else kv.to_dict("list"),
    }


def run_key(keys: dict) -> tuple:
    """The identity of a run: (policy, workload, load, seed)."""
    return (str(keys["policy"]), str(keys["workload"]), float(keys["load"]), int(keys["seed"]))


def latest_records(records: Iterable[dict]) -> dict[tuple, dict]:
    """One record per run key: the last one, except that a failure never replaces a success
    (a resumed suite reruns only failed runs, so a later success replaces an earlier failure)."""
    latest: dict[tuple, dict] = {}
    for record in records:
        key = run_key(record["failure"] if "failure" in record else record["row"])
        if "failure" in record and key in latest and "failure" not in latest[key]:
            continue
        latest[key] = record
    return latest


def assemble(records: Iterable[dict], order: dict[str, list] | None = None) -> SuiteResult:
    """The suite's tables from run records (fresh results or a journal's lines)."""
    rows, jobs, kv, failures = [], [], [], []
    for record in latest_records(records).values():
        if "failure" in record:
            failures.append(record["failure"])
            continue
        rows.append(record["row"])
        jobs.append(pd.DataFrame(record["jobs"]))
        if record.get("kv") is not None:
            kv.append(pd.DataFrame(record["kv"]))
    return SuiteResult(
        runs=_sorted(pd.DataFrame(rows, columns=None if rows else list(KEYS)), order),
        jobs=_sorted(pd.concat(jobs, ignore_index=True) if jobs else pd.DataFrame(columns=list(KEYS)), order),
        kv=_sorted(pd.concat(kv, ignore_index=True) if kv else pd.DataFrame(columns=list(KEYS)), order),
        failures=_sorted(pd.DataFrame(failures, columns=[*KEYS, "error", "message", "traceback"]), order),
    )


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
        entries.append(("suite.traces", "trace", OmegaConf.to_container(merged), name))
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
    base = OmegaConf.to_container(base_cfg, resolve=False)
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
        obj = OmegaConf.to_object(node)
        return obj if isinstance(obj, kind) else kind(**obj)
    return kind(**node)


def _sorted(frame: pd.DataFrame, order: dict[str, list] | None = None) -> pd.DataFrame:
    """Rows by workload, load, policy (suite order), seed; rows within a run keep their order."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = order or {}
    ranks = {
        column: frame[column].map({v: i for i, v in enumerate(order.get(column) or _unique(frame[column]))})
        for column in ("policy", "workload")
    }
    keyed = frame.assign(_w=ranks["workload"], _p=ranks["policy"], _i=np.arange(len(frame)))
    keyed = keyed.sort_values(["_w", "load", "_p", "seed", "_i"], kind="stable")
    return keyed.drop(columns=["_w", "_p", "_i"]).reset_index(drop=True)


def _unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------- summaries
def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric per-run metrics of a runs table (everything but the keys and bookkeeping)."""
    return [
        c
        for c in df.columns
        if c not in KEYS
        and c not in _NOT_METRICS
        and pd.api.types.is_numeric_dtype(df[c])
        and df[c].dtype != bool
    ]


def summarise(
    df: pd.DataFrame, metrics: Sequence[str] | None = None, baseline: str = "fcfs", confidence: float = 0.95
) -> pd.DataFrame:
    """One row per (workload, load, policy): ``n`` runs and, per metric, ``<m>_mean``, ``<m>_ci``
    (the t-interval's half-width) and ``<m>_lo``/``<m>_hi`` (the interval cut to the metric's
    range, ``metric_range``); plus ``jct_ratio`` (mean tree time / the baseline's in the same
    cell) and ``jct_ratio_lo``/``_hi`` (log-scale t-interval of the per-seed ratios, > 0).

    Runs of a workload that ignores the seed (``workload_seeded`` false: a trace without
    resampling) are identical whatever their seed, so such a cell keeps one run (its first
    seed): n = 1 and no interval, never a zero-width one. ``workload_seeded`` is copied per row."""
    df = _one_run_per_seedless_cell(df)
    metrics = list(metrics or metric_columns(df))
    records = []
    for (workload, load, policy), group in df.groupby(["workload", "load", "policy"], sort=False):
        record: dict[str, Any] = {"workload": workload, "load": load, "policy": policy, "n": len(group)}
        if "workload_seeded" in group:
            record["workload_seeded"] = bool(group["workload_seeded"].astype(bool).all())
        for metric in metrics:
            mean, half = t_interval(group[metric], confidence)
            low, high = bounded_interval(mean, half, metric)
            record.update(
                {f"{metric}_mean": mean, f"{metric}_ci": half, f"{metric}_lo": low, f"{metric}_hi": high}
            )
        records.append(record)
    summary = pd.DataFrame(records)
    if summary.empty:
        return summary
    ratios = []
    for record in summary.to_dict("records"):
        cell = df[(df.workload == record["workload"]) & (df.load == record["load"])]
        mine = cell[cell.policy == record["policy"]].set_index("seed")["jct_mean_s"]
        base = cell[cell.policy == baseline].set_index("seed")["jct_mean_s"]
        if base.empty:
            ratios.append((np.nan, np.nan, np.nan))
            continue
        ratios.append(
            (mine.mean() / base.mean(), *ratio_interval((mine / base).dropna().to_numpy(), confidence))
        )
    summary["jct_ratio"], summary["jct_ratio_lo"], summary["jct_ratio_hi"] = map(
        list, zip(*ratios, strict=True)
    )
    return _sorted(summary.assign(seed=0)).drop(columns="seed")


def _one_run_per_seedless_cell(df: pd.DataFrame) -> pd.DataFrame:
    if "workload_seeded" not in df or df.empty:
        return df
    seedless = ~df["workload_seeded"].fillna(True).astype(bool)
    if not seedless.any():
        return df
    first = df[seedless].sort_values("seed", kind="stable").drop_duplicates(["workload", "load", "policy"])
    return df[~seedless | df.index.isin(first.index)]


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.3g}" if magnitude < 10 else f"{value:.1f}"
    return f"{value:.2g}" if magnitude < 0.01 else f"{value:.3f}"


def _with_interval(record: dict, metric: str) -> str:
    """The mean and its interval: "m ± half", "m [lo, hi]" where the range cut it, or "m"."""
    mean, half = record[f"{metric}_mean"], record[f"{metric}_ci"]
    text = _fmt(mean)
    if not np.isfinite(half):
        return text
    low, high = record.get(f"{metric}_lo", np.nan), record.get(f"{metric}_hi", np.nan)
    if np.isfinite(low) and (low > mean - half or high < mean + half):
        return f"{text} [{_fmt(low)}, {_fmt(high)}]"
    return f"{text} ± {_fmt(half)}"


def to_markdown(summary: pd.DataFrame, metrics: dict[str, str] | None = None, baseline: str = "fcfs") -> str:
    """Markdown tables, one per workload: mean +- 95% half-width per (load, policy) for the
    headline metrics (the interval in brackets where the metric's range cut it), the tree-time
    ratio to ``baseline``; the lowest mean tree time of each load in bold. A cell of one run has
    no interval ("[—]" after its ratio); a note names the workloads that ignore the seed."""
    metrics = {m: label for m, label in (metrics or HEADLINE_METRICS).items() if f"{m}_mean" in summary}
    lines = []
    has_ratio = "jct_ratio" in summary and summary["jct_ratio"].notna().any()
    for workload, table in summary.groupby("workload", sort=False):
        lines += [f"### {workload}", ""]
        header = ["load", "policy", "n", *metrics.values()]
        if has_ratio:
            header.insert(3, f"tree time / {baseline} [95% CI]")
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
        ]
        for load, cell in table.groupby("load", sort=False):
            means = cell["jct_mean_s_mean"] if "jct_mean_s_mean" in cell else pd.Series(dtype=float)
            best = means.min() if means.nunique() > 1 else np.nan  # no bold when every policy ties
            for record in cell.to_dict("records"):
                values = []
                for metric in metrics:
                    text = _with_interval(record, metric)
                    if metric == "jct_mean_s" and record[f"{metric}_mean"] == best:
                        text = f"**{text}**"
                    values.append(text)
                row = [f"{load:g}", str(record["policy"]), str(record["n"]), *values]
                if has_ratio:
                    ratio = f"{record['jct_ratio']:.3f}" if np.isfinite(record["jct_ratio"]) else "-"
                    if np.isfinite(record["jct_ratio_lo"]):
                        ratio += f" [{record['jct_ratio_lo']:.3f}, {record['jct_ratio_hi']:.3f}]"
                    elif record["n"] == 1 and np.isfinite(record["jct_ratio"]):
                        ratio += " [—]"
                    row.insert(3, ratio)
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append(
        "Mean ± 95% Student-t half-width over seeds; in brackets instead where the interval "
        "reaches past the metric's range (below 0, or above 1 for a fraction) and is cut there. "
        "Tree time = tree completion time, over "
        "finished trees only; failed trees (a call rejected, e.g. too long for the KV cache) "
        "are counted in their own column and are not in the tree times. "
        f"Tree time / {baseline}: ratio of mean tree times in the same cell; in brackets the "
        "log-scale t-interval of the per-seed ratios (a seed gives every policy the same trees and "
        "arrivals). n = 1: one run, no interval (—). "
        "SLO: a multiple of each tree's unloaded time unless configured otherwise; goodput = trees "
        "within SLO per second. Bold: lowest mean tree time at that load (none when all tie)."
    )
    seedless = seedless_workloads(summary)
    if seedless:
        lines += [
            "",
            f"**{', '.join(f'`{w}`' for w in seedless)}: the same trees for every seed** (a trace "
            "without resampling), so each of its cells is one run (n = 1) with no interval (—): "
            "more seeds would repeat the run exactly, and their zero-width interval would be no "
            "measure of certainty. Set the trace's resample: bootstrap to draw a different sample per seed.",
        ]
    return "\n".join(lines) + "\n"


def seedless_workloads(table: pd.DataFrame) -> list[str]:
    """Workloads of a runs or summary table whose runs ignore the seed (``workload_seeded`` false)."""
    if "workload_seeded" not in table or table.empty:
        return []
    flags = table["workload_seeded"].fillna(True).astype(bool)
    return _unique(table.loc[~flags, "workload"])


def plot_suite(runs: pd.DataFrame, out_dir: Path | str, **tables: pd.DataFrame) -> list[Path]:
    """The suite's plots (``servegym.agents.plots.plot_suite``; matplotlib loads only when called)."""
    from servegym.agents.plots import plot_suite as plot

    return plot(runs, out_dir, **tables)


# ---------------------------------------------------------------------------- end to end
REPORT_FILES = (
    "runs.csv",
    "jobs.csv",
    "kv_timeline.csv",
    "summary.csv",
    "summary.md",
    "failures.csv",
    "failures.log",
)
"""The report's files (besides ``plots/*.png``); a rewrite deletes the ones it no longer writes."""


def write_tables(result: SuiteResult, out_dir: Path | str) -> dict[str, Path]:
    """runs.csv, jobs.csv, kv_timeline.csv and, when runs failed, failures.csv + failures.log;
    each by temporary file and rename."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": out / "runs.csv", "jobs": out / "jobs.csv", "kv": out / "kv_timeline.csv"}
    suite_io.write_csv_atomic(result.runs, paths["runs"])
    suite_io.write_csv_atomic(result.jobs, paths["jobs"])
    suite_io.write_csv_atomic(result.kv, paths["kv"])
    if not result.failures.empty:
        paths["failures"] = out / "failures.csv"
        suite_io.write_csv_atomic(result.failures.drop(columns="traceback"), paths["failures"])
        log = []
        for failure in result.failures.to_dict("records"):
            keys = " ".join(f"{k}={failure[k]}" for k in KEYS)
            log.append(f"=== {keys}\n{failure['error']}: {failure['message']}\n{failure['traceback']}\n")
        paths["failures_log"] = suite_io.write_text_atomic(out / "failures.log", "".join(log))
    return paths


def report(result: SuiteResult, out_dir: Path | str, baseline: str = "fcfs", plots: bool = True) -> str:
    """Write the tables, summary.csv, summary.md and the plots, each by temporary file and
    rename; ``report.json`` is removed first and written last (the report is complete only with
    it), and report files this report does not write are deleted. Returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite_io.begin_report(out)
    written = list(write_tables(result, out).values())
    if result.runs.empty:
        markdown = "No run succeeded.\n"
    else:
        summary = summarise(result.runs, baseline=baseline)
        written.append(suite_io.write_csv_atomic(summary, out / "summary.csv"))
        markdown = to_markdown(summary, baseline=baseline)
        if baseline not in set(result.runs["policy"]):
            markdown = (
                f"No tree-time ratio column: the baseline {baseline!r} is not among the policies "
                f"{_unique(result.runs['policy'])} (set suite.baseline).\n\n" + markdown
            )
        if rejected := rejected_work_line(result.runs):
            markdown = f"**Incomplete: {rejected}.**\n\n" + markdown
        if plots:
            written += plot_suite(result.runs, out, jobs=result.jobs, kv=result.kv, summary=summary)
    if not result.failures.empty:
        markdown = (
            f"**{len(result.failures)} runs failed** and are not in these tables; see failures.csv.\n\n"
            + markdown
        )
    written.append(suite_io.write_text_atomic(out / "summary.md", markdown))
    plot_dir = out / "plots"
    stale = [out / name for name in REPORT_FILES] + (
        sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
    )
    suite_io.remove_stale(out, written, stale)
    suite_io.finish_report(out, written, runs=len(result.runs), failures=len(result.failures))
    result.markdown = markdown
    return markdown


def evaluate(
    config: SuiteConfig | DictConfig,
    out_dir: Path | str,
    *,
    extra_policies: dict[str, Callable[[], Policy]] | None = None,
    base_cfg: DictConfig | None = None,
    conf_dir: Path | str | None = None,
    progress: bool = True,
    console: Any = None,
    plots: bool = True,
) -> SuiteResult:
    """Run the suite into ``out_dir`` (see the module docstring, "Interruption and resuming"):
    each finished run appended to ``runs.jsonl`` as it completes, then the report. With
    ``suite.resume`` the runs recorded there are kept and only the rest run.

    Raises ``OutputFolderError`` for a folder that cannot take the suite (before anything runs)
    and ``SuiteInterrupted`` (a ``KeyboardInterrupt``; ``str()`` is the line to print) on Ctrl-C."""
    from rich.console import Console

    console = console or Console(stderr=True)
    plan = plan_suite(config, extra_policies=extra_policies, base_cfg=base_cfg, conf_dir=conf_dir)
    suite = plan.config
    out = Path(out_dir)
    suite_io.prepare_folder(out, plan.identity, resume=suite.resume)
    resume_hint = f"rerun with suite.resume=true into {out} to continue"
    with suite_io.RunJournal(out / suite_io.JOURNAL) as journal:
        recorded = latest_records(journal.records)
        done = {key for key, record in recorded.items() if "failure" not in record}
        todo = [task for task in plan.tasks if run_key(task.keys) not in done]
        if recorded:
            retried = sum(1 for task in todo if run_key(task.keys) in recorded)
            console.print(
                f"resuming {out}: {len(plan.tasks) - len(todo)} of {len(plan.tasks)} runs recorded, "
                f"{len(todo)} to run ({retried} failed before and run again)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        try:
            execute(plan, todo, progress=progress, console=console, journal=journal, kept=len(done))
        except SuiteInterrupted as stop:
            raise SuiteInterrupted(
                f"interrupted: {stop.kept} of {len(plan.tasks)} runs kept in {journal.path} "
                f"(no tables written); {resume_hint}",
                kept=stop.kept,
            ) from None
        records = journal.records
    wanted = {run_key(task.keys) for task in plan.tasks}
    result = assemble((r for r in records if run_key(_keys_of(r)) in wanted), plan.order)
    try:
        report(result, out, baseline=suite.baseline, plots=plots)
    except KeyboardInterrupt:
        raise SuiteInterrupted(
            f"interrupted while writing the report: all {len(result.runs) + len(result.failures)} runs "
            f"are kept in {out / suite_io.JOURNAL}, the report is incomplete (no report.json); "
            f"{resume_hint} and write it",
            kept=len(result.runs) + len(result.failures),
        ) from None
    return result


def _keys_of(record: dict) -> dict:
    return record["failure"] if "failure" in record else record["row"]


def collect(folder: Path | str, exclude: Path | str | None = None) -> SuiteResult:
    """Merge the tables of every suite under ``folder`` (e.g. a Hydra multirun sweep of one-cell
    suites). A run (policy, workload, load, seed) found in two folders is an error naming both
    files, not a silent choice of one: remove one copy, or collect a narrower folder."""
    folder = Path(folder)
    skip = Path(exclude).resolve() if exclude else None
    tables: dict[str, list[pd.DataFrame]] = {"runs": [], "jobs": [], "kv_timeline": [], "failures": []}
    seen: dict[tuple, Path] = {}
    for runs in sorted(folder.rglob("runs.csv")):
        if skip is not None and runs.parent.resolve() == skip:
            continue
        for name in tables:
            path = runs.parent / f"{name}.csv"
            if not (path.exists() and path.stat().st_size > 1):
                continue
            frame = pd.read_csv(path)
            tables[name].append(frame)
            if name in ("runs", "failures") and not frame.empty:
                for keys in frame[list(KEYS)].to_dict("records"):
                    key = run_key(keys)
                    if key in seen:
                        raise SuiteConfigError(
                            "collect: the run "
                            + " ".join(f"{k}={v}" for k, v in zip(KEYS, key, strict=True))
                            + f" is in both {seen[key]} and {path}; keep one copy (delete or move the "
                            "other folder) or collect a narrower folder"
                        )
                    seen[key] = path
    if not tables["runs"]:
        raise SuiteConfigError(f"collect: no runs.csv under {folder}")

    def merged(name: str) -> pd.DataFrame:
        frames = [f for f in tables[name] if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(KEYS))
        return _sorted(pd.concat(frames, ignore_index=True))

    failures = merged("failures")
    if "traceback" not in failures:
        failures["traceback"] = ""
    return SuiteResult(runs=merged("runs"), jobs=merged("jobs"), kv=merged("kv_timeline"), failures=failures)


def collect_identity(folder: Path | str) -> dict:
    """What a collect's output folder records in suite.json (a rerun of the same collect may
    rewrite its report)."""
    return {"kind": "collect", "folder": str(Path(folder).resolve())}


__all__ = [
    "HEADLINE_METRICS",
    "OutputFolderError",
    "RunTimeout",
    "SuiteConfig",
    "SuiteConfigError",
    "SuiteInterrupted",
    "SuitePlan",
    "SuiteResult",
    "assemble",
    "bounded_interval",
    "collect",
    "collect_identity",
    "compose_config",
    "evaluate",
    "execute",
    "incomplete_runs",
    "metric_columns",
    "metric_range",
    "plan_suite",
    "plot_suite",
    "ratio_interval",
    "rejected_work_line",
    "report",
    "run_suite",
    "run_suite_full",
    "seedless_workloads",
    "summarise",
    "t_interval",
    "to_markdown",
    "unloaded_completion_s",
]
