"""The entry point runs the real script, as CleanRL's tests do: config in, JSON metrics out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_simulate_prints_metrics_json_last() -> None:
    done = simulate("workload=mapreduce", "workload.num_jobs=20", "workload.arrival_rate=4", "seed=3")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["jobs_completed"] == 20
    assert metrics["calls_completed"] == 20 * 6  # planner + 4 workers + aggregator
    assert metrics["jct_p99_s"] >= metrics["jct_p50_s"] > 0
    assert not metrics["stalled"]


def test_same_seed_same_metrics_different_seed_differs() -> None:
    runs = [simulate("workload.num_jobs=10", f"seed={seed}") for seed in (1, 1, 2)]
    lines = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    assert lines[0] == lines[1]
    assert lines[0] != lines[2]


def test_bad_config_value_fails_naming_the_key() -> None:
    done = simulate("engine.block_size=0")
    assert done.returncode != 0
    assert "engine.block_size" in done.stderr
    typo = simulate("engine.blok_size=16")
    assert typo.returncode != 0
    assert "blok_size" in typo.stderr
