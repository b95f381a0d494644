"""Save a workload as a JSONL trace and replay it: ``FixedJobs(load_jobs(path))``.

A trace is the exact list of jobs an experiment ran, so a result can be reproduced without the
generator's code or seed, and a workload from elsewhere (see ``importers.py``) can be checked in.

Line format, schema 1. One job per line; blank lines are skipped. Every line carries
``"schema": 1`` so files can be concatenated, split or streamed without a header::

    {"schema": 1, "job_id": "react-0", "arrival_s": 0.25, "tenant": "default", "kind": "react",
     "slo_s": null, "meta": {"seed": 7},
     "calls": [
       {"role": "planner", "prompt": [{"text": "sys/planner", "tokens": 300},
                                      {"text": "react-0/question", "tokens": 42}],
        "output_tokens": 120, "max_tokens": 256, "parents": [], "tool_latency_s": 1.5,
        "model": null},
       {"role": "worker", "prompt": [{"text": "sys/worker", "tokens": 200}, {"output": 0}],
        "output_tokens": 80, "max_tokens": 256, "parents": [0], "tool_latency_s": 0.0,
        "model": null}]}

(shown wrapped; a real line has no newlines). ``save_jobs`` writes every field.

- Job fields. Required: ``schema`` (1), ``job_id`` (string), ``arrival_s`` (number of
  seconds on any clock, see below), ``calls`` (array). Optional, with the ``Job`` defaults: ``tenant``, ``kind`` (strings),
  ``slo_s`` (number or null), ``meta`` (object; kept but not compared, as in ``Job``).
- Call fields, in topological order; a call's id is its position. Required: ``role`` (string),
  ``prompt`` (array of segments), ``output_tokens``, ``max_tokens`` (integers). Optional:
  ``parents`` (array of earlier call positions, default []), ``tool_latency_s`` (number,
  default 0), ``model`` (string or null, default null).
- Segments: ``{"text": key, "tokens": n}`` is a ``Text``; ``{"output": i}`` is an ``Output``
  of ancestor call ``i``.

Any other field is an error, not silently dropped: a typo such as ``max_token`` would otherwise
replay a different workload. Integers must be JSON integers (``true`` is not ``1``).

Arrival clock. ``arrival_s`` may be relative (0.25, 3.0, ...) or absolute, as exported logs write
them (epoch seconds such as 1732000000.25, or a clock that counts from 10^15): the loader
shifts every arrival so that the earliest is exactly 0. The shift is done on the numbers as
written (integers and decimal text, exactly) before they become float seconds, so
1700000000000000000.25 and 1700000000000000000.5 load as 0.0 and 0.25, not as two equal floats.
A trace whose earliest job arrives at 0 (every trace ``save_jobs`` writes from a workload that
starts there) loads bit for bit as saved; one whose earliest job arrives at t > 0 loads t seconds
earlier, the same workload on a clock that starts with it. Refused, naming the file, line,
field and value: NaN or infinite times, and a trace spanning more than ``MAX_ARRIVAL_SPAN_S``
(about 31.7 years; such a span is almost always a unit mistake, e.g. nanoseconds written into
``arrival_s``, and beyond it float64 seconds no longer resolve a microsecond).

Streaming. ``load_jobs`` reads the whole file (its jobs in file order, any arrival order).
``iter_jobs`` streams it: it yields jobs in arrival order while reading, holding only the jobs
of the last ``reorder_window_s`` seconds of trace time, so a replay's memory follows the live
work, not the trace's length (``TraceWorkload(stream=True)``, the default, replays this way).
The clock origin is then the arrival of the first job it yields, the earliest of the trace as
long as the trace never steps back further than the window: a line whose arrival is earlier
than a job already yielded is refused, naming the file, line and both times (sort the file by
``arrival_s``, widen the window, or load it whole). A trace that the stream accepts gives the
same jobs, arrival floats and order as ``FixedJobs(load_jobs(path))`` (ties in order of lines).
``limit=N`` keeps the first N jobs (lines) of the file in both, and stops reading there: a
file whose tail is not a trace still loads with a limit that stops before it. The stream
keeps one record per job read: its id, to refuse duplicates.
"""

