"""A suite's report folder: the tables, summary and plots written from a ``SuiteResult``, each
by temporary file and rename, with ``report.json`` marking a complete set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import suite_io
from .results import KEYS, SuiteResult, rejected_work_line, unique_in_order
from .summary import summarise, to_markdown


def plot_suite(runs: pd.DataFrame, out_dir: Path | str, **tables: pd.DataFrame) -> list[Path]:
    """The suite's plots (``servegym.agents.evaluation.plots.plot_suite``; matplotlib loads only when called)."""
    from servegym.agents.evaluation.plots import plot_suite as plot

    return plot(runs, out_dir, **tables)


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


def report(
    result: SuiteResult,
    out_dir: Path | str,
    baseline: str = "fcfs",
    plots: bool = True,
    metrics: dict[str, str] | None = None,
) -> str:
    """Write the tables, summary.csv, summary.md and the plots, each by temporary file and
    rename; ``report.json`` is removed first and written last (the report is complete only with
    it), and report files this report does not write are deleted. Returns the markdown.
    ``metrics`` (name -> column label) picks summary.md's columns, ``HEADLINE_METRICS`` if None
    (e.g. ``{**HEADLINE_METRICS, **INFLATION_METRICS}`` adds tokens per tree and prompt growth)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite_io.begin_report(out)
    written = list(write_tables(result, out).values())
    if result.runs.empty:
        markdown = "No run succeeded.\n"
    else:
        summary = summarise(result.runs, baseline=baseline)
        written.append(suite_io.write_csv_atomic(summary, out / "summary.csv"))
        markdown = to_markdown(summary, metrics, baseline=baseline)
        if baseline not in set(result.runs["policy"]):
            markdown = (
                f"No tree-time ratio column: the baseline {baseline!r} is not among the policies "
                f"{unique_in_order(result.runs['policy'])} (set suite.baseline).\n\n" + markdown
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
