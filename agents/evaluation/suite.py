"""Running a suite: its runs in this process or in workers, with progress and Ctrl-C handling,
in memory (``run_suite``) or journalled into a folder and reported (``evaluate``, which resumes)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from servegym.envs.engine.policy import Policy

from . import suite_io
from .config import SuiteConfig
from .plan import SuitePlan, plan_suite
from .ray_backend import ray_results
from .report import report
from .results import INCOMPLETE_COLUMNS, SuiteResult, assemble, latest_records, record_key, run_key
from .runs import RunTask, run_in_process, run_in_worker, run_one


class SuiteInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a suite; ``str()`` is one line saying what was kept and how to continue."""

    def __init__(self, message: str, kept: int = 0) -> None:
        super().__init__(message)
        self.message, self.kept = message, kept

    def __str__(self) -> str:
        return self.message


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


def execute(
    plan: SuitePlan,
    tasks: Sequence[RunTask],
    *,
    progress: bool = True,
    console: Any = None,
    journal: suite_io.RunJournal | None = None,
    kept: int = 0,
) -> list[dict]:
    """Run ``tasks`` (in ``plan.config.jobs`` processes, or as Ray tasks with
    ``suite.backend=ray``: ``ray_backend``), appending each finished run to
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
    journal_start = journal.num_recorded() if journal is not None else 0
    failed = 0
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results: Any = None
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            track = bar.add_task("suite", total=len(tasks))
            if config.backend == "ray":
                results = ray_results(tasks, address=config.ray_address, num_cpus=config.jobs)
            elif config.jobs == 1:
                results = run_in_process(tasks, run_one)
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
            # joblib (or Ray) stops and ends its workers here; joblib warns that it cancelled the
            # tasks in flight, which is what Ctrl-C asked for (the one line below says what was kept)
            with contextlib.suppress(BaseException), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.close()
        # what the journal holds is what a resume sees: the signal may land between a record's
        # write and the line that counts it
        finished = journal.num_recorded() - journal_start if journal is not None else len(records)
        total = kept + finished
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
    """Run the suite into ``out_dir`` (see ``servegym.agents.evaluation``, "Interruption and resuming"):
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
    result = assemble((r for r in records if record_key(r) in wanted), plan.order)
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
