"""Turn public LLM serving traces into Jobs, so the engine can replay real arrival and length
patterns (``FixedJobs(result.jobs)``) next to the synthetic agent-tree generators.

Formats read (first row of each shown; extra fields or columns are ignored):

- Mooncake FAST'25 JSONL (``kvcache-ai/Mooncake``, ``FAST25-release/traces``)::

      {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 2353]}

  ``timestamp`` in ms (some copies name it ``timestamp_ms``); each hash id names one 512-token
  prompt block, and equal ids mean equal tokens.
- Azure LLM inference trace CSV (2023 Splitwise release and 2024 release)::

      TIMESTAMP,ContextTokens,GeneratedTokens
      2023-11-16 18:15:46.6805900,4808,10

  ``TIMESTAMP`` is a wall-clock time with up to 7 fractional digits (an optional trailing
  ``Z`` or ``+hh:mm`` offset is honoured). No prefix information.
- BurstGPT CSV::

      Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
      5.0,ChatGPT,472,18,490,Conversation log

  ``Timestamp`` in seconds. ``Response tokens == 0`` marks a failed request.

What every importer does:

- One job per kept row by default: a single ``user`` call, ``output_tokens`` = the logged
  output length, ``max_tokens`` = ``max_tokens_budget`` or the output length, ``arrival_s`` =
  the row's time minus the earliest kept row's time (the first row in a sorted trace),
  subtracted on the exact values as written before they become float seconds
  (``traces.relative_seconds``), so epoch or nanosecond-scale clocks keep their resolution.
  A NaN or infinite time, or kept rows spanning more than ``MAX_ARRIVAL_SPAN_S`` (31.7 years,
  e.g. a ``timestamp`` of 1e308 ms), raise ``TraceFormatError`` naming the file, line and field.
- Rows that cannot become a call are skipped and counted by reason in
  ``ImportResult.skipped``, because real traces hold a few and one should not abort a
  ten-million-row import: ``"zero_input"`` (empty prompt), ``"zero_output"`` (nothing
  generated) and, for BurstGPT, ``"failed"`` (``Response tokens == 0``, the trace's failure
  marker; checked before ``zero_input``).
- A malformed row (bad JSON, a missing field or column, a non-integer or negative length, an
  unreadable time) raises ``TraceFormatError`` naming the file and the 1-based line.
- ``limit`` keeps the first ``limit`` usable rows and stops reading there (BurstGPT has 10M).
- ``iter_import`` streams single-call jobs in arrival order while reading, the same jobs as the
  ``import_*`` functions give for a trace whose rows never step back in time more than
  ``reorder_window_s`` (it refuses one that does, naming the line; see ``traces.iter_jobs``).
  Mooncake sessions need a session's later rows before its job can start, so grouping is
  whole-file only.
- Job ids are ``<file stem>/<line>``; the source and line(s) are in ``job.meta``.

Prompts. Mooncake blocks become shared ``Text`` segments, so the engine's prefix cache sees
the trace's real reuse: block id ``h`` is ``Text("mooncake/h<h>", 512)``. The last block takes
the remainder so the total equals ``input_length``; a block shorter than 512 gets the key
``mooncake/h<h>:<tokens>`` (a partial block must not share KV with a full one), and tokens
beyond ``len(hash_ids) * 512`` become one unique ``Text``. Azure and BurstGPT prompts are one
unique ``Text`` each.

Sessions (``group_sessions=True``, Mooncake only). A conversation turn's prompt is the previous
turn's prompt, its answer and a new message, so request R continues the latest request T of a
session when all of T's full-block hash ids (at least one) are the leading ids of R's, the
deepest of them was first seen in that session (so a system prompt shared by all users does
not link strangers), R arrives within ``session_gap_s`` of T, and R is longer than T's prompt
plus T's output. Full blocks only, because Mooncake gives a prompt's trailing partial block its
own id, which the next turn (where that block is full) never repeats. R then joins T's job as
its child: prompt = T's prompt + ``Output(T)`` + a unique ``Text`` for the rest, and T's
``tool_latency_s`` = the arrival gap (the trace has no completion times, so this is an upper
bound on the user's think time). Sessions are chains; a request that matches no session starts
one. Azure and BurstGPT have no session ids or prefix hashes, so grouping them would invent
structure; ``group_sessions=True`` raises there.
"""

from __future__ import annotations

