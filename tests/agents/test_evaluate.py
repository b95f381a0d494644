"""The evaluation suite's library: summary statistics, a tiny end-to-end suite, failures, config errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from servegym.agents.evaluation.api import (
    KEYS,
    SuiteConfig,
    SuiteConfigError,
    collect,
    evaluate,
    run_suite,
    run_suite_full,
    summarise,
    t_interval,
    t_quantile,
    to_markdown,
)
from servegym.agents.policies.heuristics import FCFS
from tests.agents.conftest import tiny_suite


# ---------------------------------------------------------------- statistics
def test_t_interval_of_a_known_sample() -> None:
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4) = 2.7764451, sample sd = sqrt(2.5)
    assert mean == 3.0
    assert half == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(t_interval([4.0])[1]) and t_interval([4.0])[0] == 4.0
    assert t_interval([np.nan, 2.0, 2.0]) == (2.0, 0.0)  # NaN runs are left out


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (29, 2.0452296)]
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-6)


def synthetic_runs() -> pd.DataFrame:
    rows = []
    for seed, (base, fast) in enumerate([(10.0, 8.0), (20.0, 15.0), (30.0, 27.0)]):
        rows.append({"policy": "fcfs", "workload": "w", "load": 1.0, "seed": seed, "jct_mean_s": base})
        rows.append({"policy": "fast", "workload": "w", "load": 1.0, "seed": seed, "jct_mean_s": fast})
    return pd.DataFrame(rows)


def test_summary_ratio_to_fcfs_and_paired_interval() -> None:
    summary = summarise(synthetic_runs()).set_index("policy")
    assert summary.loc["fcfs", "jct_ratio"] == 1.0
    assert summary.loc["fcfs", "jct_ratio_lo"] == summary.loc["fcfs", "jct_ratio_hi"] == 1.0
    assert summary.loc["fast", "jct_ratio"] == pytest.approx(50.0 / 60.0)  # ratio of the means
    per_seed = np.array([0.8, 0.75, 0.9])
    mean, half = t_interval(np.log(per_seed))  # a log-scale interval, exponentiated back
    assert summary.loc["fast", "jct_ratio_lo"] == pytest.approx(math.exp(mean - half))
    assert summary.loc["fast", "jct_ratio_hi"] == pytest.approx(math.exp(mean + half))
    assert summary.loc["fast", "jct_mean_s_mean"] == pytest.approx(50.0 / 3)
    assert summary.loc["fast", "n"] == 3
    markdown = to_markdown(summary.reset_index())
    assert "| 1 | fast | 3 | 0.833 [" in markdown and "tree time / fcfs" in markdown


def test_summary_without_baseline_has_nan_ratio() -> None:
    runs = synthetic_runs()
    summary = summarise(runs[runs.policy == "fast"])
    assert summary["jct_ratio"].isna().all()
    assert "tree time /" not in to_markdown(summary)


# ---------------------------------------------------------------- a tiny suite end to end
@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory: pytest.TempPathFactory):
    # a private parent: test_collect_merges_suites collects every suite under out.parent, and
    # pytest's base temp dir also holds other tests' tables (the headroom tests write runs.csv)
    out = tmp_path_factory.mktemp("suites") / "suite"
    return evaluate(tiny_suite(), out, progress=False), out


@pytest.mark.slow
def test_tiny_suite_writes_tables_markdown_and_plots(tiny_eval) -> None:
    result, out = tiny_eval
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 * 1 * 2 * 2
    assert list(runs.columns[:4]) == list(KEYS)
    assert set(map(tuple, runs[list(KEYS)].itertuples(index=False))) == {
        (p, "mapreduce", load, seed)
        for p in ("fcfs", "program_fcfs")
        for load in (1.0, 8.0)
        for seed in (0, 1)
    }
    assert (runs.jobs_completed == 6).all() and (runs.calls_completed == 6 * 6).all()
    anchors_metrics = (
        "jct_p95_s goodput_jobs_per_s slo_attainment ttft_p99_s tpot_p99_s prefix_hit_rate recomputed_tokens "
        "preemptions evictions swapped_bytes kv_utilization_mean jain_tenant_jct max_wait_s large_model_call_share"
    )
    assert set(anchors_metrics.split()) <= set(runs.columns)
    assert ((runs.slo_attainment >= 0) & (runs.slo_attainment <= 1)).all()
    assert (runs.slowdown_mean > 0.9).all()  # a tree alone is (about) as fast as it gets
    jobs = pd.read_csv(out / "jobs.csv")
    assert len(jobs) == 8 * 6 and jobs.jct_s.notna().all()
    assert np.allclose(jobs.slo_s, 5.0 * jobs.unloaded_s)
    # the SLO counts match the per-tree table
    met = jobs.groupby(list(KEYS)).met_slo.mean().reset_index()
    merged = runs.merge(met, on=list(KEYS))
    assert np.allclose(merged.slo_attainment, merged.met_slo)
    kv = pd.read_csv(out / "kv_timeline.csv")
    assert len(kv) == 8 * 20 and kv.kv_used_frac.between(0, 1).all()
    markdown = (out / "summary.md").read_text()
    assert "### mapreduce" in markdown and "| 8 | program_fcfs | 2 |" in markdown
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and "jct_mean_s_ci" in summary
    for name in ("jct_cdf", "jct_vs_load", "goodput_vs_load", "kv_utilization"):
        png = out / "plots" / f"{name}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert not (out / "failures.csv").exists()


@pytest.mark.slow
def test_same_config_same_metrics(tiny_eval, tmp_path) -> None:
    _, out = tiny_eval
    again = run_suite(tiny_suite(), progress=False)
    again.to_csv(tmp_path / "runs.csv", index=False)
    first = pd.read_csv(out / "runs.csv").drop(columns="wall_s")
    second = pd.read_csv(tmp_path / "runs.csv").drop(columns="wall_s")
    pd.testing.assert_frame_equal(first, second)
    different = run_suite(tiny_suite(seeds=[2], loads=[8.0]), progress=False)
    assert different.jct_mean_s.iloc[0] not in set(first.jct_mean_s)


@pytest.mark.slow
def test_load_multiplies_the_arrival_rate_on_the_same_trees(tiny_eval) -> None:
    _, out = tiny_eval
    jobs = pd.read_csv(out / "jobs.csv")
    fcfs = jobs[(jobs.policy == "fcfs") & (jobs.seed == 0)]
    light, heavy = (fcfs[fcfs.load == load].set_index("job_id") for load in (1.0, 8.0))
    assert np.allclose(heavy.arrival_s * 8.0, light.arrival_s)
    assert (heavy.unloaded_s == light.unloaded_s).all() and (heavy.output_tokens == light.output_tokens).all()


@pytest.mark.slow
def test_collect_merges_suites(tiny_eval) -> None:
    _, out = tiny_eval
    evaluate(tiny_suite(policies=["lpm"], loads=[8.0]), out.parent / "b", progress=False)
    assert (
        (out.parent / "b" / "summary.md")
        .read_text()
        .startswith("No tree-time ratio column: the baseline 'fcfs' is not among the policies ['lpm']")
    )
    merged = collect(out.parent)
    assert len(merged.runs) == 8 + 2
    assert set(merged.runs.policy) == {"fcfs", "program_fcfs", "lpm"}
    assert len(merged.jobs) == (8 + 2) * 6


# ---------------------------------------------------------------- failures
class RaisingPolicy(FCFS):
    """FCFS until its third decision, then an error: a stand-in for a broken learned policy."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions = 0

    def scores(self, decision):
        self.decisions += 1
        if self.decisions > 2:
            raise RuntimeError("boom: a policy bug")
        return super().scores(decision)


