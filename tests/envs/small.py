"""Small, fast settings of every env id for tests (kwargs of ``gymnasium.make``, all made of
importable servegym objects so vector envs can pickle them into subprocesses)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.serving_env import EnvConfig
from servegym.envs.soak import random_action  # noqa: F401  (the tests' random actions)
from servegym.envs.workloads.generators import MapReduce, ReactChain, TreeOfThoughts
from servegym.envs.workloads.workload import Workload

TINY = dict(  # short prompts and outputs: episodes of a few hundred iterations
    system_tokens=64,
    input_tokens_mean=48.0,
    tool_tokens_mean=16.0,
    output_tokens_mean=40.0,
    max_tokens=64,
    max_context_tokens=768,
)
TIGHT = EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=192, max_num_seqs=16)


def small_kwargs(env_id: str) -> dict[str, Any]:
    name = env_id.split("/")[-1]
    if name in ("Scheduling-v0", "PickNext-v0"):
        return dict(
            workload=Workload(generator=MapReduce(fan_out=6, max_tokens=256), arrival_rate=6.0, num_jobs=8),
            engine=EngineConfig(num_gpu_blocks=600, max_num_seqs=8),
            env=EnvConfig(max_candidates=8),
        )
    if name == "Eviction-v0":
        return dict(
            workload=Workload(generator=TreeOfThoughts(depth=2, **TINY), arrival_rate=20.0, num_jobs=10),
            engine=TIGHT,
            env=EnvConfig(max_candidates=8),
        )
    if name == "Routing-v0":
        return dict(
            workload=Workload(generator=MapReduce(fan_out=4, **TINY), arrival_rate=20.0, num_jobs=8),
            cluster=ClusterConfig(replicas=["tiny_cpu", "tiny_cpu", "llama1b_h100"]),
            engine=EngineConfig(profile="tiny_cpu"),
        )
    if name == "Serving-v0":
        return dict(
            workload=Workload(generator=TreeOfThoughts(depth=2, **TINY), arrival_rate=20.0, num_jobs=6),
            cluster=ClusterConfig(num_replicas=2),
            engine=TIGHT,
            env=EnvConfig(max_candidates=8),
        )
    if name == "PickRetain-v0":  # Retention-v0's world with pick-next admission
        return dict(
            workload=Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=20.0, num_jobs=6),
            engine=EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=400, max_num_seqs=4),
            env=EnvConfig(max_candidates=8),
        )
    if name == "Retention-v0":  # short ReAct chains: a RETAIN decision after every tool turn
        return dict(
            workload=Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=20.0, num_jobs=6),
            engine=EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=400, max_num_seqs=4),
        )
    if name == "Config-v0":  # short ReAct chains, a CONFIG decision every 20 ms of virtual time
        return dict(
            workload=Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=20.0, num_jobs=6),
            engine=replace(
                TIGHT,
                config_every_s=0.02,
                config_max_num_seqs=[2, 4, 16],
                config_max_num_batched_tokens=[64, 8192],
            ),
        )
    if name == "Budget-v0":  # short ReAct chains with long outputs: budgets cut some, continuations follow
        return dict(
            workload=Workload(
                generator=ReactChain(turns_mean=4.0, **{**TINY, "max_tokens": 16}), arrival_rate=20.0, num_jobs=6
            ),
            engine=EngineConfig(
                profile="tiny_cpu", block_size=4, num_gpu_blocks=400, max_num_seqs=4,
                continue_truncated=True, budget_rule="policy",
            ),
        )  # fmt: skip
    raise KeyError(f"no small setting for {env_id!r}")


__all__ = ["TIGHT", "TINY", "random_action", "small_kwargs"]
