"""The RETAIN lever's table: each retention rule against releasing (vLLM), across cache sizes.

    python scripts/retention_table.py                        # experiment=retention's world
    python scripts/retention_table.py --blocks 28000 12000 --seeds 10000 10001 --jobs 2

Every rule answers RETAIN through ``agents.policies.retention.Retaining`` around the same admission
heuristic (``--order``, default tree-SRPT), in ``experiment=retention``'s world with
``engine.num_gpu_blocks`` swept; ``--onnx`` adds an exported Retention-v0 policy (its sidecar's
fallback admits). Per cache size: mean and p99 tree time over held-out seeds with 95% t
intervals, and the paired ratio to ``release`` on the same seeds (log-scale t interval).
Prints a markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RULES = {  # name -> (rule, grace_s, min_kv_free)
    "release": ("release", 0.0, 0.0),
    "tool_mean+1s": ("tool_mean", 1.0, 0.0),
    "tool_mean+2s": ("tool_mean", 2.0, 0.0),
    "fixed 4s": ("fixed", 4.0, 0.0),
    "oracle+4s": ("oracle", 4.0, 0.0),
}


def run_one(args: tuple[str, int, int, str, str | None]) -> tuple[str, int, int, float, float]:
    name, blocks, seed, order, onnx = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hydra.utils import get_class

    from servegym.agents.deploy.runtime import OnnxPolicy
    from servegym.agents.evaluation.config import compose_config
    from servegym.agents.policies.retention import Retaining
    from servegym.envs.build import build_engine

    cfg = compose_config(["experiment=retention", f"engine.num_gpu_blocks={blocks}"])
    if name == "learned":
        policy = OnnxPolicy(onnx)
    else:
        rule, grace, kv_min = RULES[name]
        policy = Retaining(get_class(order)(), rule, grace, kv_min, time_scale_s=cfg.time_scale_s)
    metrics = build_engine(cfg, seed).run(policy)
    return name, blocks, seed, metrics.jct_mean_s, metrics.jct_p99_s


def table(rows: list[tuple[str, int, int, float, float]], names: list[str], blocks: list[int]) -> str:
    from servegym.agents.evaluation.stats import paired_ratio, t_interval

    by = {(n, b, s): (m, p) for n, b, s, m, p in rows}
    seeds = sorted({s for _, _, s, _, _ in rows})
    lines = [
        "| KV blocks | rule | mean tree time (s) | / release | p99 (s) |",
        "|---:|---|---:|---:|---:|",
    ]
    for b in blocks:
        base = np.array([by[("release", b, s)][0] for s in seeds])
        for n in names:
            mean = np.array([by[(n, b, s)][0] for s in seeds])
            p99 = np.array([by[(n, b, s)][1] for s in seeds])
            m, h = t_interval(mean)
            pm, ph = t_interval(p99)
            lines.append(
                f"| {b} | {n} | {m:.1f} ± {h:.1f} | {paired_ratio(mean, base)} | {pm:.0f} ± {ph:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, nargs="+", default=[27984, 12000, 8000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10000, 10001, 10002, 10003, 10004])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--order", default="servegym.agents.policies.heuristics.PredictedTreeSRPT")
    parser.add_argument("--onnx", default=None, help="an exported Retention-v0 policy.onnx to add")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = [*args.rules] + (["learned"] if args.onnx else [])
    if "release" not in names:
        names.insert(0, "release")
    tasks = [(n, b, s, args.order, args.onnx) for b in args.blocks for n in names for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    text = table(rows, names, args.blocks)
    failed = sorted({(n, b) for n, b, _, mean, _ in rows if not np.isfinite(mean)})
    if failed:  # a cache too small for a call rejects its tree: NaN, said rather than averaged
        text += f"\n\nNo finished tree (calls rejected or stalled) in: {failed}"
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
