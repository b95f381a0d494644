"""The headroom table end to end: sweep the grid on the training seeds, choose each policy's best
static configuration there (``choose_best``), run FCFS, the best tuned heuristic, the oracles and
the rollout-improved policy on the held-out seeds, and reduce the runs to one row per family and
load (``headroom_table``, columns ``HEADROOM_COLUMNS``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from servegym.agents.evaluation.api import DEFAULT_CONF_DIR, t_interval

from .config import BoundsConfig, BoundsConfigError
from .sweep import Setting, Task, grid, make_world, run_task, run_tasks

ROOM_THRESHOLD = 1.15
"""Headroom below this is flagged "< 15% room" in the table."""

HEADROOM_COLUMNS: tuple[str, ...] = (
    "family",
    "load",
    "n",  # held-out seeds
    "fcfs_mean_s",
    "fcfs_mean_ci",
    "fcfs_p99_s",
    "fcfs_p99_ci",
    "tuned_policy",
    "tuned_config",
    "tuned_mean_s",
    "tuned_mean_ci",
    "tuned_p99_s",
    "tuned_p99_ci",
    "rollout_mean_s",
    "rollout_mean_ci",
    "rollout_p99_s",
    "rollout_p99_ci",
    "rollout_branched",  # decisions branched, summed over seeds
    "rollout_improved",  # of those, where a candidate beat the base choice
    "rollout_decisions",  # ORDER decisions of the rollout runs, summed over seeds
    "rollout_wall_s",  # wall time of the rollout runs (children included), summed over seeds
    "clairvoyant_policy",
    "clairvoyant_config",
    "clairvoyant_mean_s",
    "clairvoyant_mean_ci",
    "clairvoyant_p99_s",
    "clairvoyant_p99_ci",
    "bound_mean_s",
    "bound_mean_ci",
    "bound_p99_s",
    "bound_p99_ci",
    "headroom",  # tuned mean / bound mean
    "headroom_lo",  # 95% t-interval of the per-seed ratios
    "headroom_hi",
    "room_below_15pct",  # headroom < ROOM_THRESHOLD
)
"""Columns of ``headroom.csv``: *_mean_s / *_p99_s are means over held-out seeds of the per-run
mean / p99 tree time, *_ci their 95% t half-widths."""


def choose_best(sweep: pd.DataFrame, train_seeds: Iterable[int]) -> pd.DataFrame:
    """Per (family, load, policy), the config with the lowest mean tree time over
    ``train_seeds`` (rows of other seeds are ignored); a config with an incomplete or failed
    run is never chosen. Returns one row per (family, load, policy): its config and training
    mean, in the sweep's order of first appearance."""
    train = sweep[sweep["seed"].isin(list(train_seeds))]
    if train.empty:
        raise BoundsConfigError("no sweep run on the training seeds; nothing to choose from")
    scored = (
        train.groupby(["family", "load", "policy", "config"], sort=False)
        .agg(train_mean_s=("jct_mean_s", "mean"), ok=("complete", "all"), n=("seed", "nunique"))
        .reset_index()
    )
    scored.loc[~scored["ok"], "train_mean_s"] = math.inf
    best = scored.loc[scored.groupby(["family", "load", "policy"], sort=False)["train_mean_s"].idxmin()]
    return best.reset_index(drop=True)


def _best_of(best: pd.DataFrame, family: str, load: float, policies: Iterable[str]) -> dict:
    cell = best[(best.family == family) & (best.load == load) & best.policy.isin(list(policies))]
    if cell.empty or not np.isfinite(cell["train_mean_s"]).any():
        raise RuntimeError(f"no complete configuration of {list(policies)} on {family} at load {load:g}")
    return cell.loc[cell["train_mean_s"].idxmin()].to_dict()


# ---------------------------------------------------------------------------- end to end
@dataclass
class HeadroomResult:
    table: pd.DataFrame
    """One row per (family, load), columns ``HEADROOM_COLUMNS``."""
    sweep: pd.DataFrame
    """Every training-seed run of the grid."""
    runs: pd.DataFrame
    """Every held-out run (FCFS, best tuned, each oracle at its best cap, rollout-improved)."""
    choices: pd.DataFrame
    """Per (family, load, policy): the config chosen on the training seeds and its mean."""
    wall_s: float = 0.0


