"""Eviction-v0: the agent picks the preemption victim when a replica's KV blocks run out."""

from __future__ import annotations

import numpy as np

from servegym.envs.engine.config import EngineConfig
from servegym.envs.serving_env import MaskedChoiceEnv
from servegym.envs.workloads.generators import TreeOfThoughts
from servegym.envs.workloads.workload import Workload


def eviction_workload() -> Workload:
    """Tree-of-thoughts jobs (3 x 3 thoughts kept 2 per level, each path a prefix of its
    children, 1024-token shared system prompt) arriving at 4/s, 20 per episode: many live
    calls with long shared prefixes whose decodes outgrow a small cache."""
    generator = TreeOfThoughts(
        system_tokens=1024,
        input_tokens_mean=256.0,
        tool_tokens_mean=128.0,
        output_tokens_mean=96.0,
        max_tokens=256,
    )
    return Workload(generator=generator, arrival_rate=4.0, num_jobs=20)


def eviction_engine() -> EngineConfig:
    """One llama8b_h100 replica with a 400-block (6400-token) KV cache: tight enough that
    running calls preempt one another ~140 times per episode under the default policy."""
    return EngineConfig(num_gpu_blocks=400, max_num_seqs=64)


class EvictionEnv(MaskedChoiceEnv):
    """Preemption victims of a paged-KV inference engine serving agent trees, under a tight cache.

    ## Description
    Each step is one EVICT decision: a running call needs a KV block and none is free, so one
    running call (the needy one included) must be preempted (recomputed later, or swapped to
    host memory with ``preemption_mode="swap"``). Admission order (ORDER) and routing (ROUTE)
    are made by ``fallback`` (FCFS, round-robin). The default setting (``eviction_workload``,
    ``eviction_engine``) asks 138-142 EVICT decisions per episode (random actions, seeds 0-2;
    72-140 under the heuristic victim rules), each episode 0.6-3 s of wall time on one core;
    the victim rule moves the mean tree time by ~5% between the heuristics tried (newest,
    oldest, most blocks held, youngest tree: 7.65-8.09 s over three seeds).

    ## Action space
    ``Discrete(K)``: the slot of the victim. ``action_masks()`` gives the valid slots (the
    first ``min(n, K)`` of the n candidates). An invalid action (a masked slot, or an integer
    outside ``[0, K)``) is answered by the fallback's choice (the newest running call) and
    flagged ``info["invalid_action"] = True``; an action that is not one integer raises
    ``ValueError``. Candidates beyond K are never chosen by a valid action.

    ## Observation space
    As Scheduling-v0: ``Dict`` of ``global`` (G + kinds,), ``candidates`` (K, F) rows of
    ``CANDIDATE_FEATURES`` (the running calls), ``mask`` (K,).

    ## Rewards
    As Scheduling-v0: the return is minus the total tree completion time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0 (an episode whose workload drains with no EVICT decision ends at its first
    step, the action ignored).

    ## Arguments
    As Scheduling-v0; ``env.decisions`` must be None or ``("evict",)``.

    ## Version history
    v0: EVICT as a masked discrete choice.
    """

    allowed_decisions = ("evict",)
    default_decisions = ("evict",)

    def default_workload(self) -> Workload:
        return eviction_workload()

    def default_engine(self) -> EngineConfig:
        return eviction_engine()

    def _valid_slots(self) -> np.ndarray:
        mask = np.zeros(self.config.max_candidates, dtype=bool)
        if self._decision is not None:
            mask[: min(len(self._decision), len(mask))] = True
        return mask

    def _choice_scores(self, slot: int) -> np.ndarray:
        scores = np.zeros(len(self._pending()))
        scores[slot] = -1.0  # the lowest score is preempted
        return scores
