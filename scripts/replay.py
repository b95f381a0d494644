"""Replay a servegym workload (agent trees) against an OpenAI-compatible server.

python scripts/replay.py replay.base_url=http://127.0.0.1:8000/v1 replay.model=/models/x \
    workload=mapreduce num_jobs=20 replay.label=fcfs
python scripts/replay.py workload=trace workload.path=runs/trace.jsonl replay.label=servegym \
    seeds=[0] loads=[1,2] output_dir=replays/servegym

Each call is sent when its parents have finished and their tool latencies have passed, its prompt
built from the workload's segments and its parents' real outputs, tagged with its tree
(``vllm_xargs``, as servegym.agents.deploy.vllm_adapter reads it). Writes calls.csv, jobs.csv, runs.csv,
summary.csv, summary.md and plots/ into output_dir= (empty or new) or the Hydra run dir.
Exit status: 0 when every tree finished; 1 if a tree failed (a call failed every attempt: see
calls.csv's error column); 2 on a bad config or output folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import servegym.agents.evaluation.api  # noqa: F401 - registers the ${servegym.or:...} resolvers conf/replay.yaml uses
from servegym.agents.replay import ReplayConfig, write_report
from servegym.agents.replay.sweep import replay_sweep
from servegym.envs.workloads.workload import TraceWorkload


@hydra.main(config_path="../conf", config_name="replay", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
    hydra_cfg = HydraConfig.get()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(hydra_cfg.runtime.output_dir)
    try:
        if cfg.output_dir and out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"output_dir={out_dir} is not empty: give a new or empty folder")
        config = ReplayConfig(**OmegaConf.to_container(cfg.replay, resolve=True))
        workload = hydra.utils.instantiate(cfg.workload)
        name = (
            workload.label if isinstance(workload, TraceWorkload) else hydra_cfg.runtime.choices["workload"]
        )
        tables = replay_sweep(
            workload,
            name,
            config,
            list(cfg.seeds),
            list(cfg.loads),
            cfg.num_jobs,
            on_run=lambda row: print(
                f"load {row['load']:g} seed {row['seed']}: {row['jobs_done']} trees done, "
                f"{row['jobs_failed']} failed, {row['retries']} retries, tree time mean "
                f"{row['jct_mean_s']:.3f} s, p99 {row['jct_p99_s']:.3f} s, wall {row['wall_s']:.1f} s",
                flush=True,
            ),
        )
    except (ValueError, TypeError) as error:
        print(f"bad replay config: {error}", file=sys.stderr)
        sys.exit(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables.calls.to_csv(out_dir / "calls.csv", index=False)
    print(
        write_report(
            tables.runs, tables.jobs, out_dir, baseline=cfg.baseline or config.label, plots=cfg.plots
        )
    )
    print(f"tables and plots in {out_dir}")
    if tables.num_failed_trees:
        print(
            f"{tables.num_failed_trees} trees failed: see {out_dir / 'calls.csv'} (error column)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
