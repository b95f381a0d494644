"""Retention-v0: how long a finished call's KV stays pinned for its children across the tool pause."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from servegym.envs.engine.config import EngineConfig
from servegym.envs.serving_env import RowChoiceEnv
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.workload import Workload


def retention_workload() -> Workload:
    """``workload=react_long`` at load 8 (0.8 trees/s), 40 trees an episode: long ReAct sessions
    (~27K-token final contexts) whose every turn ends in a tool pause (86.5% within 1 s, up to
    60 s), so each turn's history is either kept for the next turn or recomputed."""
    generator = ReactChain(turns_mean=10.9, tool_tokens_mean=2300.0, max_context_tokens=131072)
    return Workload(generator=generator, arrival_rate=0.8, num_jobs=40)


def retention_engine() -> EngineConfig:
    """One llama8b_h100 replica with 12,000 KV blocks (192K tokens, ~43% of its default cache:
    about seven of the workload's final contexts) at the cap that the headroom table found best
    for this family (16 running calls, 2048-token budget). Here the retention rule matters
    (``scripts/results/retention.md`` has each rule by cache size)."""
    return EngineConfig(
        num_gpu_blocks=12000, max_num_seqs=16, max_num_batched_tokens=2048, pin_ttl_rule="policy"
    )


class RetentionEnv(RowChoiceEnv):
    """KV retention across tool pauses in a paged-KV inference engine serving agent trees.

    ## Description
    The engine runs with ``pin_ttl_rule="policy"``. Each step is one RETAIN decision: a call
    finished, its tool runs, and its children will reuse a prefix of its KV (a ReAct turn's
    whole history). The agent picks how long to pin that prefix, one of
    ``engine.retain_ttls_s`` (default 0, 1, 2, 4, 8, 16, 32 s): 0 releases it to the prefix
    cache, where LRU may evict it before the next turn arrives (vLLM); a pin keeps it until
    every child was admitted or the TTL runs out, at the price of blocks other trees cannot use
    meanwhile (pins yield, oldest first, only when a running call would otherwise be
    preempted). Admission (ORDER), preemption (EVICT) and routing are made by ``fallback``.

    ## Action space
    ``Discrete(O)``: the option, O = ``len(engine.retain_ttls_s)``. Every option is valid
    (``action_masks()`` all true during a decision); an integer outside ``[0, O)`` is answered
    by the fallback (release) and flagged ``info["invalid_action"] = True``; an action that is
    not one integer raises ``ValueError``.

    ## Observation space
    ``Dict``: ``global`` (G + kinds,): the replica's global features and the kind one-hot;
    ``options`` (O, len(RETAIN_FEATURES)): one row per option (its TTL, its ratio to the
    predicted tool pause; the call's role, context, children, tree state; the replica's pins);
    ``mask`` (O,).

    ## Rewards
    As Scheduling-v0: the return is minus the total tree completion time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0 (an episode with no RETAIN decision ends at its first step).

    ## Arguments
    As Scheduling-v0; ``engine.pin_ttl_rule`` is set to ``policy``; ``env.decisions`` must be
    None or ``("retain",)``; ``max_candidates`` is unused (the option menu fixes O). Pass the
    admission heuristic to compare with as ``fallback`` (Hydra: ``env.fallback``).

    ## Version history
    v0: RETAIN as a masked discrete choice over a TTL menu.
    """

    allowed_decisions = ("retain",)
    default_decisions = ("retain",)
    layout = ("options",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_config = replace(self.engine_config, pin_ttl_rule="policy")

    def _num_slots(self) -> int:
        return len(self.engine_config.retain_ttls_s)

    def default_workload(self) -> Workload:
        return retention_workload()

    def default_engine(self) -> EngineConfig:
        return retention_engine()
