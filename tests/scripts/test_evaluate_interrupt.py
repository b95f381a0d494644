"""scripts/evaluate.py interrupted and resumed as a user does it (SIGINT to the process group, as
Ctrl-C in a terminal sends it), writing only into output_dir=, refusing a used folder, timing out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from servegym.agents.policies.heuristics import FCFS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evaluate.py"
SUITE = (
    "suite=smoke",  # 2 policies x mapreduce x 2 loads x 2 seeds = 8 runs
    "suite.num_jobs=4",
    "engine=tiny_cpu",
    "plots=false",
)
SLOW = (
    "++suite.agent_overrides.fcfs._target_=tests.scripts.test_evaluate_interrupt.SlowPolicy",
    "++suite.agent_overrides.program_fcfs._target_=tests.scripts.test_evaluate_interrupt.SlowPolicy",
)


class SlowPolicy(FCFS):
    """FCFS that waits ``SERVEGYM_TEST_DECISION_S`` seconds per decision (a run of seconds)."""

    def scores(self, decision):
        time.sleep(float(os.environ.get("SERVEGYM_TEST_DECISION_S", "0")))
        return super().scores(decision)


def command(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "progress=false", f"output_dir={out}", *SUITE, *overrides]


def env(decision_s: float = 0.0) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SERVEGYM_TEST_DECISION_S": str(decision_s)}


def run(cwd: Path, out: Path, *overrides: str, decision_s: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(out, *overrides), cwd=cwd, capture_output=True, text=True, timeout=300, env=env(decision_s)
    )


def _default_sigint() -> None:
    """A shell starts a foreground job with Ctrl-C at its default action. An ignored SIGINT is
    inherited across exec, and Python then installs no KeyboardInterrupt handler, so a test
    process that ignores it (a library or an earlier test may leave it so) must not pass that on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def journal_lines(out: Path) -> int:
    path = out / "runs.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_keeps_the_finished_runs_and_resume_finishes_the_suite(tmp_path: Path, jobs: int) -> None:
    out = tmp_path / "suite"
    suite = subprocess.Popen(
        command(out, *SLOW, f"suite.jobs={jobs}"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(decision_s=0.2),
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 240
    while journal_lines(out) < 2 and suite.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert suite.poll() is None, suite.communicate()
    os.killpg(suite.pid, signal.SIGINT)  # Ctrl-C: the suite and its workers
    stopped = time.monotonic()
    stdout, stderr = suite.communicate(timeout=60)
    assert suite.returncode == 130, stderr
    assert time.monotonic() - stopped < 30
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    kept = journal_lines(out)
    assert kept >= 2
    assert lines[0].startswith(f"interrupted: {kept} of 8 runs kept in {out / 'runs.jsonl'}")
    assert "suite.resume=true" in lines[0]
    assert not (out / "runs.csv").exists() and not (out / "report.json").exists()

    resumed = run(tmp_path, out, *SLOW, f"suite.jobs={jobs}", "suite.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out}: {kept} of 8 runs recorded, {8 - kept} to run" in resumed.stderr
    assert journal_lines(out) == 8  # nothing recorded twice
    assert len(pd.read_csv(out / "runs.csv")) == 8
    assert json.loads((out / "report.json").read_text())["runs"] == 8


@pytest.mark.slow
def test_output_dir_is_the_only_place_written_and_a_used_folder_is_refused(tmp_path: Path) -> None:
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    done = run(cwd, out)
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []  # no outputs/DATE/TIME/.hydra, no log
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "jobs.csv",
            "kv_timeline.csv",
            "report.json",
            "runs.csv",
            "runs.jsonl",
            "suite.json",
            "summary.csv",
            "summary.md",
        ]
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run(cwd, out, "suite.seeds=[10000]")
    assert again.returncode == 2
    assert "already holds a suite" in again.stderr and "suite.resume=true" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed in
    other = run(cwd, out, "suite.seeds=[10000]", "suite.resume=true")
    assert other.returncode == 2 and "suite.seeds: recorded [10000, 10001], now [10000]" in other.stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_a_run_past_the_timeout_fails_the_suite_without_hanging_it(tmp_path: Path) -> None:
    start = time.monotonic()
    done = run(
        tmp_path,
        tmp_path / "out",
        "suite.policies=[fcfs]",
        "suite.loads=[8]",
        "suite.seeds=[10000]",
        "suite.run_timeout_s=2",
        "++suite.agent_overrides.fcfs._target_=tests.scripts.test_evaluate_interrupt.SlowPolicy",
        decision_s=30.0,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - start < 120
    assert "RunTimeout" in done.stderr and "suite.run_timeout_s=2" in done.stderr
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert failures.error.tolist() == ["RunTimeout"]
