"""Config-v0: the replica's running-call cap and token budget, chosen every few seconds."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from servegym.envs.engine.config import EngineConfig
from servegym.envs.serving_env import RowChoiceEnv
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.workload import Workload

CONFIG_EVERY_S = 10.0
"""Seconds of virtual time between two CONFIG decisions of a replica, unless configured."""


def config_workload() -> Workload:
    """``workload=react_long`` at load 8 arriving in bursts (a two-state MMPP, 25x burst-to-calm
    rate, 30 s mean dwell, as ``workload=mixed_bursty``), 40 trees an episode: long ReAct
    sessions whose contexts grow by ~2,300 tokens a turn. Under a burst the cache cannot hold
    every session's history and a large cap thrashes it; between bursts few sessions run and the
    cap does not bind. Whether a cap that follows the load beats the best static one here is
    what ``scripts/config_table.py`` measures (``scripts/results/config.md``)."""
    generator = ReactChain(turns_mean=10.9, tool_tokens_mean=2300.0, max_context_tokens=131072)
    return Workload(
        generator=generator,
        arrival="mmpp",
        arrival_rate=0.8,
        mmpp_rate_ratio=25.0,
        mmpp_dwell_s=30.0,
        num_jobs=40,
    )


def config_engine() -> EngineConfig:
    """One llama8b_h100 replica with 12,000 KV blocks (~43% of its cache, as Retention-v0's),
    starting at vLLM's defaults (256 running calls, 8192-token budget), asked for its cap and
    budget every ``CONFIG_EVERY_S`` seconds."""
    return EngineConfig(num_gpu_blocks=12000, config_every_s=CONFIG_EVERY_S)


class ConfigEnv(RowChoiceEnv):
    """The batching cap of a paged-KV inference engine serving agent trees, as a slow decision.

    ## Description
    Every ``engine.config_every_s`` seconds of virtual time (default 10) the replica asks for its
    running-call cap and per-iteration token budget, one pair of the grid
    ``engine.config_max_num_seqs`` x ``engine.config_max_num_batched_tokens`` (default caps 8 to
    256, budgets 2048 and 8192), or to keep its current pair. The pair holds until the next
    decision: a high cap batches more calls per iteration but, when contexts are long, fills
    the KV cache until running calls are preempted and recomputed; a low cap leaves calls
    waiting while the cache has room. Admission (ORDER), preemption (EVICT), routing and
    retention are made by ``fallback``.

    ## Action space
    ``Discrete(O)``: the option, O = grid size + 1 (the current pair when it is off the grid,
    which it is only until the first choice when the engine starts off the grid). Valid options
    are ``action_masks()``; an invalid or out-of-range integer is answered by the fallback (keep)
    and flagged ``info["invalid_action"] = True``; an action that is not one integer raises
    ``ValueError``.

    ## Observation space
    ``Dict``: ``global`` (G + kinds,): the replica's global features and the kind one-hot;
    ``configs`` (O, len(CONFIG_FEATURES)): one row per option (its cap and budget, whether it is
    the current pair, the cap against the calls that want to run, the KV a full batch of today's
    calls would need, the budget against the queued tokens; the preemptions, finished calls and
    cap use since the last decision); ``mask`` (O,).

    ## Rewards
    As Scheduling-v0: the return is minus the total tree completion time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0.

    ## Arguments
    As Scheduling-v0; ``engine.config_every_s`` must be > 0 (it is set to ``CONFIG_EVERY_S``
    when 0); ``env.decisions`` must be None or ``("config",)``; ``max_candidates`` is unused
    (the grid fixes O). Pass the admission heuristic to compare with as ``fallback`` (Hydra:
    ``env.fallback``).

    ## Version history
    v0: CONFIG as a masked discrete choice over a cap x budget grid.
    """

    allowed_decisions = ("config",)
    default_decisions = ("config",)
    layout = ("configs",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.engine_config.config_every_s == 0:
            self.engine_config = replace(self.engine_config, config_every_s=CONFIG_EVERY_S)

    def _num_slots(self) -> int:
        grid = self.engine_config
        return len(grid.config_max_num_seqs) * len(grid.config_max_num_batched_tokens) + 1

    def default_workload(self) -> Workload:
        return config_workload()

    def default_engine(self) -> EngineConfig:
        return config_engine()
