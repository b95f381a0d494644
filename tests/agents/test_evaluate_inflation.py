"""Contextual-inflation metrics in the evaluation tables: the runs row (engine metrics) agrees
with the per-tree rows, and summary.md can show them."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.agents.evaluation.api import HEADLINE_METRICS, run_suite_full, summarise, to_markdown
from servegym.agents.evaluation.report import report
from servegym.agents.evaluation.summary import INFLATION_METRICS
from tests.agents.conftest import tiny_suite


@pytest.fixture(scope="module")
def debate_suite():
    config = tiny_suite(policies=["fcfs"], workloads=["debate"], loads=[1.0], seeds=[0, 1], num_jobs=4)
    return run_suite_full(config, progress=False)


def test_tokens_per_tree_in_runs_equal_the_per_tree_rows(debate_suite) -> None:
    runs, jobs = debate_suite.runs, debate_suite.jobs
    assert len(runs) == 2 and (runs.jobs_completed == 4).all()
    for row in runs.to_dict("records"):
        trees = jobs[jobs.seed == row["seed"]]
        assert row["tokens_per_tree_mean"] == pytest.approx(
            np.mean(trees.prompt_tokens + trees.output_tokens)
        )
        assert row["prompt_tokens_per_tree_mean"] == pytest.approx(trees.prompt_tokens.mean())
    # debate: each round's prompt holds every earlier answer (3 rounds + a judge: levels 0..3)
    assert (runs.prompt_growth_per_level > 1).all() and (runs.call_depth_max == 3).all()


def test_summary_markdown_shows_inflation_metrics(debate_suite, tmp_path) -> None:
    summary = summarise(debate_suite.runs)
    assert {f"{m}_mean" for m in INFLATION_METRICS} <= set(summary.columns)
    assert "tokens/tree" not in to_markdown(summary)  # not a headline by default
    markdown = report(debate_suite, tmp_path, plots=False, metrics={**HEADLINE_METRICS, **INFLATION_METRICS})
    assert "| tokens/tree |" in markdown and "prompt growth/level (x)" in markdown
    assert markdown == (tmp_path / "summary.md").read_text()
