"""A runs table summarised per (workload, load, policy) with confidence intervals, and that
summary as markdown (``summary.csv``, ``summary.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .results import KEYS, sort_rows, unique_in_order
from .stats import bounded_interval, ratio_interval, t_interval

HEADLINE_METRICS: dict[str, str] = {
    "jct_mean_s": "tree time mean (s)",
    "jct_p99_s": "tree time p99 (s)",
    "jobs_failed": "failed trees",
    "goodput_jobs_per_s": "goodput (trees/s)",
    "slo_attainment": "SLO attained",
    "ttft_p99_s": "TTFT p99 (s)",
    "max_wait_s": "max wait (s)",
    "prefix_hit_rate": "prefix hit",
    "preemptions": "preemptions",
    "kv_utilization_mean": "KV use",
}
"""Metrics shown in ``summary.md`` (``summary.csv`` holds every metric)."""

INFLATION_METRICS: dict[str, str] = {
    "tokens_per_tree_mean": "tokens/tree",
    "prompt_tokens_per_tree_mean": "prompt tokens/tree",
    "prompt_tokens_root_mean": "root prompt",
    "prompt_growth_per_level": "prompt growth/level (x)",
    "prompt_tokens_added_per_level": "prompt added/level",
    "call_depth_max": "max depth",
}
"""Contextual-inflation metrics (``servegym.envs.engine.metrics``), for ``summary.md`` of deep
ReAct or debate suites: ``to_markdown(summary, {**HEADLINE_METRICS, **INFLATION_METRICS})`` or
``report(..., metrics=...)``. Mostly a property of the workload, so not a headline by default;
a policy changes them only through what the trees generate (budget truncation, folding)."""

_NOT_METRICS = ("stalled", "stall_reason", "wall_s", "complete", "first_rejection", "workload_seeded")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric per-run metrics of a runs table (everything but the keys and bookkeeping)."""
    return [
        c
        for c in df.columns
        if c not in KEYS
        and c not in _NOT_METRICS
        and pd.api.types.is_numeric_dtype(df[c])
        and df[c].dtype != bool
    ]


def summarise(
    df: pd.DataFrame, metrics: Sequence[str] | None = None, baseline: str = "fcfs", confidence: float = 0.95
) -> pd.DataFrame:
    """One row per (workload, load, policy): ``n`` runs and, per metric, ``<m>_mean``, ``<m>_ci``
    (the t-interval's half-width) and ``<m>_lo``/``<m>_hi`` (the interval cut to the metric's
    range, ``metric_range``); plus ``jct_ratio`` (mean tree time / the baseline's in the same
    cell) and ``jct_ratio_lo``/``_hi`` (log-scale t-interval of the per-seed ratios, > 0).

    Runs of a workload that ignores the seed (``workload_seeded`` false: a trace without
    resampling) are identical whatever their seed, so such a cell keeps one run (its first
    seed): n = 1 and no interval, never a zero-width one. ``workload_seeded`` is copied per row."""
    df = _one_run_per_seedless_cell(df)
    metrics = list(metrics or metric_columns(df))
    records = []
    for (workload, load, policy), group in df.groupby(["workload", "load", "policy"], sort=False):
        record: dict[str, Any] = {"workload": workload, "load": load, "policy": policy, "n": len(group)}
        if "workload_seeded" in group:
            record["workload_seeded"] = bool(group["workload_seeded"].astype(bool).all())
        for metric in metrics:
            mean, half = t_interval(group[metric], confidence)
            low, high = bounded_interval(mean, half, metric)
            record.update(
                {f"{metric}_mean": mean, f"{metric}_ci": half, f"{metric}_lo": low, f"{metric}_hi": high}
            )
        records.append(record)
    summary = pd.DataFrame(records)
    if summary.empty:
        return summary
    ratios = []
    for record in summary.to_dict("records"):
        cell = df[(df.workload == record["workload"]) & (df.load == record["load"])]
        mine = cell[cell.policy == record["policy"]].set_index("seed")["jct_mean_s"]
        base = cell[cell.policy == baseline].set_index("seed")["jct_mean_s"]
        if base.empty:
            ratios.append((np.nan, np.nan, np.nan))
            continue
        ratios.append(
            (mine.mean() / base.mean(), *ratio_interval((mine / base).dropna().to_numpy(), confidence))
        )
    summary["jct_ratio"], summary["jct_ratio_lo"], summary["jct_ratio_hi"] = map(
        list, zip(*ratios, strict=True)
    )
    return sort_rows(summary.assign(seed=0)).drop(columns="seed")


