"""The Policy protocol and the candidate feature schema: the one contract between the engine
and everything that makes scheduling decisions (heuristics, RL agents, exported networks).

The engine yields a ``Decision``: what kind of choice it faces, one feature row per candidate,
a global feature vector, and a validity mask. A policy answers with one score per candidate:

* ``ORDER``: candidates are waiting calls. With ``EngineConfig.admission="rank"`` they are
  admitted in descending score order while the token budget, sequence slots and free blocks
  allow (the first that does not fit stops admission, as in vLLM). With ``"pick"`` (pick-next)
  each decision admits one call: the highest-scored among those that fit now (``mask``), or
  none when the decision offers STOP (``stop``) and the policy's extra last score, STOP's, is
  the highest (``pick``); the engine asks again after each admission until STOP, nothing fits,
  or no slot or token budget is left. A ranking heuristic answers both by its scores and never
  stops.
* ``EVICT``: candidates are running calls not yet scheduled this iteration (the call that
  could not get a block included); the lowest score is preempted.
* ``ROUTE``: candidates are replicas (rows of ``ROUTE_FEATURES``); the highest valid score
  receives the call.
* ``RETAIN`` (with ``EngineConfig.pin_ttl_rule="policy"``): a call finished, its tool runs, and
  its children will reuse a prefix of its KV. Candidates are the retention options of
  ``EngineConfig.retain_ttls_s`` (rows of ``RETAIN_FEATURES``, ``candidates`` their indices):
  pin that prefix for the option's TTL (0: release it to the prefix cache now, vLLM's
  behaviour). The highest score is taken. A pin ends early once every child was admitted, or
  under memory pressure (oldest first), as the TTL rules' pins do.
* ``CONFIG`` (with ``EngineConfig.config_every_s > 0``): every that many seconds a replica asks
  for its running-call cap and token budget. Candidates are the options (rows of
  ``CONFIG_FEATURES``, ``candidates`` their indices): the grid ``config_max_num_seqs`` x
  ``config_max_num_batched_tokens``, plus the current pair last when it is off the grid. The
  highest score is taken and holds until the next CONFIG decision.
* ``BUDGET`` (with ``EngineConfig.budget_rule="policy"``): a ready call joins a replica's queue
  and needs its ``max_tokens``. Candidates are the options (rows of ``BUDGET_FEATURES``,
  ``candidates`` their indices): ``budget_multipliers`` times the call's workload budget; the
  mask allows those whose prompt plus budget the replica's KV cache holds. The highest allowed
  score is taken. A call stopped by its budget before its natural end spawns a continuation
  (``EngineConfig.continue_truncated``, which this rule needs), which asks no BUDGET decision.

The columns of every table (candidates, globals, routes, retention options, privileged truth),
their order, scale and meaning are declared once in ``servegym.envs.engine.schema``; the name
tuples below are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

import numpy as np

from servegym.envs.engine.schema import BUDGET, CANDIDATE, CONFIG, GLOBAL, PRIVILEGED, RETAIN, ROUTE

CANDIDATE_FEATURES: tuple[str, ...] = CANDIDATE.names
PRIVILEGED_FEATURES: tuple[str, ...] = PRIVILEGED.names
GLOBAL_FEATURES: tuple[str, ...] = GLOBAL.names
ROUTE_FEATURES: tuple[str, ...] = ROUTE.names
RETAIN_FEATURES: tuple[str, ...] = RETAIN.names
CONFIG_FEATURES: tuple[str, ...] = CONFIG.names
BUDGET_FEATURES: tuple[str, ...] = BUDGET.names


def column(name: str, schema: tuple[str, ...] = CANDIDATE_FEATURES) -> int:
    """Index of a feature column, failing loudly on a name the schema lacks."""
    try:
        return schema.index(name)
    except ValueError:
        raise KeyError(f"unknown feature {name!r}; the schema has {list(schema)}") from None


class DecisionKind(IntEnum):
    ORDER = 0
    EVICT = 1
    ROUTE = 2
    RETAIN = 3
    CONFIG = 4
    BUDGET = 5


@dataclass
class Decision:
    """A choice the engine needs made. Rows of ``features`` align with ``candidates``."""

    kind: DecisionKind
    replica: int  # deciding replica (ORDER/EVICT/RETAIN/CONFIG/BUDGET) or -1 (ROUTE)
    candidates: (
        np.ndarray
    )  # (K,) int64: call ids, replica ids (ROUTE), option indices (RETAIN, CONFIG, BUDGET)
    features: np.ndarray  # (K, F) float32
    privileged: np.ndarray  # (K, P) float32; never part of an RL observation
    global_features: np.ndarray  # (G,) float32
    mask: np.ndarray  # (K,) bool: candidates the engine may accept
    call: int = -1  # ROUTE: the call being routed; RETAIN: the call that finished; BUDGET: the call
    now_s: float = 0.0
    stop: bool = False  # pick-next ORDER: the answer may carry a STOP score (see ``pick``)

    def __len__(self) -> int:
        return len(self.candidates)


@runtime_checkable
class Policy(Protocol):
    """Anything that scores candidates: a heuristic, an SB3 model wrapper, an ONNX session."""

    def scores(self, decision: Decision) -> np.ndarray:
        """One float per candidate (shape ``(len(decision),)``); see the module docstring."""
        ...


def check_scores(decision: Decision, scores: np.ndarray) -> np.ndarray:
    """Validate a policy's answer; NaN is an error, not a silent tie. A decision offering STOP
    also takes one more score, STOP's, after the candidates'."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(decision)
    if scores.shape != (n,) and not (decision.stop and scores.shape == (n + 1,)):
        extra = f" (or {n + 1}: the last is STOP's)" if decision.stop else ""
        raise ValueError(
            f"{decision.kind.name} decision has {n} candidates but the policy "
            f"returned {scores.shape[0]} scores; return one score per candidate{extra}"
        )
    if np.isnan(scores).any():
        raise ValueError(f"{decision.kind.name} scores contain NaN: {scores}")
    return scores


