"""Role token budgets as a decision: the BUDGET baselines.

With ``engine.budget_rule=policy`` (and ``engine.continue_truncated``, which it needs) the
engine asks, as each workload call joins a replica's queue, for its ``max_tokens``: one of
``engine.budget_multipliers`` times the budget its workload gives it. A call stopped by its
budget before its natural end is continued by a new call (its prompt and output again, plus an
instruction) that makes the rest, so a tight budget trades KV held and queueing now against
an extra step later. ``Budgeting`` answers that decision by a rule and passes every other
decision to the policy it wraps, so any admission heuristic composes with any budget rule
(``agent=tree_srpt_budget_*``). The rules:

* ``workload``: the role defaults, as every serving engine runs them (multiplier 1).
* ``fixed``: ``multiplier`` times the workload budget for every call (the smallest option at
  least that large).
* ``predicted``: the smallest budget at least ``multiplier`` times the call's predicted output
  (the engine's online per-role mean, ``predicted_output_log``): a per-role percentile when
  outputs are spread (2x the mean is about the 90th percentile of a lognormal with sigma 0.6);
  the workload budget until an output of the role was observed.
* ``oracle``: the smallest budget that holds the call's true output (privileged; a bound on
  avoiding continuations, never exported).

``tight_below_kv_free`` adds KV pressure: while less than that fraction of the replica's cache
is allocatable, every call gets the smallest option, so long generations yield their blocks
early (their continuations re-read the cached prefix).
"""

from __future__ import annotations

import numpy as np

from servegym.agents.policies.retention import option_scores
from servegym.envs.engine.policy import (
    BUDGET_FEATURES,
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    Decision,
    DecisionKind,
    Policy,
)

RULES = ("workload", "fixed", "predicted", "oracle")
_MULTIPLIER = BUDGET_FEATURES.index("multiplier")
_OVER_PREDICTED = BUDGET_FEATURES.index("over_predicted")
_SEEN = BUDGET_FEATURES.index("outputs_seen_log")
_MAX_TOKENS = BUDGET_FEATURES.index("max_tokens_log")
_TRUE_OUTPUT = PRIVILEGED_FEATURES.index("true_remaining_output_tokens")
_KV_FREE = GLOBAL_FEATURES.index("kv_free_frac")


class Budgeting:
    """A policy that answers BUDGET decisions by ``rule`` and every other decision by ``policy``."""

    def __init__(
        self,
        policy: Policy,
        rule: str = "workload",
        multiplier: float = 1.0,
        tight_below_kv_free: float = 0.0,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if not multiplier > 0 or not 0.0 <= tight_below_kv_free <= 1.0:
            raise ValueError(
                f"need multiplier > 0 and 0 <= tight_below_kv_free <= 1, got {multiplier!r}, "
                f"{tight_below_kv_free!r}"
            )
        self.policy = policy
        self.rule, self.multiplier, self.tight_below_kv_free = rule, multiplier, tight_below_kv_free
        self.retention = getattr(policy, "retention", None)  # the wrapped policy's hints stand

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind != DecisionKind.BUDGET:
            return self.policy.scores(decision)
        features = decision.features.astype(np.float64)
        multipliers = features[:, _MULTIPLIER]
        if decision.global_features[_KV_FREE] < self.tight_below_kv_free:
            return option_scores(multipliers, 0.0)  # the smallest
        if self.rule == "fixed":
            return option_scores(multipliers, self.multiplier)
        if self.rule == "predicted" and features[0, _SEEN] > 0:
            return option_scores(features[:, _OVER_PREDICTED], self.multiplier)
        if self.rule == "oracle":
            budgets = np.expm1(features[:, _MAX_TOKENS])
            return option_scores(budgets, float(decision.privileged[0, _TRUE_OUTPUT]) - 0.5)
        return option_scores(multipliers, 1.0)  # workload (and predicted before any output was seen)


__all__ = ["RULES", "Budgeting"]
