"""scripts/evaluate.py as a user runs it: a tiny suite in a subprocess, a failing policy, bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = (
    "suite.policies=[fcfs,program_fcfs]",
    "suite.workloads=[mapreduce]",
    "suite.loads=[1,8]",
    "suite.seeds=[0,1]",
    "suite.num_jobs=6",
    "suite.kv_timeline_bins=10",
)


class RaisingPolicy:
    """Raises on its first decision (targeted by the failure test through an agent override)."""

    def scores(self, decision):
        raise RuntimeError("boom from a test policy")


def evaluate(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # so tests.scripts.test_evaluate.RaisingPolicy imports
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", "progress=false", f"output_dir={out}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.slow
def test_tiny_suite_writes_everything_and_prints_the_table(tmp_path: Path) -> None:
    done = evaluate(tmp_path, *TINY)
    assert done.returncode == 0, done.stderr
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 8 and set(runs.policy) == {"fcfs", "program_fcfs"}
    assert "| 8 | program_fcfs | 2 |" in done.stdout
    assert (tmp_path / "summary.md").read_text().strip() in done.stdout
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "goodput_vs_load.png",
        "jct_cdf.png",
        "jct_vs_load.png",
        "kv_utilization.png",
    ]


@pytest.mark.slow
def test_failed_runs_are_listed_and_the_exit_status_is_nonzero(tmp_path: Path) -> None:
    done = evaluate(
        tmp_path,
        *TINY,
        "suite.loads=[8]",
        "++suite.agent_overrides.program_fcfs._target_=tests.scripts.test_evaluate.RaisingPolicy",
    )
    assert done.returncode == 1, done.stderr
    assert "run failed: policy=program_fcfs" in done.stderr and "boom from a test policy" in done.stderr
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert set(failures.policy) == {"program_fcfs"} and len(failures) == 2
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(runs.policy) == {"fcfs"} and len(runs) == 2
    assert "| 8 | fcfs | 2 |" in done.stdout


@pytest.mark.slow
def test_bad_config_fails_naming_the_key(tmp_path: Path) -> None:
    unknown = evaluate(tmp_path, *TINY, "suite.policies=[fcfs,no_such_policy]")
    assert unknown.returncode == 2
    assert "suite.policies" in unknown.stderr and "no_such_policy" in unknown.stderr
    no_load = evaluate(tmp_path, *TINY, "suite.loads=[0]")
    assert no_load.returncode == 2 and "suite.loads" in no_load.stderr
    typo = evaluate(tmp_path, *TINY, "suite.seed=[1]")  # the schema knows suite.seeds, not seed
    assert typo.returncode != 0 and "suite.seed" in typo.stderr
    assert not (tmp_path / "runs.csv").exists()


@pytest.mark.slow
def test_rejected_work_is_reported_and_fails_the_run_unless_told(tmp_path: Path) -> None:
    done = evaluate(tmp_path / "strict", *TINY, "suite.loads=[1]", "engine.num_gpu_blocks=1", "plots=false")
    assert done.returncode == 1, done.stderr
    assert "0 runs complete, 4 rejected work, 0 failed" in done.stdout
    assert "4 of 4 runs rejected work: 144 calls rejected, 24 trees failed" in done.stderr
    assert "run rejected work: policy=fcfs" in done.stderr and "exceeds the KV cache" in done.stderr
    assert "| failed trees |" in (tmp_path / "strict" / "summary.md").read_text()
    lenient = evaluate(
        tmp_path / "lenient",
        *TINY,
        "suite.loads=[1]",
        "engine.num_gpu_blocks=1",
        "plots=false",
        "suite.fail_on_rejected=false",
    )
    assert lenient.returncode == 0, lenient.stderr
    assert (
        "4 of 4 runs rejected work" in lenient.stderr
        and "exit 0: suite.fail_on_rejected=false" in lenient.stderr
    )


@pytest.mark.slow
def test_unknown_baseline_and_bad_workload_values_are_config_errors(tmp_path: Path) -> None:
    baseline = evaluate(tmp_path, *TINY, "suite.baseline=nosuch")
    assert baseline.returncode == 2 and "suite.baseline: unknown policy 'nosuch'" in baseline.stderr
    assert "Traceback" not in baseline.stderr
