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

Scale by construction: token counts enter as ``log1p``, block counts as fractions of the
replica's capacity, times over ``time_scale_s`` (a config value), so a network needs no running
normalisation. Privileged columns (the true remaining output, the true tool latency) live in
a separate array that RL observations and exported policies never see; oracle baselines may
read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

import numpy as np

FEATURE_SCHEMA_VERSION = 4
"""v2 added predicted_output_log and pinned_prefix_frac; v3 the tree-state columns (tree_ready_log
to tree_depth_left) and the global free_slots_frac; v4 the RETAIN decision kind (its one-hot in
the global observation) and its option table ``RETAIN_FEATURES``."""

CANDIDATE_FEATURES: tuple[str, ...] = (
    "is_running",  # 1 for a running call (EVICT), 0 for a waiting one
    "is_swapped",  # 1 when its KV sits in the host tier
    "prompt_tokens_log",  # log1p(prompt tokens, incl. ancestors' outputs)
    "cached_prefix_frac",  # prefix-cache hit on this replica / prompt tokens
    "computed_tokens_log",  # log1p(tokens already in KV)
    "output_tokens_log",  # log1p(tokens generated so far)
    "budget_left_log",  # log1p(role budget max_tokens - generated)
    "blocks_held_frac",  # blocks it holds / replica blocks
    "blocks_needed_frac",  # new blocks its next chunk needs / replica blocks
    "wait_s",  # time since it became ready (or was preempted) / time_scale_s
    "tree_age_s",  # time since its job arrived / time_scale_s
    "role_id",  # index into servegym.envs.workloads.job.KNOWN_ROLES
    "depth",  # depth in its tree (root = 0)
    "tree_service_log",  # log1p(tokens processed for its whole tree so far): Autellix PLAS
    "critical_path_service_log",  # log1p(tokens on the heaviest path of finished ancestors): Autellix ATLAS
    "tree_calls_done",  # finished calls in its tree
    "tree_calls_total_log",  # log1p(calls in its tree)
    "tenant_vtc_log",  # log1p(tenant's virtual token counter - min over backlogged tenants): VTC
    "preemptions",  # times this call was preempted
    "replica",  # replica index the call sits on
    "predicted_output_log",  # log1p(mean output of finished calls of its role and tenant, learned
    # online by the engine; else of its role; else its budget max_tokens): LTR-SJF's predictor
    "pinned_prefix_frac",  # its prompt held by a finished parent's TTL pin for it / prompt tokens
    # (Continuum: KV retained across the tool pause; admitting it releases the pin)
    # The state of its whole tree, so a policy can rank trees rather than calls (tree-SRPT needs
    # work left, Autellix/Parrot need what is ready and what is blocked); all non-privileged:
    "tree_ready_log",  # log1p(calls of its tree queued: waiting or swapped), itself included
    "tree_running_log",  # log1p(calls of its tree running)
    "tree_blocked_log",  # log1p(calls of its tree waiting on an unfinished parent)
    "tree_tool_paused_log",  # log1p(calls of its tree whose parents finished, waiting on a tool)
    "tree_predicted_left_log",  # log1p(sum over its tree's unfinished calls of the predicted
    # output (as predicted_output_log) minus what each has generated): work left, predicted
    "tree_depth_left",  # levels of its tree still to run: deepest minus shallowest unfinished + 1
)

PRIVILEGED_FEATURES: tuple[str, ...] = (
    "true_remaining_output_tokens",  # oracle SJF only
    "true_tool_latency_s",  # oracle TTL pinning only
)

GLOBAL_FEATURES: tuple[str, ...] = (
    "time_s",  # virtual time / time_scale_s
    "kv_used_frac",  # owned blocks / capacity, on the deciding replica
    "kv_cached_frac",  # unreferenced but cached blocks / capacity
    "kv_free_frac",  # allocatable blocks / capacity
    "host_used_frac",  # swap tier use
    "waiting_log",  # log1p(waiting calls on the replica)
    "running_log",  # log1p(running calls on the replica)
    "live_trees_log",  # log1p(unfinished jobs in the cluster)
    "token_budget_left_frac",  # token budget left this iteration / max_num_batched_tokens
    "free_slots_frac",  # (max_num_seqs - running calls) / max_num_seqs on the replica
)

