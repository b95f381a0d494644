"""Heuristic baselines of the field, each a ``Policy`` over the engine's feature table.

Each docstring names the system it reproduces and how faithfully. A policy answers three kinds of
decision (see ``servegym.envs.engine.policy``): ORDER (higher score admitted first), EVICT
(lowest score preempted) and ROUTE (highest valid score receives the call). Ties keep the
engine's queue order, which is FCFS.

KV retention is the engine's to carry out, so a policy that needs it declares it: an optional
``retention`` mapping of ``EngineConfig`` retention fields (``pin_ttl_rule``, ``pin_ttl_s``,
``prefix_eviction``) that ``Engine.run`` (or a driver calling ``Engine.apply_retention``) adopts
before the run. ``ProgramFCFSPinning`` (Continuum) and ``KVFlow`` work that way; the same
behaviour is reachable for any policy through the engine config. VTC's lift lives in the
engine's counters (``EngineConfig.vtc_lift``); LTR-SJF reads the engine's online output-length
predictor (the ``predicted_output_log`` column).
"""

from __future__ import annotations

import numpy as np

from servegym.envs.engine.policy import (
    PRIVILEGED_FEATURES,
    ROUTE_FEATURES,
    Decision,
    DecisionKind,
    DefaultPolicy,
    RoundRobinRouting,
    column,
    fcfs_scores,
)
from servegym.envs.workloads.job import KNOWN_ROLES, role_id

_WAIT = column("wait_s")
_PROMPT = column("prompt_tokens_log")
_CACHED = column("cached_prefix_frac")
_OUTPUT = column("output_tokens_log")
_TREE_AGE = column("tree_age_s")
_TREE_SERVICE = column("tree_service_log")
_PATH_SERVICE = column("critical_path_service_log")
_VTC = column("tenant_vtc_log")
_PREDICTED = column("predicted_output_log")
_TREE_LEFT = column("tree_predicted_left_log")
_REMAINING = PRIVILEGED_FEATURES.index("true_remaining_output_tokens")


def _then_fcfs(primary: np.ndarray, decision: Decision) -> np.ndarray:
    """Order by ``primary`` (higher first), breaking ties by FCFS: the wait enters scaled
    below the smallest gap between distinct primary values."""
    wait = fcfs_scores(decision)
    gaps = np.diff(np.unique(primary))
    unit = gaps.min() if len(gaps) else 1.0
    return primary + 0.5 * unit * wait / (1.0 + np.abs(wait).max())


class FCFS(DefaultPolicy):
    """vLLM V1's default: call-level first-come-first-served.

    ORDER: oldest ready call first (a preempted call kept its original ready time, so it goes
    back to the front, as vLLM re-queues it). EVICT: the newest running call is preempted.
    ROUTE: round-robin. Faithful to vLLM's ``fcfs`` policy at the call level; it knows nothing
    of trees.

    The base of every heuristic here: a subclass overrides ``call_scores`` (ORDER and EVICT,
    candidates are calls) or ``route_scores`` (ROUTE, candidates are replicas) and inherits
    FCFS's answer to the other kind.
    """

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.route_scores(decision)
        if decision.kind in (DecisionKind.ORDER, DecisionKind.EVICT):
            return self.call_scores(decision)
        # RETAIN, CONFIG: what vLLM does (no pin, a static cap); agents/policies/retention.py and
        # batching.py wrap a heuristic with other answers
        return super().scores(decision)

    def call_scores(self, decision: Decision) -> np.ndarray:
        return fcfs_scores(decision)

    def route_scores(self, decision: Decision) -> np.ndarray:
        return self.router.route(decision)


class SGLangLPM(FCFS):
    """SGLang's ``lpm`` schedule policy (RadixAttention, Zheng et al. NeurIPS'24).

    ORDER: longest cached prefix (in tokens) first, FCFS among equals; above
    ``fcfs_queue_len`` waiting calls SGLang falls back to FCFS, and so does this. EVICT: the
    running call with the fewest generated tokens, the longest prompt among equals, as SGLang's
    ``retract_decode`` sorts. The radix tree's LRU eviction of unreferenced prefixes is the
    engine's block LRU. Simplified: SGLang's in-batch prefix deprioritisation is not modelled.
    """

    def __init__(self, fcfs_queue_len: int = 128) -> None:
        super().__init__()
        self.fcfs_queue_len = fcfs_queue_len

    def call_scores(self, decision: Decision) -> np.ndarray:
        features = decision.features.astype(np.float64)
        if decision.kind == DecisionKind.ORDER:
            if len(decision) > self.fcfs_queue_len:
                return fcfs_scores(decision)
            cached_tokens = np.round(features[:, _CACHED] * np.expm1(features[:, _PROMPT]))
            return _then_fcfs(cached_tokens, decision)
        output = np.round(np.expm1(features[:, _OUTPUT]))
        prompt = features[:, _PROMPT] / (1.0 + features[:, _PROMPT].max())
        return output - 0.5 * prompt  # EVICT: fewest outputs lowest; longer prompt lower among equals


