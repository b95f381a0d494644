"""The batching cap as a decision: CONFIG baselines.

With ``engine.config_every_s > 0`` every replica asks, that often, for its running-call cap and
token budget among ``engine.config_max_num_seqs`` x ``engine.config_max_num_batched_tokens``.
``Batching`` answers CONFIG by a rule and passes every other decision to the policy it wraps, so
any admission (and retention) heuristic composes with any batching rule. The rules:

* ``keep``: a static engine (vLLM, SGLang: the cap is a launch flag), what every heuristic does.
* ``fixed``: the option nearest ``max_num_seqs`` / ``max_num_batched_tokens``: a static cap set
  through the decision, equal to launching the engine with it (tested), so a tuned static cap and
  a dynamic one compare in one run.
* ``kv_fit``: the largest cap whose batch of today's calls fits the cache: the largest option
  with ``kv_demand_frac`` (cap x mean blocks held per running call / blocks) at most
  ``kv_target``, the smallest cap when none does; at the largest budget. Where contexts grow
  (ReAct turns, debate rounds) a full cache preempts and recomputes, and a lower cap avoids it;
  when calls are short the cap opens again. No serving engine does this; it is the dynamic rule a
  learned CONFIG policy has to beat.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servegym.envs.engine.policy import CONFIG_FEATURES, Decision, DecisionKind, Policy, keep_config_scores

RULES = ("keep", "fixed", "kv_fit")
_SEQS = CONFIG_FEATURES.index("max_num_seqs_log")
_TOKENS = CONFIG_FEATURES.index("max_num_batched_tokens_log")
_KV_DEMAND = CONFIG_FEATURES.index("kv_demand_frac")


def option_pairs(decision: Decision) -> np.ndarray:
    """(options, 2) the (max_num_seqs, max_num_batched_tokens) of each CONFIG option."""
    logs = decision.features[:, [_SEQS, _TOKENS]].astype(np.float64)
    return np.rint(np.expm1(logs))


class Batching:
    """A policy that answers CONFIG decisions by ``rule`` and every other decision by ``policy``
    (keeping its retention hints). ``max_num_seqs`` and ``max_num_batched_tokens`` are the
    ``fixed`` rule's pair; ``kv_target`` the ``kv_fit`` rule's bound on ``kv_demand_frac``."""

    def __init__(
        self,
        policy: Policy,
        rule: str = "kv_fit",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        kv_target: float = 1.0,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or not kv_target > 0:
            raise ValueError(
                f"need max_num_seqs >= 1, max_num_batched_tokens >= 1 and kv_target > 0, got "
                f"{max_num_seqs!r}, {max_num_batched_tokens!r}, {kv_target!r}"
            )
        self.policy = policy
        self.rule = rule
        self.pair = (float(max_num_seqs), float(max_num_batched_tokens))
        self.kv_target = kv_target
        hints = getattr(policy, "retention", None)
        if hints:
            self.retention: dict[str, Any] = dict(hints)

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind != DecisionKind.CONFIG:
            return self.policy.scores(decision)
        if self.rule == "keep":
            return keep_config_scores(decision)
        pairs = option_pairs(decision)
        if self.rule == "fixed":  # nearest in log space, cap first
            distance = np.abs(np.log(pairs) - np.log(self.pair))
            return -(distance[:, 0] * 1e3 + distance[:, 1])
        fits = decision.features[:, _KV_DEMAND] <= self.kv_target
        seqs = np.where(fits, pairs[:, 0], -pairs[:, 0])  # the largest cap that fits, else the smallest
        return seqs * 1e6 + pairs[:, 1]


__all__ = ["RULES", "Batching", "option_pairs"]
