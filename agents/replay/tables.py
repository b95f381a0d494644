"""A replay's records as the evaluation's tables: ``calls.csv`` (one row per call), ``jobs.csv``
(one per tree, the evaluation's ``jct_s`` column), ``runs.csv`` (one per replay, keyed like a
suite's runs: policy, workload, load, seed) and, through ``servegym.agents.evaluation.api``, the same
``summary.csv``/``summary.md`` and plots as ``scripts/evaluate.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from servegym.agents.replay.runner import ReplayResult

REPLAY_METRICS: dict[str, str] = {
    "jct_mean_s": "tree time mean (s)",
    "jct_p99_s": "tree time p99 (s)",
    "jobs_failed": "failed trees",
    "ttft_p99_s": "TTFT p99 (s)",
    "tpot_mean_s": "TPOT mean (s)",
    "retries": "retries",
    "makespan_s": "makespan (s)",
}
"""Columns of the replay's ``summary.md``."""


def calls_frame(result: ReplayResult) -> pd.DataFrame:
    rows = []
    for record in result.calls:
        c = record.completion
        rows.append(
            {
                "job_id": record.job_id,
                "call_id": record.call_id,
                "role": record.role,
                "depth": record.depth,
                "tag": record.tag,
                "ready_s": record.ready_s,
                "sent_s": c.sent_s,
                "first_token_s": c.first_token_s,
                "end_s": c.end_s,
                "ttft_s": c.ttft_s,
                "tpot_s": c.tpot_s,
                "prompt_words": record.prompt_words,
                "prompt_tokens": c.prompt_tokens,
                "max_tokens": record.max_tokens,
                "output_tokens": c.output_tokens,
                "priority": record.priority,
                "attempts": c.attempts,
                "retries": c.retries,
                "ok": record.ok,
                "skipped": record.skipped,
                "error": " | ".join(c.errors) if not record.ok else "",
            }
        )
    return pd.DataFrame(rows)


def jobs_frame(result: ReplayResult) -> pd.DataFrame:
    rows = [
        {
            "job_id": t.job_id,
            "kind": t.kind,
            "arrival_s": t.arrival_s,
            "finish_s": t.finish_s,
            "jct_s": np.nan if t.failed else t.jct_s,
            "num_calls": t.num_calls,
            "calls_ok": t.calls_ok,
            "failed": t.failed,
        }
        for t in result.trees
    ]
    return pd.DataFrame(rows).sort_values("arrival_s", kind="stable").reset_index(drop=True)


def run_row(result: ReplayResult, calls: pd.DataFrame, jobs: pd.DataFrame) -> dict:
    """One runs.csv row: tree times over finished trees only (as the evaluation), call timings
    over calls that succeeded; failures and retries counted."""
    done = jobs[~jobs.failed]
    ok = calls[calls.ok]
    jct = done.jct_s.to_numpy(dtype=float)
    ttft = ok.ttft_s.to_numpy(dtype=float)
    tpot = ok.tpot_s.dropna().to_numpy(dtype=float)

    def stat(values: np.ndarray, fn) -> float:
        return float(fn(values)) if len(values) else float("nan")

    return {
        "jct_mean_s": stat(jct, np.mean),
        "jct_p50_s": stat(jct, np.median),
        "jct_p99_s": stat(jct, lambda v: np.percentile(v, 99)),
        "jct_max_s": stat(jct, np.max),
        "ttft_mean_s": stat(ttft, np.mean),
        "ttft_p99_s": stat(ttft, lambda v: np.percentile(v, 99)),
        "tpot_mean_s": stat(tpot, np.mean),
        "jobs_done": len(done),
        "jobs_failed": int(jobs.failed.sum()),
        "calls": len(calls),
        "calls_failed": int((~calls.ok & ~calls.skipped).sum()),
        "calls_skipped": int(calls.skipped.sum()),
        "retries": int(calls.retries.sum()),
        "output_tokens": int(ok.output_tokens.sum()),
        "makespan_s": float(jobs.finish_s.max() - jobs.arrival_s.min()) if len(jobs) else float("nan"),
        "wall_s": result.wall_s,
    }


def write_report(
    runs: pd.DataFrame, jobs: pd.DataFrame, out_dir: Path, baseline: str, plots: bool = True
) -> str:
    """``runs.csv``, ``jobs.csv``, ``summary.csv``, ``summary.md`` (and plots) for all replays in
    ``runs``/``jobs`` (which carry the key columns); returns the Markdown."""
    from servegym.agents.evaluation.api import summarise, to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "runs.csv", index=False)
    jobs.to_csv(out_dir / "jobs.csv", index=False)
    metrics = [m for m in REPLAY_METRICS if m in runs] + [
        "jct_p50_s",
        "ttft_mean_s",
        "calls_failed",
        "wall_s",
    ]
    summary = summarise(runs, metrics=metrics, baseline=baseline)
    summary.to_csv(out_dir / "summary.csv", index=False)
    markdown = to_markdown(summary, metrics=REPLAY_METRICS, baseline=baseline)
    (out_dir / "summary.md").write_text(markdown)
    if plots:
        from servegym.agents.evaluation.plots import plot_suite

        plot_suite(runs, out_dir, jobs=jobs, kv=pd.DataFrame(), summary=summary)
    return markdown