class VTC(FCFS):
    """Virtual Token Counter fair sharing (Sheng et al., OSDI'24), with the tenant as client.

    ORDER: calls of the tenant with the smallest counter first (the engine counts a prompt
    token 1 and a generated token 2, VTC's default weights), FCFS within a tenant. EVICT: the
    call of the most-served tenant. The counter lift for a tenant returning from idle (to the
    smallest counter among backlogged tenants) is applied by the engine (``vtc_lift``).
    Simplified: counters are charged per token as processed, not all at admission.
    """

    def call_scores(self, decision: Decision) -> np.ndarray:
        return _then_fcfs(-decision.features[:, _VTC].astype(np.float64), decision)


class OracleSJF(FCFS):
    """Shortest remaining output first on the *true* lengths: the upper bound that learned
    rankers (Fu et al., NeurIPS'24) approach. Reads a privileged column, so it is a baseline
    only, never an exported policy.

    ORDER: fewest remaining output tokens first; a call that has waited longer than
    ``starvation_s`` jumps ahead (ordered FCFS among such calls). EVICT: the call with the most
    remaining output.
    """

    def __init__(self, starvation_s: float = 30.0, time_scale_s: float = 30.0) -> None:
        super().__init__()
        self.starvation = starvation_s / time_scale_s  # in the table's time units

    def call_scores(self, decision: Decision) -> np.ndarray:
        remaining = decision.privileged[:, _REMAINING].astype(np.float64)
        if decision.kind == DecisionKind.EVICT:
            return -remaining
        score = _then_fcfs(-remaining, decision)
        starved = decision.features[:, _WAIT] > self.starvation
        return np.where(starved, 1e12 + fcfs_scores(decision), score)


