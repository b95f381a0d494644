"""Decision <-> fixed-shape observation and action, shared by the envs and by every driver of a
learned policy (the SB3 wrapper, the ONNX runtime, serving-engine adapters), so a policy sees
exactly the same table in training and in deployment. Numpy only.

* ``observe``: the Dict observation: ``global`` = the decision's global features and a one-hot
  of its kind; ``candidates`` = the first K feature rows of an ORDER/EVICT decision,
  zero-padded; ``mask`` = 1 for real rows. Routing-v0 shows ``replicas`` (ROUTE rows),
  Retention-v0 ``options`` (RETAIN rows), Config-v0 ``configs`` (CONFIG rows), Budget-v0
  ``budgets`` (BUDGET rows), in place of
  ``candidates``.
* ``slot_scores``: a (K,) score action back to one score per candidate. Scores are clipped to
  [-1, 1] (``ClipAction`` semantics; NaN is an error); candidates beyond K rank after every
  slot, in the fallback policy's order (ORDER admits them last, EVICT never picks one before a
  seen one).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servegym.envs.engine.policy import (
    BUDGET_FEATURES,
    CANDIDATE_FEATURES,
    CONFIG_FEATURES,
    GLOBAL_FEATURES,
    RETAIN_FEATURES,
    ROUTE_FEATURES,
    Decision,
    DecisionKind,
    Policy,
)

FEATURE_BOUND = 1e6
"""Observation bounds. Features are scaled to a few units by construction (fractions, log1p
of token counts, times over ``time_scale_s``); the bound only guards (a wait of 1e6 time
scales would be clipped)."""

GLOBAL_SIZE = len(GLOBAL_FEATURES) + len(DecisionKind)
"""Length of the ``global`` observation: the engine's global features and the kind one-hot."""

TABLE_FEATURES = {
    "candidates": CANDIDATE_FEATURES,
    "replicas": ROUTE_FEATURES,
    "options": RETAIN_FEATURES,
    "configs": CONFIG_FEATURES,
    "budgets": BUDGET_FEATURES,
}
"""The columns of each slot table an observation may hold."""


def global_observation(decision: Decision | None) -> np.ndarray:
    """(G + kinds,): the decision's global features and its kind one-hot (zeros for None)."""
    out = np.zeros(GLOBAL_SIZE, dtype=np.float32)
    if decision is not None:
        out[: len(GLOBAL_FEATURES)] = decision.global_features
        out[len(GLOBAL_FEATURES) + int(decision.kind)] = 1.0
    return np.clip(out, -FEATURE_BOUND, FEATURE_BOUND)


def candidate_table(decision: Decision | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, F) candidate rows and the (K,) mask of an ORDER/EVICT decision, zero-padded."""
    candidates = np.zeros((k, len(CANDIDATE_FEATURES)), dtype=np.float32)
    mask = np.zeros(k, dtype=np.float32)
    if decision is not None and decision.kind in (DecisionKind.ORDER, DecisionKind.EVICT):
        n = min(len(decision), k)
        candidates[:n] = decision.features[:n]
        mask[:n] = 1.0
    return np.clip(candidates, -FEATURE_BOUND, FEATURE_BOUND), mask


def replica_table(decision: Decision | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, len(ROUTE_FEATURES)) replica rows and the eligibility mask of a ROUTE decision."""
    replicas = np.zeros((rows, len(ROUTE_FEATURES)), dtype=np.float32)
    mask = np.zeros(rows, dtype=np.float32)
    if decision is not None and decision.kind == DecisionKind.ROUTE:
        replicas[: len(decision)] = decision.features
        mask[: len(decision)] = decision.mask
    return np.clip(replicas, -FEATURE_BOUND, FEATURE_BOUND), mask


