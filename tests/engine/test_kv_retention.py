"""KV retained after a call finishes: Continuum's TTL pins, KVFlow's workflow-aware eviction
order, and VTC's counter lift, each on a hand-built scenario."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS, KVFlow, ProgramFCFSPinning
from servegym.envs.engine.block_manager import BlockManager, NextUse
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs

PROFILE = "tiny_cpu"


# ---------------------------------------------------------------- block manager
def _cache_two_calls(bm: BlockManager, parent_level: NextUse, other_level: NextUse) -> tuple[list, list]:
    """A parent's 3 blocks freed first (older), then another call's 3 (more recent)."""
    parent, other = bm.allocate(3), bm.allocate(3)
    bm.register(parent, [11, 12, 13])
    bm.register(other, [21, 22, 23])
    bm.free(parent, [parent_level] * 3)
    bm.free(other, [other_level] * 3)
    return parent, other


@pytest.mark.parametrize("order", ["lru", "workflow"])
def test_workflow_evictor_keeps_the_blocks_of_a_parent_whose_child_is_due_next(order: str) -> None:
    bm = BlockManager(8, 4, prefix_eviction=order)
    parent, other = _cache_two_calls(bm, NextUse.NEXT, NextUse.NEVER)
    taken = bm.allocate(5)  # the 2 empty blocks, then 3 evictions
    bm.check_invariants()
    kept = bm.match_prefix([11, 12, 13], 3)
    if order == "lru":  # least recently freed goes first: the parent's, though its child is next
        assert kept == [] and set(parent) <= set(taken)
    else:  # furthest next use goes first: the other call's, the parent's prefix survives
        assert kept == parent and set(other) <= set(taken)


def test_workflow_evictor_takes_empty_blocks_first_and_lru_within_a_level() -> None:
    bm = BlockManager(8, 4, prefix_eviction="workflow")
    parent, other = _cache_two_calls(bm, NextUse.NEVER, NextUse.NEVER)
    assert bm.allocate(2) == [6, 7]  # empty before any cached block
    # same level: least recently freed first; a call frees tail first
    assert bm.allocate(3) == parent[::-1]
    bm.check_invariants()


def test_switching_the_eviction_order_keeps_the_free_blocks() -> None:
    bm = BlockManager(8, 4)
    _cache_two_calls(bm, NextUse.NEXT, NextUse.NEVER)
    before = sorted(bm.free_queue)
    bm.set_eviction_order("workflow")
    assert sorted(bm.free_queue) == before
    bm.check_invariants()
    assert bm.allocate(2) == [6, 7]  # empties still first


# ---------------------------------------------------------------- engine: pins and eviction
def _tool_pause_jobs(tool_latency_s: float = 3.0) -> list[Job]:
    """A ReAct step whose child repeats its prompt and output after a tool pause; meanwhile two
    unrelated calls pass through a 30-block cache, the second one evicting under LRU."""
    parent = Call(
        0, "tool_user", (Text("sys", 40),), output_tokens=8, max_tokens=8, tool_latency_s=tool_latency_s
    )
    child = Call(
        1,
        "tool_user",
        (Text("sys", 40), Output(0), Text("tool", 8)),
        output_tokens=4,
        max_tokens=4,
        parents=(0,),
    )
    other = lambda key: (Call(0, "worker", (Text(key, 60),), output_tokens=4, max_tokens=4),)  # noqa: E731
    return [Job("a", 0.0, (parent, child)), Job("b", 0.5, other("b")), Job("c", 1.0, other("c"))]


def _run(policy=None, jobs: list[Job] | None = None, **config) -> Engine:
    engine = Engine(
        FixedJobs(jobs or _tool_pause_jobs()),
        engine=EngineConfig(profile=PROFILE, block_size=4, num_gpu_blocks=30, **config),
    )
    engine.run(policy or FCFS())
    assert_all_terminal(engine)
    for replica in engine.replicas:  # the pool is whole: every pin released, nothing owned
        bm = replica.blocks
        bm.check_invariants()
        assert not replica.pins and not replica.pins.waiters and not replica.pins.of_child
        assert bm.ref_count == [0] * bm.num_blocks and bm.num_free_blocks == bm.num_blocks
    return engine


CHILD = 1  # engine call id of the child (the parent is 0)
PARENT_BLOCKS_HIT = 11 * 4  # the parent's full blocks: (40 + 8 - 1) // 4


def test_without_retention_the_child_misses_under_memory_pressure() -> None:
    engine = _run()
    assert engine.calls.cached_prompt_tokens[CHILD] == 0


def test_a_pinned_parent_s_child_hits_its_blocks_and_admission_releases_the_pin() -> None:
    engine = _run(pin_ttl_rule="fixed", pin_ttl_s=10.0)
    assert engine.calls.cached_prompt_tokens[CHILD] == PARENT_BLOCKS_HIT
    replica = engine.replicas[0]
    assert replica.pins.num_pinned == 1 and replica.pins.num_dropped == 0
    # released when the child was admitted (~3 s), long before the 10 s TTL: the clock never
    # advanced to the stale expiry event
    assert engine.now_s < 5.0


def test_ttl_expiry_releases_the_pin_to_the_prefix_cache() -> None:
    # expires at ~0.2 s, before the others arrive: LRU then evicts it as if never pinned
    engine = _run(pin_ttl_rule="fixed", pin_ttl_s=0.2)
    assert engine.replicas[0].pins.num_pinned == 1
    assert engine.calls.cached_prompt_tokens[CHILD] == 0


def test_pin_ttl_from_the_true_tool_latency_covers_the_pause() -> None:
    engine = _run(ProgramFCFSPinning(ttl="oracle", grace_s=0.5))
    assert engine.config.pin_ttl_rule == "oracle"
    assert engine.calls.cached_prompt_tokens[CHILD] == PARENT_BLOCKS_HIT


def test_tool_mean_ttl_learns_the_pause_from_returned_tools() -> None:
    # the first tree teaches the mean (3 s); the second tree's pin then spans its pause
    first = _tool_pause_jobs()
    second = [Job(f"{j.job_id}2", j.arrival_s + 10.0, j.calls) for j in _tool_pause_jobs()]
    engine = _run(ProgramFCFSPinning(ttl="tool_mean", grace_s=0.2), jobs=first + second)
    assert engine.stats.tool_stats  # observed pauses, per role
    child_2 = engine.job_table.first_call[3] + 1
    assert engine.calls.cached_prompt_tokens[CHILD] == 0  # nothing learned yet: pinned 0.2 s only
    assert engine.calls.cached_prompt_tokens[child_2] == PARENT_BLOCKS_HIT


def test_workflow_eviction_keeps_the_parent_for_its_child() -> None:
    engine = _run(KVFlow())
    assert engine.config.prefix_eviction == "workflow"
    assert engine.calls.cached_prompt_tokens[CHILD] == PARENT_BLOCKS_HIT


def test_a_pin_yields_when_nothing_else_could_run() -> None:
    # the second job needs 25 of 30 blocks: with 11 pinned it cannot fit, nothing runs, so
    # the pin is dropped instead of idling the replica until the TTL
    jobs = _tool_pause_jobs()
    big = Call(0, "worker", (Text("big", 96),), output_tokens=4, max_tokens=4)
    engine = _run(jobs=[jobs[0], Job("b", 0.5, (big,))], pin_ttl_rule="fixed", pin_ttl_s=10.0)
    replica = engine.replicas[0]
    assert replica.pins.num_dropped == 1
    assert engine.calls.finish_s[2] < 1.0  # ran at once, not after the TTL


def test_retention_hints_are_validated_and_only_before_the_run() -> None:
    engine = Engine(FixedJobs(_tool_pause_jobs()), engine=EngineConfig(profile=PROFILE))

    class Bad:
        retention = {"max_num_seqs": 3}

    with pytest.raises(ValueError, match="unknown"):
        engine.apply_retention(Bad())
    with pytest.raises(ValueError, match="prefix_eviction"):
        EngineConfig(prefix_eviction="lfu")
    with pytest.raises(ValueError, match="pin_ttl_s > 0"):
        EngineConfig(pin_ttl_rule="fixed")
    engine.next_decision()
    with pytest.raises(RuntimeError, match="before the first"):
        engine.apply_retention(KVFlow())


# ---------------------------------------------------------------- VTC lift
def _tenant_jobs() -> list[Job]:
    """Tenant a works alone for a while; tenant b arrives once a has banked service."""
    long_call = lambda key: (Call(0, "worker", (Text(key, 64),), output_tokens=200, max_tokens=200),)  # noqa: E731
    short = (Call(0, "worker", (Text("q", 16),), output_tokens=4, max_tokens=4),)
    return [Job("a1", 0.0, long_call("a1"), tenant="a"), Job("b1", 0.05, short, tenant="b")]


@pytest.mark.parametrize("lift", [True, False])
def test_vtc_lifts_a_returning_tenant_to_the_least_served_backlogged_one(lift: bool) -> None:
    engine = Engine(FixedJobs(_tenant_jobs()), engine=EngineConfig(profile=PROFILE, vtc_lift=lift))
    seen = []
    original = engine._backlog

    def spy(call: int, delta: int) -> None:
        original(call, delta)
        if delta > 0 and engine.calls.job[call] == 1:  # b just became backlogged
            seen.append(engine.stats.tenant_service.copy())

    engine._backlog = spy
    engine.run(FCFS())
    a, b = engine.stats.tenants["a"], engine.stats.tenants["b"]
    (counters,) = seen
    assert counters[a] > 0
    if lift:  # b banks no credit from idling: it starts level with a
        assert counters[b] == counters[a] and engine.stats.num_vtc_lifts == 1
    else:
        assert counters[b] == 0 and engine.stats.num_vtc_lifts == 0
    assert (engine.stats.tenant_backlog == 0).all()


def test_vtc_lift_never_lowers_a_counter() -> None:
    engine = Engine(FixedJobs(_tenant_jobs()), engine=EngineConfig(profile=PROFILE))
    engine.stats.tenants = {"a": 0, "b": 1}
    engine.stats.tenant_service = np.array([5.0, 50.0])
    engine.stats.tenant_backlog = np.array([1, 0])
    engine.calls.job[0] = 1  # a call of tenant b's job
    engine.job_table.tenant[1] = 1
    engine._backlog(0, +1)
    assert engine.stats.tenant_service.tolist() == [5.0, 50.0]
