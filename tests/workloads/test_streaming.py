"""Streaming traces: jobs read as the clock reaches them, finished trees dropped, and every
result identical to loading the whole file first."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import DefaultPolicy
from servegym.envs.workloads.generators import MapReduce, ReactChain
from servegym.envs.workloads.importers import import_azure, import_burstgpt, import_mooncake, iter_import
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs, StreamedJobs
from servegym.envs.workloads.traces import TraceFormatError, iter_jobs, load_jobs, save_jobs
from servegym.envs.workloads.workload import TraceWorkload, bootstrap_jobs

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def same_metrics(a: dict, b: dict) -> bool:
    return all(
        a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key]))
        for key in a
    )


def tree(job_id: str, arrival_s: float, calls: int, tokens: int, tool_s: float) -> Job:
    """A chain of ``calls`` calls, each continuing its parent's context (prefix reuse)."""
    out = [
        Call(
            0,
            "planner",
            (Text("sys/planner", 64), Text(f"{job_id}/q", tokens)),
            12,
            32,
            tool_latency_s=tool_s,
        )
    ]
    for i in range(1, calls):
        prompt = (*out[-1].prompt, Output(i - 1), Text(f"{job_id}/obs{i}", 9))
        out.append(Call(i, "worker", prompt, 7 + i, 32, parents=(i - 1,), tool_latency_s=tool_s))
    return Job(job_id, arrival_s, tuple(out), tenant=f"t{calls % 2}")


def run(source) -> Engine:
    engine = Engine(source)
    engine.run(FCFS())
    return engine


# --- the reader -------------------------------------------------------------------------------


