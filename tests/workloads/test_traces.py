"""JSONL trace save/replay: exact round trips and errors that point at the line and field."""

from __future__ import annotations

import copy
import dataclasses
import decimal
import json
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import DefaultPolicy
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs
from servegym.envs.workloads.traces import TraceFormatError, load_jobs, save_jobs
from servegym.envs.workloads.workload import Workload


def sample_jobs() -> list[Job]:
    plan = Call(
        0, "planner", (Text("sys/planner", 300), Text("a/question", 42)), 120, 256, tool_latency_s=1.5
    )
    work = Call(1, "worker", (Text("sys/worker", 200), Output(0)), 80, 64, parents=(0,), model="small")
    judge = Call(2, "critic", (Text("sys/critic", 90), Output(0), Output(1)), 30, 30, parents=(1,))
    single = Call(0, "user", (Text("b/prompt", 7),), 1, 1)
    return [
        Job(
            "a",
            0.0,
            (plan, work, judge),
            tenant="t1",
            kind="react",
            slo_s=12.5,
            meta={"seed": 7, "tags": ["x"]},
        ),
        Job("b", 3.0, (single,)),
    ]


def test_round_trip_is_exact_and_keeps_meta(tmp_path: Path) -> None:
    """Exact when the earliest job arrives at 0, as the loader's clock starts there."""
    jobs = sample_jobs()
    loaded = load_jobs(save_jobs(jobs, tmp_path / "trace.jsonl"))
    assert loaded == jobs
    assert [job.meta for job in loaded] == [job.meta for job in jobs]
    assert FixedJobs(loaded).jobs == jobs  # the replay


