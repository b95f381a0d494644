"""Invariant soak: a random policy runs 10^5 env steps over every workload family and env id,
with the engine's invariants checked between steps and the drain checks after every episode.

Live checks (``Engine.check_invariants``: block accounting, ref counts == block tables,
queues == call states, host tier, prefix hits) run every ``CHECK_EVERY`` steps and at every
episode end; tests/engine's ``check_drained`` then asserts every call of every tree finished
exactly once and the pool is whole. Settings are small (tiny_cpu profile, short calls, bursts of 12 jobs) so steps are
cheap; EVICT decisions also come from Scheduling-v0 and Serving-v0. ~90 s on a loaded 2-core box.
"""

from __future__ import annotations

import time
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
from engine.test_engine_invariants import check_drained

from servegym.envs import ENV_IDS
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.serving_env import EnvConfig
from servegym.envs.workloads.generators import (
    Debate,
    Generator,
    MapReduce,
    Mixed,
    PlanExecuteCritique,
    ReactChain,
    TreeOfThoughts,
)
from servegym.envs.workloads.workload import Workload

from .small import random_action

SOAK_STEPS = 100_000
STEPS = {  # env steps per env id, split evenly over the families
    "servegym/Scheduling-v0": 14_000,  # ~800 steps/s (react and plan-execute chains: ~300)
    "servegym/Scheduling-v1": 10_000,  # pick-next with STOP: a decision per admitted call
    "servegym/Eviction-v0": 1_800,  # EVICT decisions are rare per iteration: ~150 steps/s
    "servegym/Routing-v0": 36_000,  # ~1,500-2,000 steps/s
    "servegym/Serving-v0": 38_200,
}
CHECK_EVERY = 10
MAX_CONTEXT_TOKENS = 256


def generators(output_tokens_mean: float, max_tokens: int) -> dict[str, Generator]:
    """Every family with short calls: few iterations per call, many decisions per iteration."""
    short = dict(
        system_tokens=16,
        input_tokens_mean=24.0,
        tool_tokens_mean=16.0,
        output_tokens_mean=output_tokens_mean,
        max_tokens=max_tokens,
        max_context_tokens=MAX_CONTEXT_TOKENS,
    )
    react = ReactChain(turns_mean=3.0, max_turns=6, **short)
    map_reduce = MapReduce(fan_out=3, **short)
    debate = Debate(num_agents=2, num_rounds=2, **short)
    return {
        "react": react,
        "map_reduce": map_reduce,
        "plan_execute_critique": PlanExecuteCritique(reject_prob=0.5, **short),
        "debate": debate,
        "tree_of_thoughts": TreeOfThoughts(branching=2, depth=2, keep=1, **short),
        "mixed": Mixed(entries=[(react, 1.0, "a"), (map_reduce, 1.0, "b"), (debate, 1.0, "c")]),
    }


GENERATORS = generators(6.0, 12)
GROWING = generators(12.0, 24)  # decodes outgrow what admission reserved: preemptions


def soak_env(env_id: str, family: str, swap: bool) -> gym.Env:
    """Dense in agent decisions, so most of the engine's work is a step the test checks: bursts
    of jobs, few sequence slots (long queues: ORDER), for Eviction-v0 a cache that just fits the
    largest call shared by many running calls (EVICT), three or two replicas (ROUTE)."""
    eviction = env_id == "servegym/Eviction-v0"
    block_size = 4 if eviction else 8
    fit_blocks = MAX_CONTEXT_TOKENS // block_size  # the largest call fits alone
    engine = EngineConfig(
        profile="tiny_cpu",
        block_size=block_size,
        num_gpu_blocks=fit_blocks if eviction else 2 * fit_blocks,
        max_num_seqs=32 if eviction else 4,
        max_num_batched_tokens=256,
        preemption_mode="swap" if swap else "recompute",
        swap_space_bytes=1e6,
    )
    cluster = {
        "servegym/Routing-v0": ClusterConfig(replicas=["tiny_cpu", "tiny_cpu", "llama1b_h100"]),
        "servegym/Serving-v0": ClusterConfig(num_replicas=2),
    }.get(env_id, ClusterConfig())
    generator = (GROWING if eviction else GENERATORS)[family]
    workload = Workload(generator=generator, arrival="gamma", arrival_rate=200.0, num_jobs=12)
    return gym.make(
        env_id, workload=workload, cluster=cluster, engine=engine, env=EnvConfig(max_candidates=6)
    )


@pytest.mark.slow
def test_random_policy_soak_keeps_every_invariant(time_limit) -> None:
    pairs = [(env_id, family) for env_id in ENV_IDS for family in sorted(GENERATORS)]
    steps, episodes, kinds, seconds = 0, 0, Counter(), Counter()
    start = time.perf_counter()
    with time_limit(600):
        for index, (env_id, family) in enumerate(pairs):
            env = soak_env(env_id, family, swap=index % 2 == 1)
            rng = np.random.default_rng(index)
            budget = -(-STEPS[env_id] // len(GENERATORS))
            pair_start = time.perf_counter()
            taken = 0
            seed = 0
            while taken < budget:
                env.reset(seed=seed)
                seed += 1
                engine = env.unwrapped.engine
                done = False
                while not done and taken < budget:
                    _, _, terminated, truncated, info = env.step(random_action(env, rng))
                    taken += 1
                    done = terminated or truncated
                    kinds[info["decision"]] += 1
                    if done or taken % CHECK_EVERY == 0:
                        engine.check_invariants()
                if done:
                    assert terminated and not truncated
                    check_drained(engine, engine.metrics(), len(engine.jobs))
                    episodes += 1
            steps += taken
            seconds[env_id] += time.perf_counter() - pair_start
    elapsed = time.perf_counter() - start
    assert sum(STEPS.values()) == SOAK_STEPS <= steps
    assert kinds["order"] and kinds["evict"] and kinds["route"]
    print(
        f"soak: {steps} steps, {episodes} episodes in {elapsed:.1f}s ({steps / elapsed:,.0f} steps/s); {dict(kinds)}; "
        f"seconds per env id: { {k: round(v, 1) for k, v in seconds.items()} }"
    )
