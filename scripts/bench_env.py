"""Simulated engine and env speed: scaling curves, one core per run, optionally side by side
with another git revision measured in the same invocation.

Each measurement runs in a fresh worker process pinned to one core (numpy/torch one thread),
so a run's peak memory is its own and a revision is imported from its own tree. With
``--against REF`` the same cases run for REF (checked out in a temporary git worktree),
alternating with the current tree repeat by repeat, so the ratio is measured on the same noisy
machine in the same minutes.

Cases (``--cases``; each a curve over its parameter):

* ``live``     closed loop of N users sending one-call chat jobs: N calls always live
               (llama8b_h100, FCFS): engine iterations/s, decisions/s, calls/s.
* ``queue``    N one-call jobs arrive at once and wait behind a 64-call cap: wall time per
               engine iteration while the queue is long (should stay flat in N).
* ``replicas`` R replicas, 64 users each, round-robin routing (a ROUTE decision per call).
* ``k``        Scheduling-v0 env steps/s with K candidate slots (random valid actions).
* ``evict``    ReAct trees whose KV working set is far above the cache: evictions/s.
* ``envs``     every registered env id at its defaults: steps/s.
* ``presets``  the env of each training preset (``experiment=picknext_react``, ``picknext``,
               ``quick``) as ``scripts/train.py`` composes it: steps/s where PPO really trains.

    python scripts/bench_env.py                                   # all cases, 3 repeats
    python scripts/bench_env.py --against HEAD~3 --cases live envs --repeats 3
    python scripts/bench_env.py --quick                           # one repeat, small curves
    python scripts/bench_env.py --profile live 64                 # cProfile one measurement

Prints a table per case (median and min-max of the repeats, and the ratio to REF), writes
``--out`` (JSON of every run) and ``--plot`` (a PNG of the curves) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench_common import REPO, checkout, map_servegym, peak_rss_mb, rss_mb

CASES: dict[str, list[int]] = {
    "live": [16, 64, 256, 1024],
    "queue": [10, 100, 1000, 10000],
    "replicas": [1, 4, 16],
    "k": [32, 128, 512],
    "evict": [1],
    "envs": [0, 1, 2, 3, 4, 5, 6, 7],  # index into ENV_IDS (a reference tree without an id fails)
    "presets": [0, 1, 2],  # index into PRESETS
}
QUICK: dict[str, list[int]] = {
    "live": [16, 64, 256],
    "queue": [10, 1000],
    "replicas": [1, 4],
    "k": [32, 128],
    "evict": [1],
    "envs": [0, 1, 2, 3, 4],
    "presets": [0, 1, 2],
}
PRESETS = ("picknext_react", "picknext", "quick")
"""Training presets (``experiment=``) whose env the ``presets`` case steps: the worlds PPO
trains in, long KV-bound contexts included, rather than the envs' light defaults."""
UNITS = {
    "live": ("live calls", "iterations/s"),
    "queue": ("waiting calls", "us/iteration"),
    "replicas": ("replicas", "iterations/s"),
    "k": ("K", "env steps/s"),
    "evict": ("", "evictions/s"),
    "envs": ("env id", "env steps/s"),
    "presets": ("experiment", "env steps/s"),
}


# ---------------------------------------------------------------- worker side (one measurement)


def _one_call_generator():
    import numpy as np

    from servegym.envs.workloads.job import Call, Job, Text

    class OneCall:
        """A chat-shaped single call: shared system prompt, own input (Azure conv-like lengths)."""

        def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default"):
            prompt = (
                Text("sys/chat", 512),
                Text(f"{job_id}/input", int(rng.lognormal(np.log(700), 0.6)) + 1),
            )
            output = int(rng.lognormal(np.log(250), 0.6)) + 1
            call = Call(0, "user", prompt, output_tokens=output, max_tokens=2048)
            return Job(job_id, arrival_s, (call,), tenant=tenant, kind="one_call")

    return OneCall()