ROUTE_FEATURES: tuple[str, ...] = (
    "kv_used_frac",
    "kv_free_frac",
    "waiting_log",
    "running_log",
    "queued_prefill_tokens_log",  # log1p(prompt tokens waiting to be computed)
    "cached_prefix_frac",  # how much of this call's prompt the replica has cached
    "model_params_log10",  # log10 of the replica model's parameter count
    "is_tree_replica",  # 1 if an earlier call of the same tree ran there (locality)
    "call_prompt_tokens_log",  # the call being routed: log1p(prompt tokens)
    "call_role_id",
)

RETAIN_FEATURES: tuple[str, ...] = (
    # the option
    "ttl_s",  # the option's TTL / time_scale_s (0: release now)
    "is_release",  # 1 for a TTL of 0
    "ttl_over_tool_mean",  # TTL / (predicted tool pause + network delay), at most 8; 8 when none
    # is predicted yet and the TTL is positive
    # the finished call and what its children would reuse
    "tool_mean_s",  # expected wait until its children are ready: the mean tool pause observed
    # after calls of its role (0 until one is) + the cluster's network delay, / time_scale_s
    "tools_seen_log",  # log1p(tool pauses observed for its role): how much the mean is worth
    "pin_blocks_frac",  # blocks the pin would hold / replica blocks
    "context_tokens_log",  # log1p(its prompt + output tokens)
    "children_log",  # log1p(children that will reuse the prefix)
    "role_id",
    "depth",
    "tree_age_s",  # time since its job arrived / time_scale_s
    "tree_predicted_left_log",  # as the candidate column: predicted output left in its tree
    # the replica's retention state
    "pinned_frac",  # blocks held by pins now / replica blocks
    "pins_log",  # log1p(pins held now)
)
"""Columns of a RETAIN decision's rows, one row per option; non-privileged. The oracle's truth
is ``PRIVILEGED_FEATURES``' ``true_tool_latency_s`` of every row: the call's true tool latency
plus the network delay (when its children become ready, as ``tool_mean_s`` predicts it)."""


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


@dataclass
class Decision:
    """A choice the engine needs made. Rows of ``features`` align with ``candidates``."""

    kind: DecisionKind
    replica: int  # deciding replica (ORDER/EVICT/RETAIN) or -1 (ROUTE)
    candidates: np.ndarray  # (K,) int64: engine call ids, replica ids (ROUTE), option indices (RETAIN)
    features: np.ndarray  # (K, F) float32
    privileged: np.ndarray  # (K, P) float32; never part of an RL observation
    global_features: np.ndarray  # (G,) float32
    mask: np.ndarray  # (K,) bool: candidates the engine may accept
    call: int = -1  # ROUTE: the call being routed; RETAIN: the call that finished
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
                return np.eye(n)[replica]
        raise ValueError("route decision with no eligible replica")


def release_scores(decision: Decision) -> np.ndarray:
    """RETAIN as vLLM: the shortest TTL (0, release now when offered) scores highest."""
    return -decision.features[:, RETAIN_FEATURES.index("ttl_s")].astype(np.float64)


class DefaultPolicy:
    """What vLLM does when nobody else decides: FCFS admission, the newest running call
    preempted, round-robin routing, a finished call's KV released to the prefix cache. The envs
    answer the decisions an agent does not own with it; ``servegym.agents.policies.heuristics.FCFS`` is
    the same policy as a named baseline."""

    def __init__(self) -> None:
        self.router = RoundRobinRouting()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.router.route(decision)
        if decision.kind == DecisionKind.RETAIN:
            return release_scores(decision)
        return fcfs_scores(decision)
