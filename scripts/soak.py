"""Invariant soak: random actions over every env id and workload family, with the engine's
invariants checked every N steps and after every episode (``servegym.envs.soak``).

    python scripts/soak.py                       # 10^5 steps in all, checks every 10 steps
    python scripts/soak.py --steps 1000000 --check-every 20 --seed 7

Prints steps, episodes, steps/s and violations per env id; exits 1 on any violation or an
episode that did not drain (stalled or truncated).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from servegym.envs import ENV_IDS  # noqa: E402
from servegym.envs.soak import soak  # noqa: E402

SHARE = {  # of the steps, per env id: Eviction-v0's steps are slow (a few EVICT per episode)
    "servegym/Scheduling-v0": 0.16,
    "servegym/PickNext-v0": 0.14,
    "servegym/Eviction-v0": 0.02,
    "servegym/Routing-v0": 0.34,
    "servegym/Serving-v0": 0.34,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100_000, help="env steps in all")
    parser.add_argument("--check-every", type=int, default=10, help="steps between invariant checks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or args.check_every < 1:
        parser.error("--steps and --check-every must be >= 1")
    missing = set(ENV_IDS) - set(SHARE)
    if missing:
        parser.error(f"no step share for {sorted(missing)}: add it to SHARE in scripts/soak.py")
    steps = {env_id: max(1, round(args.steps * SHARE[env_id])) for env_id in ENV_IDS}
    result = soak(steps, check_every=args.check_every, seed=args.seed)
    table = Table(
        title=f"invariant soak: {result.steps:,} steps, checks every {args.check_every}, seed {args.seed}"
    )
    for name in ("env id", "steps", "steps/s"):
        table.add_column(name, justify="right")
    for env_id in ENV_IDS:
        seconds = result.seconds_by_env[env_id]
        table.add_row(
            env_id, f"{result.steps_by_env[env_id]:,}", f"{result.steps_by_env[env_id] / seconds:,.0f}"
        )
    console = Console()
    console.print(table)
    console.print(
        f"{result.episodes:,} episodes in {result.seconds:,.0f} s ({result.steps / result.seconds:,.0f} steps/s); "
        f"decisions {dict(result.decisions)}; violations: {len(result.violations)}; "
        f"episodes that did not drain: {len(result.unfinished)}"
    )
    for line in result.violations[:20] + result.unfinished[:20]:
        console.print(f"  {line}", highlight=False)
    sys.exit(1 if result.violations or result.unfinished else 0)


if __name__ == "__main__":
    main()