import calendar
import csv
import dataclasses
import decimal
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from servegym.envs.workloads.job import Call, Job, Output, Segment, Text
from servegym.envs.workloads.traces import (
    REORDER_WINDOW_S,
    RawTime,
    TraceFormatError,
    in_arrival_order,
    relative_seconds,
    utf8_lines,
)

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash id."""

DEFAULT_SESSION_GAP_S = 600.0
"""A conversation idle longer than this is over (a common chat-session timeout)."""


@dataclass(frozen=True)
class ImportResult:
    """The imported jobs and how many rows were skipped, by reason."""

    jobs: list[Job]
    skipped: dict[str, int]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class _Request:
    """One usable trace row, before it becomes a call."""

    line: int
    raw_time: RawTime  # exactly as the file wrote it, in the file's unit (see _on_zero_clock)
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    time_s: float = math.nan  # seconds after the earliest kept row, set by _on_zero_clock


Row = _Request | str  # a usable request, or the reason a row was skipped


def import_mooncake(
    path: str | os.PathLike[str],
    *,
    group_sessions: bool = False,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
    max_tokens_budget: int | None = None,
    limit: int | None = None,
) -> ImportResult:
    """Import a Mooncake FAST'25 JSONL trace; shared hash ids become shared prompt prefixes."""
    path = Path(path)
    _check_options(session_gap_s, max_tokens_budget, limit)
    requests, skipped = _collect(_mooncake_rows(path), limit)
    requests = _on_zero_clock(requests, path, "timestamp", Decimal("0.001"))
    if group_sessions:
        jobs = _mooncake_sessions(requests, path.stem, session_gap_s, max_tokens_budget)
    else:
        jobs = _single_call_jobs(requests, "mooncake", path.stem, _mooncake_prompt, max_tokens_budget)
    return ImportResult(jobs, skipped)


def iter_import(
    path: str | os.PathLike[str],
    format: str,
    *,
    max_tokens_budget: int | None = None,
    limit: int | None = None,
    reorder_window_s: float = REORDER_WINDOW_S,
    set_call_model: bool = False,
    skipped: Counter[str] | None = None,
) -> Iterator[Job]:
    """Stream a public trace (``format``: mooncake, azure or burstgpt) as single-call jobs in
    arrival order, read as they are pulled; the jobs ``import_<format>`` gives, job for job
    (module docstring). Skipped rows are counted into ``skipped`` as they are read."""
    path = Path(path)
    _check_options(DEFAULT_SESSION_GAP_S, max_tokens_budget, limit)
    unit: RawTime  # seconds per timestamp unit
    if format == "mooncake":
        rows, field, unit, source, prompt_for = (
            _mooncake_rows(path),
            "timestamp",
            Decimal("0.001"),
            "mooncake",
            _mooncake_prompt,
        )
    elif format == "azure":
        rows, field, unit, source, prompt_for = _azure_rows(path), "TIMESTAMP", 1, "azure", _unique_prompt
    elif format == "burstgpt":
        rows, field, unit, source, prompt_for = (
            _burstgpt_rows(path, set_call_model),
            "Timestamp",
            1,
            "burstgpt",
            _unique_prompt,
        )
    else:
        raise ValueError(f"iter_import: format must be mooncake, azure or burstgpt, got {format!r}")
    counts = Counter() if skipped is None else skipped
    records = ((r.raw_time, r.line, r) for r in _usable(rows, limit, counts))
    for time_s, _, r in in_arrival_order(records, path, field, unit, reorder_window_s):
        yield _single_call_job(
            dataclasses.replace(r, time_s=time_s), source, path.stem, prompt_for, max_tokens_budget
        )


def import_azure(
    path: str | os.PathLike[str],
    *,
    group_sessions: bool = False,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
    max_tokens_budget: int | None = None,
    limit: int | None = None,
) -> ImportResult:
    """Import an Azure LLM inference trace CSV (2023 or 2024 release) as single-call jobs.

    ``group_sessions`` and ``session_gap_s`` keep the importers' signatures alike; grouping
    raises here, since the trace has no session or prefix information.
    """
    path = Path(path)
    _check_options(session_gap_s, max_tokens_budget, limit)
    _refuse_grouping(group_sessions, "Azure")
    requests, skipped = _collect(_azure_rows(path), limit)
    requests = _on_zero_clock(requests, path, "TIMESTAMP", 1)
    return ImportResult(
        _single_call_jobs(requests, "azure", path.stem, _unique_prompt, max_tokens_budget), skipped
    )


