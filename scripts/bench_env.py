"""Simulated engine speed: iterations and calls completed per wall second, on one core.

A closed loop of N users, each sending a one-call job the moment its previous one finished,
keeps exactly N calls live; the engine (llama8b_h100 profile, FCFS) serves them. Prints a
table over several loads with the spread of repeated runs, a table of env steps per second
for each registered env id (default settings, random valid actions, resets included), then
``iterations_per_s=<n>`` for 64 live calls as the last line. ``--profile`` prints a cProfile
of the 64-call case instead.

    python scripts/bench_env.py [--repeats 3] [--calls 4000] [--no-fast-forward] [--env-steps 2000]
    python scripts/bench_env.py --loads --env-steps 1000   # only the env table
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: no BLAS threads fighting the loop
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from servegym.agents.heuristics import FCFS  # noqa: E402
from servegym.envs import ENV_IDS  # noqa: E402  (importing registers the ids)
from servegym.envs.engine.config import EngineConfig  # noqa: E402
from servegym.envs.engine.engine import Engine  # noqa: E402
from servegym.envs.workloads.job import Call, Job, Text  # noqa: E402
from servegym.envs.workloads.workload import ClosedLoop  # noqa: E402


@dataclass
class OneCall:
    """A chat-shaped single call: shared system prompt, own input (Azure conv-like lengths)."""

    def sample(self, rng: np.random.Generator, job_id: str, arrival_s: float, tenant: str = "default") -> Job:
        prompt = (Text("sys/chat", 512), Text(f"{job_id}/input", int(rng.lognormal(np.log(700), 0.6)) + 1))
        output = int(rng.lognormal(np.log(250), 0.6)) + 1
        call = Call(0, "user", prompt, output_tokens=output, max_tokens=2048)
        return Job(job_id, arrival_s, (call,), tenant=tenant, kind="one_call")


def run_once(live_calls: int, num_calls: int, fast_forward: bool, seed: int = 0) -> tuple[float, int, int]:
    source = ClosedLoop(OneCall(), num_users=live_calls, num_jobs=num_calls, think_time_s=0.0, seed=seed)
    engine = Engine(source, engine=EngineConfig(profile="llama8b_h100", fast_forward=fast_forward))
    start = time.perf_counter()
    metrics = engine.run(FCFS())
    elapsed = time.perf_counter() - start
    return elapsed, metrics.iterations, metrics.calls_completed


def env_steps_per_s(env_id: str, num_steps: int, seed: int) -> tuple[float, float]:
    """Random-action steps of a registered env in its default setting, resets included (one
    core); discrete envs sample among valid actions (``action_masks``). Returns (steps per
    second, agent decisions per episode over the episodes that ended)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    masked = hasattr(env.unwrapped, "action_masks")
    env.reset(seed=seed)
    episodes, episode_steps, lengths = 0, 0, []
    start = time.perf_counter()
    for _ in range(num_steps):
        mask = env.unwrapped.action_masks().astype(np.int8) if masked else None
        _, _, terminated, truncated, _ = env.step(env.action_space.sample(mask))
        episode_steps += 1
        if terminated or truncated:
            lengths.append(episode_steps)
            episode_steps = 0
            episodes += 1
            env.reset()
    elapsed = time.perf_counter() - start
    return num_steps / elapsed, float(np.mean(lengths)) if lengths else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--calls", type=int, default=3000, help="calls completed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fast-forward", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--env-steps", type=int, default=2000, help="random-action steps per env id")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    fast_forward = not args.no_fast_forward
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_once, 64, args.calls, fast_forward)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    table = Table(title=f"servegym engine speed, one core, fast_forward={fast_forward}")
    for name in ("live calls", "iterations", "iterations/s (median)", "spread (min-max)", "calls/s"):
        table.add_column(name, justify="right")
    result_64 = float("nan")
    for load in args.loads:
        runs = [run_once(load, args.calls, fast_forward, seed=r) for r in range(args.repeats)]
        its = np.array([iterations / elapsed for elapsed, iterations, _ in runs])
        calls = np.array([done / elapsed for elapsed, _, done in runs])
        table.add_row(
            str(load),
            str(runs[0][1]),
            f"{np.median(its):,.0f}",
            f"{its.min():,.0f}-{its.max():,.0f}",
            f"{np.median(calls):,.0f}",
        )
        if load == 64:
            result_64 = float(np.median(its))
    console = Console()
    if args.loads:
        console.print(table)
    envs = Table(title="env steps per second, default settings, one core, random (valid) actions")
    envs.add_column("env id", no_wrap=True)
    for name in ("steps/s (median)", "spread (min-max)", "steps per episode"):
        envs.add_column(name, justify="right")
    for env_id in ENV_IDS:
        runs = [env_steps_per_s(env_id, args.env_steps, seed=r) for r in range(args.repeats)]
        rates = np.array([rate for rate, _ in runs])
        lengths = [length for _, length in runs if np.isfinite(length)]
        envs.add_row(
            env_id,
            f"{np.median(rates):,.0f}",
            f"{rates.min():,.0f}-{rates.max():,.0f}",
            f"{np.mean(lengths):,.0f}" if lengths else "n/a",
        )
    console.print(envs)
    print(f"iterations_per_s={result_64:.0f}")


if __name__ == "__main__":
    main()
