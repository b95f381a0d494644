"""Traces as suite members (named after their file, several per suite, seeds without resampling),
intervals that respect a metric's range, and collect's refusal of duplicate runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import servegym.agents.evaluation.plots as plots
from servegym.agents.evaluation.api import (
    SuiteConfig,
    SuiteConfigError,
    bounded_interval,
    collect,
    compose_config,
    evaluate,
    ratio_interval,
    run_suite_full,
    summarise,
    to_markdown,
)
from servegym.envs.workloads.traces import save_jobs


def make_trace(path: Path, seed: int, num_jobs: int = 4) -> Path:
    """A small JSONL trace: map-reduce trees as the generator draws them with ``seed``."""
    from hydra.utils import instantiate

    workload = instantiate(compose_config(["workload=mapreduce", f"workload.num_jobs={num_jobs}"]).workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_jobs(workload.build(seed).jobs, path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("traces")
    return make_trace(folder / "agents_a.jsonl", 0), make_trace(folder / "nested" / "agents_a.jsonl", 1)


def trace_suite(**changes) -> SuiteConfig:
    fields = dict(
        policies=["fcfs", "program_fcfs"], workloads=[], loads=[8.0], seeds=[0, 1, 2], kv_timeline_bins=0
    )
    return SuiteConfig(**{**fields, **changes})


# ---------------------------------------------------------------- traces in a suite
def test_two_traces_share_a_suite_named_after_their_files(tmp_path, traces) -> None:
    a, b = traces
    b_named = {"path": str(b), "name": "session_b"}
    result = evaluate(trace_suite(traces=[str(a), b_named]), tmp_path / "suite", progress=False, plots=False)
    assert list(dict.fromkeys(result.runs.workload)) == ["agents_a", "session_b"]
    # the two traces hold different trees: their runs differ
    by = result.runs.set_index(["workload", "policy"]).jct_mean_s
    assert by["agents_a", "fcfs"] != by["session_b", "fcfs"]
    markdown = (tmp_path / "suite" / "summary.md").read_text()
    assert "### agents_a" in markdown and "### session_b" in markdown


def test_a_trace_from_the_workload_group_is_named_after_its_file(traces) -> None:
    a, _ = traces
    config = trace_suite(workloads=["trace"], workload_overrides={"trace": {"path": str(a)}}, seeds=[0])
    runs = run_suite_full(config, progress=False).runs
    assert set(runs.workload) == {"agents_a"}


def test_two_traces_with_one_name_are_refused(traces) -> None:
    a, b = traces  # both files are agents_a.jsonl
    with pytest.raises(SuiteConfigError, match="two workloads are named 'agents_a'.*give one a name"):
        run_suite_full(trace_suite(traces=[str(a), str(b)]), progress=False)
    with pytest.raises(SuiteConfigError, match=r"suite\.traces\[0\]"):
        run_suite_full(trace_suite(traces=[{"format": "jsonl"}]), progress=False)
    with pytest.raises(SuiteConfigError, match=r"suite\.workloads is empty"):
        run_suite_full(trace_suite(traces=[]), progress=False)


def test_trace_options_and_overrides_reach_the_workload(traces) -> None:
    a, _ = traces
    config = trace_suite(traces=[{"path": str(a), "limit": 2}], seeds=[0], policies=["fcfs"], baseline="fcfs")
    assert (run_suite_full(config, progress=False).runs.jobs_total == 2).all()
    config = trace_suite(
        traces=[str(a)], workload_overrides={"agents_a": {"limit": 3}}, seeds=[0], policies=["fcfs"]
    )
    assert (run_suite_full(config, progress=False).runs.jobs_total == 3).all()


def test_a_trace_without_resampling_runs_once_and_withholds_the_interval(tmp_path, traces) -> None:
    a, _ = traces
    result = evaluate(trace_suite(traces=[str(a)]), tmp_path / "suite", progress=False, plots=False)
    assert len(result.runs) == 2 and set(result.runs.seed) == {0}  # not 3 identical runs per policy
    assert not result.runs.workload_seeded.any()
    summary = pd.read_csv(tmp_path / "suite" / "summary.csv").set_index("policy")
    assert (summary.n == 1).all()
    assert summary.jct_ratio_lo.isna().all() and summary.jct_mean_s_ci.isna().all()
    markdown = (tmp_path / "suite" / "summary.md").read_text()
    assert "| 8 | program_fcfs | 1 |" in markdown and "[—]" in markdown
    assert "`agents_a`: the same trees for every seed" in markdown and "no interval (—)" in markdown


def test_identical_runs_merged_from_a_seed_sweep_count_once() -> None:
    rows = [
        {"policy": p, "workload": "t", "load": 1.0, "seed": s, "jct_mean_s": v, "workload_seeded": False}
        for s in (1, 2, 3)
        for p, v in (("fcfs", 2.0), ("x", 1.8))
    ]
    summary = summarise(pd.DataFrame(rows)).set_index("policy")
    assert (summary.n == 1).all() and summary.jct_ratio_lo.isna().all()
    assert summary.loc["x", "jct_ratio"] == pytest.approx(0.9)
    assert "0.900 [—]" in to_markdown(summary.reset_index())


def test_a_resampling_trace_runs_every_seed(traces) -> None:
    a, _ = traces
    config = trace_suite(traces=[{"path": str(a), "resample": "bootstrap"}], policies=["fcfs"])
    runs = run_suite_full(config, progress=False).runs
    assert sorted(runs.seed) == [0, 1, 2] and runs.workload_seeded.all()
    assert runs.jct_mean_s.nunique() > 1  # the seeds draw different samples of the trace


# ---------------------------------------------------------------- intervals in range
def test_intervals_are_cut_to_the_metric_range() -> None:
    rows = [
        {"policy": "fcfs", "workload": "w", "load": 1.0, "seed": s, "jct_mean_s": v, "slo_attainment": f}
        for s, v, f in ((0, 1.0, 0.99), (1, 20.0, 0.7), (2, 2.0, 1.0))
    ] + [
        {"policy": "x", "workload": "w", "load": 1.0, "seed": s, "jct_mean_s": v, "slo_attainment": 1.0}
        for s, v in ((0, 0.2), (1, 40.0), (2, 1.0))
    ]
    summary = summarise(pd.DataFrame(rows)).set_index("policy")
    mean, half = summary.loc["fcfs", "jct_mean_s_mean"], summary.loc["fcfs", "jct_mean_s_ci"]
    assert mean - half < 0  # the plain t-interval would claim negative tree times
    assert summary.loc["fcfs", "jct_mean_s_lo"] == 0.0
    assert summary.loc["fcfs", "jct_mean_s_hi"] == pytest.approx(mean + half)
    assert summary.loc["fcfs", "slo_attainment_hi"] == 1.0  # a fraction's interval stops at 1
    ratios = np.array([0.2, 2.0, 0.5])
    assert summary.loc["x", "jct_ratio_lo"] > 0
    assert summary.loc["x", "jct_ratio_lo"] == pytest.approx(ratio_interval(ratios)[0])
    markdown = to_markdown(summary.reset_index(), metrics={"jct_mean_s": "tree time"})
    assert f"| 1 | fcfs | 3 | 1.000 [1.000, 1.000] | **7.67 [0, {mean + half:.1f}]** |" in markdown


def test_ratio_interval_is_log_symmetric_and_positive() -> None:
    low, high = ratio_interval([0.5, 2.0, 1.0, 1.0])
    assert low > 0 and math.isclose(low * high, 1.0)
    assert math.isnan(ratio_interval([0.5])[0])
    assert bounded_interval(0.5, 2.0, "jct_mean_s") == (0.0, 2.5)
    assert bounded_interval(0.5, 2.0, "slo_attainment") == (0.0, 1.0)
    assert all(map(math.isnan, bounded_interval(1.0, float("nan"), "jct_mean_s")))


def test_plots_never_draw_negative_tree_times(monkeypatch, tmp_path) -> None:
    rows = [
        {"policy": "fcfs", "workload": "w", "load": load, "seed": s, "jct_mean_s": v * load, "jct_p99_s": v}
        for load in (1.0, 4.0)
        for s, v in ((0, 0.5), (1, 30.0))
    ]
    summary = summarise(pd.DataFrame(rows))
    legacy = summary.drop(columns=[c for c in summary if c.endswith(("_lo", "_hi"))])  # an older summary.csv
    figures: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    for table in (summary, legacy):
        plots.plot_vs_load(table, tmp_path / "x.png", ["fcfs"], {"jct_mean_s": "mean", "jct_p99_s": "p99"})
        for ax in figures[-1].axes:
            assert ax.get_ylim()[0] >= 0
            for collection in ax.collections:  # the error bars
                for segment in collection.get_segments():
                    assert np.min(segment[:, 1]) >= 0
        bars = plots.error_bars(table, "jct_mean_s")
        assert (table.jct_mean_s_mean.to_numpy() - bars[0] >= 0).all()


# ---------------------------------------------------------------- collect
def write_runs(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return folder / "runs.csv"


def test_collect_refuses_a_run_found_twice_naming_both_files(tmp_path) -> None:
    row = {"policy": "fcfs", "workload": "w", "load": 1.0, "seed": 0, "jct_mean_s": 1.0}
    first = write_runs(tmp_path / "sweep" / "0", [row])
    second = write_runs(tmp_path / "sweep" / "1", [{**row, "jct_mean_s": 2.0}])
    write_runs(tmp_path / "sweep" / "2", [{**row, "seed": 1}])
    with pytest.raises(SuiteConfigError, match="policy=fcfs workload=w load=1.0 seed=0") as error:
        collect(tmp_path / "sweep")
    assert str(first) in str(error.value) and str(second) in str(error.value)
    second.unlink()
    assert sorted(collect(tmp_path / "sweep").runs.seed) == [0, 1]