def import_burstgpt(
    path: str | os.PathLike[str],
    *,
    group_sessions: bool = False,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
    max_tokens_budget: int | None = None,
    limit: int | None = None,
    set_call_model: bool = False,
) -> ImportResult:
    """Import a BurstGPT CSV as single-call jobs, skipping failed requests (grouping raises, as
    for Azure).

    The ``Model`` column is kept in ``job.meta["model"]``; ``set_call_model=True`` also puts it
    in ``Call.model`` for routing experiments (off by default: the engine must then know names
    such as ``ChatGPT`` and ``GPT-4``).
    """
    path = Path(path)
    _check_options(session_gap_s, max_tokens_budget, limit)
    _refuse_grouping(group_sessions, "BurstGPT")
    requests, skipped = _collect(_burstgpt_rows(path, set_call_model), limit)
    requests = _on_zero_clock(requests, path, "Timestamp", 1)
    return ImportResult(
        _single_call_jobs(requests, "burstgpt", path.stem, _unique_prompt, max_tokens_budget), skipped
    )


# --- options and shared assembly --------------------------------------------------------------


def _check_options(session_gap_s: float, max_tokens_budget: int | None, limit: int | None) -> None:
    if not session_gap_s >= 0:
        raise ValueError(f"session_gap_s must be >= 0, got {session_gap_s!r}")
    if max_tokens_budget is not None and max_tokens_budget < 1:
        raise ValueError(f"max_tokens_budget must be >= 1 or None, got {max_tokens_budget!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit!r}")


def _refuse_grouping(group_sessions: bool, name: str) -> None:
    if group_sessions:
        raise ValueError(
            f"{name} traces have no session ids or prefix hashes, so their requests cannot be grouped "
            "into sessions without inventing structure; import single-call jobs (group_sessions=False), "
            "or use import_mooncake or a generator for multi-call jobs"
        )


def _collect(rows: Iterator[Row], limit: int | None) -> tuple[list[_Request], dict[str, int]]:
    skipped: Counter[str] = Counter()
    requests = list(_usable(rows, limit, skipped))
    return requests, dict(skipped)


def _usable(rows: Iterator[Row], limit: int | None, skipped: Counter[str]) -> Iterator[_Request]:
    """The usable rows, counting skipped ones by reason; stops after ``limit`` usable rows."""
    if limit == 0:
        return
    kept = 0
    for row in rows:
        if isinstance(row, str):
            skipped[row] += 1
            continue
        yield row
        kept += 1
        if limit is not None and kept >= limit:
            return


def _on_zero_clock(
    requests: list[_Request], path: Path, time_field: str, seconds_per_unit: RawTime
) -> list[_Request]:
    """The requests with ``time_s`` = seconds after the earliest one, shifted exactly."""
    times_s = relative_seconds(
        [r.raw_time for r in requests], [r.line for r in requests], path, time_field, seconds_per_unit
    )
    return [dataclasses.replace(r, time_s=t) for r, t in zip(requests, times_s, strict=True)]


def _single_call_jobs(
    requests: list[_Request],
    source: str,
    stem: str,
    prompt_for: Callable[[_Request, str], tuple[Text, ...]],
    max_tokens_budget: int | None,
) -> list[Job]:
    return [_single_call_job(r, source, stem, prompt_for, max_tokens_budget) for r in requests]


def _single_call_job(
    r: _Request,
    source: str,
    stem: str,
    prompt_for: Callable[[_Request, str], tuple[Text, ...]],
    max_tokens_budget: int | None,
) -> Job:
    job_id = f"{stem}/{r.line}"
    call = Call(
        call_id=0,
        role="user",
        prompt=prompt_for(r, job_id),
        output_tokens=r.output_tokens,
        max_tokens=max_tokens_budget or r.output_tokens,
        model=r.model,
    )
    meta = {"source": source, "lines": [r.line], **r.meta}
    return Job(job_id=job_id, arrival_s=r.time_s, calls=(call,), kind=source, meta=meta)


def _unique_prompt(r: _Request, job_id: str) -> tuple[Text, ...]:
    return (Text(f"{job_id}/prompt", r.input_tokens),)


# --- Mooncake ---------------------------------------------------------------------------------


def _mooncake_prompt(r: _Request, job_id: str) -> tuple[Text, ...]:
    segments = []
    remaining = r.input_tokens
    for hash_id in r.hash_ids:
        if remaining == 0:
            break
        num_tokens = min(MOONCAKE_BLOCK_TOKENS, remaining)
        key = (
            f"mooncake/h{hash_id}"
            if num_tokens == MOONCAKE_BLOCK_TOKENS
            else f"mooncake/h{hash_id}:{num_tokens}"
        )
        segments.append(Text(key, num_tokens))
        remaining -= num_tokens
    if remaining:
        segments.append(Text(f"{job_id}/rest", remaining))
    return tuple(segments)


