"""Contextual inflation: prompts grow with depth in ReAct and debate trees, and the run metrics
(tokens per tree, prompt growth per level) equal brute-force counts over the call table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.metrics import prompt_tokens_by_depth
from servegym.envs.workloads.generators import Debate, MapReduce, ReactChain
from servegym.envs.workloads.job import Output
from servegym.envs.workloads.workload import Workload

FIXED = dict(length_sigma=1e-9)
"""Every sampled length at its mean: prompts can be counted by hand."""


def run(generator, num_jobs: int = 12, seed: int = 0) -> Engine:
    engine = Engine(Workload(generator=generator, arrival_rate=2.0, num_jobs=num_jobs).build(seed))
    metrics = engine.run(FCFS())
    assert metrics.complete, metrics.first_rejection or metrics.stall_reason
    return engine


def tree_levels(engine: Engine) -> dict[int, dict[int, list[int]]]:
    """job -> depth -> prompt tokens of its calls, by a loop over the call table."""
    calls, out = engine.calls, {}
    for call in range(calls.size):
        assert calls.state[call] == CallState.FINISHED
        levels = out.setdefault(int(calls.job[call]), {})
        levels.setdefault(int(calls.depth[call]), []).append(int(calls.prompt_tokens[call]))
    return out


def test_prompt_is_the_sum_of_its_segments_counted_from_the_job() -> None:
    """The call table's prompt tokens, recounted from each job's segments: texts at their length,
    a parent's output at the tokens that parent generated."""
    for generator in (ReactChain(turns_mean=4.0), Debate(num_rounds=2)):
        engine = run(generator, num_jobs=6)
        calls = engine.calls
        for j, job in enumerate(engine.jobs):
            base = engine.job_table.first_call[j]
            for spec in job.calls:
                want = sum(
                    int(calls.num_output[base + seg.call]) if isinstance(seg, Output) else seg.num_tokens
                    for seg in spec.prompt
                )
                assert calls.prompt_tokens[base + spec.call_id] == want


@pytest.mark.parametrize("generator", [ReactChain(turns_mean=6.0), Debate()], ids=["react", "debate"])
def test_prompt_grows_with_depth_inside_every_tree(generator) -> None:
    engine = run(generator)
    deep = 0
    for levels in tree_levels(engine).values():
        means = [np.mean(levels[d]) for d in range(len(levels))]  # levels 0..D, no gap
        assert sorted(levels) == list(range(len(levels)))
        assert all(b > a for a, b in zip(means, means[1:], strict=False)), means
        deep += len(levels) > 2
    assert deep >= 3  # the property was tested on trees with several levels
    m = engine.metrics()
    assert m.prompt_growth_per_level > 1 and m.prompt_tokens_added_per_level > 0


def test_react_level_profile_by_hand() -> None:
    """Step k + 1's prompt is step k's + its output + a tool result: with every length at its
    mean, level d holds system + input + d * (output + tool) tokens."""
    gen = ReactChain(turns_mean=6.0, **FIXED)
    engine = run(gen)
    m = engine.metrics()
    step = gen.output_tokens_mean + gen.tool_tokens_mean
    depth = np.arange(m.call_depth_max + 1)
    assert m.call_depth_max >= 5
    np.testing.assert_array_equal(
        prompt_tokens_by_depth(engine), gen.system_tokens + gen.input_tokens_mean + depth * step
    )
    assert np.all(np.diff(prompt_tokens_by_depth(engine)) > 0)
    assert m.prompt_tokens_added_per_level == step
    assert m.prompt_tokens_root_mean == gen.system_tokens + gen.input_tokens_mean


def test_debate_level_profile_by_hand() -> None:
    """Round r's prompt holds the answers of rounds < r; the judge (one level below the last
    round, its system prompt as long) holds all of them."""
    gen = Debate(num_agents=3, num_rounds=3, **FIXED)
    engine = run(gen, num_jobs=4)
    answers = gen.num_agents * gen.output_tokens_mean
    want = gen.system_tokens + gen.input_tokens_mean + np.arange(gen.num_rounds + 1) * answers
    np.testing.assert_array_equal(prompt_tokens_by_depth(engine), want)
    m = engine.metrics()
    assert m.call_depth_max == gen.num_rounds
    assert m.prompt_growth_per_level == pytest.approx(np.mean(want[1:] / want[:-1]))
    calls_per_tree = gen.num_agents * gen.num_rounds + 1
    per_tree = gen.num_agents * want[:-1].sum() + want[-1]
    assert m.prompt_tokens_per_tree_mean == per_tree
    assert m.tokens_per_tree_mean == per_tree + calls_per_tree * gen.output_tokens_mean


@pytest.mark.parametrize(
    "generator", [ReactChain(turns_mean=6.0), Debate(), MapReduce()], ids=["react", "debate", "mapreduce"]
)
def test_inflation_metrics_equal_brute_force_over_the_call_table(generator) -> None:
    engine = run(generator)
    calls = engine.calls
    trees = tree_levels(engine)
    prompt = {j: 0 for j in trees}
    output = {j: 0 for j in trees}
    for call in range(calls.size):
        prompt[int(calls.job[call])] += int(calls.prompt_tokens[call])
        output[int(calls.job[call])] += int(calls.num_output[call])
    ratios, added = [], []
    for levels in trees.values():
        means = [sum(levels[d]) / len(levels[d]) for d in range(len(levels))]
        ratios += [b / a for a, b in zip(means, means[1:], strict=False)]
        added += [b - a for a, b in zip(means, means[1:], strict=False)]
    by_depth: dict[int, list[int]] = {}
    for levels in trees.values():
        for d, prompts in levels.items():
            by_depth.setdefault(d, []).extend(prompts)
    m = engine.metrics()
    assert m.tokens_per_tree_mean == pytest.approx(np.mean([prompt[j] + output[j] for j in trees]))
    assert m.prompt_tokens_per_tree_mean == pytest.approx(np.mean(list(prompt.values())))
    assert m.prompt_growth_per_level == pytest.approx(np.mean(ratios))
    assert m.prompt_tokens_added_per_level == pytest.approx(np.mean(added))
    assert m.prompt_tokens_root_mean == pytest.approx(np.mean(by_depth[0]))
    assert m.call_depth_max == max(by_depth)
    np.testing.assert_allclose(
        prompt_tokens_by_depth(engine), [np.mean(by_depth[d]) for d in sorted(by_depth)]
    )


def test_unfinished_and_failed_trees_are_left_out() -> None:
    """A tree rejected for the KV cache has no tokens per tree; with none finished, NaN and depth 0."""
    gen = ReactChain(turns_mean=3.0, **FIXED)
    engine = Engine(
        Workload(generator=gen, arrival_rate=2.0, num_jobs=3).build(0),
        engine=EngineConfig(num_gpu_blocks=4, block_size=16),
    )
    m = engine.run(FCFS())
    assert m.jobs_completed == 0 and m.jobs_failed == 3
    assert math.isnan(m.tokens_per_tree_mean) and math.isnan(m.prompt_growth_per_level)
    assert m.call_depth_max == 0 and len(prompt_tokens_by_depth(engine)) == 0
