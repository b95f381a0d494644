"""The BUDGET lever's table: each budget rule against keeping the role defaults.

    python scripts/budget_table.py                                  # experiment=budget's world
    python scripts/budget_table.py --order servegym.agents.policies.heuristics.ProgramFCFS --jobs 2
    python scripts/budget_table.py --onnx outputs/.../policy.onnx --out scripts/results/budget.md

Every rule answers BUDGET through ``agents.policies.budgets.Budgeting`` around the same admission
heuristic (``--order``, default tree-SRPT) in ``experiment=budget``'s world, where an output a
budget cuts is continued by a new call. ``free cut`` is the same world without continuations
(``engine.continue_truncated=false``: today's serving engines, where a cut output is simply
shorter and costs nothing): a reference for what continuing costs, not a policy. ``--onnx`` adds
an exported Budget-v0 policy (its sidecar's fallback admits). Per row: mean and p99 tree time
over held-out seeds with 95% t intervals, continuations per run, and the paired ratio to
``workload`` on the same seeds (log-scale t interval). Prints a markdown table; ``--out`` also
writes it.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RULES = {  # name -> (rule, multiplier, tight_below_kv_free)
    "workload": ("workload", 1.0, 0.0),
    "fixed 0.25x": ("fixed", 0.25, 0.0),
    "fixed 0.5x": ("fixed", 0.5, 0.0),
    "fixed 2x": ("fixed", 2.0, 0.0),
    "predicted 2x": ("predicted", 2.0, 0.0),
    "tight under pressure (<10% free)": ("workload", 1.0, 0.1),
    "oracle": ("oracle", 1.0, 0.0),
}
FREE_CUT = "free cut (no continuations)"

Row = tuple[str, int, float, float, int]  # name, seed, mean tree time, p99, continuations


def run_one(args: tuple[str, int, str, list[str]]) -> Row:
    name, seed, order, overrides = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hydra.utils import get_class

    from servegym.agents.deploy.runtime import OnnxPolicy
    from servegym.agents.evaluation.config import compose_config
    from servegym.agents.policies.budgets import Budgeting
    from servegym.envs.build import build_engine

    extra = ["engine.continue_truncated=false", "engine.budget_rule=workload"] if name == FREE_CUT else []
    cfg = compose_config(["experiment=budget", *overrides, *extra])
    if name.startswith("learned "):
        policy = OnnxPolicy(name.removeprefix("learned "))
    elif name == FREE_CUT:
        policy = get_class(order)()
    else:
        policy = Budgeting(get_class(order)(), *RULES[name])
    metrics = build_engine(cfg, seed).run(policy)
    return name, seed, metrics.jct_mean_s, metrics.jct_p99_s, metrics.continuations


def table(rows: list[Row], names: list[str], seeds: list[int], reference: str) -> str:
    from servegym.agents.evaluation.stats import paired_ratio, t_interval

    by = {(n, s): (m, p, c) for n, s, m, p, c in rows}
    base = np.array([by[(reference, s)][0] for s in seeds])
    lines = [
        f"| budget rule | mean tree time (s) | / {reference} | p99 (s) | continuations per run |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        mean = np.array([by[(n, s)][0] for s in seeds])
        p99 = np.array([by[(n, s)][1] for s in seeds])
        continued = np.mean([by[(n, s)][2] for s in seeds])
        (m, h), (pm, ph) = t_interval(mean), t_interval(p99)
        label = n.replace("learned ", "learned: ")
        lines.append(
            f"| {label} | {m:.1f} ± {h:.1f} | {paired_ratio(mean, base)} | {pm:.0f} ± {ph:.0f} | {continued:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10000, 10010)))
    parser.add_argument("--order", default="servegym.agents.policies.heuristics.PredictedTreeSRPT")
    parser.add_argument("--onnx", default=None, help="an exported Budget-v0 policy.onnx to add")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of experiment=budget")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = [FREE_CUT, *RULES, *([f"learned {args.onnx}"] if args.onnx else [])]
    tasks = [(n, s, args.order, args.override) for n in names for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, tasks))
    text = table(rows, names, args.seeds, "workload")
    text += (
        f"\n\nAdmission: `{args.order.rsplit('.', 1)[-1]}` for every row; held-out seeds "
        f"{args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)} runs each), ratios paired by seed against "
        "`workload` (every call keeps its role default; a cut output is continued)."
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
