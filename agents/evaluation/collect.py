"""Merging the tables of several suite folders (a Hydra multirun sweep of one-cell suites) into
one ``SuiteResult``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import SuiteConfigError
from .results import KEYS, SuiteResult, run_key, sort_rows


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
        return sort_rows(pd.concat(frames, ignore_index=True))

    failures = merged("failures")
    if "traceback" not in failures:
        failures["traceback"] = ""
    return SuiteResult(runs=merged("runs"), jobs=merged("jobs"), kv=merged("kv_timeline"), failures=failures)


def collect_identity(folder: Path | str) -> dict:
    """What a collect's output folder records in suite.json (a rerun of the same collect may
    rewrite its report)."""
    return {"kind": "collect", "folder": str(Path(folder).resolve())}
