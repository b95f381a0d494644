"""The entry point runs the real script, as CleanRL's tests do: config in, JSON metrics out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def simulate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "scripts/simulate.py",
            "output=json",
            "progress=false",
            "hydra.run.dir=/tmp/servegym-test-run",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_simulate_prints_metrics_json_last() -> None:
    done = simulate("workload=mapreduce", "workload.num_jobs=20", "workload.arrival_rate=4", "seed=3")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["jobs_completed"] == 20
    assert metrics["calls_completed"] == 20 * 6  # planner + 4 workers + aggregator
    assert metrics["jct_p99_s"] >= metrics["jct_p50_s"] > 0
    assert not metrics["stalled"]


@pytest.mark.slow
def test_same_seed_same_metrics_different_seed_differs() -> None:
    runs = [simulate("workload.num_jobs=10", f"seed={seed}") for seed in (1, 1, 2)]
    lines = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    assert lines[0] == lines[1]
    assert lines[0] != lines[2]


@pytest.mark.slow
def test_bad_config_value_fails_naming_the_key() -> None:
    done = simulate("engine.block_size=0")
    assert done.returncode != 0
    assert "engine.block_size" in done.stderr
    typo = simulate("engine.blok_size=16")
    assert typo.returncode != 0
    assert "blok_size" in typo.stderr


@pytest.mark.slow
def test_rejected_work_fails_the_run_unless_told() -> None:
    done = simulate("engine.num_gpu_blocks=1", "workload.num_jobs=5")
    assert done.returncode == 1
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["calls_rejected"] == metrics["calls_total"] == 35 and metrics["jobs_failed"] == 5
    assert metrics["complete"] is False and "exceeds the KV cache" in metrics["first_rejection"]
    assert "run rejected work: 35 of 35 calls rejected, 5 of 5 trees failed" in done.stderr
    lenient = simulate("engine.num_gpu_blocks=1", "workload.num_jobs=5", "fail_on_rejected=false")
    assert lenient.returncode == 0 and "fail_on_rejected=false: exit 0" in lenient.stderr


@pytest.mark.slow
def test_config_errors_print_the_message_without_a_traceback(tmp_path: Path) -> None:
    for override, expected in (
        ("workload.arrival_rate=1e-300", "workload: Workload.arrival_rate=1e-300/s spreads"),
        (f"workload.path={tmp_path / 'none.jsonl'}", "TraceWorkload.path: no trace file"),
    ):
        extra = ("workload=trace",) if "path" in override else ()
        done = simulate(*extra, override)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("bad config: ") and expected in done.stderr
        assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    trace = tmp_path / "latin1.jsonl"
    trace.write_bytes(b'{"schema": 1, "job_id": "caf\xe9"}\n')
    done = simulate("workload=trace", f"workload.path={trace}")
    assert done.returncode == 2 and f"{trace} line 1: not UTF-8 text" in done.stderr
