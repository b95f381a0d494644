"""scripts/train.py refuses a bad config before building anything: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.n_envs=0", "bad config: train.n_envs must be >= 1, got 0"),
        ("train.vec_env=bogus", "bad config: train.vec_env must be one of ['dummy', 'subproc'], got 'bogus'"),
        ("train.total_timesteps=0", "bad config: train.total_timesteps must be >= 1, got 0"),
        ("workload.arrival_rate=1e-300", "bad config: workload: Workload.arrival_rate=1e-300/s spreads"),
    ],
)
@pytest.mark.slow
def test_bad_train_config_is_one_clear_line(tmp_path: Path, override: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/train.py", override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
