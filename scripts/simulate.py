"""Run one workload through the engine with one policy; print the run's metrics.

python scripts/simulate.py workload=mapreduce workload.arrival_rate=4 engine=llama8b_h100 seed=3
python scripts/simulate.py output=json          # last line: one JSON object of the metrics
python scripts/simulate.py check_every=100      # Engine.check_invariants() every 100 decisions

Exit status: 0 when every tree finished; 1 when the run stalled, or rejected work (a call too
long for every replica's KV cache is rejected with its tree) and ``fail_on_rejected`` is true
(the default; ``fail_on_rejected=false`` reports it and exits 0); 2 on a bad config or trace.
"""

from __future__ import annotations

import json
import math
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from servegym.agents.rl.configs import exit_on_config_error, register_configs
from servegym.envs.build import build_engine

register_configs()


def metrics_table(metrics: dict) -> Table:
    table = Table(title="servegym run")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console = Console(stderr=cfg.output == "json")
    try:
        engine = build_engine(cfg)
        policy = instantiate(cfg.agent)
    except Exception as error:
        exit_on_config_error(error)
        raise
    total = cfg.workload.get("num_jobs") or cfg.workload.get("limit")  # a trace's length is unknown
    columns = (TextColumn("jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not cfg.progress) as bar:
        task = bar.add_task("jobs", total=total)
        engine.apply_retention(policy)  # KV pinning / workflow eviction a heuristic asks for
        decisions = 0
        while (decision := engine.next_decision()) is not None:
            engine.decide(policy.scores(decision))
            decisions += 1
            if cfg.check_every and decisions % cfg.check_every == 0:
                engine.check_invariants()  # raises InvariantError naming what broke
            if decisions % 64 == 0:  # a bar update costs more than a decision
                bar.update(task, completed=engine.num_jobs_done)
        bar.update(task, completed=engine.num_jobs_done)
        if cfg.check_every:
            engine.check_invariants()
    metrics = engine.metrics().as_dict()
    console.print(metrics_table(metrics))
    errors = Console(stderr=True)
    if metrics["stalled"]:
        errors.print(f"[red]run stalled:[/red] {metrics['stall_reason']}", highlight=False, soft_wrap=True)
    rejected = not metrics["complete"] and not metrics["stalled"]
    if rejected:
        errors.print(
            f"[red]run rejected work:[/red] {metrics['calls_rejected']} of {metrics['calls_total']} calls "
            f"rejected, {metrics['jobs_failed']} of {metrics['jobs_total']} trees failed, "
            f"{metrics['jobs_unfinished']} unfinished; tree times cover the {metrics['jobs_completed']} "
            f"finished trees only. First: {metrics['first_rejection'] or '-'}"
            + ("" if cfg.fail_on_rejected else " (fail_on_rejected=false: exit 0)"),
            highlight=False,
            markup=True,
            soft_wrap=True,
        )
    if cfg.output == "json":
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        print(json.dumps(clean))
    sys.stdout.flush()
    if metrics["stalled"] or (rejected and cfg.fail_on_rejected):
        sys.exit(1)


if __name__ == "__main__":
    main()
