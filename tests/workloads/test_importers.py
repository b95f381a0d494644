"""Importers for public serving traces, checked against small hand-written fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from servegym.envs.workloads.importers import import_azure, import_burstgpt, import_mooncake
from servegym.envs.workloads.job import Job, Output, Text
from servegym.envs.workloads.source import FixedJobs
from servegym.envs.workloads.traces import TraceFormatError, load_jobs, save_jobs

FIXTURES = Path(__file__).parent.parent / "fixtures"
MOONCAKE = FIXTURES / "mooncake_sample.jsonl"
AZURE = FIXTURES / "azure_conv_sample.csv"
BURSTGPT = FIXTURES / "burstgpt_sample.csv"


def by_line(jobs: list[Job]) -> dict[int, Job]:
    return {job.meta["lines"][0]: job for job in jobs}


def keys(job: Job, call: int = 0) -> list[str]:
    return [seg.key for seg in job.calls[call].prompt if isinstance(seg, Text)]


# --- Mooncake ---------------------------------------------------------------------------------


def test_mooncake_single_call_jobs() -> None:
    result = import_mooncake(MOONCAKE)
    assert len(result.jobs) == 10
    assert result.skipped == {"zero_output": 1, "zero_input": 1}
    jobs = by_line(result.jobs)
    assert sorted(jobs) == [1, 2, 3, 4, 5, 7, 8, 10, 11, 12]
    assert [jobs[n].arrival_s for n in (1, 4, 5, 12)] == [0.0, 3.0, 5.999, 700.0]
    inputs = {1: 1800, 2: 2290, 3: 915, 4: 3100, 5: 6758, 7: 4200, 8: 2600, 10: 1100, 11: 1400, 12: 5000}
    for line, job in jobs.items():
        (call,) = job.calls
        assert job.prompt_tokens(0) == inputs[line]
        assert call.role == "user" and call.parents == () and call.max_tokens == call.output_tokens
    assert jobs[5].calls[0].output_tokens == 500
    assert jobs[1].job_id == "mooncake_sample/1"


def test_mooncake_blocks_become_keys_with_partial_and_extra_tokens() -> None:
    jobs = by_line(import_mooncake(MOONCAKE).jobs)
    # 1800 tokens over 4 ids: three full blocks, then 264 tokens of block 3.
    assert jobs[1].calls[0].prompt == (
        Text("mooncake/h0", 512),
        Text("mooncake/h1", 512),
        Text("mooncake/h2", 512),
        Text("mooncake/h3:264", 264),
    )
    # 1400 tokens but only two ids: the 376 tokens past them are unique to the request.
    assert jobs[11].calls[0].prompt == (
        Text("mooncake/h0", 512),
        Text("mooncake/h37", 512),
        Text("mooncake_sample/11/rest", 376),
    )


def test_mooncake_shared_hash_ids_share_exactly_the_leading_keys() -> None:
    jobs = by_line(import_mooncake(MOONCAKE).jobs)
    a, b = keys(jobs[2]), keys(jobs[8])  # hash ids [0, 4, 5, 6, 7] and [0, 4, 5, 6, 33, 34]
    assert a[:4] == b[:4] == ["mooncake/h0", "mooncake/h4", "mooncake/h5", "mooncake/h6"]
    assert not set(a[4:]) & set(b[4:])
    assert keys(jobs[1])[:3] == keys(jobs[4])[:3] and keys(jobs[1])[3] != keys(jobs[4])[3]
    assert keys(jobs[3])[0] == keys(jobs[5])[0] == "mooncake/h0"  # the shared system prompt


def test_mooncake_budget_and_limit() -> None:
    result = import_mooncake(MOONCAKE, max_tokens_budget=100, limit=4)
    assert len(result.jobs) == 4
    assert [job.calls[0].max_tokens for job in result.jobs] == [100] * 4
    assert result.jobs[0].calls[0].generated_tokens == 100 and result.jobs[0].calls[0].truncated
    assert import_mooncake(MOONCAKE, limit=0).jobs == []


def test_mooncake_sessions_chain_continued_conversations() -> None:
    result = import_mooncake(MOONCAKE, group_sessions=True)
    jobs = by_line(result.jobs)
    assert [job.meta["lines"] for job in result.jobs] == [[1, 4, 7], [2], [3], [5], [8], [10], [11], [12]]
    chat = jobs[1]
    assert chat.kind == "mooncake-session" and chat.arrival_s == 0.0
    assert [call.parents for call in chat.calls] == [(), (0,), (1,)]
    assert [call.tool_latency_s for call in chat.calls] == [3.0, 9.0, 0.0]
    assert [chat.prompt_tokens(i) for i in range(3)] == [1800, 3100, 4200]
    first, second, third = (call.prompt for call in chat.calls)
    assert second == (*first, Output(0), Text("mooncake_sample/4/new", 3100 - 1800 - 210))
    assert third == (*second, Output(1), Text("mooncake_sample/7/new", 4200 - 3100 - 120))
    # Line 8 shares line 2's full blocks but is too short to hold its prompt and answer.
    assert len(jobs[8].calls) == 1 and jobs[12].arrival_s == 700.0
    assert result.skipped == {"zero_output": 1, "zero_input": 1}
    FixedJobs(result.jobs)  # ids are unique


def test_mooncake_session_gap_decides_whether_a_late_turn_joins() -> None:
    jobs = by_line(import_mooncake(MOONCAKE, group_sessions=True, session_gap_s=1000).jobs)
    assert jobs[1].meta["lines"] == [1, 4, 7, 12]
    assert jobs[1].calls[2].tool_latency_s == 688.0
    assert len(import_mooncake(MOONCAKE, group_sessions=True, session_gap_s=2.0).jobs) == 10


def test_mooncake_budget_shapes_the_session_prompts() -> None:
    chat = by_line(import_mooncake(MOONCAKE, group_sessions=True, max_tokens_budget=100).jobs)[1]
    assert [chat.prompt_tokens(i) for i in range(3)] == [1800, 3100, 4200]
    assert chat.calls[1].prompt[-1] == Text("mooncake_sample/4/new", 3100 - 1800 - 100)


def test_mooncake_accepts_timestamp_ms(tmp_path: Path) -> None:
    path = tmp_path / "copy.jsonl"
    path.write_text(
        '{"timestamp_ms": 1500, "input_length": 600, "output_length": 9, "hash_ids": [4, 5]}\n'
        '{"timestamp_ms": 4000, "input_length": 600, "output_length": 9, "hash_ids": [4, 5]}\n'
    )
    jobs = import_mooncake(path).jobs
    assert [job.arrival_s for job in jobs] == [0.0, 2.5]
    assert keys(jobs[0]) == keys(jobs[1]) == ["mooncake/h4", "mooncake/h5:88"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"timestamp": 5, "output_length": 3, "hash_ids": [1]}', "input_length: missing required field"),
        (
            '{"timestamp": 5, "input_length": -4, "output_length": 3, "hash_ids": [1]}',
            "input_length: must be an integer >= 0",
        ),
        (
            '{"timestamp": 5, "input_length": 4, "output_length": true, "hash_ids": [1]}',
            "output_length: must be an integer",
        ),
        (
            '{"timestamp": 5, "input_length": 4, "output_length": 3, "hash_ids": [1, "2"]}',
            "hash_ids[1]: must be an integer",
        ),
        ('{"timestamp": 5, "input_length": 4, "output_length": 3}', "hash_ids: must be a list"),
        (
            '{"input_length": 4, "output_length": 3, "hash_ids": []}',
            "give exactly one of 'timestamp' or 'timestamp_ms'",
        ),
        (
            '{"timestamp": "5", "input_length": 4, "output_length": 3, "hash_ids": []}',
            "timestamp: must be a number",
        ),
        ('{"timestamp": 5, "input_length": 4,', "invalid JSON"),
    ],
)
def test_mooncake_malformed_row_names_file_and_line(tmp_path: Path, row: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 3, "hash_ids": [1]}\n' + row + "\n")
    with pytest.raises(TraceFormatError) as info:
        import_mooncake(path)
    assert str(info.value).startswith(f"{path} line 2: ")
    assert expected in str(info.value)


# --- Azure ------------------------------------------------------------------------------------


def test_azure_single_call_jobs() -> None:
    result = import_azure(AZURE)
    assert len(result.jobs) == 11
    assert result.skipped == {"zero_output": 1}
    jobs = by_line(result.jobs)
    assert jobs[2].arrival_s == 0.0
    assert jobs[3].arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)
    assert jobs[10].arrival_s == pytest.approx(60 + 0.1043870 - 46.6805900, abs=1e-9)  # across a minute
    assert jobs[13].calls[0].output_tokens == 10 and jobs[13].prompt_tokens(0) == 4808
    assert keys(jobs[2]) == ["azure_conv_sample/2/prompt"]
    assert len({key for job in result.jobs for key in keys(job)}) == 11  # no sharing without prefix data


def test_azure_time_offsets_and_2024_style_times(tmp_path: Path) -> None:
    path = tmp_path / "azure_2024.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2048,28\n"
        "2024-05-10 02:00:01+02:00,100,5\n"
        "2024-05-10T00:00:02Z,100,5\n"
    )
    assert [job.arrival_s for job in import_azure(path).jobs] == pytest.approx([0.0, 0.99007, 1.99007])


def test_azure_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n")
    with pytest.raises(TraceFormatError, match=r"line 1: missing column\(s\) \['GeneratedTokens'\]"):
        import_azure(path)
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,4\n16/11/2023 18:15,3,4\n"
    )
    with pytest.raises(TraceFormatError, match=r"bad.csv line 3: TIMESTAMP: expected"):
        import_azure(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,3.5,4\n")
    with pytest.raises(TraceFormatError, match=r"line 2: ContextTokens: must be an integer >= 0, got '3.5'"):
        import_azure(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,3\n")
    with pytest.raises(TraceFormatError, match=r"line 2: expected 3 cells"):
        import_azure(path)
    with pytest.raises(ValueError, match="no session ids"):
        import_azure(AZURE, group_sessions=True)


# --- BurstGPT ---------------------------------------------------------------------------------


def test_burstgpt_skips_failures_and_keeps_the_model() -> None:
    result = import_burstgpt(BURSTGPT)
    assert result.skipped == {"failed": 2} and result.num_skipped == 2
    jobs = by_line(result.jobs)
    assert sorted(jobs) == [2, 4, 5, 6, 8, 9, 10, 11]
    assert [jobs[n].arrival_s for n in (2, 4, 8, 11)] == [0.0, 113.0, 199.5, 339.0]
    assert jobs[4].meta["model"] == "GPT-4" and jobs[6].meta["log_type"] == "API log"
    assert jobs[4].calls[0].model is None
    assert jobs[9].prompt_tokens(0) == 851 and jobs[9].calls[0].output_tokens == 613


def test_burstgpt_call_model_and_errors(tmp_path: Path) -> None:
    models = [job.calls[0].model for job in import_burstgpt(BURSTGPT, set_call_model=True, limit=3).jobs]
    assert models == ["ChatGPT", "GPT-4", "ChatGPT"]
    path = tmp_path / "bad.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\nnan,ChatGPT,4,5,9,API log\n"
    )
    with pytest.raises(TraceFormatError, match="line 2: Timestamp: must be a finite number"):
        import_burstgpt(path)
    with pytest.raises(ValueError, match="no session ids"):
        import_burstgpt(BURSTGPT, group_sessions=True)


# --- imported jobs are ordinary jobs ----------------------------------------------------------


def test_imported_jobs_round_trip_through_a_trace(tmp_path: Path) -> None:
    jobs = (
        import_mooncake(MOONCAKE, group_sessions=True).jobs
        + import_azure(AZURE).jobs
        + import_burstgpt(BURSTGPT).jobs
    )
    assert load_jobs(save_jobs(jobs, tmp_path / "all.jsonl")) == jobs


# --- absolute clocks and absurd times ---------------------------------------------------------


@pytest.mark.parametrize(
    "start_ms",
    [1732000000000, 1732000000000000, 1732000000000000000],  # epoch ms, and us / ns magnitudes
    ids=["epoch-ms", "us-magnitude", "ns-magnitude"],
)
def test_mooncake_absolute_timestamps_keep_their_resolution(tmp_path: Path, start_ms: int) -> None:
    path = tmp_path / "abs.jsonl"
    rows = [(start_ms + 2900, 7), (start_ms, 6), (f"{start_ms + 1}.5", 5)]
    path.write_text(
        "".join(
            f'{{"timestamp": {t}, "input_length": 600, "output_length": {n}, "hash_ids": [4, 5]}}\n'
            for t, n in rows
        )
    )
    assert [job.arrival_s for job in import_mooncake(path).jobs] == [2.9, 0.0, 0.0015]


def test_burstgpt_and_azure_absolute_times_keep_their_resolution(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "1732000000000000.25,ChatGPT,4,5,9,API log\n"
        "1732000000000002.75,ChatGPT,4,5,9,API log\n"
    )
    assert [job.arrival_s for job in import_burstgpt(path).jobs] == [0.0, 2.5]
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,4808,10\n"
        "2023-11-16 18:15:46.6805901,4808,10\n"
    )
    assert [job.arrival_s for job in import_azure(path).jobs] == [0.0, 1e-7]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "mooncake.jsonl",
            '{"timestamp": 0, "input_length": 4, "output_length": 3, "hash_ids": [1]}\n'
            '{"timestamp": 1e308, "input_length": 4, "output_length": 3, "hash_ids": [1]}\n',
            "line 2: timestamp: 1E+308 is 1.00e+305 s after the earliest time (0 on line 1)",
        ),
        (
            "mooncake.jsonl",
            '{"timestamp": 0, "input_length": 4, "output_length": 3, "hash_ids": [1]}\n'
            '{"timestamp": NaN, "input_length": 4, "output_length": 3, "hash_ids": [1]}\n',
            "line 2: timestamp: must be a number of ms, got Decimal('NaN')",
        ),
        (
            "burstgpt.csv",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "5.0,ChatGPT,4,5,9,API log\n1e300,ChatGPT,4,5,9,API log\n",
            "line 3: Timestamp: 1E+300 is 1.00e+300 s after the earliest time (5.0 on line 2)",
        ),
        (
            "burstgpt.csv",
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
            "5.0,ChatGPT,4,5,9,API log\ninf,ChatGPT,4,5,9,API log\n",
            "line 3: Timestamp: must be a finite number of seconds, got 'inf'",
        ),
    ],
)
def test_absurd_or_non_finite_times_are_refused(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    load = import_mooncake if name.endswith(".jsonl") else import_burstgpt
    with pytest.raises(TraceFormatError) as info:
        load(path)
    assert str(info.value).startswith(str(path)) and expected in str(info.value), str(info.value)


def test_non_utf8_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_bytes(
        b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        b"5.0,ChatGPT,4,5,9,API log\n6.0,Chat\xff,4,5,9,API log\n"
    )
    with pytest.raises(TraceFormatError, match=r"burst.csv line 3: not UTF-8 text \(byte 0xff at column 9\)"):
        import_burstgpt(path)
    path = tmp_path / "moon.jsonl"
    path.write_bytes(
        b'{"timestamp": 0, "input_length": 4, "output_length": 3, "hash_ids": [1], "x": "\xe9"}\n'
    )
    with pytest.raises(TraceFormatError, match=r"moon.jsonl line 1: not UTF-8 text \(byte 0xe9"):
        import_mooncake(path)