class Counting:
    """Wraps a policy and counts the decisions it answers."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.decisions = policy, 0
        self.retention = getattr(policy, "retention", None)

    def scores(self, decision: Any) -> Any:
        self.decisions += 1
        return self.policy.scores(decision)


def _engine_run(engine: Any, policy: Any) -> dict[str, float]:
    import time

    counting = Counting(policy)
    rss0 = rss_mb()
    start = time.perf_counter()
    metrics = engine.run(counting)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "iterations/s": metrics.iterations / wall,
        "decisions/s": counting.decisions / wall,
        "calls/s": metrics.calls_completed / wall,
        "evictions/s": metrics.evictions / wall,
        "iterations": metrics.iterations,
        "peak_mb": peak_rss_mb() - rss0,
    }


def case_live(n: int, seed: int) -> dict[str, float]:
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.engine import Engine
    from servegym.envs.workloads.workload import ClosedLoop

    source = ClosedLoop(
        _one_call_generator(), num_users=n, num_jobs=max(3000, 3 * n), think_time_s=0.0, seed=seed
    )
    return _engine_run(Engine(source, engine=EngineConfig(profile="llama8b_h100")), FCFS())


def case_queue(n: int, seed: int) -> dict[str, float]:
    """N jobs at t=0 behind a 64-call cap; time the first 300 completions (queue >= N - 300)."""
    import time

    import numpy as np

    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.engine import Engine
    from servegym.envs.workloads.source import FixedJobs

    rng = np.random.default_rng(seed)
    generator = _one_call_generator()
    jobs = [generator.sample(rng, f"j{i}", 0.0) for i in range(n + 300)]
    engine = Engine(FixedJobs(jobs), engine=EngineConfig(profile="llama8b_h100", max_num_seqs=64))
    policy = FCFS()
    rss0 = rss_mb()
    start = time.perf_counter()
    decisions = 0
    while (decision := engine.next_decision()) is not None:
        engine.decide(policy.scores(decision))
        decisions += 1
        if engine.num_jobs_done >= 300:
            break
    wall = time.perf_counter() - start
    iterations = sum(r.num_iterations for r in engine.replicas)
    return {
        "wall_s": wall,
        "us/iteration": 1e6 * wall / max(iterations, 1),
        "decisions/s": decisions / wall,
        "iterations": iterations,
        "peak_mb": peak_rss_mb() - rss0,
    }


def case_replicas(n: int, seed: int) -> dict[str, float]:
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.config import ClusterConfig, EngineConfig
    from servegym.envs.engine.engine import Engine
    from servegym.envs.workloads.workload import ClosedLoop

    source = ClosedLoop(
        _one_call_generator(), num_users=64 * n, num_jobs=1500 * n, think_time_s=0.0, seed=seed
    )
    engine = Engine(
        source, cluster=ClusterConfig(num_replicas=n), engine=EngineConfig(profile="llama8b_h100")
    )
    return _engine_run(engine, FCFS())


def _env_steps(env_id: str, steps: int, seed: int, **kwargs: Any) -> dict[str, float]:
    import gymnasium as gym

    import servegym.envs  # noqa: F401  (registers the ids)

    return _step_env(gym.make(env_id, **kwargs), steps, seed)


def _step_env(env: Any, steps: int, seed: int) -> dict[str, float]:
    """``steps`` random valid actions (masked where the env masks), resetting at episode ends."""
    import time

    import numpy as np

    env.action_space.seed(seed)
    masked = hasattr(env.unwrapped, "action_masks")
    rss0 = rss_mb()
    env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        mask = env.unwrapped.action_masks().astype(np.int8) if masked else None
        _, _, terminated, truncated, _ = env.step(env.action_space.sample(mask))
        if terminated or truncated:
            env.reset()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "env steps/s": steps / wall, "peak_mb": peak_rss_mb() - rss0}


def case_k(k: int, seed: int) -> dict[str, float]:
    from servegym.envs.serving_env import EnvConfig

    return _env_steps("servegym/Scheduling-v0", 1500, seed, env=EnvConfig(max_candidates=k))


def case_envs(index: int, seed: int) -> dict[str, float]:
    from servegym.envs import ENV_IDS

    return _env_steps(ENV_IDS[index], 1500, seed)


def case_presets(index: int, seed: int) -> dict[str, float]:
    """The env of training preset ``PRESETS[index]``, composed as ``scripts/train.py`` composes it."""
    from hydra import compose, initialize_config_dir

    import servegym.envs
    from servegym.agents.rl.configs import register_configs
    from servegym.envs.build import build_env

    register_configs()
    # the measured revision's presets (servegym.__path__ may start with the editable finder's hook)
    conf = Path(servegym.envs.__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=[f"experiment={PRESETS[index]}"])
    return _step_env(build_env(cfg), 1500, seed)


def case_evict(_: int, seed: int) -> dict[str, float]:
    """Long ReAct trees on a cache a fraction of their working set: the prefix-thrash regime."""
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.engine import Engine
    from servegym.envs.workloads.generators import ReactChain
    from servegym.envs.workloads.workload import Workload

    workload = Workload(generator=ReactChain(), arrival_rate=6.0, num_jobs=60)
    engine = Engine(workload.build(seed), engine=EngineConfig(profile="llama8b_h100", num_gpu_blocks=1500))
    return _engine_run(engine, FCFS())


def worker(case: str, param: int, seed: int) -> dict[str, float]:
    return globals()[f"case_{case}"](param, seed)


# ---------------------------------------------------------------- parent side


def measure(root: Path, case: str, param: int, seed: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", case, str(param), str(seed), "--root", str(root)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case} {param} in {root} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _label(case: str, param: int) -> str:
    if case == "envs":
        from servegym.envs import ENV_IDS

        return ENV_IDS[param].split("/")[-1]
    if case == "presets":
        return PRESETS[param]
    return "" if case == "evict" else f"{param:,}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    from rich.console import Console
    from rich.table import Table

    curves = QUICK if args.quick else CASES
    trees = {"current": REPO}
    results: dict[str, Any] = {"cases": {}, "against": args.against}
    console = Console()
    with checkout(args.against) if args.against else nullcontext() as other:
        if other is not None:
            trees[args.against] = other
        for case in args.cases:
            xlabel, metric = UNITS[case]
            table = Table(title=f"{case}: {metric} (median of {args.repeats}, min-max), one core")
            for name in (xlabel or "case", *trees, *(["ratio"] if other else []), "peak MB"):
                table.add_column(name, justify="right")
            rows = []
            for param in curves[case]:
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
                for repeat in range(args.repeats):  # alternate trees repeat by repeat
                    for name, root in trees.items():
                        try:
                            runs[name].append(measure(root, case, param, seed=repeat))
                        except RuntimeError:
                            if name == "current":
                                raise
                            runs[name] = []  # the other revision lacks this case (e.g. a newer env id)
                            break
                med = {name: statistics.median(r[metric] for r in rs) for name, rs in runs.items() if rs}
                cells = [
                    f"{med[name]:,.0f} ({min(r[metric] for r in rs):,.0f}-{max(r[metric] for r in rs):,.0f})"
                    if rs
                    else "n/a"
                    for name, rs in runs.items()
                ]
                ratio = []
                if other:
                    base = med.get(args.against)
                    # us/iteration: lower is better, so the speed-up is base / current
                    if base is None:
                        speedup = None
                    else:
                        speedup = base / med["current"] if metric.startswith("us") else med["current"] / base
                    ratio = [f"{speedup:.2f}x" if speedup is not None else "n/a"]
                peak = statistics.median(r["peak_mb"] for r in runs["current"])
                table.add_row(_label(case, param), *cells, *ratio, f"{peak:,.0f}")
                rows.append({"param": param, "runs": runs, "median": med})
            console.print(table)
            results["cases"][case] = {"metric": metric, "xlabel": xlabel, "rows": rows}
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in ("live", "queue", "replicas", "k") if c in results["cases"]]
    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        data = results["cases"][case]
        xs = [row["param"] for row in data["rows"]]
        for name in data["rows"][0]["median"]:
            ax.plot(xs, [row["median"][name] for row in data["rows"]], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(data["xlabel"])
        ax.set_ylabel(data["metric"])
        ax.set_title(case)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile(case: str, param: int) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(worker, case, param, 0)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--against", metavar="REF", help="git revision to measure side by side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter curves")
    parser.add_argument("--out", type=Path, help="write every run as JSON here")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG here")
    parser.add_argument("--profile", nargs=2, metavar=("CASE", "PARAM"), help="cProfile one measurement")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (args.worker or args.profile):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if args.worker:
        map_servegym(args.root)
        case, param, seed = args.worker
        print(json.dumps(worker(case, int(param), int(seed))))
        return
    if args.profile:
        profile(args.profile[0], int(args.profile[1]))
        return
    results = run(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
