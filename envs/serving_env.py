"""Gymnasium environments over the engine: the agent makes the engine's scheduling choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    Decision,
    DecisionKind,
    DefaultPolicy,
    Policy,
)
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload

FEATURE_BOUND = 1e6
"""Observation bounds. Features are scaled to a few units by construction (fractions, log1p
of token counts, times over ``time_scale_s``); the bound only guards (a wait of 1e6 time
scales would be clipped)."""

KIND_NAMES = {"order": DecisionKind.ORDER, "evict": DecisionKind.EVICT, "route": DecisionKind.ROUTE}


@dataclass
class EnvConfig:
    """What the agent controls and how it sees it."""

    decisions: tuple[str, ...] = ("order", "evict")
    """Decision kinds the agent answers; the others go to ``fallback`` (FCFS by default)."""
    max_candidates: int = 32
    """K: candidate slots in the observation; extra candidates rank after the agent's, FCFS."""
    time_scale_s: float = 30.0
    """Normaliser of times in the features and of the reward."""
    horizon_s: float | None = None
    """Truncate the episode once virtual time passes this (None: run until the workload drains)."""

    def __post_init__(self) -> None:
        self.decisions = tuple(self.decisions)
        unknown = [d for d in self.decisions if d not in KIND_NAMES]
        if not self.decisions or unknown:
            raise ValueError(
                f"env.decisions must be a non-empty subset of {list(KIND_NAMES)}, got {self.decisions}"
            )
        if "route" in self.decisions:
            raise ValueError(
                "route decisions need the routing env (a later version); answer them with the fallback"
            )
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ValueError(f"env.max_candidates must be an int >= 1, got {self.max_candidates!r}")
        if not self.time_scale_s > 0:
            raise ValueError(f"env.time_scale_s must be > 0, got {self.time_scale_s!r}")
        if self.horizon_s is not None and not self.horizon_s > 0:
            raise ValueError(f"env.horizon_s must be > 0 or None, got {self.horizon_s!r}")


def default_workload() -> Workload:
    """Map-reduce trees arriving faster than one replica serves them, so queues form and the
    admission order matters (FCFS and program-level FCFS differ by ~1.5x in mean tree time)."""
    return Workload(generator=MapReduce(), arrival_rate=8.0, num_jobs=60)


def default_engine() -> EngineConfig:
    return EngineConfig(max_num_seqs=32)