def headroom(
    config: BoundsConfig,
    base_cfg: DictConfig,
    conf_dir: Path | str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> HeadroomResult:
    """Sweep on the training seeds, choose, run the chosen settings, the oracles and the
    rollout-improved policy on the held-out seeds, and build the table."""
    start = time.perf_counter()
    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR)
    config.check(conf_dir)
    tuned = config.tuned_policies(conf_dir)
    oracles = list(config.clairvoyant)
    world = make_world(config, base_cfg, conf_dir, [config.baseline, *tuned, *oracles])
    settings = {(s.policy, s.config): s for name in [*tuned, *oracles] for s in grid(name, config)}
    cells = [(family, float(load)) for family in config.families for load in config.loads]

    sweep_tasks = [
        Task(setting, family, load, seed, "sweep")
        for family, load in cells
        for setting in settings.values()
        for seed in config.train_seeds
    ]
    log(f"sweep: {len(sweep_tasks)} runs on training seeds {list(config.train_seeds)}")
    sweep = run_tasks(world, sweep_tasks, config.jobs, log)
    choices = choose_best(sweep, config.train_seeds)

    picks: dict[tuple[str, float], dict] = {}
    held_tasks = []
    k = config.rollout.k
    for family, load in cells:
        tuned_pick = _best_of(choices, family, load, tuned)
        oracle_picks = [_best_of(choices, family, load, [name]) for name in oracles]
        picks[(family, load)] = {"tuned": tuned_pick, "oracles": oracle_picks}
        for seed in config.test_seeds:
            tuned_setting = settings[(tuned_pick["policy"], tuned_pick["config"])]
            held_tasks.append(Task(Setting(config.baseline), family, load, seed, "fcfs"))
            held_tasks.append(Task(tuned_setting, family, load, seed, "tuned", count_branchable_k=k))
            held_tasks += [
                Task(settings[(o["policy"], o["config"])], family, load, seed, f"oracle:{o['policy']}")
                for o in oracle_picks
            ]
    log(f"held out: {len(held_tasks)} runs on seeds {list(config.test_seeds)}")
    held = run_tasks(world, held_tasks, config.jobs, log)

    rollout_rows = []
    budget = config.rollout.decision_budget
    for family, load in cells:
        pick = picks[(family, load)]["tuned"]
        setting = settings[(pick["policy"], pick["config"])]
        base_runs = held[(held.family == family) & (held.load == load) & (held.role == "tuned")]
        for seed in config.test_seeds:
            branchable = int(base_runs.loc[base_runs.seed == seed, "branchable"].iloc[0])
            stride = max(1, math.ceil(branchable / budget)) if budget else 1
            log(
                f"rollout: {family} load {load:g} seed {seed} ({pick['policy']} {pick['config']}, stride {stride})"
            )
            task = Task(setting, family, load, seed, "rollout", rollout=config.rollout, stride=stride)
            rollout_rows.append(run_task(world, task))
    runs = pd.concat([held, pd.DataFrame(rollout_rows)], ignore_index=True)
    table = headroom_table(runs, picks, cells)
    return HeadroomResult(table, sweep, runs, choices, time.perf_counter() - start)


def headroom_table(runs: pd.DataFrame, picks: dict, cells: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """The headroom table from the held-out runs (``runs.role``: fcfs, tuned, rollout,
    oracle:<name>); columns ``HEADROOM_COLUMNS``."""
    records = []
    for family, load in cells:
        cell = runs[(runs.family == family) & (runs.load == load)]
        by_role = {role: group.set_index("seed").sort_index() for role, group in cell.groupby("role")}
        pick = picks[(family, load)]
        oracle = min(pick["oracles"], key=lambda o: o["train_mean_s"])
        record: dict[str, Any] = {"family": family, "load": load}
        columns = {
            "fcfs": "fcfs",
            "tuned": "tuned",
            "rollout": "rollout",
            f"oracle:{oracle['policy']}": "clairvoyant",
        }
        for role, prefix in columns.items():
            frame = by_role[role]
            for metric, suffix in (("jct_mean_s", "mean"), ("jct_p99_s", "p99")):
                values = frame[metric].where(frame["complete"])
                record[f"{prefix}_{suffix}_s"], record[f"{prefix}_{suffix}_ci"] = t_interval(
                    values.to_numpy()
                )
        rollout = by_role["rollout"]
        for key in ("branched", "improved", "decisions"):
            record[f"rollout_{key}"] = int(rollout[f"rollout_{key}"].sum())
        record["rollout_wall_s"] = float(rollout["wall_s"].sum())
        record["tuned_policy"], record["tuned_config"] = pick["tuned"]["policy"], pick["tuned"]["config"]
        record["clairvoyant_policy"], record["clairvoyant_config"] = oracle["policy"], oracle["config"]
        # the bound: per seed, the complete run with the lowest mean tree time of all measured
        bound = []
        for seed, runs_of_seed in cell[cell["complete"].astype(bool)].groupby("seed"):
            best = runs_of_seed.loc[runs_of_seed["jct_mean_s"].idxmin()]
            bound.append((seed, best["jct_mean_s"], best["jct_p99_s"]))
        bound_runs = pd.DataFrame(bound, columns=["seed", "mean", "p99"]).set_index("seed")
        bound_mean = bound_runs["mean"].reindex(sorted(cell["seed"].unique()))
        record["n"] = int(cell["seed"].nunique())
        record["bound_mean_s"], record["bound_mean_ci"] = t_interval(bound_mean.to_numpy())
        record["bound_p99_s"], record["bound_p99_ci"] = t_interval(bound_runs["p99"].to_numpy())
        tuned_mean = by_role["tuned"]["jct_mean_s"].where(by_role["tuned"]["complete"])
        ratio_mean, ratio_half = t_interval((tuned_mean / bound_mean).to_numpy())
        record["headroom"] = float(tuned_mean.mean() / bound_mean.mean())
        record["headroom_lo"], record["headroom_hi"] = ratio_mean - ratio_half, ratio_mean + ratio_half
        record["room_below_15pct"] = bool(record["headroom"] < ROOM_THRESHOLD)
        records.append(record)
    return pd.DataFrame(records, columns=list(HEADROOM_COLUMNS))
