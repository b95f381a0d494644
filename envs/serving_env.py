"""Gymnasium environments over the engine: the agent makes the engine's scheduling choices.

``EngineEnv`` holds what every env shares (the episode over one engine run, the decisions it
hands the agent, the reward, the episode end); each env only says how it shows a decision and
how it reads an action. ``SchedulingEnv`` and ``ServingEnv`` live here; ``EvictionEnv`` and
``RoutingEnv`` (one choice among masked slots, ``MaskedChoiceEnv``) in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import jain_index
from servegym.envs.engine.policy import (
    Decision,
    DecisionKind,
    DefaultPolicy,
    Policy,
)
from servegym.envs.observation import (
    FEATURE_BOUND,
    GLOBAL_SIZE,
    LAYOUTS,
    TABLE_FEATURES,
    score_action,
    slot_scores,
)
from servegym.envs.render import RENDER_MODES, render_image, render_text
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload

KIND_NAMES = {
    "order": DecisionKind.ORDER,
    "evict": DecisionKind.EVICT,
    "route": DecisionKind.ROUTE,
    "retain": DecisionKind.RETAIN,
    "config": DecisionKind.CONFIG,
    "budget": DecisionKind.BUDGET,
}


@dataclass
class EnvConfig:
    """What the agent controls and how it sees it."""

    decisions: tuple[str, ...] | None = None
    """Decision kinds the agent answers; the others go to ``fallback`` (FCFS admission, newest
    call evicted, round-robin routing). None: the env's own set (Scheduling-v0: order, evict;
    Eviction-v0: evict; Routing-v0: route; Serving-v0: all three)."""
    max_candidates: int = 32
    """K: candidate slots in the observation; extra candidates rank after the agent's, FCFS."""
    time_scale_s: float = 30.0
    """Normaliser of times in the features and of the reward."""
    horizon_s: float | None = None
    """Truncate the episode once virtual time passes this (None: run until the workload drains)."""
    slo_s: float | None = None
    """A tree's completion-time objective (seconds after its arrival) for ``slo_miss_penalty``."""
    slo_miss_penalty: float = 0.0
    """Reward term: minus this, once per tree, when the tree's age passes ``slo_s`` unfinished."""
    fairness_weight: float = 0.0
    """Reward term: minus this x (1 - Jain's index of the tenants' attained service) per
    ``time_scale_s`` of virtual time: a steady cost of serving tenants unequally."""

    def __post_init__(self) -> None:
        if self.decisions is not None:
            self.decisions = tuple(self.decisions)
            unknown = [d for d in self.decisions if d not in KIND_NAMES]
            if not self.decisions or unknown:
                raise ValueError(
                    f"env.decisions must be a non-empty subset of {list(KIND_NAMES)} or None, "
                    f"got {self.decisions}"
                )
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ValueError(f"env.max_candidates must be an int >= 1, got {self.max_candidates!r}")
        if not self.time_scale_s > 0:
            raise ValueError(f"env.time_scale_s must be > 0, got {self.time_scale_s!r}")
        if self.horizon_s is not None and not self.horizon_s > 0:
            raise ValueError(f"env.horizon_s must be > 0 or None, got {self.horizon_s!r}")
        if self.slo_s is not None and not self.slo_s > 0:
            raise ValueError(f"env.slo_s must be > 0 or None, got {self.slo_s!r}")
        if not self.slo_miss_penalty >= 0 or not self.fairness_weight >= 0:
            raise ValueError("env.slo_miss_penalty and env.fairness_weight must be >= 0")
        if self.slo_miss_penalty > 0 and self.slo_s is None:
            raise ValueError("env.slo_miss_penalty needs env.slo_s (the objective a tree misses)")


def default_workload() -> Workload:
    """Map-reduce trees arriving faster than one replica serves them, so queues form and the
    admission order matters (the README's main-job table compares the orders here)."""
    return Workload(generator=MapReduce(), arrival_rate=8.0, num_jobs=60)


def default_engine() -> EngineConfig:
    return EngineConfig(max_num_seqs=32)


