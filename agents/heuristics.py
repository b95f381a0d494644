"""Heuristic baselines of the field, each a ``Policy`` over the engine's feature table.

Each docstring names the system it reproduces and how faithfully. More baselines (SGLang-LPM,
VTC, SJF, Autellix PLAS/ATLAS, Continuum pinning, KVFlow, Llumnix and RouteLLM routing) follow
in the baselines issue; they plug in the same way.
"""

from __future__ import annotations

import numpy as np

from servegym.envs.engine.policy import ROUTE_FEATURES, Decision, DecisionKind, column

_WAIT = column("wait_s")


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


class FCFS:
    """vLLM V1's default: call-level first-come-first-served.

    ORDER: oldest ready call first (a preempted call kept its original ready time, so it goes
    back to the front, as vLLM re-queues it). EVICT: the newest running call is preempted.
    ROUTE: round-robin. Faithful to vLLM's ``fcfs`` policy at the call level; it knows nothing
    of trees.
    """

    def __init__(self) -> None:
        self.router = RoundRobinRouting()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.router.route(decision)
        return decision.features[:, _WAIT].astype(np.float64)


class RandomPolicy:
    """Uniform random scores: a floor for comparisons and a fuzzer for engine invariants."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def scores(self, decision: Decision) -> np.ndarray:
        return self.rng.random(len(decision))


__all__ = ["FCFS", "ROUTE_FEATURES", "RandomPolicy", "RoundRobinRouting"]