def _mooncake_rows(path: Path) -> Iterator[Row]:
    with utf8_lines(path) as lines:
        for line_no, line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_float=Decimal, parse_constant=Decimal)
            except json.JSONDecodeError as err:
                raise _row_error(path, line_no, f"invalid JSON: {err.msg} at column {err.colno}") from err
            if not isinstance(obj, dict):
                raise _row_error(path, line_no, "a Mooncake row must be a JSON object")
            if ("timestamp" in obj) == ("timestamp_ms" in obj):
                raise _row_error(
                    path, line_no, "timestamp: give exactly one of 'timestamp' or 'timestamp_ms' (ms)"
                )
            time_field = "timestamp" if "timestamp" in obj else "timestamp_ms"
            time_ms = obj[time_field]
            if (
                not isinstance(time_ms, int | Decimal)
                or isinstance(time_ms, bool)
                or (isinstance(time_ms, Decimal) and not time_ms.is_finite())
            ):
                raise _row_error(path, line_no, f"{time_field}: must be a number of ms, got {time_ms!r}")
            input_tokens = _json_length(obj, "input_length", path, line_no)
            output_tokens = _json_length(obj, "output_length", path, line_no)
            hash_ids = obj.get("hash_ids")
            if not isinstance(hash_ids, list):
                raise _row_error(path, line_no, f"hash_ids: must be a list of integers, got {hash_ids!r}")
            for index, hash_id in enumerate(hash_ids):
                if type(hash_id) is not int:
                    raise _row_error(path, line_no, f"hash_ids[{index}]: must be an integer, got {hash_id!r}")
            if input_tokens == 0:
                yield "zero_input"
            elif output_tokens == 0:
                yield "zero_output"
            else:
                yield _Request(line_no, time_ms, input_tokens, output_tokens, tuple(hash_ids))


def _json_length(obj: dict[str, Any], name: str, path: Path, line_no: int) -> int:
    if name not in obj:
        raise _row_error(path, line_no, f"{name}: missing required field")
    value = obj[name]
    if type(value) is not int or value < 0:
        raise _row_error(path, line_no, f"{name}: must be an integer >= 0, got {value!r}")
    return value


def _mooncake_sessions(
    requests: list[_Request], stem: str, session_gap_s: float, max_tokens_budget: int | None
) -> list[Job]:
    """Chain requests into sessions (rule in the module docstring), then build one job each."""
    sessions: list[list[_Request]] = []
    first_seen: dict[int, int] = {}  # hash id -> the session it first appeared in
    for r in requests:
        index = _continued_session(r, sessions, first_seen, session_gap_s, max_tokens_budget)
        if index is None:
            index = len(sessions)
            sessions.append([])
        sessions[index].append(r)
        for hash_id in r.hash_ids:
            first_seen.setdefault(hash_id, index)
    return [_session_job(chain, stem, max_tokens_budget) for chain in sessions]


