"""The clairvoyant tree-level SRPT order (``TreeSRPT``): an upper-bound oracle that reads the
engine's call table for true remaining lengths. Kept apart from ``policies/heuristics.py`` because it is
a bound, never a baseline or an exportable policy (``conf/bounds.yaml`` builds it by
``_target_: servegym.agents.bounds.TreeSRPT``)."""

from __future__ import annotations

import numpy as np

from servegym.envs.engine.calls import TERMINAL
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Decision, DecisionKind, fcfs_scores


class TreeSRPT:
    """Tree-level shortest remaining processing time on the *true* lengths: calls of the tree
    with the fewest true remaining output tokens (over all its unfinished calls, including
    those not yet ready) first, FCFS among equals; EVICT: a call of the tree with the most.
    An upper-bound oracle: it reads the engine's call table (``attach``), far beyond the
    feature table, so it is never a baseline a learned policy must beat, nor exportable.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Give the oracle the engine whose trees it ranks (``run_policy`` calls it)."""
        self.engine = engine

    def tree_remaining_tokens(self, calls_ids: np.ndarray) -> np.ndarray:
        if self.engine is None:
            raise RuntimeError("TreeSRPT needs the engine: call attach(engine) before the run")
        calls = self.engine.calls
        n = calls.size
        live = ~np.isin(calls.state[:n], [int(s) for s in TERMINAL])
        remaining = np.where(live, np.maximum(calls.target_tokens[:n] - calls.num_output[:n], 0), 0)
        per_job = np.bincount(calls.job[:n], weights=remaining, minlength=len(self.engine.jobs))
        return per_job[calls.job[calls_ids]]

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            raise ValueError("TreeSRPT answers ORDER and EVICT; pair it with a router for ROUTE")
        primary = -self.tree_remaining_tokens(decision.candidates)
        wait = fcfs_scores(decision)
        gaps = np.diff(np.unique(primary))
        unit = gaps.min() if len(gaps) else 1.0
        return primary + 0.5 * unit * wait / (1.0 + np.abs(wait).max())
