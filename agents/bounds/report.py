"""Reporting the headroom table: cells as "mean ± ci / p99 ± ci", ``headroom.md`` with its
definitions in a few lines, a ``rich`` table for the terminal, and the CSV files. Formatting
only: every number comes from ``table.HeadroomResult``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from servegym.agents.evaluation.api import DEFAULT_CONF_DIR

from .config import BoundsConfig
from .table import ROOM_THRESHOLD, HeadroomResult


def _cell(mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.1f} ± {half:.1f}" if np.isfinite(half) else f"{mean:.1f}"


def _headroom_text(row: dict, sep: str = " ") -> str:
    text = f"{row['headroom']:.3f}"
    if np.isfinite(row["headroom_lo"]):
        text += f"{sep}[{row['headroom_lo']:.3f}, {row['headroom_hi']:.3f}]"
    if row["room_below_15pct"]:
        text += f"{sep}< 15% room"
    return text


def short_config(config: str) -> str:
    """A setting's config for tables: ``seqs`` = max_num_seqs, ``tokens`` = max_num_batched_tokens."""
    return config.replace("max_num_seqs=", "seqs=").replace("max_num_batched_tokens=", "tokens=")


def table_rows(table: pd.DataFrame, sep: str = " / ") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table, each time cell "mean ± ci<sep>p99 ± ci" (Markdown:
    " / "; the terminal: a line break)."""
    header = [
        "family",
        "load",
        "FCFS",
        "best tuned heuristic",
        "best tuned",
        "rollout-improved",
        "clairvoyant",
        "bound",
        "headroom: tuned / bound [95% CI]",
    ]
    rows = []
    for row in table.to_dict("records"):

        def both(prefix: str, row: dict = row) -> str:
            mean = _cell(row[f"{prefix}_mean_s"], row[f"{prefix}_mean_ci"])
            return f"{mean}{sep}{_cell(row[f'{prefix}_p99_s'], row[f'{prefix}_p99_ci'])}"

        name_sep = " " if sep == " / " else "\n"
        rows.append(
            [
                row["family"],
                f"{row['load']:g}",
                both("fcfs"),
                f"{row['tuned_policy']}{name_sep}({short_config(row['tuned_config'])})",
                both("tuned"),
                both("rollout"),
                f"{both('clairvoyant')}{name_sep}({row['clairvoyant_policy']}, "
                f"{short_config(row['clairvoyant_config'])})",
                both("bound"),
                _headroom_text(row, " " if sep == " / " else "\n"),
            ]
        )
    return header, rows


def to_markdown(result: HeadroomResult, config: BoundsConfig) -> str:
    """headroom.md: the table, the rollout's cost and the definitions in a few lines."""
    header, rows = table_rows(result.table)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| family | load | rollout: decisions branched / ORDER decisions | improved | wall (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result.table.to_dict("records"):
        lines.append(
            f"| {row['family']} | {row['load']:g} | {row['rollout_branched']} / {row['rollout_decisions']} | "
            f"{row['rollout_improved']} | {row['rollout_wall_s']:.0f} |"
        )
    r = config.rollout
    horizon = "to the end of the run" if r.horizon_s is None else f"{r.horizon_s:g} s ahead"
    lines += [
        "",
        f"Tree time in seconds, mean / p99 per run, then mean ± 95% Student-t half-width over the "
        f"{len(config.test_seeds)} held-out seeds {_span(config.test_seeds)}; configurations chosen on "
        f"training seeds {_span(config.train_seeds)} from max_num_seqs (seqs) {list(config.max_num_seqs)} x "
        f"max_num_batched_tokens (tokens) {list(config.max_num_batched_tokens)}"
        + "".join(
            f" (x {name} {key} {list(values)})"
            for name, grid_ in config.agent_grids.items()
            for key, values in dict(grid_).items()
        )
        + f", {len(config.tuned_policies(DEFAULT_CONF_DIR))} heuristics. FCFS at the engine's default config. "
        f"Rollout-improved: the best tuned heuristic, branching at most {r.decision_budget} ORDER decisions "
        f"per run into its own answer and its {r.k - 1} best-scored fitting alternatives (each admitted "
        f"first), each simulated {horizon}. Clairvoyant: the "
        f"oracle ({', '.join(config.clairvoyant)}) with the better training mean, at its own best cap. "
        "Bound: per seed, the best schedule measured (any column); the true optimum may be lower, so "
        "the headroom is a lower bound on the room. Headroom: best tuned mean / bound mean, in brackets "
        f"the t-interval of per-seed ratios; < 15% room where it is below {ROOM_THRESHOLD}. "
        f"Wall time of the whole table: {result.wall_s:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _span(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def rich_table(table: pd.DataFrame) -> Any:
    """The main table as a ``rich.table.Table`` for the terminal."""
    from rich.table import Table

    header, rows = table_rows(table, sep="\n")
    out = Table(title="headroom: tree time (s), mean then p99, over held-out seeds", show_lines=True)
    for i, name in enumerate(header):
        out.add_column(name, justify="left" if i in (0, 3) else "right", overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def write(result: HeadroomResult, config: BoundsConfig, out_dir: Path | str) -> str:
    """headroom.md, headroom.csv, sweep.csv, choices.csv and runs.csv into ``out_dir``; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result, config)
    (out / "headroom.md").write_text(markdown)
    result.table.to_csv(out / "headroom.csv", index=False)
    result.sweep.to_csv(out / "sweep.csv", index=False)
    result.choices.to_csv(out / "choices.csv", index=False)
    result.runs.to_csv(out / "runs.csv", index=False)
    return markdown
