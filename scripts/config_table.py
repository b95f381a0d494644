"""The CONFIG lever's table: does a cap that changes with the load beat the best static cap?

    python scripts/config_table.py                            # experiment=config's world
    python scripts/config_table.py --jobs 2 --onnx outputs/.../policy.onnx --out scripts/results/config.md

Every policy admits by the same heuristic (``--order``, default tree-SRPT) and answers CONFIG
through ``agents.policies.batching.Batching``: ``fixed`` at each pair of the grid (a static cap,
as launching vLLM with it), ``kv_fit`` at each ``--targets`` value (the largest cap whose batch of
today's calls fits the cache). The best static pair and the best kv_fit target are chosen on the
training seeds (``--train-seeds``), then every row is reported on the held-out seeds: mean and p99
tree time with 95% t intervals and the paired ratio to the best static cap (log-scale t
interval). ``--onnx`` adds an exported Config-v0 policy (its sidecar's fallback admits). Prints a
markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

Row = tuple[str, int, float, float]  # name, seed, mean tree time, p99


def run_one(args: tuple[str, int, str, list[str]]) -> Row:
    name, seed, order, overrides = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hydra.utils import get_class

    from servegym.agents.deploy.runtime import OnnxPolicy
    from servegym.agents.evaluation.config import compose_config
    from servegym.agents.policies.batching import Batching
    from servegym.envs.build import build_engine

    cfg = compose_config(["experiment=config", *overrides])
    kind, _, value = name.partition(" ")
    if kind == "learned":
        policy = OnnxPolicy(value)
    elif kind == "kv_fit":
        policy = Batching(get_class(order)(), "kv_fit", kv_target=float(value))
    else:  # "fixed S/T"
        seqs, tokens = (int(v) for v in value.split("/"))
        policy = Batching(get_class(order)(), "fixed", seqs, tokens)
    metrics = build_engine(cfg, seed).run(policy)
    return name, seed, metrics.jct_mean_s, metrics.jct_p99_s


def best(rows: list[Row], names: list[str], seeds: list[int]) -> str:
    by = {(n, s): m for n, s, m, _ in rows}
    return min(names, key=lambda n: np.mean([by[(n, s)] for s in seeds]))


def table(rows: list[Row], names: list[str], seeds: list[int], reference: str) -> str:
    from servegym.agents.evaluation.stats import paired_ratio, t_interval

    by = {(n, s): (m, p) for n, s, m, p in rows}
    base = np.array([by[(reference, s)][0] for s in seeds])
    lines = ["| policy | mean tree time (s) | / best static | p99 (s) |", "|---|---:|---:|---:|"]
    for n in names:
        mean = np.array([by[(n, s)][0] for s in seeds])
        p99 = np.array([by[(n, s)][1] for s in seeds])
        (m, h), (pm, ph) = t_interval(mean), t_interval(p99)
        label = n.replace("learned ", "learned: ") if n.startswith("learned") else n
        lines.append(f"| {label} | {m:.1f} ± {h:.1f} | {paired_ratio(mean, base)} | {pm:.0f} ± {ph:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10000, 10010)))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5])
    parser.add_argument("--order", default="servegym.agents.policies.heuristics.PredictedTreeSRPT")
    parser.add_argument("--onnx", default=None, help="an exported Config-v0 policy.onnx to add")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of experiment=config")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from servegym.agents.evaluation.config import compose_config

    engine = compose_config(["experiment=config", *args.override]).engine
    static = [
        f"fixed {s}/{t}" for s in engine.config_max_num_seqs for t in engine.config_max_num_batched_tokens
    ]
    dynamic = [f"kv_fit {t:g}" for t in args.targets]
    learned = [f"learned {args.onnx}"] if args.onnx else []
    seeds = [*args.train_seeds, *args.seeds]
    tasks = [(n, s, args.order, args.override) for n in static + dynamic + learned for s in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    best_static, best_dynamic = best(rows, static, args.train_seeds), best(rows, dynamic, args.train_seeds)
    names = [*static, *dynamic, *learned]
    text = table(rows, names, args.seeds, best_static)
    text += (
        f"\n\nChosen on training seeds {args.train_seeds}: best static cap `{best_static}`, best kv_fit "
        f"`{best_dynamic}`; reported on held-out seeds {args.seeds[0]}-{args.seeds[-1]} "
        f"({len(args.seeds)} runs each), ratios paired by seed against `{best_static}`."
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
