"""The rollout-improved policy: a base policy that, at a budget of contended ORDER decisions,
tries its own answer and its best fitting alternatives in forked branches (``branches``) and
keeps the cheapest. Also ``run_policy``, the plain driver, which counts the decisions such a
rollout could branch so the rollout's stride can spread its budget over a whole run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    Decision,
    DecisionKind,
    Policy,
    check_scores,
)

from .branches import branch_costs

_BLOCKS_NEEDED = CANDIDATE_FEATURES.index("blocks_needed_frac")
_PROMPT = CANDIDATE_FEATURES.index("prompt_tokens_log")
_CACHED = CANDIDATE_FEATURES.index("cached_prefix_frac")
_OUTPUT = CANDIDATE_FEATURES.index("output_tokens_log")
_RUNNING = GLOBAL_FEATURES.index("running_log")
_BUDGET_LEFT = GLOBAL_FEATURES.index("token_budget_left_frac")
_KV_FREE = GLOBAL_FEATURES.index("kv_free_frac")


def run_policy(engine: Engine, policy: Policy, count_branchable_k: int = 0) -> tuple[Any, int]:
    """Drive ``engine`` with ``policy`` to the end (``Engine.run``'s loop, plus ``attach`` for
    oracles); returns (metrics, ORDER decisions with >= 2 fitting candidates among the top
    ``count_branchable_k``; 0 when not counted)."""
    if hasattr(policy, "attach"):
        policy.attach(engine)
    engine.apply_retention(policy)
    branchable = 0
    while (decision := engine.next_decision()) is not None:
        scores = policy.scores(decision)
        if count_branchable_k and decision.kind == DecisionKind.ORDER:
            branchable += contended(decision, engine.config) and bool(
                alternatives(decision, check_scores(decision, scores), count_branchable_k)
            )
        engine.decide(scores)
    return engine.metrics(), branchable


def contended(decision: Decision, config: EngineConfig) -> bool:
    """Whether an ORDER decision's order can matter: the whole queue does not fit this
    iteration by the feature table (more candidates than free slots, more prefill tokens than
    the budget left, or more blocks needed than free). When it all fits, every order admits
    the same calls, so a rollout does not spend a branch there. Approximate (each candidate's
    need is counted alone): it skips a few decisions whose order still matters within one
    admission (a sibling admitted first can publish a prefix the next one hits)."""
    f = decision.features.astype(np.float64)
    g = decision.global_features.astype(np.float64)
    free_slots = config.max_num_seqs - round(float(np.expm1(g[_RUNNING])))
    prompt = np.expm1(f[:, _PROMPT])
    chunks = prompt * (1.0 - f[:, _CACHED]) + np.expm1(f[:, _OUTPUT])
    return bool(
        len(decision) > free_slots
        or chunks.sum() > g[_BUDGET_LEFT] * config.max_num_batched_tokens
        or f[:, _BLOCKS_NEEDED].sum() > g[_KV_FREE]
    )


def alternatives(decision: Decision, scores: np.ndarray, k: int) -> list[int]:
    """Candidates a rollout tries first instead of the base policy's own answer: of the ``k``
    highest-scored candidates that fit the replica's free blocks now (the feature table's
    ``blocks_needed_frac`` against ``kv_free_frac``), best first, ties in queue order, those
    that are not already the base's first choice; at most ``k - 1``, so with the base's own
    answer a branched decision tries ``k`` choices."""
    fits = decision.features[:, _BLOCKS_NEEDED] <= decision.global_features[_KV_FREE]
    order = np.argsort(-scores, kind="stable")
    first = int(order[0])
    return [int(i) for i in order if fits[i] and i != first][: k - 1] if k >= 2 else []


def promote(scores: np.ndarray, index: int) -> np.ndarray:
    """``scores`` with candidate ``index`` ranked first and the others kept in their order."""
    out = np.array(scores, dtype=np.float64)
    top = float(out.max())
    out[index] = top + max(1.0, abs(top) * 1e-6)
    return out


@dataclass
class RolloutStats:
    """What a rollout-improved run spent and changed."""

    decisions: int = 0
    """ORDER decisions of the run."""
    branchable: int = 0
    """Of those, decisions with >= 2 fitting candidates among the base's top k."""
    branched: int = 0
    """Decisions where the top-k were simulated."""
    improved: int = 0
    """Branched decisions where a candidate other than the base choice was strictly better."""
    children: int = 0
    """Forked branches."""
    last_best_cost: float = math.nan
    """The kept branch's cost at the last branched decision (the run's total tree time when
    the horizon is unbounded: after it the parent follows the base policy, as that child did)."""
    wall_s: float = 0.0


def run_rollout(
    engine: Engine,
    base: Policy,
    k: int = 3,
    horizon_s: float | None = None,
    decision_budget: int = 8,
    stride: int = 1,
    max_parallel: int = 2,
) -> tuple[Any, RolloutStats]:
    """The rollout-improved ``base`` policy on ``engine`` (see the package docstring): at every
    ``stride``-th branchable ORDER decision, until ``decision_budget`` are spent, try the base's
    own answer and its ``alternatives`` (each admitted first) and keep the cheapest. Returns
    (metrics, stats)."""
    start = time.perf_counter()
    stats = RolloutStats()
    if hasattr(base, "attach"):
        base.attach(engine)
    engine.apply_retention(base)
    stride = max(1, int(stride))
    while (decision := engine.next_decision()) is not None:
        scores = check_scores(decision, base.scores(decision))
        if decision.kind == DecisionKind.ORDER:
            stats.decisions += 1
            others = alternatives(decision, scores, k) if contended(decision, engine.config) else []
            if others:
                stats.branchable += 1
                if stats.branched < decision_budget and (stats.branchable - 1) % stride == 0:
                    until_s = math.inf if horizon_s is None else decision.now_s + horizon_s
                    choices = [scores, *(promote(scores, i) for i in others)]  # the base's own answer first
                    # Without a horizon, the base's answer costs what the branch kept last time
                    # costs: the parent has followed that branch's trajectory since, and the base
                    # continues it. One child fewer per decision after the first.
                    known = horizon_s is None and stats.branched > 0
                    costs = branch_costs(
                        engine, base, choices[1:] if known else choices, until_s, max_parallel
                    )
                    if known:
                        costs = [stats.last_best_cost, *costs]
                    stats.children += len(choices) - known
                    best = int(np.argmin(costs))  # the base's answer on ties
                    stats.branched += 1
                    stats.last_best_cost = costs[best]
                    if best != 0:
                        stats.improved += 1
                        scores = choices[best]
        engine.decide(scores)
    stats.wall_s = time.perf_counter() - start
    return engine.metrics(), stats
