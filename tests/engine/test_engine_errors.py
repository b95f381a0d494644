"""What the engine does with work it cannot do and answers it cannot use: a call too large for
every KV cache or asking for a model nobody serves is rejected with a reason (its tree cut, the
rest of the run unharmed); bad configs and bad policy answers fail loudly with the field or
shape named; a run that cannot progress ends with a diagnostic instead of hanging."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.policy import Decision, DecisionKind
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs

PROFILE = "tiny_cpu"
BLOCK_SIZE = 4
NUM_BLOCKS = 32  # 128 tokens of KV per replica


def call(call_id: int, prompt: tuple, output_tokens: int = 8, parents: tuple = (), **kw) -> Call:
    return Call(call_id, "worker", prompt, output_tokens, max(output_tokens, 8), parents=parents, **kw)


def small_job(job_id: str, arrival_s: float = 0.0) -> Job:
    """Root -> child -> grandchild, each well within the cache."""
    return Job(
        job_id,
        arrival_s,
        (
            call(0, (Text(f"{job_id}/q", 20),)),
            call(1, (Text(f"{job_id}/q", 20), Output(0)), parents=(0,)),
            call(2, (Text(f"{job_id}/q", 20), Output(0), Output(1)), parents=(1,)),
        ),
    )


def engine_for(jobs: list[Job], cluster: ClusterConfig | None = None, **config) -> Engine:
    settings = dict(profile=PROFILE, block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS)
    return Engine(FixedJobs(jobs), cluster, EngineConfig(**{**settings, **config}))


def calls_of(engine: Engine, job_id: str) -> range:
    index = next(i for i, job in enumerate(engine.jobs) if job.job_id == job_id)
    base = engine.job_table.first_call[index]
    return range(base, base + len(engine.jobs[index].calls))


def assert_pool_whole(engine: Engine) -> None:
    for replica in engine.replicas:
        bm = replica.blocks
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks and bm.ref_count == [0] * bm.num_blocks
        assert bm.num_host_used_blocks == 0


# ---------------------------------------------------------------- rejection at admission
def test_call_larger_than_every_cache_is_rejected_with_its_tree() -> None:
    """The child's prompt (20 + the root's 8 outputs + 100) plus its 8-token budget needs 136
    tokens of KV; the cache holds 128. The child and grandchild are rejected, the root ran."""
    big = Job(
        "big",
        0.0,
        (
            call(0, (Text("big/q", 20),)),
            call(1, (Text("big/q", 20), Output(0), Text("big/doc", 100)), parents=(0,)),
            call(2, (Text("big/q", 20), Output(1)), parents=(1,)),
        ),
    )
    jobs = [small_job("a"), big, small_job("b", 0.001)]
    engine = engine_for(jobs)
    metrics = engine.run(FCFS())

    assert_all_terminal(engine)
    assert not metrics.stalled
    assert metrics.jobs_failed == 1 and metrics.jobs_completed == 2
    assert metrics.jobs_completed + metrics.jobs_failed == len(jobs)
    [(job_id, call_index, reason)] = engine.rejections
    assert (job_id, call_index) == ("big", 1)
    assert "128" in reason and "prompt 128" in reason and "max_tokens 8" in reason, reason
    assert "exceeds the KV cache (128 tokens)" in reason, reason
    root, child, grandchild = calls_of(engine, "big")
    states = engine.calls.state
    assert states[root] == CallState.FINISHED
    assert states[child] == states[grandchild] == CallState.REJECTED
    assert engine.calls.num_output[child] == engine.calls.num_output[grandchild] == 0
    assert np.isnan(engine.calls.first_token_s[[child, grandchild]]).all()
    for other in ("a", "b"):
        assert all(states[c] == CallState.FINISHED for c in calls_of(engine, other))
    assert metrics.calls_rejected == 2 and metrics.calls_completed == 7
    assert_pool_whole(engine)


def test_oversized_root_rejects_the_whole_tree_before_anything_runs() -> None:
    huge = Job("huge", 0.0, (call(0, (Text("huge/q", 200),)), call(1, (Output(0),), parents=(0,))))
    engine = engine_for([huge, small_job("a")])
    metrics = engine.run(FCFS())
    assert_all_terminal(engine)
    [(job_id, call_index, reason)] = engine.rejections
    assert (job_id, call_index) == ("huge", 0) and "prompt 200" in reason and "128 tokens" in reason
    assert metrics.jobs_failed == 1 and metrics.jobs_completed == 1 and metrics.calls_rejected == 2
    assert engine.calls.num_computed[list(calls_of(engine, "huge"))].sum() == 0
    assert_pool_whole(engine)


def test_rejection_reason_names_the_largest_cache_among_replicas_serving_the_model() -> None:
    """One KV budget, two models: the tiny model's 4-token blocks are 4 KiB, the 1B model's
    128 KiB, so the same 5 MiB holds 5120 tokens on one replica and 160 on the other."""
    jobs = [
        Job("any", 0.0, (call(0, (Text("any/q", 6000),)),)),
        Job("1b", 0.0, (call(0, (Text("1b/q", 200),), model="Llama-3.2-1B"),)),
        Job("fits", 0.0, (call(0, (Text("fits/q", 200),)),)),
    ]
    cluster = ClusterConfig(replicas=[PROFILE, "llama1b_h100"])
    engine = Engine(
        FixedJobs(jobs), cluster, EngineConfig(block_size=BLOCK_SIZE, kv_budget_bytes=40 * 131072.0)
    )
    assert [r.capacity_tokens for r in engine.replicas] == [5120, 160]
    metrics = engine.run(FCFS())
    reasons = {job_id: reason for job_id, _, reason in engine.rejections}
    assert set(reasons) == {"any", "1b"}
    assert "prompt 6000" in reasons["any"] and "(5120 tokens)" in reasons["any"]
    assert "prompt 200" in reasons["1b"] and "(160 tokens)" in reasons["1b"]
    assert metrics.jobs_failed == 2 and metrics.jobs_completed == 1 and not metrics.stalled
    assert engine.calls.replica[list(calls_of(engine, "fits"))].tolist() == [0]


def test_call_for_an_unserved_model_is_rejected() -> None:
    lost = Job("lost", 0.0, (call(0, (Text("lost/q", 20),), model="gpt-unknown"),))
    engine = engine_for([small_job("a"), lost])
    metrics = engine.run(FCFS())
    assert_all_terminal(engine)
    [(job_id, _, reason)] = engine.rejections
    assert job_id == "lost" and "gpt-unknown" in reason and "no replica serves" in reason
    assert metrics.jobs_failed == 1 and metrics.jobs_completed == 1
    assert_pool_whole(engine)


def test_call_for_a_served_model_runs_only_where_it_is_served() -> None:
    jobs = [Job(f"j{i}", 0.0, (call(0, (Text(f"j{i}/q", 20),), model="Llama-3.2-1B"),)) for i in range(4)]
    engine = engine_for(jobs, ClusterConfig(replicas=[PROFILE, "llama1b_h100", "llama1b_h100"]))
    metrics = engine.run(FCFS())
    assert metrics.jobs_completed == 4 and engine.rejections == []
    assert set(engine.calls.replica[: engine.calls.size].tolist()) <= {1, 2}


def test_route_never_picks_a_masked_replica() -> None:
    """Regression: with every eligible score -inf, argmax over np.where(eligible, scores, -inf)
    picked index 0 even when replica 0 was masked (it does not serve the call's model)."""

    class MinusInfinity:
        def scores(self, decision: Decision) -> np.ndarray:
            return np.full(len(decision), -np.inf)

    jobs = [Job("j", 0.0, (call(0, (Text("j/q", 20),), model="Llama-3.2-1B"),))]
    engine = engine_for(jobs, ClusterConfig(replicas=[PROFILE, "llama1b_h100", "llama1b_h100"]))
    engine.run(MinusInfinity())
    assert engine.calls.replica[0] in (1, 2)


# ---------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: EngineConfig(block_size=0), "engine.block_size"),
        (lambda: EngineConfig(block_size=16.0), "engine.block_size"),
        (lambda: EngineConfig(max_num_batched_tokens=0), "engine.max_num_batched_tokens"),
        (lambda: EngineConfig(max_num_seqs=-3), "engine.max_num_seqs"),
        (lambda: EngineConfig(long_prefill_token_threshold=-1), "engine.long_prefill_token_threshold"),
        (lambda: EngineConfig(kv_budget_bytes=0.0), "engine.kv_budget_bytes"),
        (lambda: EngineConfig(kv_budget_bytes=math.nan), "engine.kv_budget_bytes"),
        (lambda: EngineConfig(num_gpu_blocks=0), "engine.num_gpu_blocks"),
        (lambda: EngineConfig(swap_space_bytes=-1.0), "engine.swap_space_bytes"),
        (lambda: EngineConfig(preemption_mode="lru"), "engine.preemption_mode"),
        (lambda: ClusterConfig(num_replicas=0), "cluster.num_replicas"),
        (lambda: ClusterConfig(network_delay_s=-0.5), "cluster.network_delay_s"),
        # mistyped or non-finite values must fail here too, not later with a TypeError or a NaN
        # clock (regression: they used to pass __post_init__)
        (lambda: EngineConfig(num_gpu_blocks=2.5), "engine.num_gpu_blocks"),
        (lambda: EngineConfig(long_prefill_token_threshold=2.5), "engine.long_prefill_token_threshold"),
        (lambda: EngineConfig(swap_space_bytes=math.nan), "engine.swap_space_bytes"),
        (lambda: EngineConfig(kv_budget_bytes=math.inf), "engine.kv_budget_bytes"),
        (lambda: ClusterConfig(num_replicas=1.5), "cluster.num_replicas"),
        (lambda: ClusterConfig(network_delay_s=math.nan), "cluster.network_delay_s"),
        (lambda: ClusterConfig(network_delay_s=math.inf), "cluster.network_delay_s"),
        (lambda: EngineConfig(block_size=True), "engine.block_size"),
        (lambda: ClusterConfig(replicas=[""]), "cluster.replicas"),
    ],
)
def test_bad_config_values_name_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_bad_engine_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="time_scale_s"):
        Engine(FixedJobs([small_job("a")]), time_scale_s=0.0)
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        Engine(FixedJobs([small_job("a")]), engine=EngineConfig(profile="nope"))