from __future__ import annotations

import decimal
import heapq
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from servegym.envs.workloads.arrivals import MAX_ARRIVAL_SPAN_S
from servegym.envs.workloads.job import Call, Job, JobValidationError, Output, Segment, Text

SCHEMA_VERSION = 1

_JOB_REQUIRED = ("schema", "job_id", "arrival_s", "calls")
_JOB_OPTIONAL = ("tenant", "kind", "slo_s", "meta")
_CALL_REQUIRED = ("role", "prompt", "output_tokens", "max_tokens")
_CALL_OPTIONAL = ("parents", "tool_latency_s", "model")

REORDER_WINDOW_S = 60.0
"""Default of ``iter_jobs``'s ``reorder_window_s``: how far back in trace time a streamed trace
may step (logs merged from several servers are a little out of order); a chosen default."""


class TraceFormatError(ValueError):
    """A trace (ours or an imported one) is malformed. The message names the file, the 1-based
    line and the field, e.g. ``trace.jsonl line 7: calls[2].parents: ...``."""


class _FieldError(Exception):
    """A JSON-shape problem at ``field``; ``load_jobs`` adds the file and line."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"{field}: {what}" if field else what)


def save_jobs(jobs: Iterable[Job], path: str | os.PathLike[str]) -> Path:
    """Write ``jobs`` to ``path`` as schema-1 JSONL (see the module docstring); returns the path.

    Writes to a temporary file and renames it, so an interrupted save leaves no torn trace.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[str] = set()
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for job in jobs:
                if job.job_id in seen:
                    raise ValueError(f"job id {job.job_id!r} appears twice; trace job ids must be unique")
                seen.add(job.job_id)
                out.write(_dump_line(job) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_jobs(path: str | os.PathLike[str], limit: int | None = None) -> list[Job]:
    """Read a schema-1 JSONL trace, validating every line (JSON shape here, the data model's
    invariants in ``validate_job``); raises ``TraceFormatError`` at the first bad line.
    ``limit=N`` keeps the first N jobs and reads no further.

    Arrivals are shifted exactly so the earliest is 0 (see "Arrival clock" above). The jobs
    come in file order; ``iter_jobs`` streams them in arrival order instead."""
    path = Path(path)
    _check_limit(limit)
    decoded = [(line_no, fields, raw) for raw, line_no, fields in _decoded_lines(path, limit)]
    line_numbers = [line_no for line_no, _, _ in decoded]
    arrivals = relative_seconds([raw for _, _, raw in decoded], line_numbers, path, "arrival_s")
    jobs = []
    for (line_no, fields, _), arrival_s in zip(decoded, arrivals, strict=True):
        try:
            jobs.append(Job(arrival_s=arrival_s, **fields))
        except JobValidationError as err:
            raise _line_error(path, line_no, str(err)) from err
    return jobs


def iter_jobs(
    path: str | os.PathLike[str],
    limit: int | None = None,
    reorder_window_s: float = REORDER_WINDOW_S,
) -> Iterator[Job]:
    """Stream a schema-1 JSONL trace: its jobs in arrival order (ties in line order), each read
    and validated as late as the window allows, so a caller that drops finished jobs holds
    memory for the live ones only. Arrivals start at 0 exactly as in ``load_jobs``; a line that
    steps back in time past ``reorder_window_s`` seconds is refused (see "Streaming" above).
    ``limit=N`` keeps the first N jobs of the file and reads no further."""
    path = Path(path)
    _check_limit(limit)
    ordered = in_arrival_order(_decoded_lines(path, limit), path, "arrival_s", 1, reorder_window_s)
    for arrival_s, line_no, fields in ordered:
        try:
            yield Job(arrival_s=arrival_s, **fields)
        except JobValidationError as err:
            raise _line_error(path, line_no, str(err)) from err


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")


def _decoded_lines(path: Path, limit: int | None) -> Iterator[tuple[RawTime, int, dict[str, Any]]]:
    """(arrival as written, line, the other ``Job`` fields) of each job line, duplicate ids
    refused; stops after ``limit`` jobs without reading on."""
    if limit == 0:
        return
    first_line: dict[str, int] = {}
    with utf8_lines(path) as lines:
        for line_no, line in lines:
            if not line.strip():
                continue
            fields, raw_arrival = _read_line(path, line_no, line)
            job_id = fields["job_id"]
            if job_id in first_line:
                what = f"job_id: duplicate job id {job_id!r} (first on line {first_line[job_id]})"
                raise _line_error(path, line_no, what)
            first_line[job_id] = line_no
            yield raw_arrival, line_no, fields
            if limit is not None and len(first_line) >= limit:
                return


_T = TypeVar("_T")


def in_arrival_order(
    records: Iterable[tuple[RawTime, int, _T]],
    path: Path,
    field: str,
    seconds_per_unit: RawTime = 1,
    reorder_window_s: float = REORDER_WINDOW_S,
) -> Iterator[tuple[float, int, _T]]:
    """The streaming twin of ``relative_seconds``: ``(raw, line, payload)`` records in file
    order in, ``(seconds after the origin, line, payload)`` out in (raw, line) order. A record
    waits until one more than ``reorder_window_s`` seconds later has been read (or the input
    ends); the first one out is the origin, shifted on the exact values as in
    ``relative_seconds``. Raises ``TraceFormatError`` (file, line, field, value) for a NaN or
    infinite time, a span over ``MAX_ARRIVAL_SPAN_S``, and a record earlier than one already
    yielded (the trace stepped back further than the window)."""
    if not (
        isinstance(reorder_window_s, int | float)
        and math.isfinite(reorder_window_s)
        and reorder_window_s >= 0
    ):
        raise ValueError(
            f"reorder_window_s must be a finite number of seconds >= 0, got {reorder_window_s!r}"
        )
    scale = Decimal(seconds_per_unit)
    window = _EXACT.divide(Decimal(repr(float(reorder_window_s))), scale)  # in the file's unit
    heap: list[tuple[RawTime, int, _T]] = []
    newest: RawTime | None = None
    origin: tuple[Decimal, RawTime, int] | None = None  # exact value, as written, line
    last: tuple[RawTime, int] | None = None  # the latest record yielded
    for raw, line, payload in records:
        if isinstance(raw, Decimal) and not raw.is_finite():
            raise _line_error(path, line, f"{field}: must be a finite number, got {raw}")
        if last is not None and raw < last[0]:
            raise _line_error(
                path,
                line,
                f"{field}: {raw} is earlier than {last[0]} on line {last[1]}, which the stream has "
                f"already replayed; a streamed trace may step back at most reorder_window_s="
                f"{reorder_window_s:g} s. Sort the file by {field}, widen the window "
                "(workload.reorder_window_s=...), or load it whole (workload.stream=false)",
            )
        heapq.heappush(heap, (raw, line, payload))
        if newest is None or raw > newest:
            newest = raw
            horizon = _EXACT.subtract(Decimal(newest), window)
        while heap and heap[0][0] < horizon:
            raw_out, line_out, payload_out = heapq.heappop(heap)
            origin = origin or (Decimal(raw_out), raw_out, line_out)
            last = (raw_out, line_out)
            yield _shifted(raw_out, line_out, origin, scale, path, field), line_out, payload_out
    while heap:
        raw_out, line_out, payload_out = heapq.heappop(heap)
        origin = origin or (Decimal(raw_out), raw_out, line_out)
        yield _shifted(raw_out, line_out, origin, scale, path, field), line_out, payload_out


def _shifted(
    raw: RawTime, line: int, origin: tuple[Decimal, RawTime, int], scale: Decimal, path: Path, field: str
) -> float:
    span_s = _EXACT.multiply(_EXACT.subtract(Decimal(raw), origin[0]), scale)
    if span_s > Decimal(MAX_ARRIVAL_SPAN_S):
        raise _line_error(
            path,
            line,
            f"{field}: {raw} is {_short(span_s)} s after the earliest time ({origin[1]} on line "
            f"{origin[2]}); a trace may span at most {MAX_ARRIVAL_SPAN_S:.0e} s (31.7 years). Check "
            f"the unit of {field} ({_unit_name(scale)}) and the row's value",
        )
    return float(span_s)


def _read_line(path: Path, line_no: int, line: str) -> tuple[dict[str, Any], RawTime]:
    try:
        obj = json.loads(
            line,
            object_pairs_hook=_no_duplicate_keys,
            parse_float=Decimal,  # exact: arrivals are shifted before they become floats
            parse_constant=_refuse_constant,
        )
    except ValueError as err:
        what = (
            f"invalid JSON: {err.msg} at column {err.colno}"
            if isinstance(err, json.JSONDecodeError)
            else f"invalid JSON: {err}"
        )
        raise _line_error(path, line_no, what) from err
    try:
        return _decode_job(obj)
    except _FieldError as err:
        raise _line_error(path, line_no, str(err)) from err


RawTime = int | Decimal
"""A time as the file wrote it: a JSON integer or the exact decimal of a JSON number."""

_EXACT = decimal.Context(prec=100, traps=[decimal.InvalidOperation])


def relative_seconds(
    raw_times: Sequence[RawTime],
    lines: Sequence[int],
    path: Path,
    field: str,
    seconds_per_unit: RawTime = 1,
) -> list[float]:
    """``(raw - min(raw)) * seconds_per_unit`` as float seconds, one per raw time: shifted on
    the exact values, then rounded once, so absolute clocks (epoch seconds, microsecond or
    nanosecond counters) keep their resolution. Every trace loader uses it.

    Raises ``TraceFormatError`` (file, line, field, value) for a NaN or infinite time and for a
    span over ``MAX_ARRIVAL_SPAN_S``."""
    for raw, line in zip(raw_times, lines, strict=True):
        if isinstance(raw, Decimal) and not raw.is_finite():
            raise _line_error(path, line, f"{field}: must be a finite number, got {raw}")
    if not raw_times:
        return []
    first = min(range(len(raw_times)), key=raw_times.__getitem__)
    last = max(range(len(raw_times)), key=raw_times.__getitem__)
    origin = Decimal(raw_times[first])
    scale = Decimal(seconds_per_unit)
    span_s = _EXACT.multiply(_EXACT.subtract(Decimal(raw_times[last]), origin), scale)
    if span_s > Decimal(MAX_ARRIVAL_SPAN_S):
        raise _line_error(
            path,
            lines[last],
            f"{field}: {raw_times[last]} is {_short(span_s)} s after the earliest time "
            f"({raw_times[first]} on line {lines[first]}); a trace may span at most "
            f"{MAX_ARRIVAL_SPAN_S:.0e} s (31.7 years). Check the unit of {field} "
            f"({_unit_name(seconds_per_unit)}) and the row's value",
        )
    return [float(_EXACT.multiply(_EXACT.subtract(Decimal(raw), origin), scale)) for raw in raw_times]


def _short(value: Decimal) -> str:
    return f"{float(value):.3g}" if value < Decimal("1e300") else f"{value:.2e}"


def _unit_name(seconds_per_unit: RawTime) -> str:
    return "seconds" if seconds_per_unit == 1 else f"{seconds_per_unit} s per unit"


@contextmanager
def utf8_lines(path: Path) -> Iterator[Iterator[tuple[int, str]]]:
    """(1-based line number, text) of a UTF-8 file, for every trace reader: a line that is not
    UTF-8 raises ``TraceFormatError`` naming the file, line and byte, instead of a bare
    ``UnicodeDecodeError``. Line ends are kept (the CSV reader needs them).

    Read with ``os.pread`` at an offset of its own: a stream left open while the process forks
    (``agents/bounds/`` forks engines to roll out branches) shares the descriptor, and a
    child reading through it must not move the parent's position."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield (_decode_line(path, line_no, data) for line_no, data in enumerate(_pread_lines(fd), start=1))
    finally:
        os.close(fd)


def _pread_lines(fd: int, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The file's lines as bytes with their ``\n`` kept (as binary file iteration splits)."""
    offset, pending = 0, b""
    while data := os.pread(fd, chunk_bytes, offset):
        offset += len(data)
        pending += data
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield pending[start : end + 1]
            start = end + 1
        pending = pending[start:]
    if pending:
        yield pending


def _decode_line(path: Path, line_no: int, data: bytes) -> tuple[int, str]:
    try:
        return line_no, data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _line_error(
            path,
            line_no,
            f"not UTF-8 text (byte {data[err.start]:#04x} at column {err.start + 1}); save the trace as UTF-8",
        ) from err


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; write finite numbers only")


def _line_error(path: Path, line_no: int, what: str) -> TraceFormatError:
    return TraceFormatError(f"{path} line {line_no}: {what}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; in a trace that hides an editing mistake.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


# --- encoding ---------------------------------------------------------------------------------


def _dump_line(job: Job) -> str:
    obj = {
        "schema": SCHEMA_VERSION,
        "job_id": job.job_id,
        "arrival_s": float(job.arrival_s),
        "tenant": job.tenant,
        "kind": job.kind,
        "slo_s": None if job.slo_s is None else float(job.slo_s),
        "meta": job.meta,
        "calls": [_encode_call(call) for call in job.calls],
    }
    try:
        return json.dumps(obj, separators=(",", ":"))
    except TypeError as err:
        raise ValueError(f"job {job.job_id!r}: meta must hold only JSON values: {err}") from err


def _encode_call(call: Call) -> dict[str, Any]:
    return {
        "role": call.role,
        "prompt": [_encode_segment(seg) for seg in call.prompt],
        "output_tokens": call.output_tokens,
        "max_tokens": call.max_tokens,
        "parents": list(call.parents),
        "tool_latency_s": float(call.tool_latency_s),
        "model": call.model,
    }


def _encode_segment(seg: Segment) -> dict[str, Any]:
    if isinstance(seg, Text):
        return {"text": seg.key, "tokens": seg.num_tokens}
    return {"output": int(seg.call)}


# --- decoding: JSON shape only; the data model's rules stay in validate_job -------------------


def _decode_job(obj: Any) -> tuple[dict[str, Any], RawTime]:
    """The ``Job`` fields but ``arrival_s``, and the arrival as written (shifted later)."""
    if not isinstance(obj, dict):
        raise _FieldError("", f"a trace line must be a JSON object (one job), got {_describe(obj)}")
    _check_fields(obj, "", _JOB_REQUIRED, _JOB_OPTIONAL)
    schema = obj["schema"]
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise _FieldError(
            "schema", f"unsupported schema {_describe(schema)}; this reader knows {SCHEMA_VERSION}"
        )
    calls = _expect(obj, "calls", "", list)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _FieldError("meta", f"must be an object, got {_describe(meta)}")
    arrival = obj["arrival_s"]
    if not isinstance(arrival, int | Decimal) or isinstance(arrival, bool):
        raise _FieldError("arrival_s", f"must be a number, got {_describe(arrival)}")
    fields = {
        "job_id": _expect(obj, "job_id", "", str),
        "calls": tuple(_decode_call(call, index) for index, call in enumerate(calls)),
        "tenant": _expect(obj, "tenant", "", str, default="default"),
        "kind": _expect(obj, "kind", "", str, default="custom"),
        "slo_s": None if obj.get("slo_s") is None else _number(obj, "slo_s", ""),
        "meta": _plain(meta),
    }
    return fields, arrival


def _plain(value: Any) -> Any:
    """``meta`` with the exact decimals the reader parses turned back into floats."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _decode_call(obj: Any, index: int) -> Call:
    where = f"calls[{index}]"
    if not isinstance(obj, dict):
        raise _FieldError(where, f"a call must be an object, got {_describe(obj)}")
    _check_fields(obj, where, _CALL_REQUIRED, _CALL_OPTIONAL)
    prompt = _expect(obj, "prompt", where, list)
    parents = _expect(obj, "parents", where, list, default=[])
    for position, parent in enumerate(parents):
        if type(parent) is not int:
            raise _FieldError(f"{where}.parents[{position}]", f"must be an integer, got {_describe(parent)}")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _FieldError(f"{where}.model", f"must be a string or null, got {_describe(model)}")
    return Call(
        call_id=index,
        role=_expect(obj, "role", where, str),
        prompt=tuple(_decode_segment(seg, f"{where}.prompt[{pos}]") for pos, seg in enumerate(prompt)),
        output_tokens=_expect(obj, "output_tokens", where, int),
        max_tokens=_expect(obj, "max_tokens", where, int),
        parents=tuple(parents),
        tool_latency_s=_number(obj, "tool_latency_s", where, default=0.0),
        model=model,
    )


def _decode_segment(obj: Any, where: str) -> Segment:
    if isinstance(obj, dict) and "output" in obj:
        _check_fields(obj, where, ("output",), ())
        return Output(_expect(obj, "output", where, int))
    if isinstance(obj, dict) and "text" in obj:
        _check_fields(obj, where, ("text", "tokens"), ())
        key = _expect(obj, "text", where, str)
        num_tokens = _expect(obj, "tokens", where, int)
        try:
            return Text(key, num_tokens)
        except ValueError as err:  # an empty key or a length < 1: Text owns that rule
            field = "text" if not key else "tokens"
            raise _FieldError(f"{where}.{field}", str(err)) from err
    raise _FieldError(
        where, f'a segment is {{"text": key, "tokens": n}} or {{"output": i}}, got {_describe(obj)}'
    )


def _check_fields(
    obj: dict[str, Any], where: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    for name in required:
        if name not in obj:
            raise _FieldError(_join(where, name), "missing required field")
    for name in obj:
        if name not in required and name not in optional:
            known = ", ".join(required + optional)
            raise _FieldError(_join(where, name), f"unknown field (known: {known})")


_JSON_TYPE = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def _expect(obj: dict[str, Any], name: str, where: str, kind: type, default: Any = None) -> Any:
    if name not in obj and default is not None:
        return default
    value = obj[name]
    # bool is a subclass of int in Python, but `true` in a trace is a mistake, not 1.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _FieldError(_join(where, name), f"must be {_JSON_TYPE[kind]}, got {_describe(value)}")
    return value


def _number(obj: dict[str, Any], name: str, where: str, default: float | None = None) -> float:
    if name not in obj and default is not None:
        return default
    value = obj[name]
    if not isinstance(value, int | float | Decimal) or isinstance(value, bool):
        raise _FieldError(_join(where, name), f"must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer too large for a float
        number = math.inf
    if not math.isfinite(number):  # float(Decimal("1e400")) is inf, not an error
        raise _FieldError(_join(where, name), f"number out of range: {_describe(value)}")
    return number


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Decimal):
        return f"number {value}"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    shown = json.dumps(value, default=str)  # exact decimals nested in an array or object
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind[type(value)]} {shown}"