class LTRSJF(FCFS):
    """Shortest *predicted* remaining output first (Fu et al., NeurIPS'24, in spirit), with a
    starvation guard. The predictor is the engine's online mean output of finished calls of
    the same (role, tenant), falling back to the role, then to the budget
    (``predicted_output_log``): agent roles have characteristic output lengths, so a per-role
    mean is the cheapest predictor that ranks well; the paper's OPT-125M ranker over the
    prompt text is out of reach of a token-count simulator. Remaining = predicted - generated
    so far, at least one token.

    ORDER: fewest predicted remaining tokens first, FCFS among equals; a call that has waited
    more than ``starvation_factor`` x its predicted service time (remaining / ``tokens_per_s``,
    at least ``min_starvation_s``) is promoted ahead of all others, FCFS among such calls (the
    paper promotes a starved request for a quantum). EVICT: the most predicted remaining.
    """

    def __init__(
        self,
        starvation_factor: float = 10.0,
        tokens_per_s: float = 50.0,
        min_starvation_s: float = 5.0,
        time_scale_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.starvation_factor = starvation_factor
        self.tokens_per_s = tokens_per_s
        self.min_starvation_s = min_starvation_s
        self.time_scale_s = time_scale_s

    def remaining(self, decision: Decision) -> np.ndarray:
        f = decision.features.astype(np.float64)
        return np.maximum(np.expm1(f[:, _PREDICTED]) - np.expm1(f[:, _OUTPUT]), 1.0)

    def call_scores(self, decision: Decision) -> np.ndarray:
        remaining = self.remaining(decision)
        if decision.kind == DecisionKind.EVICT:
            return -remaining
        score = _then_fcfs(-remaining, decision)
        limit_s = np.maximum(self.starvation_factor * remaining / self.tokens_per_s, self.min_starvation_s)
        starved = decision.features[:, _WAIT] * self.time_scale_s > limit_s
        return np.where(starved, 1e12 + fcfs_scores(decision), score)


class AutellixPLAS(FCFS):
    """Autellix's program-level attained service (Luo et al., arXiv 2502.13965).

    Priority is the attained service of the call's whole program (tree), mapped to multi-level
    feedback queues whose bounds grow geometrically (``first_quantum_tokens`` x ``growth``^i,
    ``num_queues`` levels); lower queue first, FCFS within a queue. Anti-starvation: a call
    whose wait over its program's service exceeds ``beta`` goes back to the top queue.
    ``critical_path=True`` gives ATLAS: the service on the heaviest path of finished ancestors
    instead of the whole program's. EVICT: the call in the lowest queue. Service is counted in
    tokens processed rather than seconds; the locality load balancer is ``AutellixRouting``.
    """

    def __init__(
        self,
        critical_path: bool = False,
        first_quantum_tokens: float = 2048.0,
        growth: float = 4.0,
        num_queues: int = 8,
        beta: float = 16.0,
        time_scale_s: float = 30.0,
        tokens_per_s: float = 5000.0,
    ) -> None:
        super().__init__()
        self.service_column = _PATH_SERVICE if critical_path else _TREE_SERVICE
        self.bounds = first_quantum_tokens * growth ** np.arange(num_queues - 1)
        self.beta = beta
        self.wait_to_tokens = time_scale_s * tokens_per_s  # wait in table units -> token-equivalents

    def queue(self, decision: Decision) -> np.ndarray:
        service = np.expm1(decision.features[:, self.service_column].astype(np.float64))
        level = np.searchsorted(self.bounds, service, side="right")
        wait_tokens = decision.features[:, _WAIT] * self.wait_to_tokens
        starved = wait_tokens > self.beta * np.maximum(service, 1.0)
        return np.where(starved, 0, level)

    def call_scores(self, decision: Decision) -> np.ndarray:
        return _then_fcfs(-self.queue(decision).astype(np.float64), decision)


class ProgramFCFS(FCFS):
    """Program-level FCFS, the ordering Continuum pairs with its KV pinning (Li et al., arXiv
    2511.02230): calls of the earliest-arrived tree first, FCFS within a tree. EVICT: the
    call of the youngest tree. The TTL pinning itself needs KV retention in the engine."""

    def call_scores(self, decision: Decision) -> np.ndarray:
        return _then_fcfs(decision.features[:, _TREE_AGE].astype(np.float64), decision)


class ProgramFCFSPinning(ProgramFCFS):
    """Continuum (Li et al., arXiv 2511.02230): program-level FCFS plus TTL pinning. When a
    call finishes into a tool call, the prefix its children reuse stays pinned in KV for a TTL
    (then joins the prefix cache); a child admitted meanwhile hits it.

    The TTL is the expected tool pause: the running mean of the pauses observed after calls
    of the same role (``ttl="tool_mean"``, the engine learns it as tools return) plus
    ``grace_s`` for the queueing after the child becomes ready; ``ttl="oracle"`` uses the true
    tool latency (an upper bound: Continuum predicts it per tool). Simplified: Continuum picks
    TTL from the tool-duration distribution by weighing the expected saving against the memory
    held; here it is the mean (or the truth) plus a grace, and pins yield to running calls
    under memory pressure (oldest first) instead of by cost.
    """

    def __init__(self, ttl: str = "tool_mean", grace_s: float = 1.0) -> None:
        super().__init__()
        if ttl not in ("tool_mean", "oracle"):
            raise ValueError(f"ttl must be 'tool_mean' or 'oracle', got {ttl!r}")
        self.retention = {"pin_ttl_rule": ttl, "pin_ttl_s": grace_s}


class PredictedTreeSRPT(FCFS):
    """Tree-level shortest remaining processing time on *predicted* work: calls of the tree
    with the least predicted output left over all its unfinished calls (``tree_predicted_left_log``:
    the engine's online per-(role, tenant) mean output, minus what each call generated, summed
    over the tree's ready, running, blocked and tool-paused calls) first, FCFS among equals.
    EVICT: a call of the tree with the most predicted work left.

    The non-clairvoyant twin of the ``TreeSRPT`` bound (``agents/bounds/``), which reads the
    true lengths. It needs schema v3's tree-state columns and nothing private, so it runs from
    an exported policy's inputs and in the vLLM adapter (there on the requests vLLM has seen).
    Agent trees make it strong: a tree's remaining call count is known from its structure and
    role means predict call lengths well. Like any SRPT it can starve a large tree under
    sustained overload; report p99 next to the mean.
    """

    def call_scores(self, decision: Decision) -> np.ndarray:
        left = decision.features[:, _TREE_LEFT].astype(np.float64)
        if decision.kind == DecisionKind.EVICT:
            return -left
        return _then_fcfs(-left, decision)


class KVFlow(FCFS):
    """KVFlow's workflow-aware eviction (Pan et al., NeurIPS'25): when the prefix cache must
    evict, the blocks whose next use is furthest in the tree's step graph go first, LRU among
    equals (``prefix_eviction="workflow"``; see ``servegym.envs.engine.block_manager``). Levels,
    from the tree's known structure when a call's blocks are freed: prefix a pending child
    repeats or a preempted call's own KV (next step), a role's system prompt (shared across
    trees), then everything else (no known reuse), and empty blocks before any of them.
    Simplified: levels are set when a block is freed, not refreshed every step as KVFlow's
    radix priorities are; steps beyond the next are not distinguished; no CPU prefetch.
    ORDER/EVICT/ROUTE: vLLM's FCFS, so the comparison with FCFS isolates eviction."""

    retention = {"prefix_eviction": "workflow"}


_R_FREE = ROUTE_FEATURES.index("kv_free_frac")
_R_RUNNING = ROUTE_FEATURES.index("running_log")
_R_QUEUED = ROUTE_FEATURES.index("queued_prefill_tokens_log")
_R_CACHED = ROUTE_FEATURES.index("cached_prefix_frac")
_R_TREE = ROUTE_FEATURES.index("is_tree_replica")
_R_PARAMS = ROUTE_FEATURES.index("model_params_log10")
_R_PROMPT = ROUTE_FEATURES.index("call_prompt_tokens_log")
_R_ROLE = ROUTE_FEATURES.index("call_role_id")


class LlumnixRouting(FCFS):
    """Llumnix's dispatch (Sun et al., OSDI'24): send a call to the freest replica, freeness =
    (free KV - head-of-line demand) / (batch size + 1). KV and demand are fractions of the
    replica's cache; the demand is the prompt tokens queued there over ``capacity_tokens``.
    Migration and autoscaling are not modelled. ORDER/EVICT: FCFS."""

    routing_only = True  # ORDER/EVICT are FCFS's: one replica leaves it nothing to decide

    def __init__(self, capacity_tokens: float = 4.5e5) -> None:
        super().__init__()
        self.capacity_tokens = capacity_tokens

    def route_scores(self, decision: Decision) -> np.ndarray:
        f = decision.features.astype(np.float64)
        demand = np.expm1(f[:, _R_QUEUED]) / self.capacity_tokens
        return (f[:, _R_FREE] - demand) / (np.expm1(f[:, _R_RUNNING]) + 1.0)


class AutellixRouting(FCFS):
    """Autellix's locality-aware load balancer: calls with at most ``short_prompt_tokens``
    prompt tokens go to the least-loaded replica (fewest running calls, then most free KV);
    longer ones stay on a replica their program already used (the one holding most of their
    prefix), falling back to least-loaded."""

    routing_only = True  # ORDER/EVICT are FCFS's: one replica leaves it nothing to decide

    def __init__(self, short_prompt_tokens: int = 2048) -> None:
        super().__init__()
        self.short = np.log1p(short_prompt_tokens)

    def route_scores(self, decision: Decision) -> np.ndarray:
        f = decision.features.astype(np.float64)
        least_loaded = -f[:, _R_RUNNING] + 0.01 * f[:, _R_FREE]
        if f[0, _R_PROMPT] <= self.short:
            return least_loaded
        return 100.0 * f[:, _R_TREE] + 10.0 * f[:, _R_CACHED] + least_loaded


class ThresholdModelRouting(FCFS):
    """RouteLLM-style model-size routing (Ong et al., arXiv 2406.18665): the large model only
    when the call's estimated need passes ``threshold``, else the small one; among replicas of
    the chosen size, Llumnix-style freeness. The estimate here is a stand-in for RouteLLM's
    learned win-rate: the prompt length (longer, harder calls to the large model), so
    ``threshold`` is in prompt tokens. ``role_min_params`` (the cluster's
    ``role_min_params``, as the operator configured it) keeps a role off the models below its
    minimum whenever a large enough one may take it: where the cluster lets such a call run
    below at an output penalty (``below_min_output_factor``), this router pays it only when it
    must."""

    routing_only = True  # ORDER/EVICT are FCFS's: one replica leaves it nothing to decide

    def __init__(
        self, threshold_tokens: float = 4096.0, role_min_params: dict[str, float] | None = None
    ) -> None:
        super().__init__()
        self.threshold = np.log1p(threshold_tokens)
        self.freeness = LlumnixRouting()
        # role id -> log10 of its minimum parameters (the ROUTE rows' model_params_log10 scale)
        self.min_params_log10 = np.zeros(len(KNOWN_ROLES))
        for role, params in (role_min_params or {}).items():
            self.min_params_log10[role_id(role)] = np.log10(params)

    def route_scores(self, decision: Decision) -> np.ndarray:
        f = decision.features.astype(np.float64)
        params = f[:, _R_PARAMS]
        want_large = f[0, _R_PROMPT] >= self.threshold
        size_score = params if want_large else -params
        free = self.freeness.scores(decision)
        below = params < self.min_params_log10[int(f[0, _R_ROLE])] - 1e-6
        return 100.0 * size_score + np.clip(free, -1.0, 1.0) - 1e4 * below


class RandomPolicy:
    """Uniform random scores: a floor for comparisons and a fuzzer for engine invariants."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def scores(self, decision: Decision) -> np.ndarray:
        return self.rng.random(len(decision))


__all__ = [
    "FCFS",
    "KVFlow",
    "LTRSJF",
    "ProgramFCFSPinning",
    "VTC",
    "AutellixPLAS",
    "AutellixRouting",
    "LlumnixRouting",
    "OracleSJF",
    "ProgramFCFS",
    "RandomPolicy",
    "RoundRobinRouting",
    "SGLangLPM",
    "ThresholdModelRouting",
]
