"""Evaluation throughput, process pool vs Ray: one suite run by ``suite.jobs=N`` worker
processes and by ``suite.backend=ray`` on a local N-node Ray cluster (one CPU per node, each
node its own ``ray start`` process on 127.0.0.1: ``servegym.agents.evaluation.ray_loopback``), in runs
per minute, alternating backend repeat by repeat so both see the same noisy minutes.

Both use N CPUs, so the ratio is what Ray costs (task submission, object transfer, one driver
connection per suite) against a pool on one machine; what Ray buys is N beyond one machine.
Each repeat is one whole suite, started and finished: the pool's time includes starting its
workers (loky keeps them for the next repeat), Ray's includes connecting to the running
cluster (its worker processes likewise stay). Starting the cluster is timed apart. Each repeat
also checks that both backends gave the same rows.

    python scripts/bench_eval_backends.py                    # 2 CPUs, 3 repeats, 24 runs a suite
    python scripts/bench_eval_backends.py --cpus 4 --repeats 5 --seeds 6 --num-jobs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pandas as pd

from servegym.agents.evaluation.api import SuiteConfig, run_suite_full
from servegym.agents.evaluation.ray_loopback import LoopbackCluster


def suite(args: argparse.Namespace, **backend: object) -> SuiteConfig:
    return SuiteConfig(
        policies=["fcfs", "program_fcfs", "plas"],
        workloads=["mapreduce", "react"],
        loads=[1.0, 8.0],
        seeds=list(range(10000, 10000 + args.seeds)),
        num_jobs=args.num_jobs,
        kv_timeline_bins=20,
        **backend,
    )


def timed(config: SuiteConfig) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    result = run_suite_full(config, progress=False)
    elapsed = time.perf_counter() - start
    if not result.failures.empty:
        raise SystemExit(f"a run failed:\n{result.failures.to_string()}")
    return elapsed, result.runs.drop(columns="wall_s")


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpus", type=int, default=2, help="pool workers = Ray nodes (one CPU each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--seeds", type=int, default=2, help="seeds per cell (3 policies x 2 workloads x 2 loads)"
    )
    parser.add_argument("--num-jobs", type=int, default=40, help="trees per run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    start = time.perf_counter()
    with LoopbackCluster(num_nodes=args.cpus, cpus_per_node=1) as cluster:
        startup_s = time.perf_counter() - start
        pool = suite(args, jobs=args.cpus)
        ray = suite(args, backend="ray", ray_address=cluster.address)
        runs = len(pool.policies) * len(pool.workloads) * len(pool.loads) * len(pool.seeds)
        rates: dict[str, list[float]] = {"pool": [], "ray": []}
        ratios = []
        for repeat in range(args.repeats):
            order = [("pool", pool), ("ray", ray)] if repeat % 2 == 0 else [("ray", ray), ("pool", pool)]
            rows, per_min = {}, {}
            for name, config in order:
                elapsed, rows[name] = timed(config)
                per_min[name] = 60.0 * runs / elapsed
                rates[name].append(per_min[name])
            pd.testing.assert_frame_equal(rows["pool"], rows["ray"])  # same seeds, same rows
            ratios.append(per_min["ray"] / per_min["pool"])
            print(
                f"repeat {repeat + 1}: pool {per_min['pool']:.1f} runs/min, ray {per_min['ray']:.1f} "
                f"runs/min, ratio {ratios[-1]:.2f}; identical rows",
                flush=True,
            )
    print(
        f"\n{runs} runs a suite ({args.num_jobs} trees each), {args.cpus} CPUs, {args.repeats} repeats; "
        f"Ray cluster start ({args.cpus} nodes): {startup_s:.1f} s, not counted"
    )
    print("\n| backend | runs/min, median (min-max) | ray / pool |")
    print("|---|---:|---:|")
    print(f"| process pool, suite.jobs={args.cpus} | {spread(rates['pool'])} | |")
    print(f"| Ray, {args.cpus}-node loopback cluster | {spread(rates['ray'])} | {spread(ratios, 2)} |")


if __name__ == "__main__":
    main()
