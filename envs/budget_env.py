"""Budget-v0: each call's max_tokens, with continuations paying for outputs a budget cuts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from servegym.envs.engine.config import EngineConfig
from servegym.envs.retention_env import retention_workload
from servegym.envs.serving_env import RowChoiceEnv
from servegym.envs.workloads.workload import Workload


def budget_engine() -> EngineConfig:
    """Retention-v0's replica (one llama8b_h100, 12,000 KV blocks, 16 running calls, 2048-token
    budget) with truncated outputs continued and every call's budget a BUDGET decision."""
    return EngineConfig(
        num_gpu_blocks=12000,
        max_num_seqs=16,
        max_num_batched_tokens=2048,
        continue_truncated=True,
        budget_rule="policy",
    )


class BudgetEnv(RowChoiceEnv):
    """Token budgets of the calls of agent trees in a paged-KV inference engine.

    ## Description
    The engine runs with ``budget_rule="policy"`` and ``continue_truncated``. Each step is one
    BUDGET decision: a call of a tree joins the replica's queue, and the agent picks its
    ``max_tokens`` among ``engine.budget_multipliers`` (default 0.25, 0.5, 1, 2) times the
    budget its workload gives it. A call that reaches its budget before its natural end stops,
    frees its slot and KV, and a continuation call (its prompt and output again, plus
    ``engine.continuation_prompt_tokens`` of instruction) makes the rest one network hop later:
    a tight budget lets other calls in sooner at the price of an extra step that re-reads the
    context (a prefix-cache hit while it stays cached). The budget also enters the engine's
    output predictor until a call of the role finished. Admission (ORDER), preemption (EVICT),
    routing, retention and CONFIG are made by ``fallback``.

    ## Action space
    ``Discrete(O)``: the option, O = ``len(engine.budget_multipliers)``. Valid options
    (``action_masks()``) are those whose prompt plus budget the replica's KV cache holds; an
    invalid or out-of-range integer is answered by the fallback (the workload budget) and
    flagged ``info["invalid_action"] = True``; an action that is not one integer raises
    ``ValueError``.

    ## Observation space
    ``Dict``: ``global`` (G + kinds,): the replica's global features and the kind one-hot;
    ``budgets`` (O, len(BUDGET_FEATURES)): one row per option (its multiplier and max_tokens, its
    ratio to the call's predicted output, the blocks the call would hold; the call's prompt,
    predicted output, role, depth, children and its tree's predicted work left); ``mask`` (O,).

    ## Rewards
    As Scheduling-v0: the return is minus the total tree completion time over ``time_scale_s``.

    ## Episode end
    As Scheduling-v0.

    ## Arguments
    As Scheduling-v0; ``engine.budget_rule`` is set to ``policy`` (and ``continue_truncated`` to
    True) when it is not; ``env.decisions`` must be None or ``("budget",)``; ``max_candidates``
    is unused (the menu fixes O). Pass the admission heuristic to compare with as ``fallback``
    (Hydra: ``env.fallback``).

    ## Version history
    v0: BUDGET as a masked discrete choice over multipliers of the workload's budget.
    """

    allowed_decisions = ("budget",)
    default_decisions = ("budget",)
    layout = ("budgets",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.engine_config.budget_rule != "policy":
            self.engine_config = replace(self.engine_config, continue_truncated=True, budget_rule="policy")

    def _num_slots(self) -> int:
        return len(self.engine_config.budget_multipliers)

    def default_workload(self) -> Workload:
        return retention_workload()

    def default_engine(self) -> EngineConfig:
        return budget_engine()
