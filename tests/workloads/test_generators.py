"""Generators draw valid trees of the promised shapes, deterministically, within their limits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from servegym.envs.workloads.generators import (
    GENERATORS,
    Debate,
    MapReduce,
    Mixed,
    PlanExecuteCritique,
    ReactChain,
    TreeOfThoughts,
    sample_tool_latency_s,
)
from servegym.envs.workloads.job import Job, Output, Text

SEEDS = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=25, deadline=None)


def draw(generator, seed: int, num_jobs: int = 5) -> list[Job]:
    rng = np.random.default_rng(seed)
    return [generator.sample(rng, f"j{i}", float(i)) for i in range(num_jobs)]


def outputs(prompt) -> list[int]:
    return [seg.call for seg in prompt if isinstance(seg, Output)]


def starts_with(prompt, prefix) -> bool:
    return prompt[: len(prefix)] == prefix


@pytest.mark.parametrize("name", sorted(GENERATORS))
@FAST
@given(seed=SEEDS)
def test_every_generator_yields_valid_jobs_within_context(name: str, seed: int) -> None:
    generator = GENERATORS[name]()
    for job in draw(generator, seed):  # Job.__post_init__ already ran validate_job
        assert job.kind == name or (name == "mixed" and job.kind in GENERATORS)
        limit = getattr(generator, "max_context_tokens", 32768)
        for call in job.calls:
            assert job.prompt_tokens(call.call_id) + call.max_tokens <= limit
            assert isinstance(call.prompt[0], Text) and call.prompt[0].key.startswith("sys/")
            assert call.tool_latency_s >= 0


@FAST
@given(seed=SEEDS)
def test_react_steps_extend_the_previous_prompt(seed: int) -> None:
    for job in draw(ReactChain(), seed):
        for prev, step in zip(job.calls, job.calls[1:], strict=False):
            assert step.parents == (prev.call_id,)
            assert starts_with(step.prompt, prev.prompt)
            assert step.prompt[len(prev.prompt)] == Output(prev.call_id)
            assert (
                step.prompt[-1].key == f"{job.job_id}/tool{prev.call_id}"
                and len(step.prompt) == len(prev.prompt) + 2
            )
            assert prev.tool_latency_s > 0  # a tool runs between steps
        assert job.calls[-1].tool_latency_s == 0.0  # the final answer calls no tool
        assert job.meta["turns"] == len(job.calls)


@FAST
@given(seed=SEEDS)
def test_react_chain_stops_before_overflowing_a_small_context(seed: int) -> None:
    generator = ReactChain(turns_mean=40.0, max_context_tokens=8192)
    for job in draw(generator, seed):
        assert all(job.prompt_tokens(c.call_id) + c.max_tokens <= 8192 for c in job.calls)
    assert ReactChain(turns_mean=1.0).sample(np.random.default_rng(seed), "j", 0.0).meta["turns"] == 1


@FAST
@given(seed=SEEDS, fan_out=st.integers(1, 8))
def test_map_reduce_fans_out_and_aggregates_every_worker(seed: int, fan_out: int) -> None:
    for job in draw(MapReduce(fan_out=fan_out), seed, num_jobs=2):
        planner, *workers, aggregator = job.calls
        assert len(workers) == fan_out and planner.role == "planner" and aggregator.role == "aggregator"
        worker_ids = [w.call_id for w in workers]
        assert all(w.parents == (planner.call_id,) and w.role == "worker" for w in workers)
        assert list(aggregator.parents) == worker_ids and outputs(aggregator.prompt) == worker_ids
        # Workers share system + input + plan and differ only in their chunk.
        assert len({w.prompt[:3] for w in workers}) == 1 and len({w.prompt[3] for w in workers}) == fan_out


@FAST
@given(seed=SEEDS, num_agents=st.integers(1, 4), num_rounds=st.integers(1, 4))
def test_debate_rounds_see_all_previous_answers(seed: int, num_agents: int, num_rounds: int) -> None:
    job = draw(Debate(num_agents=num_agents, num_rounds=num_rounds), seed, num_jobs=1)[0]
    assert len(job.calls) == num_agents * num_rounds + 1
    for call in job.calls[:-1]:
        round_index = call.call_id // num_agents
        assert outputs(call.prompt) == list(range(round_index * num_agents))
        assert call.parents == tuple(range(max(0, round_index - 1) * num_agents, round_index * num_agents))
    judge = job.calls[-1]
    assert judge.role == "aggregator" and outputs(judge.prompt) == list(range(num_agents * num_rounds))


@FAST
@given(seed=SEEDS, max_retries=st.integers(0, 3))
def test_plan_execute_critique_retries_extend_the_history(seed: int, max_retries: int) -> None:
    for job in draw(PlanExecuteCritique(max_retries=max_retries), seed):
        roles = [c.role for c in job.calls]
        retries = job.meta["retries"]
        assert roles == ["planner"] + ["worker", "critic"] * (retries + 1) and retries <= max_retries
        for earlier, later in zip(job.calls[1:], job.calls[3:], strict=False):  # same role, next attempt
            assert starts_with(later.prompt, earlier.prompt)
        assert all(c.tool_latency_s > 0 for c in job.calls if c.role == "worker")
    rng = np.random.default_rng(seed)
    assert PlanExecuteCritique(reject_prob=0.0).sample(rng, "j", 0.0).meta["retries"] == 0
    assert PlanExecuteCritique(reject_prob=1.0, max_retries=2).sample(rng, "j", 0.0).meta["retries"] == 2


@FAST
@given(seed=SEEDS, branching=st.integers(1, 4), depth=st.integers(1, 4), keep=st.integers(1, 4))
def test_tree_of_thoughts_prunes_and_expands_the_kept(
    seed: int, branching: int, depth: int, keep: int
) -> None:
    keep = min(keep, branching)
    job = draw(TreeOfThoughts(branching=branching, depth=depth, keep=keep), seed, num_jobs=1)[0]
    children = job.children()
    pruned = set(job.meta["pruned"])
    assert len(job.calls) == branching + keep * branching * (depth - 1) + 1
    assert all(not children[c] for c in pruned)
    aggregator = job.calls[-1]
    assert len(aggregator.parents) == keep and not pruned & set(aggregator.parents)
    depths = job.depth()
    for call in job.calls[:-1]:
        if call.call_id not in pruned and depths[call.call_id] < depth - 1:
            assert len(children[call.call_id]) == branching
        for parent in call.parents:  # a thought's prompt is its parent's path + the parent's output
            assert call.prompt == (*job.calls[parent].prompt, Output(parent))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_jobs_and_different_seeds_differ(name: str) -> None:
    generator = GENERATORS[name]()
    first, second, other = draw(generator, 7), draw(generator, 7), draw(generator, 8)
    assert first == second and [j.meta for j in first] == [j.meta for j in second]
    assert first != other


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_budget_truncates_some_calls_but_not_most(name: str) -> None:
    calls = [c for job in draw(GENERATORS[name](), 0, num_jobs=200) for c in job.calls]
    truncated = sum(c.truncated for c in calls) / len(calls)
    assert 0.0 < truncated < 0.2


def test_tool_latency_matches_router_285_quantiles() -> None:
    rng = np.random.default_rng(0)
    gaps = np.array([sample_tool_latency_s(rng, 60.0) for _ in range(20000)])
    assert abs(np.mean(gaps <= 1.0) - 0.865) < 0.01 and abs(np.mean(gaps <= 10.0) - 0.951) < 0.01
    assert gaps.min() > 0 and gaps.max() <= 60.0


def test_system_prompts_are_shared_across_jobs_and_optionally_per_tenant() -> None:
    rng = np.random.default_rng(0)
    a, b = MapReduce().sample(rng, "a", 0.0, "t1"), MapReduce().sample(rng, "b", 0.0, "t2")
    assert a.calls[0].prompt[0] == b.calls[0].prompt[0]
    per_tenant = MapReduce(system_per_tenant=True)
    a, b = per_tenant.sample(rng, "a", 0.0, "t1"), per_tenant.sample(rng, "b", 0.0, "t2")
    assert a.calls[0].prompt[0] != b.calls[0].prompt[0] and a.tenant == "t1"


def test_mixed_picks_by_weight_and_sets_the_entry_tenant() -> None:
    mix = Mixed([(ReactChain(), 3.0, "alice"), (Debate(), 1.0, "bob"), (MapReduce(), 0.0, "nobody")])
    jobs = draw(mix, 0, num_jobs=400)
    tenants = {job.tenant for job in jobs}
    assert tenants == {"alice", "bob"}
    assert all((job.tenant, job.kind) in {("alice", "react"), ("bob", "debate")} for job in jobs)
    assert 0.65 < sum(job.tenant == "alice" for job in jobs) / len(jobs) < 0.85


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ReactChain(max_tokens=0), "ReactChain.max_tokens"),
        (lambda: ReactChain(turns_mean=0.5), "ReactChain.turns_mean"),
        (lambda: ReactChain(length_sigma=0.0), "ReactChain.length_sigma"),
        (lambda: ReactChain(tool_latency_max_s=5.0), "tool_latency_max_s"),
        (lambda: MapReduce(fan_out=0), "MapReduce.fan_out"),
        (lambda: MapReduce(fan_out=64), "max_context_tokens"),
        (lambda: PlanExecuteCritique(reject_prob=1.5), "reject_prob"),
        (lambda: PlanExecuteCritique(max_retries=-1), "max_retries"),
        (lambda: Debate(num_rounds=0), "Debate.num_rounds"),
        (lambda: Debate(num_agents=8, num_rounds=8), "max_context_tokens"),
        (lambda: TreeOfThoughts(keep=4, branching=3), "keep"),
        (lambda: TreeOfThoughts(depth=0), "TreeOfThoughts.depth"),
        (lambda: Debate(slo_s=0.0), "slo_s"),
        (lambda: Mixed([]), "Mixed.entries"),
        (lambda: Mixed([(ReactChain(), -1.0, "a")]), "weights"),
        (
            lambda: Mixed([(ReactChain(), 1.0, "a"), (ReactChain(system_tokens=10), 1.0, "b")]),
            "system_tokens",
        ),
    ],
)
def test_bad_parameters_fail_with_a_message_naming_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_slo_and_kind_are_set() -> None:
    job = Debate(slo_s=30.0).sample(np.random.default_rng(0), "j0", 1.5, "t")
    assert (job.slo_s, job.kind, job.tenant, job.arrival_s) == (30.0, "debate", "t", 1.5)