class EngineEnv(gym.Env):
    """One episode = one engine run of a workload; each step answers one decision the agent owns.

    Subclasses set the decision kinds they may own (``allowed_decisions``, defaulting to
    ``default_decisions``), the slot tables they show (``layout``; the observation space and
    ``_observe`` follow from it, over ``_num_slots()`` rows), their action space and
    ``_answer`` (action -> engine scores).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}
    allowed_decisions: ClassVar[tuple[str, ...]] = ("order", "evict", "route")
    default_decisions: ClassVar[tuple[str, ...]] = ("order", "evict", "route")
    layout: ClassVar[tuple[str, ...]] = ("candidates",)

    def __init__(
        self,
        workload: Workload | None = None,
        cluster: ClusterConfig | None = None,
        engine: EngineConfig | None = None,
        env: EnvConfig | None = None,
        fallback: Policy | None = None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be None or one of {list(RENDER_MODES)}, got {render_mode!r}")
        self.render_mode = render_mode
        self.workload = workload or self.default_workload()
        self.cluster = cluster or self.default_cluster()
        self.engine_config = engine or self.default_engine()
        config = env or EnvConfig()
        decisions = config.decisions
        if decisions is None:
            decisions = self.default_decisions
            config = replace(config, decisions=decisions)
        if not set(decisions) <= set(self.allowed_decisions):
            raise ValueError(
                f"{type(self).__name__} answers {list(self.allowed_decisions)} decisions, but "
                f"env.decisions={decisions}; use servegym/Serving-v0 for all three kinds, "
                "or leave env.decisions None for this env's own"
            )
        self.config = config
        self._fallback = fallback
        self.fallback = fallback or DefaultPolicy()
        self._agent_kinds = {KIND_NAMES[name] for name in decisions}
        self.num_replicas = len(self.cluster.profiles(self.engine_config.profile))
        self.engine: Engine | None = None
        self._decision: Decision | None = None
        self._tree_seconds = 0.0
        self._ended = True
        self.workload_seed: int | None = None  # the workload of the current episode
        self.num_slots = self._num_slots()
        self.observation_space = spaces.Dict(
            {
                "global": feature_box((GLOBAL_SIZE,)),
                **{key: feature_box((self.num_slots, len(TABLE_FEATURES[key]))) for key in self.layout},
                "mask": mask_box(self.num_slots),
            }
        )
        self.action_space = self._action_space(self.num_slots)

    # ------------------------------------------------------------------ defaults
    def default_workload(self) -> Workload:
        return default_workload()

    def default_cluster(self) -> ClusterConfig:
        return ClusterConfig()

    def default_engine(self) -> EngineConfig:
        return default_engine()

    def build_engine(self, workload_seed: int) -> Engine:
        """A fresh engine on workload ``workload_seed``, configured as this env's episodes are
        (``reset`` uses it; so does a wrapper that runs a reference policy on the same input)."""
        return Engine(
            self.workload.build(workload_seed),
            cluster=self.cluster,
            engine=self.engine_config,
            time_scale_s=self.config.time_scale_s,
        )

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """``options={"workload_seed": s}`` replays workload ``s`` (copies of an env given the
        same one see the same trees and arrivals: the input a variance-reduced baseline needs);
        otherwise each episode draws its workload from the env's seeded generator."""
        super().reset(seed=seed)
        workload_seed = int(self.np_random.integers(2**31 - 1))  # drawn either way: same stream
        unknown = set(options or ()) - {"workload_seed"}
        if unknown:
            raise ValueError(f"reset options {sorted(unknown)} unknown; the only option is workload_seed")
        if options and options.get("workload_seed") is not None:
            workload_seed = int(options["workload_seed"])
        self.workload_seed = workload_seed
        self.engine = self.build_engine(workload_seed)
        if self._fallback is None:  # a fresh round-robin each episode: same seed, same episode
            self.fallback = DefaultPolicy()
        self._tree_seconds = 0.0
        self._last_now_s = 0.0
        self._slo_counted = np.zeros(0, dtype=bool)
        self._ended = False
        self._decision = self._advance()
        return self._observe(), {"decision": self._kind_name()}

    def step(self, action: Any):
        if self.engine is None:
            raise RuntimeError("call reset() before step()")
        if self._ended:
            raise RuntimeError("the episode has ended; call reset()")
        info: dict[str, Any] = {}
        if self._decision is not None:
            self.engine.decide(self._answer(action, info))
            self._decision = self._advance()
        # else: the workload drained before the agent's first decision; this step only ends it
        reward = self._reward()
        terminated = self._decision is None
        horizon = self.config.horizon_s
        truncated = not terminated and horizon is not None and self.engine.now_s >= horizon
        info["decision"] = self._kind_name()
        if terminated or truncated:
            self._ended = True
            info["metrics"] = self.engine.metrics().as_dict()
        return self._observe(), float(reward), terminated, truncated, info

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: a text view (queue, running calls, KV use per replica, trees in flight);
        ``"rgb_array"``: an (H, W, 3) uint8 image (KV blocks by state, trees by colour); None
        without a render mode. Drawn by ``servegym.envs.render``."""
        if self.render_mode == "ansi":
            return render_text(self.engine, self._decision)
        if self.render_mode == "rgb_array":
            return render_image(self.engine, self._decision)
        return None

    def _reward(self) -> float:
        """The one place the reward is defined: minus the tree-seconds elapsed since the last
        step over ``time_scale_s`` (so the return is minus the total tree completion time),
        minus ``slo_miss_penalty`` per tree whose age passed ``slo_s`` unfinished since the last
        step, minus ``fairness_weight`` x (1 - Jain's index of the tenants' attained service)
        x the elapsed time over ``time_scale_s``. The last two are 0 by default."""
        engine, cfg = self._running(), self.config
        reward = -(engine.tree_seconds - self._tree_seconds) / cfg.time_scale_s
        self._tree_seconds = engine.tree_seconds
        if cfg.slo_miss_penalty:
            n = len(engine.jobs)
            counted = np.zeros(n, dtype=bool)
            counted[: len(self._slo_counted)] = self._slo_counted
            finish = engine.job_table.finish_s[:n]
            end = np.where(np.isnan(finish), engine.now_s, finish)
            assert cfg.slo_s is not None  # EnvConfig refuses a penalty without slo_s
            missed = (end - engine.job_table.arrival_s[:n] > cfg.slo_s) & ~counted
            reward -= cfg.slo_miss_penalty * int(missed.sum())
            self._slo_counted = counted | missed
        if cfg.fairness_weight and len(engine.stats.tenant_service) > 1:
            unfairness = 1.0 - jain_index(engine.stats.tenant_service)
            reward -= cfg.fairness_weight * unfairness * (engine.now_s - self._last_now_s) / cfg.time_scale_s
        self._last_now_s = engine.now_s
        return float(reward)

    # ------------------------------------------------------------------ for subclasses
    def _answer(self, action: Any, info: dict[str, Any]) -> np.ndarray:
        """The engine's scores for the pending decision (one per candidate); may note in ``info``."""
        raise NotImplementedError

    def _num_slots(self) -> int:
        return self.config.max_candidates

    def _action_space(self, num_slots: int) -> spaces.Space:
        """Score actions (``ClipAction`` semantics); the discrete envs pick one slot instead."""
        return spaces.Box(-1.0, 1.0, (num_slots,), np.float32)

    def _observe(self) -> dict[str, np.ndarray]:
        return self._observe_decision(self._decision)

    def _observe_decision(self, decision: Decision | None) -> dict[str, np.ndarray]:
        return LAYOUTS[self.layout](decision, self.num_slots)

    # ------------------------------------------------------------------ internals
    def _running(self) -> Engine:
        """The episode's engine (``reset`` builds it)."""
        if self.engine is None:
            raise RuntimeError("call reset() before step()")
        return self.engine

    def _pending(self) -> Decision:
        """The decision being answered: ``step`` calls ``_answer`` only while one is pending."""
        if self._decision is None:
            raise RuntimeError("no decision is pending: the episode has ended; call reset()")
        return self._decision

    def _advance(self) -> Decision | None:
        """Run the engine to the next decision the agent owns, answering others by fallback."""
        engine = self._running()
        while (decision := engine.next_decision()) is not None:
            if decision.kind in self._agent_kinds:
                return decision
            engine.decide(self.fallback.scores(decision))
        return None

    def _kind_name(self) -> str | None:
        return None if self._decision is None else self._decision.kind.name.lower()


