"""A suite's tables (runs, trees, KV use, failures) assembled from run records, in suite order,
and what they say about runs that did not finish their work."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

KEYS = ("policy", "workload", "load", "seed")
"""Columns that identify a run; every other column of ``runs.csv`` is a metric."""

INCOMPLETE_COLUMNS = ("calls_rejected", "jobs_failed", "jobs_unfinished")
"""A run with any of these > 0 did not finish its work: its tree times cover finished trees only."""


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


def run_key(keys: dict) -> tuple:
    """The identity of a run: (policy, workload, load, seed)."""
    return (str(keys["policy"]), str(keys["workload"]), float(keys["load"]), int(keys["seed"]))


def record_key(record: dict) -> tuple:
    """The ``run_key`` of a run record ({"row", ...} or {"failure"})."""
    return run_key(record["failure"] if "failure" in record else record["row"])


def latest_records(records: Iterable[dict]) -> dict[tuple, dict]:
    """One record per run key: the last one, except that a failure never replaces a success
    (a resumed suite reruns only failed runs, so a later success replaces an earlier failure)."""
    latest: dict[tuple, dict] = {}
    for record in records:
        key = record_key(record)
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
        runs=sort_rows(pd.DataFrame(rows, columns=None if rows else list(KEYS)), order),
        jobs=sort_rows(
            pd.concat(jobs, ignore_index=True) if jobs else pd.DataFrame(columns=list(KEYS)), order
        ),
        kv=sort_rows(pd.concat(kv, ignore_index=True) if kv else pd.DataFrame(columns=list(KEYS)), order),
        failures=sort_rows(pd.DataFrame(failures, columns=[*KEYS, "error", "message", "traceback"]), order),
    )


def sort_rows(frame: pd.DataFrame, order: dict[str, list] | None = None) -> pd.DataFrame:
    """Rows by workload, load, policy (suite order), seed; rows within a run keep their order."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = order or {}
    ranks = {
        column: frame[column].map(
            {v: i for i, v in enumerate(order.get(column) or unique_in_order(frame[column]))}
        )
        for column in ("policy", "workload")
    }
    keyed = frame.assign(_w=ranks["workload"], _p=ranks["policy"], _i=np.arange(len(frame)))
    keyed = keyed.sort_values(["_w", "load", "_p", "seed", "_i"], kind="stable")
    return keyed.drop(columns=["_w", "_p", "_i"]).reset_index(drop=True)


def unique_in_order(values: Iterable) -> list:
    """Distinct values in first-seen order (the order of a table without a suite's order)."""
    return list(dict.fromkeys(values))