def _menu_table(kind: DecisionKind, columns: tuple[str, ...], menu: str) -> Any:
    """A table builder for a decision whose rows are a fixed menu of options (RETAIN, CONFIG, BUDGET):
    (rows, len(columns)) option rows and their mask, zeros for any other decision."""

    def table(decision: Decision | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
        options = np.zeros((rows, len(columns)), dtype=np.float32)
        mask = np.zeros(rows, dtype=np.float32)
        if decision is not None and decision.kind == kind:
            if len(decision) > rows:
                raise ValueError(
                    f"{kind.name} decision with {len(decision)} options, the observation holds {rows}: "
                    f"the env and the engine must share {menu}"
                )
            options[: len(decision)] = decision.features
            mask[: len(decision)] = decision.mask
        return np.clip(options, -FEATURE_BOUND, FEATURE_BOUND), mask

    return table


option_table = _menu_table(DecisionKind.RETAIN, RETAIN_FEATURES, "engine.retain_ttls_s")
"""(rows, len(RETAIN_FEATURES)) option rows of a RETAIN decision and their mask."""
config_table = _menu_table(
    DecisionKind.CONFIG,
    CONFIG_FEATURES,
    "engine.config_max_num_seqs and engine.config_max_num_batched_tokens",
)
"""(rows, len(CONFIG_FEATURES)) option rows of a CONFIG decision and their mask."""
budget_table = _menu_table(DecisionKind.BUDGET, BUDGET_FEATURES, "engine.budget_multipliers")
"""(rows, len(BUDGET_FEATURES)) option rows of a BUDGET decision and their mask."""


def observe(decision: Decision | None, max_candidates: int) -> dict[str, np.ndarray]:
    """The Scheduling/Eviction observation of a decision (all zeros for None, the terminal one)."""
    candidates, mask = candidate_table(decision, max_candidates)
    return {"global": global_observation(decision), "candidates": candidates, "mask": mask}


def observe_replicas(decision: Decision | None, num_replicas: int) -> dict[str, np.ndarray]:
    """The Routing-v0 observation: global, ``replicas`` (R, len(ROUTE_FEATURES)), eligibility mask."""
    replicas, mask = replica_table(decision, num_replicas)
    return {"global": global_observation(decision), "replicas": replicas, "mask": mask}


def _with_candidates(key: str, table: Any, kind: DecisionKind) -> Any:
    """An observation builder with the candidate table and a second one (``key``, filled by
    ``table`` for decisions of ``kind``), both with K rows and one mask, the table of the other
    kind zero: slot i means the same thing whatever the decision."""

    def build(decision: Decision | None, max_candidates: int) -> dict[str, np.ndarray]:
        candidates, mask = candidate_table(decision, max_candidates)
        second, second_mask = table(decision, max_candidates)
        is_second = decision is not None and decision.kind == kind
        return {
            "global": global_observation(decision),
            "candidates": candidates,
            key: second,
            "mask": second_mask if is_second else mask,
        }

    return build


def _menu_only(key: str, table: Any) -> Any:
    """An observation builder with one option table (``key``) and its mask."""

    def build(decision: Decision | None, num_options: int) -> dict[str, np.ndarray]:
        options, mask = table(decision, num_options)
        return {"global": global_observation(decision), key: options, "mask": mask}

    return build


observe_options = _menu_only("options", option_table)
"""The Retention-v0 observation: global, ``options`` (O, len(RETAIN_FEATURES)), their mask."""
observe_configs = _menu_only("configs", config_table)
"""The Config-v0 observation: global, ``configs`` (O, len(CONFIG_FEATURES)), their mask."""
observe_budgets = _menu_only("budgets", budget_table)
"""The Budget-v0 observation: global, ``budgets`` (O, len(BUDGET_FEATURES)), their mask."""


observe_serving = _with_candidates("replicas", replica_table, DecisionKind.ROUTE)
"""The Serving-v0 observation: candidates and replicas (ROUTE's replicas in the first slots)."""
observe_pick_retain = _with_candidates("options", option_table, DecisionKind.RETAIN)
"""The PickRetain-v0 observation: candidates and options (RETAIN's options in the first slots)."""


LAYOUTS = {
    ("candidates",): observe,
    ("replicas",): observe_replicas,
    ("candidates", "replicas"): observe_serving,
    ("options",): observe_options,
    ("candidates", "options"): observe_pick_retain,
    ("configs",): observe_configs,
    ("budgets",): observe_budgets,
}
"""Observation builder per set of slot tables (Scheduling/Eviction, Routing, Serving, Retention,
PickRetain, Config, Budget)."""


def observation_layout(keys: Any) -> tuple[str, ...]:
    """The slot tables among an observation's keys, in the order policies concatenate them."""
    tables = tuple(key for key in TABLE_FEATURES if key in keys)
    if tables not in LAYOUTS:
        raise ValueError(f"no servegym observation has keys {sorted(keys)}")
    return tables


def score_action(action: Any, size: int) -> np.ndarray:
    """A Box score action, checked (shape, NaN) and clipped to [-1, 1]."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (size,):  # a (4, 8) or (K, 1) array is a caller's bug, not K scores
        raise ValueError(f"action must have shape ({size},), got {action.shape}")
    if np.isnan(action).any():
        raise ValueError("action contains NaN")
    return np.clip(action, -1.0, 1.0)


def slot_scores(decision: Decision, action: Any, max_candidates: int, fallback: Policy) -> np.ndarray:
    """Engine scores of an ORDER/EVICT decision from a (K,) score action."""
    k = max_candidates
    action = score_action(action, k)
    n = len(decision)
    scores = np.empty(n)
    scores[: min(n, k)] = action[: min(n, k)]
    if n > k:
        overflow = fallback.scores(subset(decision, slice(k, n)))
        ranks = np.argsort(np.argsort(-overflow, kind="stable"), kind="stable")
        scores[k:] = -2.0 - ranks if decision.kind == DecisionKind.ORDER else 2.0
    return scores


def presort_rows(decision: Decision) -> np.ndarray:
    """Row order of a pick-next candidate table (PickNext-v0): oldest tree first
    (``tree_age_s`` descending), then the longest-waiting call (``wait_s`` descending), then
    queue order. When more than K calls wait, the K oldest trees' calls are the ones shown.
    A RETAIN decision's options keep their menu order (PickRetain-v0)."""
    if decision.kind == DecisionKind.RETAIN:
        return np.arange(len(decision))
    tree_age = decision.features[:, CANDIDATE_FEATURES.index("tree_age_s")]
    wait = decision.features[:, CANDIDATE_FEATURES.index("wait_s")]
    return np.lexsort((np.arange(len(decision)), -wait, -tree_age))


def pick_valid(decision: Decision, rows: np.ndarray, k: int) -> np.ndarray:
    """(K + 1,) valid pick-next actions: shown slots whose call fits now, then STOP (offered
    by the decision). For EVICT every shown slot is valid and STOP is not."""
    valid = np.zeros(k + 1, dtype=bool)
    shown = rows[:k]
    valid[: len(shown)] = decision.mask[shown]
    valid[k] = decision.kind == DecisionKind.ORDER and decision.stop
    return valid


def pick_scores(decision: Decision, rows: np.ndarray, slot: int, k: int) -> np.ndarray:
    """Engine scores that make the engine take pick-next action ``slot`` (``k`` is STOP)."""
    if slot == k:  # STOP: its score, the extra last one, is the highest
        scores = np.zeros(len(decision) + 1)
        scores[-1] = 1.0
        return scores
    scores = np.zeros(len(decision))
    scores[rows[slot]] = -1.0 if decision.kind == DecisionKind.EVICT else 1.0  # EVICT: lowest goes
    return scores


def subset(decision: Decision, rows: slice | np.ndarray) -> Decision:
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


__all__ = [
    "FEATURE_BOUND",
    "GLOBAL_SIZE",
    "TABLE_FEATURES",
    "candidate_table",
    "global_observation",
    "LAYOUTS",
    "observation_layout",
    "observe",
    "observe_configs",
    "observe_budgets",
    "observe_options",
    "observe_pick_retain",
    "observe_replicas",
    "config_table",
    "budget_table",
    "option_table",
    "observe_serving",
    "pick_scores",
    "pick_valid",
    "presort_rows",
    "replica_table",
    "score_action",
    "slot_scores",
    "subset",
]