# ---------------------------------------------------------------- bad policy answers
def order_decision() -> tuple[Engine, Decision]:
    engine = engine_for([small_job(f"j{i}") for i in range(3)])
    decision = engine.next_decision()
    assert decision is not None and decision.kind == DecisionKind.ORDER and len(decision) == 3
    return engine, decision


@pytest.mark.parametrize(
    "scores, message",
    [
        (np.zeros(2), "3 candidates but the policy returned 2 scores"),
        (np.zeros(4), "3 candidates but the policy returned 4 scores"),
        (np.array([0.0, np.nan, 1.0]), "NaN"),
    ],
)
def test_bad_scores_raise_and_leave_the_decision_pending(scores: np.ndarray, message: str) -> None:
    engine, decision = order_decision()
    with pytest.raises(ValueError, match=message):
        engine.decide(scores)
    assert engine.next_decision() is decision  # still pending: a good answer goes through
    engine.decide(np.zeros(3))
    metrics = engine.run(FCFS())
    assert metrics.jobs_completed == 3


def test_decide_without_a_pending_decision_raises() -> None:
    engine = engine_for([small_job("a"), small_job("b")])
    with pytest.raises(RuntimeError, match="no pending decision"):
        engine.decide(np.zeros(1))
    decision = engine.next_decision()
    assert decision is not None
    engine.decide(np.zeros(len(decision)))
    with pytest.raises(RuntimeError, match="no pending decision"):
        engine.decide(np.zeros(len(decision)))  # answered already
    engine.run(FCFS())
    assert engine.done and engine.next_decision() is None and engine.next_decision() is None
    with pytest.raises(RuntimeError, match="no pending decision"):
        engine.decide(np.zeros(1))