def test_saved_line_follows_the_documented_format(tmp_path: Path) -> None:
    path = save_jobs(sample_jobs(), tmp_path / "trace.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["schema"] == 1
    assert first["calls"][1]["prompt"] == [{"text": "sys/worker", "tokens": 200}, {"output": 0}]
    assert first["calls"][1]["parents"] == [0]
    assert set(first) == {"schema", "job_id", "arrival_s", "tenant", "kind", "slo_s", "meta", "calls"}


def test_blank_lines_are_skipped_and_optional_fields_default(tmp_path: Path) -> None:
    line = {"schema": 1, "job_id": "j", "arrival_s": 1, "calls": [valid_call()]}
    path = tmp_path / "t.jsonl"
    path.write_text("\n" + json.dumps(line) + "\n   \n")
    (job,) = load_jobs(path)
    assert job == Job("j", 0.0, (Call(0, "user", (Text("k", 5),), 3, 4),))  # its clock starts at it
    assert job.tenant == "default" and job.kind == "custom" and job.meta == {}


def test_save_rejects_duplicate_ids_and_leaves_no_file(tmp_path: Path) -> None:
    job = sample_jobs()[1]
    with pytest.raises(ValueError, match="appears twice"):
        save_jobs([job, job], tmp_path / "t.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_meta_that_is_not_json(tmp_path: Path) -> None:
    job = Job("m", 0.0, sample_jobs()[1].calls, meta={"bad": object()})
    with pytest.raises(ValueError, match="job 'm': meta"):
        save_jobs([job], tmp_path / "t.jsonl")


# --- every error names the file, the line and the field ---------------------------------------


def valid_call(**changes: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "prompt": [{"text": "k", "tokens": 5}],
        "output_tokens": 3,
        "max_tokens": 4,
        **changes,
    }


def valid_line() -> dict[str, Any]:
    return {
        "schema": 1,
        "job_id": "bad",
        "arrival_s": 0.5,
        "calls": [
            valid_call(),
            valid_call(parents=[0], prompt=[{"text": "k", "tokens": 5}, {"output": 0}]),
            valid_call(parents=[0]),
        ],
    }


def edit(change) -> str:  # noqa: ANN001 - a small lambda over a dict
    line = copy.deepcopy(valid_line())
    change(line)
    return json.dumps(line)


ERROR_CASES = {
    "invalid json": ('{"schema": 1, "job_id": ', "invalid JSON"),
    "duplicate key": ('{"schema": 1, "schema": 1}', "invalid JSON: duplicate key 'schema'"),
    "not an object": ("[1, 2]", "must be a JSON object (one job), got array"),
    "missing schema": (edit(lambda d: d.pop("schema")), "schema: missing required field"),
    "unknown schema": (edit(lambda d: d.update(schema=2)), "schema: unsupported schema integer 2"),
    "missing arrival": (edit(lambda d: d.pop("arrival_s")), "arrival_s: missing required field"),
    "unknown job field": (edit(lambda d: d.update(priority=1)), "priority: unknown field"),
    "unknown call field": (
        edit(lambda d: d["calls"][2].update(max_token=9)),
        "calls[2].max_token: unknown field",
    ),
    "missing call field": (
        edit(lambda d: d["calls"][1].pop("role")),
        "calls[1].role: missing required field",
    ),
    "bool is not an int": (
        edit(lambda d: d["calls"][0].update(output_tokens=True)),
        "calls[0].output_tokens: must be an integer, got boolean true",
    ),
    "float is not an int": (
        edit(lambda d: d["calls"][0].update(max_tokens=4.0)),
        "calls[0].max_tokens: must be an integer, got number 4.0",
    ),
    "string arrival": (
        edit(lambda d: d.update(arrival_s="0.5")),
        'arrival_s: must be a number, got string "0.5"',
    ),
    "NaN arrival": (edit(lambda d: d.update(arrival_s=float("nan"))), "NaN is not a JSON number"),
    "infinite arrival": (
        edit(lambda d: d.update(arrival_s=float("inf"))),
        "Infinity is not a JSON number",
    ),
    "arrival 1e400": (
        edit(lambda d: d.update(arrival_s=0.5)).replace('"arrival_s": 0.5', '"arrival_s": 1e400'),
        "arrival_s: 1E+400 is",
    ),
    "absurd arrival span": (
        edit(lambda d: d.update(arrival_s=2e9)),
        "arrival_s: 2000000000.0 is 2e+09 s after the earliest time (0.5 on line 1)",
    ),
    "tool latency 1e400": (
        edit(lambda d: d.update(arrival_s=0.5)).replace(
            '"max_tokens": 4}', '"max_tokens": 4, "tool_latency_s": 1e400}', 1
        ),
        "calls[0].tool_latency_s: number out of range: number 1E+400",
    ),
    "calls not a list": (edit(lambda d: d.update(calls={})), "calls: must be an array, got object"),
    "no calls": (edit(lambda d: d.update(calls=[])), "calls: a job needs at least one call"),
    "meta not an object": (edit(lambda d: d.update(meta=[1])), "meta: must be an object"),
    "zero text tokens": (
        edit(lambda d: d["calls"][1]["prompt"][0].update(tokens=0)),
        "calls[1].prompt[0].tokens: Text.num_tokens must be a positive int",
    ),
    "negative text tokens": (
        edit(lambda d: d["calls"][0]["prompt"][0].update(tokens=-3)),
        "calls[0].prompt[0].tokens:",
    ),
    "empty text key": (
        edit(lambda d: d["calls"][0]["prompt"][0].update(text="")),
        "calls[0].prompt[0].text:",
    ),
    "zero output tokens": (
        edit(lambda d: d["calls"][2].update(output_tokens=0)),
        "calls[2].output_tokens: must be an int >= 1",
    ),
    "negative max tokens": (
        edit(lambda d: d["calls"][0].update(max_tokens=-1)),
        "calls[0].max_tokens: must be an int",
    ),
    "bad segment": (
        edit(lambda d: d["calls"][0]["prompt"].append({"tokens": 5})),
        "calls[0].prompt[1]: a segment is",
    ),
    "extra segment field": (
        edit(lambda d: d["calls"][1]["prompt"][1].update(tokens=3)),
        "calls[1].prompt[1].tokens: unknown field",
    ),
    "later parent": (
        edit(lambda d: d["calls"][2].update(parents=[5])),
        "calls[2].parents: parent 5 must be an earlier call",
    ),
    "self parent": (
        edit(lambda d: d["calls"][1].update(parents=[1])),
        "calls[1].parents: parent 1 must be an earlier call",
    ),
    "parent not an int": (
        edit(lambda d: d["calls"][1].update(parents=["0"])),
        "calls[1].parents[0]: must be an integer",
    ),
    "output of a non-ancestor": (
        edit(lambda d: d["calls"][2]["prompt"].append({"output": 1})),
        "calls[2].prompt[1]: Output of call 1 is not an ancestor of call 2",
    ),
    "model not a string": (
        edit(lambda d: d["calls"][0].update(model=3)),
        "calls[0].model: must be a string or null",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    bad, expected = ERROR_CASES[case]
    path = tmp_path / "trace.jsonl"
    good = json.dumps({**valid_line(), "job_id": "ok"})
    path.write_text(f"{good}\n\n{bad}\n")  # the bad job is on line 3: blank lines still count
    with pytest.raises(TraceFormatError) as info:
        load_jobs(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 3: "), message
    assert expected in message, message
    assert isinstance(info.value, ValueError)


def test_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    good = json.dumps({**valid_line(), "job_id": "ok"}).encode()
    bad = json.dumps({**valid_line(), "job_id": "cafe"}).encode().replace(b"cafe", b"caf\xe9")
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(TraceFormatError) as info:
        load_jobs(path)
    assert str(info.value).startswith(f"{path} line 2: not UTF-8 text (byte 0xe9 at column ")


# --- absolute clocks: shifted exactly to start at 0 -------------------------------------------

# (name, the clock's value at the trace's start written as JSON text): epoch seconds, and the
# magnitudes of epoch microseconds and nanoseconds, where float64 resolves only 0.25 s and 256 s.
CLOCKS = {
    "epoch seconds": "1732000000",
    "microsecond magnitude": "1732000000000000",
    "nanosecond magnitude": "1732000000000000000",
}
OFFSETS_S = ("0", "0.25", "1.5", "2.000001", "7.75")


def absolute_trace(path: Path, start: str, offsets: tuple[str, ...] = OFFSETS_S) -> Path:
    """One job per offset, arrival_s = start + offset written exactly as decimal text."""
    lines = []
    for i, offset in enumerate(offsets):
        whole, _, frac = offset.partition(".")
        arrival = f"{int(start) + int(whole)}" + (f".{frac}" if frac else "")
        line = json.dumps({**valid_line(), "job_id": f"j{i}", "arrival_s": 0}).replace(
            '"arrival_s": 0', f'"arrival_s": {arrival}'
        )
        lines.append(line)
    path.write_text("\n".join(reversed(lines)) + "\n")  # not sorted: the minimum is the origin
    return path


@pytest.mark.parametrize("clock", CLOCKS)
def test_absolute_arrivals_start_at_zero_with_full_resolution(tmp_path: Path, clock: str) -> None:
    loaded = load_jobs(absolute_trace(tmp_path / "abs.jsonl", CLOCKS[clock]))
    by_id = {job.job_id: job.arrival_s for job in loaded}
    assert [by_id[f"j{i}"] for i in range(len(OFFSETS_S))] == [float(o) for o in OFFSETS_S]


def test_absolute_trace_replays_like_the_relative_one(tmp_path: Path) -> None:
    """A generated workload moved onto a nanosecond-magnitude clock (written exactly) loads with
    the same float arrivals and runs to the same metrics, bit for bit; float64 would hold
    1.732e18 + t only to 256 s and report tree times of 0."""
    generated = Workload(generator=MapReduce(), arrival_rate=2.0, num_jobs=8).build(0).jobs
    relative = [
        dataclasses.replace(job, arrival_s=job.arrival_s - generated[0].arrival_s) for job in generated
    ]
    path = save_jobs(relative, tmp_path / "ns.jsonl")
    lines = []
    with decimal.localcontext(prec=60):
        for line, job in zip(path.read_text().splitlines(), relative, strict=True):
            absolute = Decimal(CLOCKS["nanosecond magnitude"]) + Decimal(repr(job.arrival_s))
            lines.append(line.replace(f'"arrival_s":{job.arrival_s!r}', f'"arrival_s":{absolute}'))
    assert lines[1] != path.read_text().splitlines()[1]
    path.write_text("\n".join(lines) + "\n")
    loaded = load_jobs(path)
    assert [job.arrival_s for job in loaded] == [job.arrival_s for job in relative]
    replayed = Engine(FixedJobs(loaded)).run(DefaultPolicy())
    original = Engine(FixedJobs(relative)).run(DefaultPolicy())
    assert repr(replayed.as_dict()) == repr(original.as_dict())  # repr: NaN equals NaN
    assert replayed.jct_mean_s > 1.0 and replayed.jobs_completed == 8


def test_duplicate_job_id_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    line = json.dumps(valid_line())
    path.write_text(f"{line}\n{json.dumps({**valid_line(), 'job_id': 'other'})}\n{line}\n")
    with pytest.raises(TraceFormatError, match=r"line 3: job_id: duplicate job id 'bad' \(first on line 1\)"):
        load_jobs(path)


# --- property: any valid job survives the round trip ------------------------------------------


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    num_calls = draw(st.integers(1, 6))
    calls: list[Call] = []
    ancestors: list[set[int]] = []
    for index in range(num_calls):
        parents = tuple(sorted(draw(st.sets(st.integers(0, index - 1), max_size=index)))) if index else ()
        mine = set(parents).union(*(ancestors[p] for p in parents))
        ancestors.append(mine)
        text = st.builds(Text, st.text(min_size=1, max_size=8), st.integers(1, 5000))
        segment = st.one_of(text, st.sampled_from(sorted(mine)).map(Output)) if mine else text
        calls.append(
            Call(
                call_id=index,
                role=draw(st.text(min_size=1, max_size=10)),
                prompt=tuple(draw(st.lists(segment, min_size=1, max_size=5))),
                output_tokens=draw(st.integers(1, 10**6)),
                max_tokens=draw(st.integers(1, 10**6)),
                parents=parents,
                tool_latency_s=draw(st.floats(0, 1e4, allow_nan=False)),
                model=draw(st.none() | st.text(max_size=6)),
            )
        )
    return Job(
        job_id=draw(st.text(max_size=10)),
        arrival_s=draw(st.floats(0, 1e7, allow_nan=False)),
        calls=tuple(calls),
        tenant=draw(st.text(max_size=5)),
        kind=draw(st.text(max_size=5)),
        slo_s=draw(st.none() | st.floats(1e-6, 1e6)),
        meta=draw(st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=3)),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(jobs(), max_size=4, unique_by=lambda job: job.job_id))
def test_random_valid_jobs_round_trip(generated: list[Job]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_jobs(save_jobs(generated, Path(folder) / "trace.jsonl"))
    # the clock starts at the earliest job; the shift is exact on the written decimals
    origin = min((Decimal(repr(job.arrival_s)) for job in generated), default=Decimal(0))
    with decimal.localcontext(prec=60):
        expected = [
            dataclasses.replace(job, arrival_s=float(Decimal(repr(job.arrival_s)) - origin))
            for job in generated
        ]
    assert loaded == expected
    if generated and min(job.arrival_s for job in generated) == 0:
        assert loaded == generated
    assert [job.meta for job in loaded] == [job.meta for job in generated]


def test_every_trace_option_is_reachable_from_the_config(tmp_path: Path) -> None:
    from servegym.agents.evaluation.api import compose_config

    path = save_jobs(sample_jobs(), tmp_path / "t.jsonl")
    cfg = compose_config(
        ["workload=trace", f"workload.path={path}", "workload.limit=1", "workload.group_sessions=false"]
    )
    from hydra.utils import instantiate

    assert [job.job_id for job in instantiate(cfg.workload).build(0).jobs] == ["a"]