def _one_run_per_seedless_cell(df: pd.DataFrame) -> pd.DataFrame:
    if "workload_seeded" not in df or df.empty:
        return df
    seedless = ~df["workload_seeded"].fillna(True).astype(bool)
    if not seedless.any():
        return df
    first = df[seedless].sort_values("seed", kind="stable").drop_duplicates(["workload", "load", "policy"])
    return df[~seedless | df.index.isin(first.index)]


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.3g}" if magnitude < 10 else f"{value:.1f}"
    return f"{value:.2g}" if magnitude < 0.01 else f"{value:.3f}"


def _with_interval(record: dict, metric: str) -> str:
    """The mean and its interval: "m ± half", "m [lo, hi]" where the range cut it, or "m"."""
    mean, half = record[f"{metric}_mean"], record[f"{metric}_ci"]
    text = _fmt(mean)
    if not np.isfinite(half):
        return text
    low, high = record.get(f"{metric}_lo", np.nan), record.get(f"{metric}_hi", np.nan)
    if np.isfinite(low) and (low > mean - half or high < mean + half):
        return f"{text} [{_fmt(low)}, {_fmt(high)}]"
    return f"{text} ± {_fmt(half)}"


def to_markdown(summary: pd.DataFrame, metrics: dict[str, str] | None = None, baseline: str = "fcfs") -> str:
    """Markdown tables, one per workload: mean +- 95% half-width per (load, policy) for the
    headline metrics (the interval in brackets where the metric's range cut it), the tree-time
    ratio to ``baseline``; the lowest mean tree time of each load in bold. A cell of one run has
    no interval ("[—]" after its ratio); a note names the workloads that ignore the seed."""
    metrics = {m: label for m, label in (metrics or HEADLINE_METRICS).items() if f"{m}_mean" in summary}
    lines = []
    has_ratio = "jct_ratio" in summary and summary["jct_ratio"].notna().any()
    for workload, table in summary.groupby("workload", sort=False):
        lines += [f"### {workload}", ""]
        header = ["load", "policy", "n", *metrics.values()]
        if has_ratio:
            header.insert(3, f"tree time / {baseline} [95% CI]")
        lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
        ]
        for load, cell in table.groupby("load", sort=False):
            means = cell["jct_mean_s_mean"] if "jct_mean_s_mean" in cell else pd.Series(dtype=float)
            best = means.min() if means.nunique() > 1 else np.nan  # no bold when every policy ties
            for record in cell.to_dict("records"):
                values = []
                for metric in metrics:
                    text = _with_interval(record, metric)
                    if metric == "jct_mean_s" and record[f"{metric}_mean"] == best:
                        text = f"**{text}**"
                    values.append(text)
                row = [f"{load:g}", str(record["policy"]), str(record["n"]), *values]
                if has_ratio:
                    ratio = f"{record['jct_ratio']:.3f}" if np.isfinite(record["jct_ratio"]) else "-"
                    if np.isfinite(record["jct_ratio_lo"]):
                        ratio += f" [{record['jct_ratio_lo']:.3f}, {record['jct_ratio_hi']:.3f}]"
                    elif record["n"] == 1 and np.isfinite(record["jct_ratio"]):
                        ratio += " [—]"
                    row.insert(3, ratio)
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append(
        "Mean ± 95% Student-t half-width over seeds; in brackets instead where the interval "
        "reaches past the metric's range (below 0, or above 1 for a fraction) and is cut there. "
        "Tree time = tree completion time, over "
        "finished trees only; failed trees (a call rejected, e.g. too long for the KV cache) "
        "are counted in their own column and are not in the tree times. "
        f"Tree time / {baseline}: ratio of mean tree times in the same cell; in brackets the "
        "log-scale t-interval of the per-seed ratios (a seed gives every policy the same trees and "
        "arrivals). n = 1: one run, no interval (—). "
        "SLO: a multiple of each tree's unloaded time unless configured otherwise; goodput = trees "
        "within SLO per second. Bold: lowest mean tree time at that load (none when all tie)."
    )
    seedless = seedless_workloads(summary)
    if seedless:
        lines += [
            "",
            f"**{', '.join(f'`{w}`' for w in seedless)}: the same trees for every seed** (a trace "
            "without resampling), so each of its cells is one run (n = 1) with no interval (—): "
            "more seeds would repeat the run exactly, and their zero-width interval would be no "
            "measure of certainty. Set the trace's resample: bootstrap to draw a different sample per seed.",
        ]
    return "\n".join(lines) + "\n"


def seedless_workloads(table: pd.DataFrame) -> list[str]:
    """Workloads of a runs or summary table whose runs ignore the seed (``workload_seeded`` false)."""
    if "workload_seeded" not in table or table.empty:
        return []
    flags = table["workload_seeded"].fillna(True).astype(bool)
    return unique_in_order(table.loc[~flags, "workload"])
