"""Cascading lockups: how one fault spreads through a cluster serving agent trees, per policy.

    python scripts/fault_table.py                          # react_long on four replicas, load 4
    python scripts/fault_table.py --policies fcfs llumnix --seeds 10000 10001 --jobs 2

Each fault scenario is a set of ``cluster.*`` overrides (``FAULTS``): none; tool failures (5% of
tool attempts hang until a 30 s timeout, then retry); one replica of four throttled 10x for 60 s
(``cluster.slowdowns``); one replica of four down for 60 s (``cluster.outages``: its calls lose
their KV and are requeued to the other three). Every policy meets the same faults (they are drawn per call, not per
schedule). Per scenario and policy: mean and p99 tree time over held-out seeds with 95% t
intervals, and the p99's ratio to the no-fault run of the same policy and seeds (how far the
fault spreads into the tail). Prints a markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

FAULTS: dict[str, list[str]] = {
    "none": [],
    "tool failures 5%, 30 s timeout": ["cluster.tool_failure_prob=0.05", "cluster.tool_timeout_s=30"],
    "replica 0 at 1/10 speed, 60-120 s": [
        "cluster.slowdowns=[{replica: 0, start_s: 60, duration_s: 60, factor: 10}]"
    ],
    "replica 0 down, 60-120 s": ["cluster.outages=[{replica: 0, start_s: 60, duration_s: 60}]"],
}
WORLD = [
    "workload=react_long",
    "workload.arrival_rate=0.4",  # load 4 over four replicas (0.1 trees/s per replica at load 1)
    "workload.num_jobs=60",
    "cluster=four",
    "engine.num_gpu_blocks=12000",
    "engine.max_num_seqs=16",
    "engine.max_num_batched_tokens=2048",
]


def run_one(args: tuple[str, str, int, list[str]]) -> tuple[str, str, int, float, float]:
    fault, policy, seed, extra = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from servegym.agents.evaluation.config import compose_config
    from servegym.agents.rl.train import heuristic_factory
    from servegym.envs.build import build_engine

    cfg = compose_config([*WORLD, *extra, *FAULTS[fault]])
    metrics = build_engine(cfg, seed).run(heuristic_factory(cfg, policy)())
    return fault, policy, seed, metrics.jct_mean_s, metrics.jct_p99_s


def table(rows: list[tuple[str, str, int, float, float]], faults: list[str], policies: list[str]) -> str:
    from servegym.agents.evaluation.stats import paired_ratio, t_interval

    by = {(f, p, s): (m, q) for f, p, s, m, q in rows}
    seeds = sorted({s for _, _, s, _, _ in rows})
    lines = [
        "| fault | policy | mean tree time (s) | p99 tree time (s) | p99 / no fault |",
        "|---|---|---:|---:|---:|",
    ]
    for fault in faults:
        for policy in policies:
            mean = np.array([by[(fault, policy, s)][0] for s in seeds])
            p99 = np.array([by[(fault, policy, s)][1] for s in seeds])
            calm = np.array([by[("none", policy, s)][1] for s in seeds])
            m, h = t_interval(mean)
            q, qh = t_interval(p99)
            lines.append(
                f"| {fault} | {policy} | {m:.1f} ± {h:.1f} | {q:.0f} ± {qh:.0f} | {paired_ratio(p99, calm)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policies", nargs="+", default=["fcfs", "llumnix", "autellix_lb", "tree_srpt"])
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10000, 10001, 10002, 10003, 10004])
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides of the world")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    faults = ["none", *[f for f in args.faults if f != "none"]]
    tasks = [(f, p, s, args.override) for f in faults for p in args.policies for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    text = table(rows, faults, args.policies)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