def pick(decision: Decision, scores: np.ndarray) -> int | None:
    """A pick-next ORDER answer: the index of the highest-scored candidate the mask allows
    (ties: the first in queue order), or None for STOP when the decision offers it and STOP's
    score (the extra last one) is strictly the highest."""
    n = len(decision)
    allowed = np.flatnonzero(decision.mask)
    best = int(allowed[np.argmax(scores[allowed])])
    if decision.stop and len(scores) == n + 1 and scores[n] > scores[best]:
        return None
    return best


def fcfs_scores(decision: Decision) -> np.ndarray:
    """Oldest ready call highest (a preempted call keeps its ready time, so it goes first)."""
    return decision.features[:, CANDIDATE_FEATURES.index("wait_s")].astype(np.float64)


class RoundRobinRouting:
    """Route each call to the next replica in turn, skipping masked ones (vLLM's router default)."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, decision: Decision) -> np.ndarray:
        n = len(decision)
        for step in range(n):
            replica = (self._next + step) % n
            if decision.mask[replica]:
                self._next = replica + 1
                scores: np.ndarray = np.eye(n)[replica]  # one-hot
                return scores
        raise ValueError("route decision with no eligible replica")


def keep_config_scores(decision: Decision) -> np.ndarray:
    """CONFIG as a static engine: keep the current cap and budget."""
    return decision.features[:, CONFIG_FEATURES.index("is_current")].astype(np.float64)


def release_scores(decision: Decision) -> np.ndarray:
    """RETAIN as vLLM: the shortest TTL (0, release now when offered) scores highest."""
    return -decision.features[:, RETAIN_FEATURES.index("ttl_s")].astype(np.float64)


def workload_budget_scores(decision: Decision) -> np.ndarray:
    """BUDGET as the workload says: its own ``max_tokens`` (multiplier 1) scores highest."""
    return decision.features[:, BUDGET_FEATURES.index("is_workload")].astype(np.float64)


class DefaultPolicy:
    """What vLLM does when nobody else decides: FCFS admission, the newest running call
    preempted, round-robin routing, a finished call's KV released to the prefix cache, the
    configured cap and budget kept, each call's max_tokens as its workload sets it. The envs
    answer the decisions an agent does not own with it; ``servegym.agents.policies.heuristics.FCFS`` is
    the same policy as a named baseline."""

    def __init__(self) -> None:
        self.router = RoundRobinRouting()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.router.route(decision)
        if decision.kind == DecisionKind.RETAIN:
            return release_scores(decision)
        if decision.kind == DecisionKind.CONFIG:
            return keep_config_scores(decision)
        if decision.kind == DecisionKind.BUDGET:
            return workload_budget_scores(decision)
        return fcfs_scores(decision)
