"""Calibration: the fit recovers a cost model from its own times, and scripts/calibrate.py fits
the tiny model on a CPU end to end (a profile the sim loads, a sim-vs-torch fidelity table)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from servegym.envs.engine import calibration as cal
from servegym.envs.engine.cost_model import CostModel, load_profile

ROOT = Path(__file__).resolve().parents[2]
FIDELITY_BOUND = 0.5
"""Loose: on a shared 2-core CPU, iteration times drift by tens of percent between the profiling
and the workload run (spreads up to ~80% IQR/median seen), so the test only checks that the
fitted sim lands within 50% of the torch backend's mean tree time (typically 5-30%)."""


def synthetic_points(profile, model: str) -> list[cal.Point]:
    specs = cal.default_grid(model, quick=False)
    points = [cal.Point(label=s.label, num_seqs=s.num_seqs, **s.features()) for s in specs]
    f = cal.feature_arrays(points)
    times = cal.profile_times_s(profile, f)
    for p, t in zip(points, times, strict=True):
        p.times_s = [float(t)]
    return points


@pytest.mark.parametrize("base_name", ["llama1b_h100", "tiny_cpu"])
def test_fit_recovers_known_constants(base_name: str) -> None:
    base = load_profile(base_name)
    truth = dataclasses.replace(
        base,
        overhead_s=0.8e-3,
        comm_s_per_token=2e-7 if base_name == "llama1b_h100" else 3e-6,
        prefill_overhead_s=1.5e-3,
        flops_efficiency=0.45,
        bandwidth_efficiency=0.6,
        kv_bandwidth_efficiency=0.3,
    )
    points = synthetic_points(truth, "llama1b" if base_name == "llama1b_h100" else "tiny")
    cal.split_held_out(points)
    result = cal.fit(base, points, name="fitted")
    got = result.profile
    assert not result.notes
    for name in (
        "overhead_s",
        "comm_s_per_token",
        "prefill_overhead_s",
        "flops_efficiency",
        "bandwidth_efficiency",
        "kv_bandwidth_efficiency",
    ):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-2), name
    assert result.held_out["max_ape_pct"] < 0.1 and result.train["max_ape_pct"] < 0.1


def test_capped_fit_recovers_feasible_constants_and_never_passes_the_peak() -> None:
    """``cap_at_peak``: a profile within the datasheet is still recovered exactly; times that
    only a FLOP rate above the peak could explain leave the fitted rate at the peak (no note
    raising it) and the rest of the time in the other terms."""
    base = load_profile("llama1b_h100")
    truth = dataclasses.replace(base, overhead_s=0.8e-3, flops_efficiency=0.45, bandwidth_efficiency=0.6)
    points = synthetic_points(truth, "llama1b")
    capped = cal.fit(base, points, name="fitted", cap_at_peak=True)
    assert capped.profile.flops_efficiency == pytest.approx(0.45, rel=1e-2)
    assert capped.train["max_ape_pct"] < 0.1
    too_fast = synthetic_points(
        dataclasses.replace(base, peak_flops_per_gpu=3 * base.peak_flops_per_gpu), "llama1b"
    )
    free = cal.fit(base, too_fast, name="fitted")
    assert any("exceeds peak_flops_per_gpu" in n for n in free.notes)
    capped = cal.fit(base, too_fast, name="fitted", cap_at_peak=True)
    assert not any("exceeds" in n for n in capped.notes)
    assert capped.profile.peak_flops_per_gpu == base.peak_flops_per_gpu
    assert capped.profile.flops_efficiency <= 1.0 and capped.profile.bandwidth_efficiency <= 1.0


def test_fit_names_unidentified_rates() -> None:
    """Decode-only points never make compute bind: the note says so, and the fitted FLOP rate
    still never binds on them (predictions stay exact)."""
    base = load_profile("llama1b_h100")
    points = [p for p in synthetic_points(base, "llama1b") if p.label.startswith("decode")]
    result = cal.fit(base, points, name="fitted")
    assert any("compute never binds" in n for n in result.notes)
    assert result.train["max_ape_pct"] < 0.1


def test_written_profile_round_trips(tmp_path: Path) -> None:
    profile = dataclasses.replace(
        load_profile("llama1b_h100"), overhead_s=1e-05, kv_bandwidth_efficiency=0.25
    )
    path = cal.write_profile(profile, tmp_path / "p.yaml", ["a header"])
    assert path.read_text().startswith("# a header\n")
    assert load_profile(str(path)) == profile