def _continued_session(
    r: _Request,
    sessions: list[list[_Request]],
    first_seen: dict[int, int],
    session_gap_s: float,
    max_tokens_budget: int | None,
) -> int | None:
    # Longest match first; each depth has one candidate, the session that introduced that block.
    for depth in range(len(r.hash_ids), 0, -1):
        index = first_seen.get(r.hash_ids[depth - 1])
        if index is None:
            continue
        tail = sessions[index][-1]
        full_blocks = min(tail.input_tokens // MOONCAKE_BLOCK_TOKENS, len(tail.hash_ids))
        if (
            full_blocks == depth
            and tail.hash_ids[:depth] == r.hash_ids[:depth]
            and 0 <= r.time_s - tail.time_s <= session_gap_s
            and r.input_tokens > tail.input_tokens + _generated(tail, max_tokens_budget)
        ):
            return index
    return None


def _generated(r: _Request, max_tokens_budget: int | None) -> int:
    return min(r.output_tokens, max_tokens_budget or r.output_tokens)


def _session_job(chain: list[_Request], stem: str, max_tokens_budget: int | None) -> Job:
    job_id = f"{stem}/{chain[0].line}"
    calls: list[Call] = []
    for index, r in enumerate(chain):
        prompt: tuple[Segment, ...]
        if index == 0:
            prompt = _mooncake_prompt(r, job_id)
        else:
            parent = chain[index - 1]
            new_tokens = r.input_tokens - parent.input_tokens - _generated(parent, max_tokens_budget)
            prompt = (*calls[-1].prompt, Output(index - 1), Text(f"{stem}/{r.line}/new", new_tokens))
        think_s = chain[index + 1].time_s - r.time_s if index + 1 < len(chain) else 0.0
        calls.append(
            Call(
                call_id=index,
                role="user",
                prompt=prompt,
                output_tokens=r.output_tokens,
                max_tokens=max_tokens_budget or r.output_tokens,
                parents=(index - 1,) if index else (),
                tool_latency_s=think_s,
            )
        )
    meta = {"source": "mooncake", "lines": [r.line for r in chain]}
    return Job(
        job_id=job_id,
        arrival_s=chain[0].time_s,
        calls=tuple(calls),
        kind="mooncake-session",
        meta=meta,
    )


# --- CSV traces -------------------------------------------------------------------------------

_AZURE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?")


def _azure_rows(path: Path) -> Iterator[Row]:
    for line_no, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        time_s = _parse_wall_time(row["TIMESTAMP"], path, line_no)
        input_tokens = _csv_length(row, "ContextTokens", path, line_no)
        output_tokens = _csv_length(row, "GeneratedTokens", path, line_no)
        if input_tokens == 0:
            yield "zero_input"
        elif output_tokens == 0:
            yield "zero_output"
        else:
            yield _Request(line_no, time_s, input_tokens, output_tokens)


def _burstgpt_rows(path: Path, set_call_model: bool) -> Iterator[Row]:
    for line_no, row in _csv_rows(path, ("Timestamp", "Model", "Request tokens", "Response tokens")):
        try:
            time_s = Decimal(row["Timestamp"].strip())
        except decimal.InvalidOperation:
            time_s = Decimal("NaN")
        if not time_s.is_finite():
            raise _row_error(
                path, line_no, f"Timestamp: must be a finite number of seconds, got {row['Timestamp']!r}"
            )
        input_tokens = _csv_length(row, "Request tokens", path, line_no)
        output_tokens = _csv_length(row, "Response tokens", path, line_no)
        model = row["Model"]
        if output_tokens == 0:
            yield "failed"
        elif input_tokens == 0:
            yield "zero_input"
        else:
            meta = {"model": model, "log_type": row.get("Log Type")}
            yield _Request(
                line_no,
                time_s,
                input_tokens,
                output_tokens,
                model=model if set_call_model else None,
                meta=meta,
            )


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    with utf8_lines(path) as numbered:
        reader = csv.DictReader(text for _, text in numbered)
        header = reader.fieldnames or []
        missing = [name for name in columns if name not in header]
        if missing:
            raise _row_error(path, 1, f"missing column(s) {missing}; the header has {header}")
        for row in reader:
            if None in row.values() or None in row:  # too few or too many cells
                raise _row_error(path, reader.line_num, f"expected {len(header)} cells as in the header")
            yield reader.line_num, row


def _csv_length(row: dict[str, str], name: str, path: Path, line_no: int) -> int:
    text = row[name].strip()
    if not (text.isascii() and text.isdigit()):
        raise _row_error(path, line_no, f"{name}: must be an integer >= 0, got {row[name]!r}")
    return int(text)


def _parse_wall_time(text: str, path: Path, line_no: int) -> Decimal:
    """Exact UTC epoch seconds, parsed by hand: Azure writes 7 fractional digits, which
    ``datetime.fromisoformat`` only accepts from Python 3.11."""
    match = _AZURE_TIME.fullmatch(text.strip())
    if match is None:
        raise _row_error(path, line_no, f"TIMESTAMP: expected 'YYYY-MM-DD HH:MM:SS[.fraction]', got {text!r}")
    whole, fraction, offset = match.groups()
    try:
        whole_s = calendar.timegm(datetime.fromisoformat(whole).timetuple())
    except ValueError as err:  # e.g. month 13
        raise _row_error(path, line_no, f"TIMESTAMP: {err}: {text!r}") from err
    if offset and offset != "Z":
        digits = offset[1:].replace(":", "")
        sign = 1 if offset[0] == "+" else -1
        whole_s -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return Decimal(whole_s) + (Decimal(f"0.{fraction}") if fraction else 0)


def _row_error(path: Path, line_no: int, what: str) -> TraceFormatError:
    return TraceFormatError(f"{path} line {line_no}: {what}")
