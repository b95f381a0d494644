"""Plots of an evaluation suite (matplotlib, Agg backend: files only, no display).

``plot_suite(runs, out_dir)`` writes under ``out_dir/plots/``:

* ``jct_cdf.png``: CDF of tree completion times per policy, one panel per workload, at its
  highest load (trees of every seed pooled);
* ``jct_vs_load.png``: mean and p99 tree completion time versus load (mean over seeds, 95%
  t-interval bars cut at 0, the y axis from 0), one column per workload;
* ``goodput_vs_load.png``: goodput and SLO attainment versus load;
* ``kv_utilization.png``: KV use over time per policy at the highest load, first seed
  (time-weighted per bin, mean over replicas).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_LINESTYLES = ("-", "--", "-.", ":")


def _policy_styles(policies: list[str]) -> dict[str, dict]:
    """A colour and a line style per policy, so policies that tie stay visible on top of each other."""
    cmap = plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")
    return {
        p: {"color": cmap(i % cmap.N), "linestyle": _LINESTYLES[i % len(_LINESTYLES)]}
        for i, p in enumerate(policies)
    }


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _panels(count: int, rows: int = 1, width: float = 4.2, height: float = 3.2):
    fig, axes = plt.subplots(rows, count, figsize=(width * count, height * rows), squeeze=False)
    return fig, axes


def plot_jct_cdf(jobs: pd.DataFrame, path: Path, policies: list[str]) -> Path | None:
    if jobs.empty or "jct_s" not in jobs:
        return None
    workloads = _unique(jobs.workload)
    styles = _policy_styles(policies)
    fig, axes = _panels(len(workloads))
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = jobs[jobs.workload == workload]
        load = mine.load.max()
        for policy in policies:
            jct = np.sort(mine[(mine.load == load) & (mine.policy == policy)].jct_s.dropna().to_numpy())
            if len(jct):
                ax.step(
                    jct,
                    np.arange(1, len(jct) + 1) / len(jct),
                    where="post",
                    label=policy,
                    **styles[policy],
                )
        ax.set(
            title=f"{workload}, load {load:g}", xlabel="tree completion time (s)", ylabel="fraction of trees"
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def plot_vs_load(
    summary: pd.DataFrame, path: Path, policies: list[str], metrics: dict[str, str]
) -> Path | None:
    metrics = {m: label for m, label in metrics.items() if f"{m}_mean" in summary}
    if summary.empty or not metrics:
        return None
    workloads = _unique(summary.workload)
    styles = _policy_styles(policies)
    fig, axes = _panels(len(workloads), rows=len(metrics))
    for col, workload in enumerate(workloads):
        mine = summary[summary.workload == workload]
        for row, (metric, label) in enumerate(metrics.items()):
            ax = axes[row][col]
            for policy in policies:
                line = mine[mine.policy == policy].sort_values("load")
                if line.empty:
                    continue
                ax.errorbar(
                    line.load,
                    line[f"{metric}_mean"],
                    yerr=error_bars(line, metric),
                    label=policy,
                    **styles[policy],
                    marker="o",
                    markersize=3,
                    capsize=2,
                )
            ax.set(title=workload if row == 0 else None, xlabel="load (x offered rate)", ylabel=label)
            if mine.load.max() >= 4 * mine.load.min():
                ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0.0)  # every suite metric is >= 0: no axis (or bar) below it
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def error_bars(line: pd.DataFrame, metric: str) -> np.ndarray:
    """(2, n) distances below and above each mean: to the interval cut to the metric's range
    (``<m>_lo``/``<m>_hi`` of ``summarise``; a summary without them is cut at 0 here), never
    below 0, so no bar draws a negative time, count or rate; 0 where there is no interval."""
    mean = line[f"{metric}_mean"].to_numpy(dtype=np.float64)
    half = line[f"{metric}_ci"].to_numpy(dtype=np.float64)
    if f"{metric}_lo" in line and f"{metric}_hi" in line:
        low = line[f"{metric}_lo"].to_numpy(dtype=np.float64)
        high = line[f"{metric}_hi"].to_numpy(dtype=np.float64)
    else:
        low, high = np.maximum(mean - half, 0.0), mean + half
    below = np.nan_to_num(np.clip(mean - low, 0.0, None), nan=0.0)
    above = np.nan_to_num(np.clip(high - mean, 0.0, None), nan=0.0)
    below = np.minimum(below, np.nan_to_num(np.clip(mean, 0.0, None)))  # never past 0
    return np.vstack([below, above])


def plot_kv_timeline(kv: pd.DataFrame, path: Path, policies: list[str]) -> Path | None:
    if kv.empty or "kv_used_frac" not in kv:
        return None
    workloads = _unique(kv.workload)
    styles = _policy_styles(policies)
    fig, axes = _panels(len(workloads), width=5.0)
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = kv[kv.workload == workload]
        load = mine.load.max()
        seed = mine[mine.load == load].seed.min()
        mine = mine[(mine.load == load) & (mine.seed == seed)]
        for policy in policies:
            line = mine[mine.policy == policy].groupby("time_s", sort=True).kv_used_frac.mean()
            if len(line):
                ax.plot(line.index, line.to_numpy(), label=policy, linewidth=1, **styles[policy])
        ax.set(
            title=f"{workload}, load {load:g}, seed {seed}",
            xlabel="time (s)",
            ylabel="KV blocks in use (fraction)",
            ylim=(0, 1.02),
        )
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write the figure by temporary file and rename (an interrupted plot leaves no torn PNG)."""
    from servegym.agents.evaluation.suite_io import save_figure_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_suite(
    runs: pd.DataFrame,
    out_dir: Path | str,
    jobs: pd.DataFrame | None = None,
    kv: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
) -> list[Path]:
    """Every plot of the module docstring; ``jobs``/``kv`` default to the ``jobs.csv`` and
    ``kv_timeline.csv`` a suite wrote into ``out_dir`` (plots without their data are skipped)."""
    from servegym.agents.evaluation.summary import summarise

    out = Path(out_dir)
    plots = out / "plots"
    if jobs is None:
        jobs = pd.read_csv(out / "jobs.csv") if (out / "jobs.csv").exists() else pd.DataFrame()
    if kv is None:
        kv = pd.read_csv(out / "kv_timeline.csv") if (out / "kv_timeline.csv").exists() else pd.DataFrame()
    if summary is None:
        summary = summarise(runs)
    policies = _unique(runs.policy)
    made = [
        plot_jct_cdf(jobs, plots / "jct_cdf.png", policies),
        plot_vs_load(
            summary,
            plots / "jct_vs_load.png",
            policies,
            {"jct_mean_s": "mean tree time (s)", "jct_p99_s": "p99 tree time (s)"},
        ),
        plot_vs_load(
            summary,
            plots / "goodput_vs_load.png",
            policies,
            {"goodput_jobs_per_s": "goodput (trees/s in SLO)", "slo_attainment": "SLO attainment"},
        ),
        plot_kv_timeline(kv, plots / "kv_utilization.png", policies),
    ]
    return [path for path in made if path is not None]
