"""Decision <-> fixed-shape observation and action, shared by the envs and by every driver of a
learned policy (the SB3 wrapper, the ONNX runtime, serving-engine adapters), so a policy sees
exactly the same table in training and in deployment. Numpy only.

* ``observe``: the Dict observation: ``global`` = the decision's global features and a one-hot
  of its kind; ``candidates`` = the first K feature rows, zero-padded; ``mask`` = 1 for real rows.
* ``slot_scores``: a (K,) action back to one score per candidate. Scores are clipped to
  [-1, 1]; candidates beyond K rank after every slot, in the fallback policy's order.
"""

from __future__ import annotations

import numpy as np

from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    Decision,
    DecisionKind,
    Policy,
)

FEATURE_BOUND = 1e6
"""Observation bounds. Features are scaled to a few units by construction (fractions, log1p
of token counts, times over ``time_scale_s``); the bound only guards (a wait of 1e6 time
scales would be clipped)."""

NUM_GLOBAL = len(GLOBAL_FEATURES) + len(DecisionKind)


def observe(decision: Decision | None, max_candidates: int) -> dict[str, np.ndarray]:
    """The observation of a decision (all zeros for None, the terminal observation)."""
    k = max_candidates
    candidates = np.zeros((k, len(CANDIDATE_FEATURES)), dtype=np.float32)
    mask = np.zeros(k, dtype=np.float32)
    kind = np.zeros(len(DecisionKind), dtype=np.float32)
    global_features = np.zeros(len(GLOBAL_FEATURES), dtype=np.float32)
    if decision is not None:
        n = min(len(decision), k)
        candidates[:n] = decision.features[:n]
        mask[:n] = 1.0
        kind[int(decision.kind)] = 1.0
        global_features = decision.global_features
    return {
        "global": np.clip(np.concatenate([global_features, kind]), -FEATURE_BOUND, FEATURE_BOUND),
        "candidates": np.clip(candidates, -FEATURE_BOUND, FEATURE_BOUND),
        "mask": mask,
    }


def slot_scores(decision: Decision, action: np.ndarray, max_candidates: int, fallback: Policy) -> np.ndarray:
    """One score per candidate from a (K,) score action (``ClipAction`` semantics; NaN is an error)."""
    k = max_candidates
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (k,):
        raise ValueError(f"action must have shape ({k},), got {action.shape}")
    if np.isnan(action).any():
        raise ValueError("action contains NaN")
    action = np.clip(action, -1.0, 1.0)
    n = len(decision)
    scores = np.empty(n)
    scores[: min(n, k)] = action[: min(n, k)]
    if n > k:  # unseen candidates rank after every slot, in the fallback's order
        overflow = fallback.scores(subset(decision, slice(k, n)))
        ranks = np.argsort(np.argsort(-overflow, kind="stable"), kind="stable")
        # ORDER admits them after all seen ones; EVICT never picks one before a seen one
        scores[k:] = -2.0 - ranks if decision.kind == DecisionKind.ORDER else 2.0
    return scores


def subset(decision: Decision, rows: slice) -> Decision:
    return Decision(
        kind=decision.kind,
        replica=decision.replica,
        candidates=decision.candidates[rows],
        features=decision.features[rows],
        privileged=decision.privileged[rows],
        global_features=decision.global_features,
        mask=decision.mask[rows],
        call=decision.call,
        now_s=decision.now_s,
    )


__all__ = ["FEATURE_BOUND", "NUM_GLOBAL", "observe", "slot_scores", "subset"]
