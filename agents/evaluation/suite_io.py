"""Durable writing for the evaluation suite: a run journal, an output folder that holds one suite,
and files written by temporary file and rename.

Layout of a suite's output folder (``servegym.agents.evaluation`` documents the tables)::

    suite.json      the suite's identity: every setting that changes a run's numbers (resume compares it)
    runs.jsonl      the journal: one line per finished run (its row, its trees, its KV bins, or its
                    failure), appended, flushed and fsynced as the run completes
    report.json     written last, after every table and plot: the files of the report and how many
                    runs it covers; removed before a report is (re)written, so a folder without it
                    holds no complete report
    runs.csv, jobs.csv, kv_timeline.csv, summary.csv, summary.md, failures.*, plots/*.png

A folder holds one suite. A new suite needs an empty (or absent) folder; a folder with another
suite's files is refused, and one with this suite's journal is continued only when asked
(``suite.resume=true``). So tables of two suites never share a folder, and an interrupted report
is marked by the missing ``report.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

JOURNAL = "runs.jsonl"
IDENTITY = "suite.json"
MANIFEST = "report.json"
HYDRA_OWN = frozenset({".hydra"})
"""Entries of a folder that are not a suite's output (Hydra's record of this invocation)."""


class OutputFolderError(ValueError):
    """The output folder cannot take this suite; the message says why and what to do."""


# ---------------------------------------------------------------------------- atomic files
def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:  # the bytes reach the disk before the name points at them
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv_atomic(frame: Any, path: Path | str) -> Path:
    """``frame.to_csv(path, index=False)`` by temporary file and rename."""
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        frame.to_csv(tmp, index=False)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure_atomic(fig: Any, path: Path | str, **kwargs: Any) -> Path:
    """``fig.savefig(path)`` by temporary file and rename (the format from ``path``'s suffix)."""
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- JSON
def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values (json's ``default``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def dumps(value: Any) -> str:
    """One line of JSON; NaN stays NaN (Python's json reads it back)."""
    return json.dumps(value, default=_plain, separators=(",", ":"), allow_nan=True)


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data (tuples as lists, numpy as Python), for comparing identities."""
    return json.loads(dumps(value))


def first_difference(recorded: Any, current: Any, prefix: str = "") -> str | None:
    """The dotted key where two JSON values first differ, with both values; None if equal."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in sorted(set(recorded) | set(current), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in recorded:
                return f"{where}: not recorded, now {current[key]!r}"
            if key not in current:
                return f"{where}: recorded {recorded[key]!r}, now absent"
            found = first_difference(recorded[key], current[key], where)
            if found:
                return found
        return None
    if _equal(recorded, current):
        return None
    return f"{prefix or '(root)'}: recorded {recorded!r}, now {current!r}"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ---------------------------------------------------------------------------- the journal
class RunJournal:
    """``runs.jsonl``: one JSON object per finished run, appended with one ``write`` and an
    ``fsync``, so a run is on disk before the next starts and a crash loses at most the run in
    flight. A torn last line (the process killed mid-write) is cut off when the journal is opened."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            self.records = list(self._read_and_repair())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _read_and_repair(self) -> Iterator[dict]:
        data = self.path.read_bytes()
        good = 0  # bytes up to the end of the last whole, parseable line
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            good += len(line)
            yield record
        if good < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())

    def append(self, record: dict) -> None:
        line = (dumps(record) + "\n").encode("utf-8")
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.records.append(record)

    def num_recorded(self) -> int:
        """Whole lines in the file now, as a resume will read them (``execute`` counts the runs
        an interrupted suite kept by it)."""
        return sum(1 for line in self.path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- the folder
def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in HYDRA_OWN) if folder.is_dir() else []


def prepare_folder(folder: Path | str, identity: dict, *, resume: bool, kind: str = "suite") -> bool:
    """Make ``folder`` ready for the suite ``identity`` (plain JSON data): create it, or check
    that it is empty, or (``resume``) that it holds this suite's journal. Returns True when
    there is a journal to continue. Raises ``OutputFolderError`` naming what to do otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output_dir {folder} is a file; name a folder")
    entries = _entries(folder)
    identity_path = folder / IDENTITY
    if not entries:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(identity_path, json.dumps(identity, indent=1, default=_plain) + "\n")
        return False
    if not identity_path.exists():
        raise OutputFolderError(
            f"output_dir {folder} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}) "
            "and holds no suite; a suite writes only into an empty folder, so that its tables never "
            "mix with other files: name a new output_dir"
        )
    try:
        recorded = json.loads(identity_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise OutputFolderError(
            f"{identity_path} is not valid JSON ({error}); name a new output_dir"
        ) from error
    if kind == "collect":
        if recorded == canonical(identity):
            return False  # the same collect again: its report is rewritten
        raise OutputFolderError(
            f"output_dir {folder} already holds another suite or collect ({IDENTITY}); "
            "name a new output_dir for this collect"
        )
    if not resume:
        raise OutputFolderError(
            f"output_dir {folder} already holds a suite ({IDENTITY}, {JOURNAL}); pass suite.resume=true "
            "to continue it (runs already recorded are skipped), or name a new output_dir"
        )
    if recorded.get("kind", "suite") != kind:
        raise OutputFolderError(
            f"suite.resume: {folder} holds a {recorded.get('kind', 'suite')}, not a {kind}; name a new output_dir"
        )
    difference = first_difference(recorded, canonical(identity))
    if difference:
        raise OutputFolderError(
            f"suite.resume: the suite in {folder} was run with a different config ({difference}); "
            "resume with the recorded setting, or name a new output_dir for the new suite"
        )
    return (folder / JOURNAL).exists()


def begin_report(folder: Path) -> None:
    """Mark the report incomplete (remove ``report.json``) before rewriting any of its files."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)


def finish_report(folder: Path, files: Iterable[Path], runs: int, failures: int) -> Path:
    """Write ``report.json`` last: the report's files (relative) and what it covers."""
    folder = Path(folder)
    names = sorted(str(Path(f).resolve().relative_to(folder.resolve())) for f in files)
    manifest = {"complete": True, "runs": runs, "failures": failures, "files": names}
    return write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def remove_stale(folder: Path, keep: Iterable[Path], candidates: Iterable[Path]) -> None:
    """Delete the report files among ``candidates`` that this report does not write (a
    failures.csv from before a retry succeeded, a plot whose data is gone)."""
    kept = {Path(p).resolve() for p in keep}
    for path in candidates:
        if path.exists() and path.resolve() not in kept:
            path.unlink()


__all__ = [
    "IDENTITY",
    "JOURNAL",
    "MANIFEST",
    "OutputFolderError",
    "RunJournal",
    "begin_report",
    "canonical",
    "dumps",
    "finish_report",
    "first_difference",
    "prepare_folder",
    "remove_stale",
    "save_figure_atomic",
    "write_csv_atomic",
    "write_text_atomic",
]
