"""The evaluation suite under interruption: the run journal, resuming, one suite per folder,
atomic report files, the per-run timeout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import servegym.agents.evaluation.api as ev
import servegym.agents.evaluation.report as report_module
import servegym.agents.evaluation.suite as suite_module
from servegym.agents.evaluation import suite_io
from servegym.agents.evaluation.api import (
    OutputFolderError,
    SuiteConfig,
    SuiteInterrupted,
    evaluate,
    report,
    run_suite_full,
)
from servegym.agents.policies.heuristics import FCFS
from tests.agents.conftest import tiny_suite as shared_tiny_suite

REAL_RUN_ONE = suite_module.run_one


def tiny_suite(**changes) -> SuiteConfig:
    """The shared tiny suite (tests/agents/conftest.py) with 4 trees a run and 5 KV bins: 8 runs."""
    return shared_tiny_suite(**{"num_jobs": 4, "kv_timeline_bins": 5, **changes})


def journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, runs: int) -> list:
    """Patch run_one so that Ctrl-C arrives while run number ``runs + 1`` is running."""
    calls: list = []
    real = REAL_RUN_ONE

    def run_one(task):
        calls.append(task.keys)
        if len(calls) > runs:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(suite_module, "run_one", run_one)  # looked up by execute()
    return calls


def count_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    real = REAL_RUN_ONE

    def run_one(task):
        calls.append(task.keys)
        return real(task)

    monkeypatch.setattr(suite_module, "run_one", run_one)  # looked up by execute()
    return calls


# ---------------------------------------------------------------- the journal and Ctrl-C
def test_ctrl_c_keeps_finished_runs_and_says_so_in_one_line(tmp_path, monkeypatch) -> None:
    out = tmp_path / "suite"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(SuiteInterrupted) as stop:
        evaluate(tiny_suite(), out, progress=False, plots=False)
    message = str(stop.value)
    assert "\n" not in message and stop.value.kept == 3
    assert f"3 of 8 runs kept in {out / 'runs.jsonl'}" in message and "suite.resume=true" in message
    assert isinstance(stop.value, KeyboardInterrupt)  # callers that catch Ctrl-C still do
    records = journal_lines(out)
    assert len(records) == 3 and all("row" in r and r["jobs"]["job_id"] for r in records)
    assert not (out / "runs.csv").exists() and not (out / "report.json").exists()


def test_ctrl_c_that_library_cleanup_turns_into_another_error_still_interrupts(tmp_path, monkeypatch) -> None:
    """A SIGINT inside library code whose cleanup raises anew (OmegaConf once made it a
    ConfigKeyError) reaches run_one as an ordinary exception; the suite must stop as on Ctrl-C,
    not record a failed run and go on."""
    out = tmp_path / "suite"
    calls: list = []

    def run_one(task):
        calls.append(task.keys)
        if len(calls) == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)  # the real signal, to this process
                time.sleep(5)
            except KeyboardInterrupt:  # as run_one reports an exception: a failed run
                return {"failure": {**task.keys, "error": "ConfigKeyError", "message": "", "traceback": ""}}
        return REAL_RUN_ONE(task)

    monkeypatch.setattr(suite_module, "run_one", run_one)
    with pytest.raises(SuiteInterrupted) as stop:
        evaluate(tiny_suite(), out, progress=False, plots=False)
    assert stop.value.kept == 2 and len(calls) == 3
    records = journal_lines(out)
    assert len(records) == 2 and not any("failure" in r for r in records)


def test_resume_runs_only_what_is_missing_and_matches_an_uninterrupted_suite(tmp_path, monkeypatch) -> None:
    out = tmp_path / "suite"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(SuiteInterrupted):
        evaluate(tiny_suite(), out, progress=False, plots=False)
    calls = count_runs(monkeypatch)
    resumed = evaluate(tiny_suite(resume=True), out, progress=False, plots=False)
    assert len(calls) == 5  # the 3 recorded runs are not run again
    assert len(journal_lines(out)) == 8 and len(resumed.runs) == 8
    assert json.loads((out / "report.json").read_text())["runs"] == 8
    fresh = evaluate(tiny_suite(), tmp_path / "fresh", progress=False, plots=False)
    for name in ("runs", "jobs", "kv_timeline"):
        a = pd.read_csv(out / f"{name}.csv").drop(columns="wall_s", errors="ignore")
        b = pd.read_csv(tmp_path / "fresh" / f"{name}.csv").drop(columns="wall_s", errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    assert len(fresh.runs) == 8


def test_resume_runs_failed_runs_again(tmp_path, monkeypatch) -> None:
    out = tmp_path / "suite"
    config = tiny_suite(policies=["fcfs", "flaky"], loads=[8.0], seeds=[0])

    class Broken(FCFS):
        def scores(self, decision):
            raise RuntimeError("boom")

    first = evaluate(config, out, extra_policies={"flaky": Broken}, progress=False, plots=False)
    assert len(first.failures) == 1 and (out / "failures.csv").exists()
    calls = count_runs(monkeypatch)
    second = evaluate(
        dataclass_replace(config, resume=True),
        out,
        extra_policies={"flaky": FCFS},
        progress=False,
        plots=False,
    )
    assert [c["policy"] for c in calls] == ["flaky"]
    assert second.failures.empty and set(second.runs.policy) == {"fcfs", "flaky"}
    assert not (out / "failures.csv").exists()  # the retried run succeeded: no stale failure table
    assert "failures.csv" not in json.loads((out / "report.json").read_text())["files"]


def dataclass_replace(config: SuiteConfig, **changes) -> SuiteConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_resume_refuses_a_different_suite_naming_the_key(tmp_path) -> None:
    out = tmp_path / "suite"
    evaluate(tiny_suite(loads=[8.0], seeds=[0]), out, progress=False, plots=False)
    with pytest.raises(OutputFolderError, match=r"suite\.seeds: recorded \[0\], now \[0, 1\]"):
        evaluate(tiny_suite(loads=[8.0], seeds=[0, 1], resume=True), out, progress=False, plots=False)
    with pytest.raises(OutputFolderError, match=r"num_gpu_blocks"):
        base = ev.compose_config(["engine.num_gpu_blocks=4000"])
        evaluate(tiny_suite(loads=[8.0], seeds=[0], resume=True), out, base_cfg=base, progress=False)
    # settings that do not change a run's numbers may change on resume
    evaluate(
        tiny_suite(loads=[8.0], seeds=[0], resume=True, jobs=2, baseline="program_fcfs"), out, progress=False
    )


def test_a_folder_holds_one_suite(tmp_path) -> None:
    stray = tmp_path / "other"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="not empty .*notes.txt.* name a new output_dir"):
        evaluate(tiny_suite(), stray, progress=False)
    assert sorted(p.name for p in stray.iterdir()) == ["notes.txt"]  # untouched
    out = tmp_path / "suite"
    evaluate(tiny_suite(loads=[8.0], seeds=[0]), out, progress=False, plots=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputFolderError, match="already holds a suite.*suite.resume=true"):
        evaluate(tiny_suite(loads=[8.0], seeds=[0]), out, progress=False, plots=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_torn_last_journal_line_is_cut_off(tmp_path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3, "tr')  # killed mid-write
    with suite_io.RunJournal(path) as journal:
        assert journal.records == [{"a": 1}, {"b": 2}]
        journal.append({"d": 4})
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2}', '{"d":4}']


# ---------------------------------------------------------------- the report
def test_an_interrupted_report_is_marked_incomplete_and_a_rewrite_drops_stale_files(
    tmp_path, monkeypatch
) -> None:
    result = run_suite_full(tiny_suite(loads=[8.0], seeds=[0]), progress=False)
    report(result, tmp_path)
    manifest = json.loads((tmp_path / "report.json").read_text())
    assert manifest["complete"] and manifest["runs"] == 2
    assert "plots/jct_cdf.png" in manifest["files"] and "summary.md" in manifest["files"]
    (tmp_path / "failures.csv").write_text("stale from an older report\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "plot_suite", interrupted)  # looked up by report()
    with pytest.raises(KeyboardInterrupt):
        report(result, tmp_path)
    assert not (tmp_path / "report.json").exists()  # the set is marked incomplete
    assert not list(tmp_path.rglob("*.tmp"))  # no torn temporary file left behind
    monkeypatch.undo()
    report(result, tmp_path, plots=False)
    manifest = json.loads((tmp_path / "report.json").read_text())
    assert not (tmp_path / "failures.csv").exists() and not list((tmp_path / "plots").glob("*.png"))
    assert not any(name.startswith("plots/") for name in manifest["files"])


def test_an_interrupted_table_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "runs.csv"
    path.write_text("old\n")

    class Exploding:
        def to_csv(self, target, index=False):
            Path(target).write_text("half a tab")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        suite_io.write_csv_atomic(Exploding(), path)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["runs.csv"]


def test_ctrl_c_while_writing_the_report_keeps_the_runs(tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "plot_suite", interrupted)  # looked up by report()
    out = tmp_path / "suite"
    with pytest.raises(SuiteInterrupted, match="while writing the report: all 2 runs are kept"):
        evaluate(tiny_suite(loads=[8.0], seeds=[0]), out, progress=False)
    assert len(journal_lines(out)) == 2 and not (out / "report.json").exists()
    monkeypatch.undo()
    calls = count_runs(monkeypatch)
    evaluate(tiny_suite(loads=[8.0], seeds=[0], resume=True), out, progress=False)
    assert calls == [] and (out / "report.json").exists()


# ---------------------------------------------------------------- timeout
@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_past_the_timeout_is_a_failure_and_the_suite_goes_on(tmp_path, jobs: int) -> None:
    import time

    class Stuck(FCFS):  # defined here so a worker process gets it by value (cloudpickle)
        def scores(self, decision):
            time.sleep(60)
            return super().scores(decision)

    config = tiny_suite(policies=["fcfs", "stuck"], loads=[8.0], seeds=[0], run_timeout_s=1.0, jobs=jobs)
    start = time.perf_counter()
    result = evaluate(
        config, tmp_path / "suite", extra_policies={"stuck": Stuck}, progress=False, plots=False
    )
    assert time.perf_counter() - start < 40
    assert list(result.runs.policy) == ["fcfs"]
    failure = result.failures.iloc[0]
    assert failure.policy == "stuck" and failure.error == "RunTimeout"
    assert "suite.run_timeout_s=1" in failure.message
    assert pd.read_csv(tmp_path / "suite" / "failures.csv").error.tolist() == ["RunTimeout"]


def test_the_timeout_does_not_outlive_its_run() -> None:
    import signal

    before = signal.getsignal(signal.SIGALRM)
    result = run_suite_full(tiny_suite(loads=[8.0], seeds=[0], run_timeout_s=30.0), progress=False)
    assert result.failures.empty and signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True])
def test_a_bad_timeout_names_the_key(value) -> None:
    with pytest.raises(ev.SuiteConfigError, match=r"suite\.run_timeout_s"):
        run_suite_full(tiny_suite(run_timeout_s=value), progress=False)
