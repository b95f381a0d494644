"""PickNext-v0: pick-next admission with STOP, the batching lever, as a masked discrete choice."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.policy import DecisionKind, Policy, check_scores, pick
from servegym.envs.observation import pick_scores, pick_valid, presort_rows, subset
from servegym.envs.serving_env import MaskedChoiceEnv
from servegym.envs.workloads.workload import Workload


class PickNextEnv(MaskedChoiceEnv):
    """Pick-next admission of a paged-KV inference engine serving agent trees, with STOP.

    ## Description
    The engine runs with ``admission="pick"``: whenever a replica may admit waiting calls, each
    step picks ONE call to admit now among those that fit (free blocks, token budget, a free
    sequence slot), or STOP: admit nothing more this iteration, keeping KV and slots free for
    what comes next. After an admission the engine asks again, until STOP, nothing fits, or no
    slot or budget is left. This is the batching lever a ranking cannot express: a ranking
    admits everything that fits. STOP is offered only once something is scheduled in the
    iteration (an idle replica cannot wait: no time would pass). Preemption victims (EVICT)
    and routing are made by ``fallback`` unless ``env.decisions`` includes ``evict``.

    ## Action space
    ``Discrete(K + 1)``: slot ``i < K`` admits the candidate in slot ``i``; ``K`` is STOP.
    ``action_masks()`` marks the slots holding a call that fits now, and STOP where it is
    offered. An invalid action is answered by the fallback (FCFS: the oldest call that fits)
    and flagged ``info["invalid_action"] = True``; an action that is not one integer raises.
    For an EVICT decision (when the agent owns them) slot ``i`` preempts slot ``i``'s call.

    ## Observation space
    As Scheduling-v0 (``global`` (G + kinds,), ``candidates`` (K, F), ``mask`` (K,) for real rows),
    with the candidates presorted by a documented key, oldest tree first, then oldest call
    (``presort_rows``), so when more than K calls wait the K oldest trees' calls
    are the ones shown. A call past slot K cannot be picked this step (the policy may STOP or
    pick a shown one); ``info["candidates_cut"]`` counts fitting calls past K at each step and
    the episode's end info gives ``cut_binding_frac``, the share of ORDER steps where one was.

    ## Rewards
    As Scheduling-v0: minus unfinished trees times elapsed virtual time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0.

    ## Arguments
    As Scheduling-v0; ``engine.admission`` is set to ``pick``; ``env.decisions`` is a subset
    of order, evict (default order).

    ## Version history
    v0: pick-next ORDER with STOP as a masked ``Discrete(K + 1)``, presorted candidates. A new
    id rather than Scheduling-v1: the decision protocol differs (one pick per decision, not a
    score per candidate), Scheduling-v0 stays as it is, and Gymnasium would otherwise call
    every Scheduling-v0 out of date.
    """

    allowed_decisions: ClassVar[tuple[str, ...]] = ("order", "evict")
    default_decisions: ClassVar[tuple[str, ...]] = ("order",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_config = replace(self.engine_config, admission="pick")
        self._rows = np.zeros(0, dtype=np.int64)
        self._order_steps = self._cut_steps = 0

    def default_engine(self) -> EngineConfig:
        return replace(super().default_engine(), admission="pick")

    def _action_space(self, num_slots: int) -> spaces.Space:
        return spaces.Discrete(num_slots + 1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._order_steps = self._cut_steps = 0
        return super().reset(seed=seed, options=options)

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = super().step(action)
        info["candidates_cut"] = self._cut()
        if terminated or truncated:
            info["cut_binding_frac"] = self._cut_steps / max(self._order_steps, 1)
        return obs, reward, terminated, truncated, info

    def _observe(self) -> dict[str, np.ndarray]:
        decision = self._decision
        if decision is not None:
            self._rows = presort_rows(decision)
            decision = subset(decision, self._rows)
            if decision.kind == DecisionKind.ORDER:
                self._order_steps += 1
                self._cut_steps += self._cut() > 0
        return self._observe_decision(decision)

    def policy_slot(self, policy: Policy) -> tuple[int, np.ndarray]:
        """The action that carries out ``policy``'s answer to the pending decision, and the
        (K + 1,) mask of the actions it rates as good (the shown calls tied with its choice;
        siblings of one fan-out often tie). The action is the slot of the call it picks (STOP's
        K when it stops); a pick past slot K cannot be taken this step and falls to its
        best-scored shown call that fits, so a heuristic driven through the env ranks within
        the table the agent sees. Cloning a heuristic into the slot policy
        (``agents/rl/pretrain.py``) and the tests use it."""
        decision, k = self._decision, self.config.max_candidates
        best = np.zeros(k + 1, dtype=bool)
        if decision is None:  # the episode's last step: any action
            best[0] = True
            return 0, best
        scores = check_scores(decision, policy.scores(decision))
        choice = pick(decision, scores) if decision.kind == DecisionKind.ORDER else None
        if decision.kind == DecisionKind.ORDER and choice is None:
            best[k] = True
            return k, best
        rows = self._rows[:k]
        valid = self._valid_slots()[: len(rows)]
        sign = -1.0 if decision.kind == DecisionKind.EVICT else 1.0  # EVICT: the lowest goes
        shown = np.where(valid, sign * scores[rows], -np.inf)
        best[: len(rows)] = valid & (shown == shown.max())
        slot = np.flatnonzero(rows == choice) if choice is not None else np.zeros(0, dtype=np.int64)
        return (int(slot[0]) if len(slot) else int(np.argmax(shown))), best

    def _cut(self) -> int:
        """Calls that fit now but sit past slot K (cannot be picked this step)."""
        d, k = self._decision, self.config.max_candidates
        if d is None or d.kind != DecisionKind.ORDER or len(d) <= k:
            return 0
        return int(d.mask[self._rows[k:]].sum())

    def _valid_slots(self) -> np.ndarray:
        if self._decision is None:
            return np.zeros(self.config.max_candidates + 1, dtype=bool)
        return pick_valid(self._decision, self._rows, self.config.max_candidates)

    def _choice_scores(self, slot: int) -> np.ndarray:
        return pick_scores(self._pending(), self._rows, slot, self.config.max_candidates)


class PickRetainEnv(PickNextEnv):
    """Two levers at once: pick-next admission with STOP and KV retention across tool pauses.

    ## Description
    PickNext-v0 whose engine also runs ``pin_ttl_rule="policy"``: between admissions, each
    call that finishes with children reusing its prefix asks a RETAIN decision (Retention-v0):
    how long to pin that prefix, one of ``engine.retain_ttls_s``. One policy answers both, so it
    can pin what it means to admit next, and admit what it pinned.

    ## Action space
    ``Discrete(K + 1)``. ORDER: as PickNext-v0 (slot ``K`` is STOP). RETAIN: slot ``i`` takes
    option ``i`` (the first ``len(engine.retain_ttls_s)`` slots; STOP is invalid).

    ## Observation space
    ``Dict``: ``global`` (G + kinds,), ``candidates`` (K, F) and ``options`` (K,
    len(RETAIN_FEATURES)), the table of the other kind zero, and one ``mask`` (K,).

    ## Rewards, episode end
    As Scheduling-v0.

    ## Arguments
    As PickNext-v0; ``engine.admission`` is ``pick`` and ``engine.pin_ttl_rule`` is
    ``policy``; ``env.decisions`` a subset of order, evict, retain (default order, retain);
    ``env.max_candidates`` must be at least the number of options.

    ## Version history
    v0: pick-next ORDER with STOP and RETAIN over a TTL menu, one masked ``Discrete(K + 1)``.
    """

    allowed_decisions = ("order", "evict", "retain")
    default_decisions = ("order", "retain")
    layout = ("candidates", "options")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_config = replace(self.engine_config, pin_ttl_rule="policy")
        options = len(self.engine_config.retain_ttls_s)
        if self.config.max_candidates < options:
            raise ValueError(
                f"env.max_candidates ({self.config.max_candidates}) must be >= the {options} options of "
                "engine.retain_ttls_s: RETAIN decisions put them in the first slots"
            )

    def default_engine(self) -> EngineConfig:
        from servegym.envs.retention_env import retention_engine

        return replace(retention_engine(), admission="pick")

    def default_workload(self) -> Workload:
        from servegym.envs.retention_env import retention_workload

        return retention_workload()
