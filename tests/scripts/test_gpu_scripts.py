"""The GPU machine's scripts run where gymnasium is missing and servegym is not installed.

``scripts/gpu_check.sh`` runs them with bare python3 (torch, triton, numpy, pyyaml; no gymnasium,
no servegym install) and a symlink named ``servegym`` to the checkout on PYTHONPATH. These tests
rebuild that world in a subprocess: gymnasium unimportable, the editable install's finder gone,
and the same symlink."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BARE = """
import runpy, sys
sys.modules["gymnasium"] = None  # not installed there
# servegym not installed there: drop the editable install's finder and path hook
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_bare(tmp_path: Path, script: str, *args: str, shim: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "PYTHONPATH")}
    if shim:  # what gpu_check.sh does
        (tmp_path / "shim").mkdir()
        (tmp_path / "shim" / "servegym").symlink_to(ROOT)
        env["PYTHONPATH"] = str(tmp_path / "shim")
    return subprocess.run(
        [sys.executable, "-c", BARE, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_without_the_symlink_servegym_is_not_found(tmp_path: Path) -> None:
    """The bare world really is bare: the scripts below find servegym only through the symlink."""
    done = run_bare(tmp_path, "scripts/bench_model.py", "--quick", shim=False)
    assert done.returncode != 0
    assert "No module named 'servegym'" in done.stderr


@pytest.mark.slow
def test_bench_model_runs_bare(tmp_path: Path) -> None:
    done = run_bare(tmp_path, "scripts/bench_model.py", "--quick")
    assert done.returncode == 0, done.stderr
    assert "(OK: <= 1e-3)" in done.stdout


@pytest.mark.slow
def test_calibrate_refit_runs_bare(tmp_path: Path) -> None:
    """``--refit`` fits from the shipped H100 report and runs the engine (heuristics, sim backend)."""
    profile, report = tmp_path / "fitted.yaml", tmp_path / "report.json"
    done = run_bare(
        tmp_path,
        "scripts/calibrate.py",
        "--refit",
        "kernels/calibration_h100_2026-11-27.json",
        "--out",
        str(profile),
        "--json",
        str(report),
    )
    assert done.returncode == 0, done.stderr
    assert profile.stat().st_size > 0 and report.stat().st_size > 0
    assert "calibration done" in done.stdout