class SchedulingEnv(gym.Env):
    """Admission order and preemption victims of a paged-KV inference engine serving agent trees.

    ## Description
    Each step is one choice the engine faces (iterations with no choice are skipped inside
    ``step``): which waiting calls to admit first (ORDER) or which running call to preempt when
    KV blocks run out (EVICT). Other choices (routing) are made by ``fallback``.

    ## Action space
    ``Box(-1, 1, (K,))``: one score per candidate slot. ORDER admits in descending score order
    while the token budget, sequence slots and free blocks allow; EVICT preempts the lowest
    score. Scores of padded slots are ignored; candidates beyond K rank after all slots in
    FCFS order. Values outside [-1, 1] are clipped (``ClipAction`` semantics); NaN is an error.

    ## Observation space
    ``Dict``: ``global`` (G + 3,): the engine's global features (``GLOBAL_FEATURES``) and a
    one-hot of the decision kind (ORDER, EVICT, ROUTE); ``candidates`` (K, F): one row of
    ``CANDIDATE_FEATURES`` per candidate, zero-padded; ``mask`` (K,): 1 for real candidates.
    Features are scaled by construction (see ``servegym.envs.engine.policy``); no privileged
    column is included.

    ## Rewards
    Minus the number of unfinished trees times the virtual time elapsed since the previous
    step, over ``time_scale_s``: the episode return is minus the total tree completion time
    (in units of ``time_scale_s``).

    ## Episode end
    Terminated when the workload drains; truncated once virtual time passes ``horizon_s``.
    ``info`` carries the engine's run metrics at the end, and the decision kind every step.

    ## Arguments
    ``workload`` (a ``Workload``), ``cluster``, ``engine`` (their configs), ``env`` (an
    ``EnvConfig``), ``fallback`` (a Policy for the decisions the agent does not make).

    ## Version history
    v0: ORDER and EVICT as scores.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        workload: Workload | None = None,
        cluster: ClusterConfig | None = None,
        engine: EngineConfig | None = None,
        env: EnvConfig | None = None,
        fallback: Policy | None = None,
    ) -> None:
        self.workload = workload or default_workload()
        self.cluster = cluster or ClusterConfig()
        self.engine_config = engine or default_engine()
        self.config = env or EnvConfig()
        self.fallback = fallback or DefaultPolicy()
        self._agent_kinds = {KIND_NAMES[name] for name in self.config.decisions}
        k, f, g = (
            self.config.max_candidates,
            len(CANDIDATE_FEATURES),
            len(GLOBAL_FEATURES) + len(DecisionKind),
        )
        self.observation_space = spaces.Dict(
            {
                "global": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (g,), np.float32),
                "candidates": spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (k, f), np.float32),
                "mask": spaces.Box(0.0, 1.0, (k,), np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (k,), np.float32)
        self.engine: Engine | None = None
        self._decision: Decision | None = None
        self._tree_seconds = 0.0

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        workload_seed = int(self.np_random.integers(2**31 - 1))
        self.engine = Engine(
            self.workload.build(workload_seed),
            cluster=self.cluster,
            engine=self.engine_config,
            time_scale_s=self.config.time_scale_s,
        )
        self._tree_seconds = 0.0
        self._decision = self._advance()
        return self._observe(), {"decision": self._kind_name()}

    def step(self, action: np.ndarray):
        if self.engine is None:
            raise RuntimeError("call reset() before step()")
        if self._decision is None:
            raise RuntimeError("the episode has ended; call reset()")
        self.engine.decide(self._scores(np.asarray(action, dtype=np.float64).reshape(-1)))
        self._decision = self._advance()
        reward = -(self.engine.tree_seconds - self._tree_seconds) / self.config.time_scale_s
        self._tree_seconds = self.engine.tree_seconds
        terminated = self._decision is None
        horizon = self.config.horizon_s
        truncated = not terminated and horizon is not None and self.engine.now_s >= horizon
        info: dict[str, Any] = {"decision": self._kind_name()}
        if terminated or truncated:
            info["metrics"] = self.engine.metrics().as_dict()
        return self._observe(), float(reward), terminated, truncated, info

    # ------------------------------------------------------------------ internals
    def _advance(self) -> Decision | None:
        """Run the engine to the next decision the agent owns, answering others by fallback."""
        while (decision := self.engine.next_decision()) is not None:
            if decision.kind in self._agent_kinds:
                return decision
            self.engine.decide(self.fallback.scores(decision))
        return None

    def _scores(self, action: np.ndarray) -> np.ndarray:
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        if np.isnan(action).any():
            raise ValueError("action contains NaN")
        decision = self._decision
        k = self.config.max_candidates
        action = np.clip(action, -1.0, 1.0)
        n = len(decision)
        scores = np.empty(n)
        scores[: min(n, k)] = action[: min(n, k)]
        if n > k:  # unseen candidates rank after every slot, in the fallback's order
            overflow = self.fallback.scores(_subset(decision, slice(k, n)))
            ranks = np.argsort(np.argsort(-overflow, kind="stable"), kind="stable")
            # ORDER admits them after all seen ones; EVICT never picks one before a seen one
            scores[k:] = -2.0 - ranks if decision.kind == DecisionKind.ORDER else 2.0
        return scores

    def _observe(self) -> dict[str, np.ndarray]:
        k = self.config.max_candidates
        candidates = np.zeros((k, len(CANDIDATE_FEATURES)), dtype=np.float32)
        mask = np.zeros(k, dtype=np.float32)
        kind = np.zeros(len(DecisionKind), dtype=np.float32)
        global_features = np.zeros(len(GLOBAL_FEATURES), dtype=np.float32)
        if self._decision is not None:
            d = self._decision
            n = min(len(d), k)
            candidates[:n] = d.features[:n]
            mask[:n] = 1.0
            kind[int(d.kind)] = 1.0
            global_features = d.global_features
        return {
            "global": np.clip(np.concatenate([global_features, kind]), -FEATURE_BOUND, FEATURE_BOUND),
            "candidates": np.clip(candidates, -FEATURE_BOUND, FEATURE_BOUND),
            "mask": mask,
        }

    def _kind_name(self) -> str | None:
        return None if self._decision is None else self._decision.kind.name.lower()


def _subset(decision: Decision, rows: slice) -> Decision:
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