@pytest.mark.slow
def test_a_raising_policy_is_reported_and_the_rest_survive(tmp_path) -> None:
    config = tiny_suite(policies=["fcfs", "broken"], loads=[8.0])
    result = evaluate(config, tmp_path, extra_policies={"broken": RaisingPolicy}, progress=False)
    assert set(result.runs.policy) == {"fcfs"} and len(result.runs) == 2
    assert len(result.failures) == 2
    assert set(result.failures.policy) == {"broken"}
    assert (result.failures.error == "RuntimeError").all()
    assert result.failures.message.str.contains("boom").all()
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert failures[list(KEYS)].to_dict("records") == [
        {"policy": "broken", "workload": "mapreduce", "load": 8.0, "seed": s} for s in (0, 1)
    ]
    assert "boom: a policy bug" in (tmp_path / "failures.log").read_text()
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 2
    df = run_suite(config, extra_policies={"broken": RaisingPolicy}, progress=False)
    assert len(df.attrs["failures"]) == 2


@pytest.mark.slow
def test_process_pool_gives_the_same_rows() -> None:
    config = tiny_suite(loads=[8.0], seeds=[0])
    serial = run_suite_full(config, progress=False).runs.drop(columns="wall_s")
    pooled = run_suite_full(tiny_suite(loads=[8.0], seeds=[0], jobs=2), progress=False).runs.drop(
        columns="wall_s"
    )
    pd.testing.assert_frame_equal(serial, pooled)


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"policies": ["fcfs", "no_such_policy"]}, "suite.policies"),
        ({"policies": []}, "suite.policies"),
        ({"workloads": ["nope"]}, "suite.workloads"),
        ({"seeds": []}, "suite.seeds"),
        ({"loads": [1.0, 0.0]}, "suite.loads"),
        ({"loads": [-2.0]}, "suite.loads"),
        ({"loads": [float("nan")]}, "suite.loads"),
        ({"jobs": 0}, "suite.jobs"),
        ({"seeds": [1, 1]}, "suite.seeds"),
        ({"slo_scale": 0.0}, "suite.slo_scale"),
        ({"agent_overrides": {"lpm": {"fcfs_queue_len": 4}}}, "suite.agent_overrides.lpm"),
    ],
)
def test_bad_config_names_the_key(changes: dict, key: str) -> None:
    with pytest.raises(SuiteConfigError, match=key.replace(".", r"\.")):
        run_suite(tiny_suite(**changes), progress=False)


