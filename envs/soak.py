"""Invariant soak: random actions over every env id and workload family, with the engine's
invariants (``Engine.check_invariants``) checked between steps and after every episode.

Settings are small and dense in decisions (tiny_cpu profile, short calls, bursts of 12 jobs,
few sequence slots, for Eviction-v0 a cache that just fits the largest call, two or three
replicas for routing), so most of the engine's work is a step the soak checks. Used by
``scripts/soak.py`` (a report) and ``tests/envs/test_soak.py`` (CI).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.invariants import InvariantError
from servegym.envs.serving_env import EngineEnv, EnvConfig, MaskedChoiceEnv
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

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.metrics import RunMetrics

MAX_CONTEXT_TOKENS = 256


def generators(
    output_tokens_mean: float, max_tokens: int, max_context_tokens: int = MAX_CONTEXT_TOKENS
) -> dict[str, Generator]:
    """Every family with short calls: few iterations per call, many decisions per iteration.
    (The engine's property tests use the same families with longer outputs.)"""
    short: dict[str, Any] = dict(
        system_tokens=16,
        input_tokens_mean=24.0,
        tool_tokens_mean=16.0,
        output_tokens_mean=output_tokens_mean,
        max_tokens=max_tokens,
        max_context_tokens=max_context_tokens,
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
    """A small, decision-dense setting of ``env_id`` over ``family``."""
    import servegym.envs  # noqa: F401  (registers the ids)

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


def random_action(env: gym.Env, rng: np.random.Generator) -> int | np.ndarray:
    """Uniform over the action space; the discrete envs pick a valid slot 3 times in 4."""
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        if rng.random() < 0.75:
            masked = env.unwrapped
            assert isinstance(masked, MaskedChoiceEnv), "servegym's Discrete envs are MaskedChoiceEnvs"
            return int(rng.choice(np.flatnonzero(masked.action_masks())))
        return int(rng.integers(space.n))
    return rng.uniform(-1, 1, space.shape).astype(np.float32)


@dataclass
class SoakResult:
    steps: int = 0
    episodes: int = 0
    seconds: float = 0.0
    decisions: Counter[str] = field(default_factory=Counter)  # decision kind -> steps
    steps_by_env: Counter[str] = field(default_factory=Counter)
    seconds_by_env: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    violations: list[str] = field(default_factory=list)  # "env family seed: message"
    unfinished: list[str] = field(default_factory=list)  # episodes that truncated or stalled


def soak(
    steps: dict[str, int],
    check_every: int = 10,
    seed: int = 0,
    on_episode: Callable[[Engine, RunMetrics], object] | None = None,
) -> SoakResult:
    """Random actions for ``steps[env_id]`` steps per env id, split evenly over the families;
    invariants every ``check_every`` steps and at each episode end. A violation is recorded
    (the episode is abandoned) rather than raised, so a report can count them."""
    result = SoakResult()
    start = time.perf_counter()
    index = 0
    for env_id, total in steps.items():
        budget = -(-total // len(GENERATORS))
        for family in sorted(GENERATORS):
            env = soak_env(env_id, family, swap=index % 2 == 1)
            rng = np.random.default_rng(seed + index)
            index += 1
            pair_start = time.perf_counter()
            taken, episode_seed = 0, seed
            while taken < budget:
                env.reset(seed=episode_seed)
                unwrapped = env.unwrapped
                assert isinstance(unwrapped, EngineEnv) and unwrapped.engine is not None, "reset() builds it"
                engine = unwrapped.engine
                done = False
                try:
                    while not done and taken < budget:
                        _, _, terminated, truncated, info = env.step(random_action(env, rng))
                        taken += 1
                        done = terminated or truncated
                        result.decisions[info["decision"]] += 1
                        if done or taken % check_every == 0:
                            engine.check_invariants()
                except InvariantError as error:
                    result.violations.append(f"{env_id} {family} seed {episode_seed}: {error}")
                    done = False
                if done:
                    result.episodes += 1
                    metrics = engine.metrics()
                    if not terminated or metrics.stalled:
                        result.unfinished.append(f"{env_id} {family} seed {episode_seed}")
                    if on_episode is not None:
                        on_episode(engine, metrics)
                episode_seed += 1
            env.close()
            result.steps += taken
            result.steps_by_env[env_id] += taken
            result.seconds_by_env[env_id] += time.perf_counter() - pair_start
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["GENERATORS", "GROWING", "SoakResult", "generators", "random_action", "soak", "soak_env"]