def feature_box(shape: tuple[int, ...]) -> spaces.Box:
    return spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, shape, np.float32)


def mask_box(size: int) -> spaces.Box:
    return spaces.Box(0.0, 1.0, (size,), np.float32)


class SchedulingEnv(EngineEnv):
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
    ``Dict``: ``global`` (G + kinds,): the engine's global features (``GLOBAL_FEATURES``) and a
    one-hot of the decision kind (ORDER, EVICT, ROUTE); ``candidates`` (K, F): one row of
    ``CANDIDATE_FEATURES`` per candidate, zero-padded; ``mask`` (K,): 1 for real candidates.
    Features are scaled by construction (see ``servegym.envs.engine.policy``); no privileged
    column is included.

    ## Rewards
    Minus the number of unfinished trees times the virtual time elapsed since the previous
    step, over ``time_scale_s``: the episode return is minus the total tree completion time
    (in units of ``time_scale_s``). Optional SLO-miss and fairness terms (``EnvConfig``;
    defined once, in ``EngineEnv._reward``).

    ## Episode end
    Terminated when the workload drains; truncated once virtual time passes ``horizon_s``.
    ``info`` carries the engine's run metrics at the end, and the decision kind every step.
    If the workload drains before the agent's first decision, ``reset`` returns an all-zero
    observation (``info["decision"]`` None) and the first step, whatever its action, ends the
    episode with the whole return.

    ## Arguments
    ``workload`` (a ``Workload``), ``cluster``, ``engine`` (their configs), ``env`` (an
    ``EnvConfig``; ``decisions`` a subset of order, evict), ``fallback`` (a Policy for the
    decisions the agent does not make; default ``DefaultPolicy``, fresh each episode).

    ## Version history
    v0: ORDER and EVICT as scores.
    """

    allowed_decisions = ("order", "evict")
    default_decisions = ("order", "evict")

    def _answer(self, action: Any, info: dict[str, Any]) -> np.ndarray:
        return slot_scores(self._pending(), action, self.config.max_candidates, self.fallback)


class ServingEnv(EngineEnv):
    """All three choices of a cluster serving agent trees, made by one policy.

    ## Description
    Each step is one choice: which waiting calls a replica admits first (ORDER), which running
    call it preempts when KV blocks run out (EVICT), or which replica receives a call that just
    became ready (ROUTE). The kind is in the observation; one policy answers all of them.

    ## Action space
    ``Box(-1, 1, (K,))``: one score per slot. ORDER and EVICT as in Scheduling-v0 (slots are
    candidate calls); ROUTE: slots ``0 .. R-1`` are the replicas, the highest-scored eligible
    replica receives the call (ineligible replicas and slots ``R ..`` are ignored). Values
    outside [-1, 1] are clipped; NaN is an error.

    ## Observation space
    ``Dict`` with one mask over K slots for both tables, so a slot's row is read the same way
    whatever the kind: ``global`` (G + kinds,): global features and the kind one-hot (a ROUTE
    decision fills only the cluster-wide columns ``time_s`` and ``live_trees_log``);
    ``candidates`` (K, F): ``CANDIDATE_FEATURES`` rows of an ORDER/EVICT decision, zero for
    ROUTE; ``replicas`` (K, len(ROUTE_FEATURES)): for ROUTE, replica r's row in slot r (rows
    ``R ..`` zero), zero for ORDER/EVICT; ``mask`` (K,): real candidates, or eligible replicas.

    ## Rewards
    As Scheduling-v0: minus unfinished trees times elapsed virtual time over ``time_scale_s``;
    the return is minus the total tree completion time.

    ## Episode end
    As Scheduling-v0.

    ## Arguments
    As Scheduling-v0; ``env.decisions`` may be any subset of order, evict, route (default all),
    and ``env.max_candidates`` must be at least the number of replicas. The defaults are
    Routing-v0's heterogeneous cluster (two 8B replicas, one 70B) with Eviction-v0's workload
    and 400-block caches, so every kind of decision arises often: per episode (random
    actions, seeds 0-2) 320 ROUTE, 340-630 ORDER and 43-70 EVICT decisions.

    ## Version history
    v0: ORDER, EVICT and ROUTE as scores over K slots.
    """

    layout = ("candidates", "replicas")

    def _num_slots(self) -> int:
        k = self.config.max_candidates
        if k < self.num_replicas:
            raise ValueError(
                f"env.max_candidates ({k}) must be >= the number of replicas ({self.num_replicas}): "
                "ROUTE decisions put the replicas in the first slots"
            )
        return k

    def default_workload(self) -> Workload:
        from servegym.envs.eviction_env import eviction_workload

        return eviction_workload()

    def default_cluster(self) -> ClusterConfig:
        from servegym.envs.routing_env import routing_cluster

        return routing_cluster()

    def default_engine(self) -> EngineConfig:
        from servegym.envs.eviction_env import eviction_engine

        return eviction_engine()

    def _answer(self, action: Any, info: dict[str, Any]) -> np.ndarray:
        d = self._pending()
        if d.kind == DecisionKind.ROUTE:  # the engine ignores ineligible replicas
            return score_action(action, self.config.max_candidates)[: len(d)].copy()
        return slot_scores(d, action, self.config.max_candidates, self.fallback)


class MaskedChoiceEnv(EngineEnv):
    """Base of the envs whose action picks one slot (``Discrete``) among the valid ones.

    ``action_masks()`` returns the (n,) bool validity mask (sb3-contrib's MaskablePPO calls
    it). An invalid action (a masked slot, or an integer out of range) is answered by the
    fallback policy's choice and flagged ``info["invalid_action"] = True``; it never raises.
    An action that is not one integer (an array of several values, a fractional or NaN
    float) is a caller's bug and raises ``ValueError``.
    """

    def _action_space(self, num_slots: int) -> spaces.Space:
        return spaces.Discrete(num_slots)

    def action_masks(self) -> np.ndarray:
        """(n,) bool: the slots a valid action may pick. With no pending decision (the episode
        drained before any), slot 0 alone, so a masked distribution stays well defined."""
        mask = self._valid_slots()
        if not mask.any():
            mask[0] = True
        return mask

    def _valid_slots(self) -> np.ndarray:
        raise NotImplementedError

    def _choice_scores(self, slot: int) -> np.ndarray:
        """Engine scores that make the engine pick ``slot``."""
        raise NotImplementedError

    def _answer(self, action: Any, info: dict[str, Any]) -> np.ndarray:
        slot = _slot(action)
        valid = self._valid_slots()
        if 0 <= slot < len(valid) and valid[slot]:
            info["invalid_action"] = False
            return self._choice_scores(slot)
        info["invalid_action"] = True
        return self.fallback.scores(self._pending())

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = super().step(action)
        info.setdefault("invalid_action", False)
        return obs, reward, terminated, truncated, info


class RowChoiceEnv(MaskedChoiceEnv):
    """A masked choice whose slots are the decision's rows one to one (Routing-v0's replicas,
    Retention-v0's and Config-v0's options; a decision may have fewer rows than slots): valid
    slots are the decision's mask, and the choice scores 1."""

    def _valid_slots(self) -> np.ndarray:
        valid = np.zeros(self.num_slots, dtype=bool)
        if self._decision is not None:
            valid[: len(self._decision)] = self._decision.mask
        return valid

    def _choice_scores(self, slot: int) -> np.ndarray:
        assert self._decision is not None
        scores = np.zeros(len(self._decision))
        scores[slot] = 1.0
        return scores

    def policy_slot(self, policy: Policy) -> tuple[int, np.ndarray]:
        """The action that carries out ``policy``'s answer to the pending decision (its
        highest-scored valid row), and the mask of the rows tied with it: what cloning a
        heuristic into the slot policy (``agents/rl/pretrain.py``) learns from."""
        best = np.zeros(self.num_slots, dtype=bool)
        if self._decision is None:  # the episode's last step: any action
            best[0] = True
            return 0, best
        scores = np.full(self.num_slots, -np.inf)
        answer = np.asarray(policy.scores(self._decision), dtype=np.float64)[: self.num_slots]
        scores[: len(answer)] = answer
        valid = self._valid_slots()
        shown = np.where(valid, scores, -np.inf)
        best[:] = valid & (shown == shown.max())
        return int(np.argmax(shown)), best


def _slot(action: Any) -> int:
    value = np.asarray(action)
    if value.size != 1:
        raise ValueError(f"action must be one integer slot, got an array of shape {value.shape}")
    value = value.reshape(()).item()
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"action must be an integer slot, got {value!r}")
    if not isinstance(value, int | float):
        raise ValueError(f"action must be an integer slot, got {value!r}")
    return int(value)