def test_a_workload_that_does_not_build_fails_at_start() -> None:
    config = tiny_suite(workload_overrides={"mapreduce": {"arrival_rate": -1.0}})
    with pytest.raises(SuiteConfigError, match="suite.workloads: 'mapreduce'"):
        run_suite(config, progress=False)


def test_a_baseline_outside_the_policies_is_a_config_error() -> None:
    with pytest.raises(SuiteConfigError, match=r"suite.baseline: unknown policy 'nosuch'"):
        run_suite(tiny_suite(baseline="nosuch"), progress=False)


# ---------------------------------------------------------------- rejected work
def test_rejected_work_is_counted_in_runs_summary_and_markdown(tmp_path) -> None:
    from servegym.agents.evaluation.api import compose_config, rejected_work_line

    base = compose_config(["engine.num_gpu_blocks=1"])  # no call fits: every tree fails
    result = evaluate(tiny_suite(loads=[1.0]), tmp_path, base_cfg=base, progress=False)
    runs = result.runs
    assert len(runs) == 4 and result.failures.empty
    assert (runs.jobs_failed == 6).all() and (runs.calls_rejected == runs.calls_total).all()
    assert (runs.jobs_total == 6).all() and not runs.complete.any()
    assert runs.first_rejection.str.contains("exceeds the KV cache").all()
    assert len(result.incomplete()) == 4
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert (summary.jobs_failed_mean == 6).all()
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.startswith("**Incomplete: 4 of 4 runs rejected work: 144 calls rejected, 24 trees failed")
    assert "| failed trees |" in markdown and "over finished trees only" in markdown
    assert rejected_work_line(runs).startswith("4 of 4 runs rejected work")


@pytest.mark.slow
def test_a_complete_suite_reports_zero_failed_trees(tiny_eval) -> None:
    from servegym.agents.evaluation.api import incomplete_runs, rejected_work_line

    runs = tiny_eval[0].runs
    assert (runs.jobs_failed == 0).all() and runs.complete.all() and (runs.first_rejection == "").all()
    assert incomplete_runs(runs).empty and rejected_work_line(runs) == ""


# ---------------------------------------------------------------- one source of truth
def test_the_default_suite_is_written_once() -> None:
    """conf/suite/default.yaml names the default suite; SuiteConfig has no default for it, and
    no YAML repeats a SuiteConfig default (so the two cannot drift apart)."""
    import dataclasses

    from omegaconf import OmegaConf

    from servegym.agents.evaluation.api import DEFAULT_CONF_DIR

    fields = {f.name: f for f in dataclasses.fields(SuiteConfig)}
    for name in ("policies", "workloads"):
        assert (
            fields[name].default is dataclasses.MISSING
            and fields[name].default_factory is dataclasses.MISSING
        )
    defaults = SuiteConfig(policies=["fcfs"], workloads=["mapreduce"])
    for path in sorted((DEFAULT_CONF_DIR / "suite").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        for key, value in node.items():
            if key in ("defaults", "policies", "workloads"):
                continue
            assert key in fields, f"{path.name}: {key} is not a SuiteConfig field"
            assert value != getattr(defaults, key), (
                f"{path.name}: {key}={value!r} repeats SuiteConfig's default"
            )
    script = (DEFAULT_CONF_DIR.parent / "scripts" / "evaluate.py").read_text()
    assert "heuristics)" not in script.split('"""')[1]  # the docstring points at the YAML, no count