def test_iter_jobs_matches_the_whole_file_load_on_absolute_clocks(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = []
    for i, arrival in enumerate(["1700000000000000000.5", "1700000000000000000.25", "1700000000000000003"]):
        lines.append(
            f'{{"schema":1,"job_id":"j{i}","arrival_s":{arrival},"calls":[{json.dumps(call_json())}]}}'
        )
    path.write_text("\n".join(lines) + "\n")
    streamed = list(iter_jobs(path))
    assert [job.job_id for job in streamed] == ["j1", "j0", "j2"]  # arrival order
    assert [job.arrival_s for job in streamed] == [0.0, 0.25, 2.75]  # exact shift, origin = earliest
    assert streamed == FixedJobs(load_jobs(path)).jobs


def call_json() -> dict:
    return {"role": "user", "prompt": [{"text": "k", "tokens": 5}], "output_tokens": 3, "max_tokens": 4}


def write_arrivals(path: Path, arrivals: list[float]) -> Path:
    rows = [
        json.dumps({"schema": 1, "job_id": f"j{i}", "arrival_s": t, "calls": [call_json()]})
        for i, t in enumerate(arrivals)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_trace_stepping_back_within_the_window_streams_like_the_sorted_file(tmp_path: Path) -> None:
    path = write_arrivals(tmp_path / "t.jsonl", [5.0, 3.0, 9.0, 8.5, 70.0, 69.0, 200.0])
    assert list(iter_jobs(path, reorder_window_s=2.0)) == FixedJobs(load_jobs(path)).jobs


def test_a_trace_stepping_back_past_the_window_is_refused_with_file_and_line(tmp_path: Path) -> None:
    path = write_arrivals(tmp_path / "t.jsonl", [0.0, 10.0, 100.0, 5.0])
    with pytest.raises(
        TraceFormatError, match=r"t\.jsonl line 4: arrival_s: 5\.0 is earlier than .* line 2"
    ) as err:
        list(iter_jobs(path, reorder_window_s=60.0))
    assert "workload.stream=false" in str(err.value)
    assert len(load_jobs(path)) == 4  # the whole-file load takes any order


def test_limit_stops_reading_before_a_garbage_tail(tmp_path: Path) -> None:
    path = write_arrivals(tmp_path / "t.jsonl", [0.0, 1.0, 2.0])
    with path.open("ab") as file:
        file.write(b"this is not json\n\xff\xfe not even utf-8\n")
    with pytest.raises(TraceFormatError, match="line 4"):
        load_jobs(path)
    assert [job.job_id for job in load_jobs(path, limit=3)] == ["j0", "j1", "j2"]
    assert [job.job_id for job in iter_jobs(path, limit=3)] == ["j0", "j1", "j2"]
    assert list(iter_jobs(path, limit=0)) == []
    workload = TraceWorkload(str(path), limit=2)
    engine = run(workload.build(0))
    assert engine.metrics().jobs_completed == 2


def test_the_stream_reads_lazily(tmp_path: Path) -> None:
    """Pulling one job reads a window's worth of lines, not the file: a bad line far ahead is
    not seen until the stream reaches it."""
    path = write_arrivals(tmp_path / "t.jsonl", [float(i) for i in range(200)])
    with path.open("a") as file:
        file.write("garbage\n")
    stream = iter_jobs(path, reorder_window_s=5.0)
    assert next(stream).job_id == "j0"
    assert [next(stream).job_id for _ in range(100)][-1] == "j100"
    with pytest.raises(TraceFormatError, match="line 201"):
        list(stream)


@pytest.mark.parametrize(
    ("importer", "path", "fmt"),
    [
        (import_mooncake, FIXTURES / "mooncake_sample.jsonl", "mooncake"),
        (import_azure, FIXTURES / "azure_conv_sample.csv", "azure"),
        (import_burstgpt, FIXTURES / "burstgpt_sample.csv", "burstgpt"),
    ],
)
def test_iter_import_gives_the_importers_jobs(importer, path: Path, fmt: str) -> None:
    result = importer(path)
    counts: Counter[str] = Counter()
    assert list(iter_import(path, fmt, skipped=counts)) == FixedJobs(result.jobs).jobs
    assert dict(counts) == result.skipped
    assert list(iter_import(path, fmt, limit=3)) == FixedJobs(importer(path, limit=3).jobs).jobs
    workload = TraceWorkload(str(path), format=fmt)
    assert isinstance(workload.build(0), StreamedJobs)
    assert same_metrics(
        run(workload.build(0)).metrics().as_dict(), run(FixedJobs(result.jobs)).metrics().as_dict()
    )


# --- the engine -------------------------------------------------------------------------------

job_specs = st.lists(
    st.tuples(
        st.floats(0.0, 40.0, allow_nan=False),  # arrival (s)
        st.integers(1, 4),  # calls
        st.integers(1, 400),  # question tokens
        st.sampled_from([0.0, 0.0, 0.5, 3.0]),  # tool latency
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=job_specs, shuffle=st.randoms(use_true_random=False), window=st.sampled_from([0.0, 5.0, 60.0]))
def test_streaming_gives_the_whole_file_results(tmp_path: Path, specs, shuffle, window: float) -> None:
    jobs = [tree(f"j{i}", t, n, q, tool) for i, (t, n, q, tool) in enumerate(specs)]
    ordered = sorted(jobs, key=lambda job: job.arrival_s)
    # lines a little out of order: each job swapped with a neighbour at most ``window`` s away
    lines = list(ordered)
    for i in range(len(lines) - 1):
        if shuffle.random() < 0.3 and lines[i + 1].arrival_s - lines[i].arrival_s <= window:
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
    path = save_jobs(lines, tmp_path / "trace.jsonl")
    whole = run(FixedJobs(load_jobs(path)))
    streamed = run(StreamedJobs(lambda: iter_jobs(path, reorder_window_s=window)))
    assert same_metrics(whole.metrics().as_dict(), streamed.metrics().as_dict())
    n = len(jobs)
    np.testing.assert_array_equal(whole.job_table.finish_s[:n], streamed.job_table.finish_s[:n])
    np.testing.assert_array_equal(
        whole.calls.first_token_s[: whole.calls.size], streamed.calls.first_token_s[: streamed.calls.size]
    )
    assert streamed.tree_seconds == whole.tree_seconds
    assert [job.job_id for job in streamed.jobs] == [job.job_id for job in whole.jobs]  # read again on demand
    streamed.check_invariants()  # every call terminal and counted once, the KV pool whole


class Counted:
    """A streaming source over generated trees that counts what the engine pulled."""

    streaming = True

    def __init__(self, jobs: list[Job]) -> None:
        self._all = jobs
        self.pulled = 0

    def initial_jobs(self) -> Iterator[Job]:
        for job in self._all:
            self.pulled += 1
            yield job

    def on_job_finished(self, job: Job, now_s: float):
        return ()

    @property
    def jobs(self) -> list[Job]:
        return self._all


def spaced_trees(count: int, gap_s: float) -> list[Job]:
    rng = np.random.default_rng(0)
    generator = MapReduce()
    return [generator.sample(rng, f"j{i}", i * gap_s) for i in range(count)]


def test_a_long_run_holds_memory_for_live_trees_only() -> None:
    """Counted, not timed: jobs held, jobs pulled ahead of the clock and calls still holding
    prompt segments or hashes stay bounded by the live trees while 300 trees go through."""
    source = Counted(spaced_trees(300, gap_s=20.0))
    engine = Engine(source)
    policy = DefaultPolicy()
    most = {"held": 0, "ahead": 0, "heavy_calls": 0}
    steps = 0
    while (decision := engine.next_decision()) is not None:
        engine.decide(policy.scores(decision))
        steps += 1
        arrived = sum(1 for first in engine.job_table.first_call if first >= 0)
        most["held"] = max(most["held"], engine.jobs.num_held)
        most["ahead"] = max(most["ahead"], source.pulled - arrived)
        if steps % 25 == 0:
            calls = engine.calls
            heavy = sum(1 for c in range(calls.size) if calls.hashes[c] or calls.segments[c])
            most["heavy_calls"] = max(most["heavy_calls"], heavy)
    metrics = engine.metrics()
    assert metrics.jobs_completed == 300 and metrics.complete
    live = max(most["held"], 1)
    assert most["held"] <= 10, most  # trees 20 s apart, each done in a few seconds
    assert most["ahead"] <= 1, most  # one arrival event ahead of the clock
    assert most["heavy_calls"] <= 10 * live * max(len(job.calls) for job in source.jobs), most
    assert engine.jobs.num_held == 0
    calls = engine.calls
    assert not any(calls.hashes[c] or calls.segments[c] or calls.blocks[c] for c in range(calls.size))
    assert not engine.stats._tools_seen
    # every call of every tree completed exactly once
    assert calls.size == sum(len(job.calls) for job in source.jobs)
    assert (calls.state[: calls.size] == CallState.FINISHED).all()
    assert engine.job_table.calls_done[:300].tolist() == [len(job.calls) for job in source.jobs]
    engine.check_invariants()
    same = run(FixedJobs(source.jobs))
    assert same_metrics(metrics.as_dict(), same.metrics().as_dict())


def test_a_streaming_source_out_of_order_is_refused() -> None:
    jobs = [tree("a", 5.0, 1, 10, 0.0), tree("b", 1.0, 1, 10, 0.0)]
    with pytest.raises(ValueError, match=r"job 'b' arrives at 1\.0 s, before the previous job"):
        run(Counted(jobs))


def test_rejected_trees_are_released_and_counted_like_the_whole_file(tmp_path: Path) -> None:
    jobs = [tree(f"j{i}", float(i), 3, 400 if i % 3 else 50_000_000, 0.5) for i in range(9)]
    path = save_jobs(jobs, tmp_path / "t.jsonl")
    whole = run(FixedJobs(load_jobs(path))).metrics().as_dict()
    streamed_engine = run(TraceWorkload(str(path)).build(0))
    assert whole["jobs_failed"] == 3
    assert same_metrics(whole, streamed_engine.metrics().as_dict())
    assert streamed_engine.jobs.num_held == 0


# --- TraceWorkload: name, resampling, config --------------------------------------------------


def test_trace_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = write_arrivals(tmp_path / "chat_log.jsonl", [0.0])
    assert TraceWorkload(str(path)).label == "chat_log"
    assert TraceWorkload(str(path)).name is None
    assert TraceWorkload(str(path), name="chat").label == "chat"
    with pytest.raises(ValueError, match="TraceWorkload.name"):
        TraceWorkload(str(path), name="  ")
    with pytest.raises(ValueError, match="TraceWorkload.resample must be one of"):
        TraceWorkload(str(path), resample="jackknife")


def test_bootstrap_keeps_the_arrival_process_and_redraws_trees(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    generator = ReactChain()
    times = np.cumsum(rng.exponential(2.0, 40))
    jobs = [generator.sample(rng, f"j{i}", float(t - times[0])) for i, t in enumerate(times)]
    path = save_jobs(jobs, tmp_path / "t.jsonl")
    workload = TraceWorkload(str(path), resample="bootstrap")
    a, b, a_again = (workload.build(seed).jobs for seed in (1, 2, 1))
    assert a == a_again and a != b  # seeded, and seeds differ
    original = load_jobs(path)
    for copy in (a, b):
        assert len(copy) == len(original) and copy[0].arrival_s == 0.0
        assert len({job.job_id for job in copy}) == len(copy)
        gaps = np.diff([job.arrival_s for job in copy])
        want = np.diff([job.arrival_s for job in original])
        mean_gap = original[-1].arrival_s / (len(original) - 1)
        # the same gaps, rotated, with one wrap-around gap of the mean gap
        np.testing.assert_allclose(
            np.sort(np.append(want, mean_gap)), np.sort(np.append(gaps, _missing(gaps, want, mean_gap)))
        )
        trees = {job.job_id: job.calls for job in original}
        assert all(job.calls == trees[job.job_id.split("#")[0]] for job in copy)
    assert len({job.job_id.split("#")[0] for job in a}) < len(original)  # drawn with replacement
    assert bootstrap_jobs([], 3) == []
    engine = run(workload.build(5))
    assert engine.metrics().jobs_completed == len(original)


def _missing(gaps: np.ndarray, want: np.ndarray, mean_gap: float) -> np.ndarray:
    """The one gap of ``want`` + [mean_gap] that the rotated ``gaps`` do not hold."""
    pool = sorted(np.append(want, mean_gap).tolist())
    for gap in gaps.tolist():
        pool.remove(min(pool, key=lambda g: abs(g - gap)))
    return np.array(pool)


def test_every_trace_option_is_in_the_config() -> None:
    node = OmegaConf.load(REPO / "conf" / "workload" / "trace.yaml")
    fields = set(TraceWorkload.__dataclass_fields__)
    assert set(node) - {"_target_"} == fields
    for name in fields - {"path"}:
        assert node[name] == TraceWorkload.__dataclass_fields__[name].default, name


def test_a_stalled_stream_counts_the_trees_that_never_arrived(tmp_path: Path) -> None:
    """Blocks held from outside never come back, so the run stalls with trees still unread:
    the stream counts them as a list source does (same jobs_total, unfinished and reason)."""
    path = save_jobs([tree(f"j{i}", 2.0 * i, 2, 300, 0.0) for i in range(8)], tmp_path / "t.jsonl")
    results = []
    for source in (FixedJobs(load_jobs(path)), TraceWorkload(str(path)).build(0)):
        engine = Engine(source)
        blocks = engine.replicas[0].blocks
        blocks.allocate(blocks.num_blocks - 2)
        results.append(engine.run(FCFS()).as_dict())
    whole, streamed = results
    assert whole["stalled"] and whole["jobs_total"] == 8 and whole["jobs_unfinished"] == 8
    assert same_metrics(whole, streamed)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reading_the_stream_leaves_the_parents_position(tmp_path: Path) -> None:
    """agents/bounds/ forks engines mid-run; a child reading the shared trace must not move the
    parent's place in it."""
    path = write_arrivals(tmp_path / "t.jsonl", [float(i) for i in range(3000)])
    stream = iter_jobs(path, reorder_window_s=0.0)
    assert next(stream).job_id == "j0"
    pid = os.fork()
    if pid == 0:  # the child drains its copy of the stream and leaves at once
        try:
            sum(1 for _ in stream)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert [job.job_id for job in stream] == [f"j{i}" for i in range(1, 3000)]