def test_new_cost_terms_keep_the_old_model_and_scalar_array_identity() -> None:
    base = load_profile("llama8b_h100")
    same = dataclasses.replace(base, kv_bandwidth_efficiency=base.bandwidth_efficiency)
    args = (512, 512 * 300.5, 8, 8 * 1500 + 1000)
    assert CostModel(same).iteration_time_s(*args) == CostModel(base).iteration_time_s(*args)
    extra = dataclasses.replace(base, prefill_overhead_s=2e-3)
    assert CostModel(extra).iteration_time_s(*args) == pytest.approx(
        CostModel(base).iteration_time_s(*args) + 2e-3
    )
    assert CostModel(extra).iteration_time_s(0, 0, 8, 8000) == CostModel(base).iteration_time_s(0, 0, 8, 8000)
    slow_kv = dataclasses.replace(base, kv_bandwidth_efficiency=0.1, prefill_overhead_s=1e-3)
    cm = CostModel(slow_kv)
    prefill, attn = np.array([0, 0, 64, 512]), np.array([0.0, 0.0, 64 * 100.5, 512 * 256.5])
    decode, kv = np.array([1, 64, 0, 32]), np.array([2000, 64 * 2000, 68, 32 * 900])
    arr = cm.iteration_time_s(prefill, attn, decode, kv)
    assert [
        cm.iteration_time_s(*map(int, a)) for a in zip(prefill, attn, decode, kv, strict=True)
    ] == arr.tolist()
    assert cm.decode_run_times_s(64, np.array([64 * 2000]))[0] == arr[1]


@pytest.mark.slow
def test_quick_cpu_calibration_end_to_end(tmp_path: Path) -> None:
    """The script as the GPU machine runs it (no gymnasium, hydra or SB3): fit, profile, fidelity."""
    out, report = tmp_path / "tiny_cpu_fitted.yaml", tmp_path / "r.json"
    code = (
        "import sys, runpy\n"
        "for name in ('gymnasium', 'hydra', 'stable_baselines3'): sys.modules[name] = None\n"
        f"sys.argv = ['calibrate.py', '--device', 'cpu', '--model', 'tiny', '--quick', '--repeats', '3',"
        f" '--out', {str(out)!r}, '--json', {str(report)!r}]\n"
        "runpy.run_path('scripts/calibrate.py', run_name='__main__')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held-out MAPE" in run.stdout and "tree-time error" in run.stdout
    profile = load_profile(str(out))
    assert profile.name == "tiny_cpu_fitted" and "held-out MAPE" in profile.source
    result = json.loads(report.read_text())
    assert len(result["points"]) == len(cal.default_grid("tiny", quick=True))
    assert all(len(p["times_s"]) == 3 for p in result["points"])
    assert result["held_out"]["mape_pct"] < result["base_held_out"]["mape_pct"]  # placeholders are ~90% off
    torch_row, sim_row = result["fidelity"]["torch (measured)"], result["fidelity"]["sim (fitted)"]
    assert torch_row["preemptions"] > 0  # the workload is tight enough to preempt
    assert (
        result["engine_points"] > 0 and "torch (repeat)" in result["fidelity"]
    )  # engine iterations joined the fit
    assert len(result["fidelity_iterations"]) == torch_row["iterations"]  # one record per iteration
    assert "held-out engine run (seed 0): iteration MAPE" in out.read_text()

    # --refit: the same measurements fit again without measuring (what a machine without a GPU can do)
    refit, refit_report = tmp_path / "refit.yaml", tmp_path / "refit.json"
    again = subprocess.run(
        [
            sys.executable,
            "scripts/calibrate.py",
            "--refit",
            str(report),
            "--out",
            str(refit),
            "--json",
            str(refit_report),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_profile(str(refit)) == dataclasses.replace(
        profile, name="refit", source=load_profile(str(refit)).source
    )
    second = json.loads(refit_report.read_text())
    assert second["fidelity"]["torch (measured)"] == torch_row and second["measured"] == result["measured"]
    assert (
        second["points"] == result["points"]
        and second["fidelity_iterations"] == result["fidelity_iterations"]
    )
    error = abs(sim_row["jct_mean_s"] - torch_row["jct_mean_s"]) / torch_row["jct_mean_s"]
    assert error < FIDELITY_BOUND, result["fidelity"]
