"""scripts/bench_kernels.py runs end to end on CPU (its --quick sweep of the torch reference)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick_runs_on_cpu_and_writes_outputs(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_kernels.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("device: cpu")[-1]  # the table prints last
    assert "decode" in table and "prefill" in table
    rows = json.loads((tmp_path / "kernels_bench.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"decode", "prefill"}
    assert all(r["time_us"] > 0 and r["kv_gbytes"] > 0 for r in rows)
    assert (tmp_path / "kernels_bench.csv").read_text().startswith("kind,batch,")
