"""One run of a suite: a policy on a workload at a load and seed, in one engine, under a wall-clock
limit; its row of metrics, its per-tree rows and its binned KV use. Picklable for worker processes."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import job_completion_s, kv_utilization_timeline, slo_metrics
from servegym.envs.engine.policy import Policy
from servegym.envs.workloads.job import Job

from .load import apply_load, build_source, unloaded_completion_s


class RunTimeout(Exception):
    """A run took longer than ``suite.run_timeout_s``."""


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


def run_in_process(tasks: Sequence[RunTask], run: Callable[[RunTask], dict]) -> Iterator[dict]:
    """``run`` (``run_one``) for each task in this process (``suite.jobs=1``). A Ctrl-C can land inside
    library code whose cleanup raises in turn (OmegaConf's flag restore once turned it into a
    ``ConfigKeyError``), and ``run_one`` would report that as a failed run and go on: a SIGINT
    handler notes the signal, so the interrupt wins over whatever exception it became. Off the
    main thread (no handlers there) the runs go as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield from (run(task) for task in tasks)
        return
    seen = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal seen
        seen = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for task in tasks:
            result = run(task)
            if seen:  # the interrupt became this run's exception: not a result
                raise KeyboardInterrupt
            yield result
    finally:
        signal.signal(signal.SIGINT, previous)


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
    # whole prompts of the tree's calls (0 for a call never ready): tokens per tree = prompt + output
    prompts = np.bincount(calls.job[: calls.size], weights=calls.prompt_tokens[: calls.size], minlength=n)[:n]
    frame = pd.DataFrame(
        {
            "job_id": [job.job_id for job in engine.jobs],
            "tenant": [job.tenant for job in engine.jobs],
            "num_calls": [len(job.calls) for job in engine.jobs],
            "output_tokens": outputs.astype(np.int64),
            "prompt_tokens": prompts.astype(np.int64),
            "arrival_s": engine.job_table.arrival_s[:n],
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
    end_s = float(np.nanmax(engine.job_table.finish_s[: len(engine.jobs)], initial=samples[:, 0].max()))
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
