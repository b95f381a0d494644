"""Token budgets with a cost: a call stopped by its ``max_tokens`` before its natural end spawns a
continuation (``EngineConfig.continue_truncated``), and with ``budget_rule=policy`` a BUDGET
decision sets each call's ``max_tokens``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.policy import BUDGET_FEATURES, PRIVILEGED_FEATURES, Decision, DecisionKind
from servegym.envs.workloads.generators import ReactChain
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TINY

ENGINE = EngineConfig(
    profile="tiny_cpu", block_size=4, num_gpu_blocks=400, max_num_seqs=4, continue_truncated=True
)
NETWORK_S, TOOL_S = 0.01, 0.5


def _two_step_job(output: int = 100, budget: int = 40) -> Job:
    """A call whose output passes its budget, its tool, and a child that reads the whole output."""
    return Job(
        "j0",
        0.0,
        (
            Call(
                0,
                "planner",
                (Text("sys/planner", 12), Text("j0/q", 9)),
                output,
                budget,
                tool_latency_s=TOOL_S,
            ),
            Call(1, "worker", (Text("sys/worker", 8), Output(0), Text("j0/tool", 5)), 7, 64, parents=(0,)),
        ),
    )


def _run(engine_config: EngineConfig, policy: object = None, jobs: list[Job] | None = None) -> Engine:
    engine = Engine(
        FixedJobs(jobs or [_two_step_job()]), ClusterConfig(network_delay_s=NETWORK_S), engine_config
    )
    engine.run(policy or FCFS())
    engine.check_invariants()
    assert_all_terminal(engine)
    return engine


def test_a_truncated_call_is_continued_until_its_output_is_whole() -> None:
    engine = _run(ENGINE)
    calls, n = engine.calls, engine.calls.size
    assert n == 4  # the call, two continuations (40 + 40 + 20 tokens), the child
    head, first, second, child = 0, 2, 3, 1
    assert calls.continues[:n].tolist() == [-1, -1, head, first]
    assert calls.num_output[[head, first, second]].tolist() == [40, 40, 20]
    assert calls.prompt_tokens[first] == 21 + 40 + ENGINE.continuation_prompt_tokens
    assert calls.prompt_tokens[second] == calls.prompt_tokens[first] + 40 + ENGINE.continuation_prompt_tokens
    assert calls.prompt_tokens[child] == 8 + 100 + 5  # the whole output, not the budget's 40
    # each continuation is ready one hop after the stop; the tool runs after the last one
    np.testing.assert_allclose(calls.ready_s[first], calls.finish_s[head] + NETWORK_S)
    np.testing.assert_allclose(calls.ready_s[second], calls.finish_s[first] + NETWORK_S)
    np.testing.assert_allclose(calls.ready_s[child], calls.finish_s[second] + TOOL_S + NETWORK_S)
    metrics = engine.metrics()
    assert metrics.continuations == 2 and metrics.budget_truncations == 2
    assert metrics.calls_completed == metrics.calls_total == 4 and metrics.jobs_completed == 1
    assert engine.stats.observed_tool_pause_s(int(calls.role[head])) == (TOOL_S, 1)
    # the continuation reuses the stopped call's KV: its prompt starts with that call's blocks
    assert calls.cached_prompt_tokens[first] >= 56  # 14 full blocks of prompt + output


def test_without_continuations_the_output_is_cut_as_before() -> None:
    engine = _run(dataclasses.replace(ENGINE, continue_truncated=False))
    calls = engine.calls
    assert calls.size == 2 and calls.num_output[0] == 40 and calls.prompt_tokens[1] == 8 + 40 + 5
    assert engine.metrics().continuations == 0 and engine.metrics().budget_truncations == 1


def test_a_continuation_too_large_for_the_cache_fails_its_tree_cleanly() -> None:
    """The continuation's prompt (the call's prompt and output plus the instruction) plus its
    budget exceeds the KV cache: it is rejected with a reason and its tree is cut, no hang."""
    engine = _run(dataclasses.replace(ENGINE, num_gpu_blocks=30), jobs=[_two_step_job(output=200, budget=90)])
    metrics = engine.metrics()
    assert metrics.jobs_failed == 1 and metrics.calls_rejected == 2  # the continuation and the child
    assert "exceeds the KV cache" in metrics.first_rejection and not metrics.stalled


class Budgets:
    """Answers BUDGET decisions with the option at ``index`` (FCFS otherwise); records them. At
    0.5x the call makes 20 tokens and two continuations at the workload budget (40) the rest."""

    def __init__(self, index: int) -> None:
        self.index, self.fcfs, self.seen = index, FCFS(), []

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind != DecisionKind.BUDGET:
            return self.fcfs.scores(decision)
        self.seen.append(decision)
        return -np.abs(np.arange(len(decision)) - self.index).astype(np.float64)


POLICY = dataclasses.replace(ENGINE, budget_rule="policy", budget_multipliers=[0.5, 1.0, 3.0])


@pytest.mark.parametrize(("index", "calls", "continuations"), [(0, 4, 2), (1, 4, 2), (2, 2, 0)])
def test_a_budget_decision_sets_max_tokens(index: int, calls: int, continuations: int) -> None:
    policy = Budgets(index)
    engine = _run(POLICY, policy)
    assert len(policy.seen) == 2  # one per workload call; continuations ask none
    first = policy.seen[0]
    assert first.call == 0 and first.mask.all()
    column = BUDGET_FEATURES.index
    np.testing.assert_allclose(first.features[:, column("multiplier")], [0.5, 1.0, 3.0])
    assert first.features[:, column("is_workload")].tolist() == [0, 1, 0]
    np.testing.assert_allclose(
        np.expm1(first.features[:, column("max_tokens_log")]), [20, 40, 120], rtol=1e-5
    )
    assert (first.privileged[:, PRIVILEGED_FEATURES.index("true_remaining_output_tokens")] == 100).all()
    assert engine.calls.size == calls and engine.metrics().continuations == continuations
    assert engine.calls.max_tokens[0] == [20, 40, 120][index]
    assert engine.calls.prompt_tokens[1] == 8 + 100 + 5  # whatever the budget, the child reads it all


def test_budgets_the_cache_cannot_hold_are_masked() -> None:
    """prompt 21 + 3 x 40 = 141 tokens > 30 blocks of 4: the 3x option is masked; a policy
    preferring it gets the best allowed one."""
    policy = Budgets(2)
    engine = _run(dataclasses.replace(POLICY, num_gpu_blocks=30), policy)
    assert policy.seen[0].mask.tolist() == [True, True, False]
    assert engine.calls.max_tokens[0] == 40


def test_the_default_policy_keeps_the_workload_budget() -> None:
    engine, plain = _run(POLICY), _run(ENGINE)
    n = plain.calls.size
    assert engine.calls.size == n
    np.testing.assert_array_equal(engine.calls.finish_s[:n], plain.calls.finish_s[:n])


def test_budget_config_is_checked() -> None:
    with pytest.raises(ValueError, match="continue_truncated"):
        EngineConfig(budget_rule="policy")
    with pytest.raises(ValueError, match="includes 1"):
        EngineConfig(continue_truncated=True, budget_rule="policy", budget_multipliers=[0.5, 2.0])
    with pytest.raises(ValueError, match="budget_rule"):
        EngineConfig(budget_rule="tight")
    with pytest.raises(ValueError, match="continuation_prompt_tokens"):
        EngineConfig(continuation_prompt_tokens=0)


def test_continued_react_trees_drain_with_every_call_once() -> None:
    """ReAct trees on a tight cache with tight random budgets, recompute preemption and TTL pins:
    every call (continuations included) terminal and counted once, the pool whole, the same
    trajectory twice."""
    config = dataclasses.replace(
        POLICY, num_gpu_blocks=200, budget_multipliers=[0.25, 1.0], pin_ttl_rule="tool_mean"
    )
    workload = Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=4.0, num_jobs=12)

    def run() -> Engine:
        engine = Engine(workload.build(3), ClusterConfig(), config)
        engine.run(Budgets(0))
        engine.check_invariants()
        assert_all_terminal(engine)
        return engine

    a, b = run(), run()
    assert a.metrics().continuations > 0 and a.metrics().jobs_completed == 12
    np.testing.assert_array_equal(a.calls.finish_s[: a.calls.size], b.calls.finish_s[: b.calls.size])


def test_a_streaming_source_gives_the_list_results_with_continuations() -> None:
    """A streamed trace drops a finished tree's structure, continuations included, and still
    gives the list source's trajectory."""
    from servegym.envs.workloads.source import StreamedJobs

    config = dataclasses.replace(POLICY, budget_multipliers=[0.25, 1.0])
    jobs = Workload(generator=ReactChain(turns_mean=3.0, **TINY), arrival_rate=6.0, num_jobs=10).build(4).jobs

    def run(source) -> Engine:
        engine = Engine(source, ClusterConfig(), config)
        engine.run(Budgets(0))
        assert_all_terminal(engine)
        return engine

    listed, streamed = run(FixedJobs(jobs)), run(StreamedJobs(lambda: iter(jobs)))
    assert listed.metrics().continuations > 0
    assert repr(listed.metrics().as_dict()) == repr(streamed.metrics().as_dict())
    assert not streamed.trees.continued and not streamed.trees.extra_specs  # dropped with their trees


def _mean_running(engine: Engine) -> float:
    replica = engine.replicas[0]
    return replica.running_call_iterations / replica.num_iterations


def test_a_reservation_makes_a_budget_cost_kv_now() -> None:
    """SGLang-style admission (reserve_output_frac): running calls hold back KV for their
    unspent budgets, so fewer run at once, and a tighter budget lets more in."""
    workload = Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=40.0, num_jobs=16)
    config = dataclasses.replace(POLICY, num_gpu_blocks=260, budget_multipliers=[0.25, 1.0, 4.0])

    def run(reserve: float, index: int) -> Engine:
        engine = Engine(
            workload.build(2), ClusterConfig(), dataclasses.replace(config, reserve_output_frac=reserve)
        )
        engine.run(Budgets(index))
        engine.check_invariants()
        assert_all_terminal(engine)
        assert engine.metrics().jobs_completed == 16
        return engine

    free, reserved = run(0.0, 2), run(1.0, 2)
    assert _mean_running(reserved) < _mean_running(free)
    assert _mean_running(run(1.0, 0)) > _mean_running(reserved)  # tight budgets reserve less
    with pytest.raises(ValueError, match="reserve_output_frac"):
        EngineConfig(reserve_output_frac=1.5)
