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
  per-run values. "JCT / FCFS" is the ratio of a policy's mean tree time to the baseline's in
  the same (workload, load) cell; its interval is the t-interval of the per-seed ratios (paired:
  a seed gives both policies the same trees and arrivals).

Outputs (``evaluate`` / the script, into the Hydra run dir or ``output_dir=``): ``runs.csv`` (one
row per run: policy, workload, load, seed, every metric), ``jobs.csv`` (one row per tree),
``kv_timeline.csv`` (KV use over time, binned), ``summary.csv`` and ``summary.md`` (mean and CI
per cell), ``failures.csv`` / ``failures.log`` when a run raised or stalled, ``plots/*.png``.

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

import dataclasses
import math
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
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
from servegym.envs.workloads.workload import Workload

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

_NOT_METRICS = ("stalled", "stall_reason", "wall_s", "complete", "first_rejection")

INCOMPLETE_COLUMNS = ("calls_rejected", "jobs_failed", "jobs_unfinished")
"""A run with any of these > 0 did not finish its work: its tree times cover finished trees only."""


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
    """Names of ``conf/workload/*.yaml``."""
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

    def check(self, conf_dir: Path, extra_policies: Iterable[str] = ()) -> None:
        """Fail with the offending key named; called by ``run_suite`` before anything runs."""
        extra = set(extra_policies)
        agents = _group_options(conf_dir, "agent")
        workloads = _group_options(conf_dir, "workload")
        for key, group, values, known in (
            ("suite.policies", "agent", self.policies, agents | extra),
            ("suite.workloads", "workload", self.workloads, workloads),
        ):
            if not values:
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
        if not isinstance(self.kv_timeline_bins, int) or self.kv_timeline_bins < 0:
            raise SuiteConfigError(
                f"suite.kv_timeline_bins must be an int >= 0, got {self.kv_timeline_bins!r}"
            )
        for key, overrides, names in (
            ("suite.agent_overrides", self.agent_overrides, self.policies),
            ("suite.workload_overrides", self.workload_overrides, self.workloads),
        ):
            for name in overrides:
                if name not in names:
                    raise SuiteConfigError(f"{key}.{name}: {name!r} is not in the suite's list {list(names)}")


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


# ---------------------------------------------------------------------------- configs
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

    @property
    def keys(self) -> dict:
        return {"policy": self.policy, "workload": self.workload, "load": self.load, "seed": self.seed}


def run_one(task: RunTask) -> dict:
    """One run; returns {"row", "jobs", "kv"} or, if it raised or stalled, {"failure"}."""
    start = time.perf_counter()
    try:
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
        row["wall_s"] = time.perf_counter() - start
        return {"row": row, "jobs": _job_rows(task, engine, unloaded, slo), "kv": _kv_rows(task, engine)}
    except Exception as error:  # a failing run is reported with its config; the suite goes on
        return {
            "failure": {
                **task.keys,
                "error": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exc(),
            }
        }


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
    """``run_suite`` with every table: runs, jobs (one row per tree), kv (binned KV use), failures."""
    from joblib import Parallel, delayed
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    tasks = _tasks(config, base_cfg, conf_dir, extra_policies)
    console = console or Console(stderr=True)
    rows, jobs, kv, failures = [], [], [], []
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        track = bar.add_task("suite", total=len(tasks))
        results = Parallel(n_jobs=config.jobs, return_as="generator_unordered")(
            delayed(run_one)(t) for t in tasks
        )
        for result in results:
            if "failure" in result:
                failure = result["failure"]
                failures.append(failure)
                bar.console.print(
                    f"run failed: policy={failure['policy']} workload={failure['workload']} "
                    f"load={failure['load']} seed={failure['seed']}: {failure['error']}: {failure['message']}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
            else:
                row = result["row"]
                if any(row.get(column, 0) for column in INCOMPLETE_COLUMNS):
                    bar.console.print(
                        f"run rejected work: policy={row['policy']} workload={row['workload']} "
                        f"load={row['load']} seed={row['seed']}: {row['calls_rejected']} of "
                        f"{row['calls_total']} calls rejected, {row['jobs_failed']} of {row['jobs_total']} "
                        f"trees failed; first: {row['first_rejection'] or '-'}",
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
                rows.append(row)
                jobs.append(result["jobs"])
                if result["kv"] is not None:
                    kv.append(result["kv"])
            bar.update(
                track, advance=1, description=f"suite ({len(failures)} failed)" if failures else "suite"
            )
            done = len(rows) + len(failures)
            if (
                progress
                and not console.is_terminal
                and (done % max(1, len(tasks) // 10) == 0 or done == len(tasks))
            ):
                console.print(  # a log line per ~10% where no live bar can render (SLURM, CI)
                    f"suite: {done}/{len(tasks)} runs, {len(failures)} failed, {time.perf_counter() - start:.0f} s",
                    highlight=False,
                )
    order = _sort_key(config)
    return SuiteResult(
        runs=_sorted(pd.DataFrame(rows, columns=None if rows else list(KEYS)), order),
        jobs=_sorted(pd.concat(jobs, ignore_index=True) if jobs else pd.DataFrame(columns=list(KEYS)), order),
        kv=_sorted(pd.concat(kv, ignore_index=True) if kv else pd.DataFrame(columns=list(KEYS)), order),
        failures=_sorted(pd.DataFrame(failures, columns=[*KEYS, "error", "message", "traceback"]), order),
    )


def _tasks(
    config: SuiteConfig, base_cfg: DictConfig, conf_dir: Path, extra_policies: dict[str, Callable[[], Policy]]
) -> list[RunTask]:
    from hydra.utils import instantiate

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
    workloads = {}
    for name in config.workloads:
        node = load_option(conf_dir, "workload", name, config.workload_overrides.get(name))
        root = OmegaConf.create({**base, "workload": node})
        try:  # fail at start, naming the workload, rather than in every run
            apply_load(instantiate(root.workload), 1.0, config.num_jobs)
        except Exception as error:
            raise SuiteConfigError(f"suite.workloads: {name!r} does not build: {error}") from error
        workloads[name] = node
    return [
        RunTask(
            policy=policy,
            workload=workload,
            load=float(load),
            seed=int(seed),
            make_policy=factories[policy][0],
            takes_seed=factories[policy][1],
            workload_node=workloads[workload],
            base=base,
            engine=engine,
            cluster=cluster,
            time_scale_s=time_scale_s,
            num_jobs=config.num_jobs,
            slo_scale=config.slo_scale,
            slo_fixed_s=config.slo_fixed_s,
            kv_bins=config.kv_timeline_bins,
        )
        # workload and seed outermost: a worker replays each seed's unloaded trees once
        for workload in config.workloads
        for seed in config.seeds
        for load in config.loads
        for policy in config.policies
    ]


def _as_object(node: Any, kind: type) -> Any:
    if isinstance(node, kind):
        return node
    if isinstance(node, DictConfig):
        obj = OmegaConf.to_object(node)
        return obj if isinstance(obj, kind) else kind(**obj)
    return kind(**node)


def _sort_key(config: SuiteConfig) -> dict[str, list]:
    return {"policy": list(config.policies), "workload": list(config.workloads)}


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
    """One row per (workload, load, policy): ``n`` seeds and, per metric, ``<m>_mean`` and
    ``<m>_ci`` (the t-interval's half-width); plus ``jct_ratio`` (mean tree time / the
    baseline's in the same cell) and ``jct_ratio_lo``/``_hi`` (t-interval of per-seed ratios)."""
    metrics = list(metrics or metric_columns(df))
    records = []
    for (workload, load, policy), group in df.groupby(["workload", "load", "policy"], sort=False):
        record: dict[str, Any] = {"workload": workload, "load": load, "policy": policy, "n": len(group)}
        for metric in metrics:
            record[f"{metric}_mean"], record[f"{metric}_ci"] = t_interval(group[metric], confidence)
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
        paired = (mine / base).dropna()
        mean, half = t_interval(paired.to_numpy(), confidence)
        ratios.append((mine.mean() / base.mean(), mean - half, mean + half))
    summary["jct_ratio"], summary["jct_ratio_lo"], summary["jct_ratio_hi"] = map(
        list, zip(*ratios, strict=True)
    )
    return _sorted(summary.assign(seed=0)).drop(columns="seed")


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


def to_markdown(summary: pd.DataFrame, metrics: dict[str, str] | None = None, baseline: str = "fcfs") -> str:
    """Markdown tables, one per workload: mean +- 95% half-width per (load, policy) for the
    headline metrics, the tree-time ratio to ``baseline``; the lowest mean tree time of each
    load in bold."""
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
                    text = _fmt(record[f"{metric}_mean"])
                    if np.isfinite(record[f"{metric}_ci"]):
                        text += f" ± {_fmt(record[f'{metric}_ci'])}"
                    if metric == "jct_mean_s" and record[f"{metric}_mean"] == best:
                        text = f"**{text}**"
                    values.append(text)
                row = [f"{load:g}", str(record["policy"]), str(record["n"]), *values]
                if has_ratio:
                    ratio = f"{record['jct_ratio']:.3f}" if np.isfinite(record["jct_ratio"]) else "-"
                    if np.isfinite(record["jct_ratio_lo"]):
                        ratio += f" [{record['jct_ratio_lo']:.3f}, {record['jct_ratio_hi']:.3f}]"
                    row.insert(3, ratio)
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append(
        "Mean ± 95% Student-t half-width over seeds. Tree time = tree completion time, over "
        "finished trees only; failed trees (a call rejected, e.g. too long for the KV cache) "
        "are counted in their own column and are not in the tree times. "
        f"Tree time / {baseline}: ratio of mean tree times in the same cell; in brackets the "
        "t-interval of the per-seed ratios (a seed gives every policy the same trees and arrivals). "
        "SLO: a multiple of each tree's unloaded time unless configured otherwise; goodput = trees "
        "within SLO per second. Bold: lowest mean tree time at that load (none when all tie)."
    )
    return "\n".join(lines) + "\n"


def plot_suite(runs: pd.DataFrame, out_dir: Path | str, **tables: pd.DataFrame) -> list[Path]:
    """The suite's plots (``servegym.agents.plots.plot_suite``; matplotlib loads only when called)."""
    from servegym.agents.plots import plot_suite as plot

    return plot(runs, out_dir, **tables)


# ---------------------------------------------------------------------------- end to end
def write_tables(result: SuiteResult, out_dir: Path | str) -> dict[str, Path]:
    """runs.csv, jobs.csv, kv_timeline.csv and, when runs failed, failures.csv + failures.log."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": out / "runs.csv", "jobs": out / "jobs.csv", "kv": out / "kv_timeline.csv"}
    result.runs.to_csv(paths["runs"], index=False)
    result.jobs.to_csv(paths["jobs"], index=False)
    result.kv.to_csv(paths["kv"], index=False)
    if not result.failures.empty:
        paths["failures"] = out / "failures.csv"
        result.failures.drop(columns="traceback").to_csv(paths["failures"], index=False)
        with open(out / "failures.log", "w") as log:
            for failure in result.failures.to_dict("records"):
                keys = " ".join(f"{k}={failure[k]}" for k in KEYS)
                log.write(f"=== {keys}\n{failure['error']}: {failure['message']}\n{failure['traceback']}\n")
    return paths


def report(result: SuiteResult, out_dir: Path | str, baseline: str = "fcfs", plots: bool = True) -> str:
    """Write the tables, summary.csv, summary.md and the plots; returns the markdown."""
    out = Path(out_dir)
    write_tables(result, out)
    if result.runs.empty:
        markdown = "No run succeeded.\n"
    else:
        summary = summarise(result.runs, baseline=baseline)
        summary.to_csv(out / "summary.csv", index=False)
        markdown = to_markdown(summary, baseline=baseline)
        if baseline not in set(result.runs["policy"]):
            markdown = (
                f"No tree-time ratio column: the baseline {baseline!r} is not among the policies "
                f"{_unique(result.runs['policy'])} (set suite.baseline).\n\n" + markdown
            )
        if rejected := rejected_work_line(result.runs):
            markdown = f"**Incomplete: {rejected}.**\n\n" + markdown
        if plots:
            plot_suite(result.runs, out, jobs=result.jobs, kv=result.kv, summary=summary)
    (out / "summary.md").write_text(markdown)
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
) -> SuiteResult:
    """Run the suite and write everything into ``out_dir`` (see the module docstring)."""
    result = run_suite_full(
        config,
        extra_policies=extra_policies,
        base_cfg=base_cfg,
        conf_dir=conf_dir,
        progress=progress,
        console=console,
    )
    suite = suite_from_cfg(config.suite) if isinstance(config, DictConfig) else config
    report(result, out_dir, baseline=suite.baseline)
    return result


def collect(folder: Path | str, exclude: Path | str | None = None) -> SuiteResult:
    """Merge the tables of every suite under ``folder`` (e.g. a Hydra multirun sweep of one-cell
    suites); a run present twice keeps its last copy."""
    folder = Path(folder)
    skip = Path(exclude).resolve() if exclude else None
    tables: dict[str, list[pd.DataFrame]] = {"runs": [], "jobs": [], "kv_timeline": [], "failures": []}
    for runs in sorted(folder.rglob("runs.csv")):
        if skip is not None and runs.parent.resolve() == skip:
            continue
        for name in tables:
            path = runs.parent / f"{name}.csv"
            if path.exists() and path.stat().st_size > 1:
                tables[name].append(pd.read_csv(path))
    if not tables["runs"]:
        raise SuiteConfigError(f"collect: no runs.csv under {folder}")

    def merged(name: str, unique: Sequence[str]) -> pd.DataFrame:
        frames = [f for f in tables[name] if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(KEYS))
        frame = pd.concat(frames, ignore_index=True)
        return _sorted(frame.drop_duplicates(subset=[*KEYS, *unique], keep="last"))

    failures = merged("failures", ())
    if "traceback" not in failures:
        failures["traceback"] = ""
    return SuiteResult(
        runs=merged("runs", ()),
        jobs=merged("jobs", ("job_id",)),
        kv=merged("kv_timeline", ("replica", "time_s")),
        failures=failures,
    )


__all__ = [
    "HEADLINE_METRICS",
    "SuiteConfig",
    "SuiteConfigError",
    "SuiteResult",
    "collect",
    "compose_config",
    "evaluate",
    "incomplete_runs",
    "metric_columns",
    "plot_suite",
    "rejected_work_line",
    "report",
    "run_suite",
    "run_suite_full",
    "summarise",
    "t_interval",
    "to_markdown",
    "unloaded_completion_s",
]