# ---------------------------------------------------------------- stalls end the run
@pytest.mark.parametrize("left_free", [0, 2, 6])
def test_run_that_cannot_progress_ends_with_a_diagnostic(time_limit, left_free: int) -> None:
    """Blocks held from outside the engine never come back. With 0 or 2 free nothing is ever
    admitted; with 6 a root is admitted, outgrows them, preempts itself and cannot return. The
    run must end (not spin) with a stall that names the replica and its blocks."""
    engine = engine_for([small_job("a"), small_job("b")])
    engine.replicas[0].blocks.allocate(NUM_BLOCKS - left_free)
    with time_limit(20):
        metrics = engine.run(FCFS())
    assert metrics.stalled and engine.stall
    reason = metrics.stall_reason
    assert "unfinished jobs" in reason and "needs" in reason, reason
    assert f"replica 0: 2 waiting, 0 running, {left_free}/{NUM_BLOCKS} blocks free" in reason, reason
    assert metrics.jobs_completed == 0 and (metrics.preemptions > 0) == (left_free > 5)
    assert engine.done and engine.next_decision() is None
    engine.replicas[0].blocks.check_invariants()


def test_stall_on_one_replica_ends_a_cluster_run(time_limit) -> None:
    engine = engine_for([small_job(f"j{i}") for i in range(4)], ClusterConfig(num_replicas=2))
    engine.replicas[1].blocks.allocate(NUM_BLOCKS)
    with time_limit(20):
        metrics = engine.run(FCFS())
    assert metrics.stalled and "replica 1:" in metrics.stall_reason
    assert f"0/{NUM_BLOCKS} blocks free" in metrics.stall_reason
    engine.replicas[0].blocks.check_invariants()


@pytest.mark.parametrize("router", ["LlumnixRouting", "AutellixRouting", "ThresholdModelRouting"])
def test_a_routing_only_policy_is_refused_in_a_one_replica_cluster(router: str) -> None:
    from servegym.agents.policies import heuristics
    from servegym.envs.engine.config import ClusterConfig
    from servegym.envs.workloads.generators import MapReduce
    from servegym.envs.workloads.workload import Workload

    workload = Workload(generator=MapReduce(fan_out=2), num_jobs=2)
    one = Engine(workload.build(0), cluster=ClusterConfig(num_replicas=1))
    with pytest.raises(ValueError, match="only decides where calls go, and this cluster has one replica"):
        one.run(getattr(heuristics, router)())
    two = Engine(workload.build(0), cluster=ClusterConfig(num_replicas=2))
    assert two.run(getattr(heuristics, router)()).complete
