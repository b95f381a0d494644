"""The headroom table: FCFS, the best tuned heuristic, the rollout-improved policy and the
clairvoyant bound per scenario family and load, on held-out seeds (agents/bounds/ defines each).

python scripts/bounds.py                                          # conf/bounds.yaml: mapreduce, debate at load 0.5, 8
python scripts/bounds.py bounds.families=[react,mixed] bounds.loads=[4.0]
python scripts/bounds.py bounds.rollout.decision_budget=32 bounds.rollout.k=4 bounds.jobs=4
python scripts/bounds.py bounds.num_jobs=20 bounds.test_seeds=[10000,10001] output_dir=/tmp/headroom   # a quick look

Writes headroom.md, headroom.csv, sweep.csv, choices.csv and runs.csv into the Hydra run dir or
output_dir=, prints the table (rich) and its Markdown. Exit status 2 on a bad config.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread per process
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from rich.console import Console  # noqa: E402

from servegym.agents.bounds import BoundsConfigError, bounds_from_cfg, headroom, rich_table, write  # noqa: E402
from servegym.agents.rl.configs import register_configs  # noqa: E402

register_configs()
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(config_path="../conf", config_name="bounds", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the whole table
    errors = Console(stderr=True)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        config = bounds_from_cfg(cfg.bounds)
        result = headroom(
            config, cfg, conf_dir=CONF_DIR, log=lambda line: errors.print(line, highlight=False, markup=False)
        )
    except BoundsConfigError as error:  # the message names the key
        errors.print(f"[red]bad bounds config:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    markdown = write(result, config, out_dir)
    console.print(rich_table(result.table))
    print(markdown, flush=True)  # plain Markdown: paste it into a README or an issue
    console.print(f"{result.wall_s:.0f} s; tables in {out_dir}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
