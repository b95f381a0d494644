"""KV retention across tool pauses as a decision: the RETAIN baselines of the field.

With ``engine.pin_ttl_rule=policy`` the engine asks, when a call finishes and its children will
reuse a prefix of its KV, how long to pin that prefix: one of ``engine.retain_ttls_s`` (0
releases it to the prefix cache now). ``Retaining`` answers that decision by a rule and passes
every other decision to the policy it wraps, so any admission heuristic composes with any
retention rule (``agent=tree_srpt_retain``). The rules are the field's, as TTL choices:

* ``release``: vLLM and SGLang: no pin; the blocks stay cached until LRU evicts them.
* ``tool_mean``: Continuum (Li et al., arXiv 2511.02230): pin for the expected tool pause
  (the running mean of pauses observed after calls of the role, ``tool_mean_s``) plus a
  ``grace_s`` for the queueing after the child is ready; before any pause was observed,
  ``grace_s`` alone.
* ``oracle``: the true tool latency plus ``grace_s`` (privileged; a bound, never exported).
* ``fixed``: ``grace_s`` alone, whatever the role.

Each takes the smallest option at least as long as its TTL (the longest when none is), so on
a fine menu it equals the engine's own ``pin_ttl_rule`` of the same name. ``min_kv_free``
adds KV-pressure awareness (releases when less than that fraction of the cache is allocatable,
the simplest form of Continuum's cost-benefit weighing), which no static engine rule has.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servegym.envs.engine.policy import (
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    RETAIN_FEATURES,
    Decision,
    DecisionKind,
    Policy,
)

RULES = ("release", "tool_mean", "oracle", "fixed")
_TTL = RETAIN_FEATURES.index("ttl_s")
_TOOL_MEAN = RETAIN_FEATURES.index("tool_mean_s")
_TRUE_TOOL = PRIVILEGED_FEATURES.index("true_tool_latency_s")
_KV_FREE = GLOBAL_FEATURES.index("kv_free_frac")


def option_scores(ttls_s: np.ndarray, target_s: float) -> np.ndarray:
    """Scores that make the engine take the smallest option >= ``target_s`` (the longest when
    none is): minus each option's distance, in menu positions, from that one."""
    chosen = min(int(np.searchsorted(ttls_s, target_s - 1e-9, side="left")), len(ttls_s) - 1)
    return -np.abs(np.arange(len(ttls_s)) - chosen).astype(np.float64)


class Retaining:
    """A policy that answers RETAIN decisions by ``rule`` and every other decision by
    ``policy``; it sets ``engine.pin_ttl_rule=policy`` (keeping the wrapped policy's other
    retention hints, e.g. KVFlow's workflow eviction) so that the engine asks.

    ``time_scale_s`` must be the engine's (the options' TTLs and the tool mean arrive over it).
    """

    def __init__(
        self,
        policy: Policy,
        rule: str = "tool_mean",
        grace_s: float = 1.0,
        min_kv_free: float = 0.0,
        time_scale_s: float = 30.0,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not grace_s >= 0 or not 0.0 <= min_kv_free <= 1.0 or not time_scale_s > 0:
            raise ValueError(
                f"need grace_s >= 0, 0 <= min_kv_free <= 1 and time_scale_s > 0, got {grace_s!r}, "
                f"{min_kv_free!r}, {time_scale_s!r}"
            )
        if rule == "fixed" and grace_s == 0:
            raise ValueError("rule=fixed pins for grace_s seconds: give grace_s > 0")
        hints = dict(getattr(policy, "retention", None) or {})
        if hints.get("pin_ttl_rule", "off") not in ("off", "policy"):
            raise ValueError(
                f"{type(policy).__name__} pins by its own rule ({hints['pin_ttl_rule']}); wrap a policy "
                "without one (e.g. program_fcfs rather than program_fcfs_pinning)"
            )
        self.policy = policy
        self.rule, self.grace_s, self.min_kv_free = rule, grace_s, min_kv_free
        self.time_scale_s = time_scale_s
        self.retention: dict[str, Any] = {**hints, "pin_ttl_rule": "policy"}

    def ttl_s(self, decision: Decision) -> float:
        """The TTL this rule wants for the decision's call, in seconds."""
        if self.rule == "release" or decision.global_features[_KV_FREE] < self.min_kv_free:
            return 0.0
        if self.rule == "oracle":
            return float(decision.privileged[0, _TRUE_TOOL]) + self.grace_s
        if self.rule == "tool_mean":
            return float(decision.features[0, _TOOL_MEAN]) * self.time_scale_s + self.grace_s
        return self.grace_s

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind != DecisionKind.RETAIN:
            return self.policy.scores(decision)
        ttls = decision.features[:, _TTL].astype(np.float64) * self.time_scale_s
        return option_scores(ttls, self.ttl_s(decision))


__all__ = ["RULES", "Retaining", "option_scores"]
