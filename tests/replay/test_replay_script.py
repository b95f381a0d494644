"""scripts/replay.py end to end, in a subprocess, against the fake server on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL_MAPREDUCE = [
    "workload=mapreduce",
    "workload.arrival_rate=20",
    "+workload.generator.fan_out=2",
    "+workload.generator.system_tokens=12",
    "+workload.generator.input_tokens_mean=10",
    "+workload.generator.tool_tokens_mean=6",
    "+workload.generator.output_tokens_mean=6",
    "+workload.generator.max_tokens=12",
    "+workload.generator.max_context_tokens=512",
    "replay.tool_time_scale=0.002",
    "replay.request_timeout_s=5",
    "num_jobs=3",
]


def run_script(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "replay.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.slow
def test_replay_script_writes_the_evaluation_tables(server, tmp_path) -> None:
    out = tmp_path / "out"
    server.plan = {"j1:1:worker:1": ["500"]}
    url = f"replay.base_url=http://127.0.0.1:{server.port}/v1"
    done = run_script(*SMALL_MAPREDUCE, url, "replay.label=fake", "seeds=[0,1]", f"output_dir={out}")
    assert done.returncode == 0, done.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert runs[["policy", "workload", "seed"]].values.tolist() == [
        ["fake", "mapreduce", 0],
        ["fake", "mapreduce", 1],
    ]
    assert runs.jobs_done.tolist() == [3, 3] and runs.retries.tolist() == [
        1,
        0,
    ]  # the tag's first attempt (seed 0) fails
    calls = pd.read_csv(out / "calls.csv")
    assert len(calls) == 2 * 3 * 4 and calls.ok.all()  # planner, 2 workers, aggregator per tree
    assert len(server.log) == len(calls) + 1  # every call once, plus the failed attempt
    assert "### mapreduce" in (out / "summary.md").read_text()
    assert (out / "plots" / "jct_cdf.png").is_file()

    again = run_script(*SMALL_MAPREDUCE, url, f"output_dir={out}")
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = run_script(*SMALL_MAPREDUCE, url, "replay.max_connections=0", f"output_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "max_connections" in bad.stderr


@pytest.mark.slow
def test_replay_script_exits_1_when_a_tree_fails(server, tmp_path) -> None:
    server.plan = {"j0:0:planner:0": ["400"]}
    url = f"replay.base_url=http://127.0.0.1:{server.port}/v1"
    done = run_script(*SMALL_MAPREDUCE, url, "plots=false", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 1 and "1 trees failed" in done.stderr
    calls = pd.read_csv(tmp_path / "out" / "calls.csv")
    assert calls.skipped.sum() == 3 and "HTTP 400" in calls.error.dropna().iloc[0]
