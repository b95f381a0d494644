"""The replay against a fake OpenAI-compatible server on 127.0.0.1: every call of every tree
completes exactly once, in dependency order and after its parents' tool time, with its parents'
real outputs in its prompt; failures are retried and counted, never dropped."""

from __future__ import annotations

import dataclasses

import pytest

from servegym.agents.deploy.vllm_adapter import parse_tree_tag
from servegym.agents.replay import PromptBuilder, ReplayConfig, calls_frame, jobs_frame, replay, run_row
from servegym.agents.replay.runner import tree_id_of
from servegym.envs.workloads.job import Output, Text
from servegym.envs.workloads.source import FixedJobs
from tests.replay.workloads import small_trees

TOOL_SCALE = 0.002  # the generators' tool gaps (up to 60 s) become milliseconds


def config(url: str, **overrides) -> ReplayConfig:
    fields = {"base_url": url, "max_connections": 4, "request_timeout_s": 0.5, "retry_backoff_s": 0.01}
    return ReplayConfig(**{**fields, "tool_time_scale": TOOL_SCALE, **overrides})


def test_every_call_runs_once_after_its_parents_with_their_outputs(server) -> None:
    jobs = small_trees()
    # nothing fails here: a generous timeout, so a loaded machine (CI on 2 shared cores once took
    # over 0.5 s to answer) does not turn a slow answer into a retry
    result = replay(FixedJobs(jobs), config(f"http://127.0.0.1:{server.port}/v1", request_timeout_s=10.0))
    by_tag = {}
    for received in server.log:
        assert received.tag not in by_tag, f"{received.tag} sent twice"
        by_tag[received.tag] = received
    calls = calls_frame(result)
    assert len(by_tag) == len(calls) == sum(len(job.calls) for job in jobs)
    assert calls.ok.all() and (calls.attempts == 1).all()
    for job in jobs:
        depths = job.depth()
        for call in job.calls:
            mine = by_tag[f"{tree_id_of(job)}:{call.call_id}:{call.role}:{depths[call.call_id]}"]
            assert mine.body["max_tokens"] == call.generated_tokens
            assert parse_tree_tag(mine.tag).tree_id == job.job_id
            for parent in call.parents:
                theirs = by_tag[f"{tree_id_of(job)}:{parent}:{job.calls[parent].role}:{depths[parent]}"]
                tool_s = TOOL_SCALE * job.calls[parent].tool_latency_s
                assert mine.received_s >= theirs.done_s + tool_s - 1e-3  # dependency order and tool pause
            for segment in call.prompt:
                if isinstance(segment, Output):
                    assert (
                        by_tag[
                            f"{tree_id_of(job)}:{segment.call}:{job.calls[segment.call].role}:{depths[segment.call]}"
                        ].output.strip()
                        in mine.body["prompt"]
                    )
    trees = jobs_frame(result)
    assert len(trees) == len(jobs) and not trees.failed.any() and (trees.jct_s > 0).all()
    row = run_row(result, calls, trees)
    assert (row["jobs_done"], row["jobs_failed"], row["retries"], row["calls_failed"]) == (len(jobs), 0, 0, 0)
    assert row["ttft_p99_s"] > 0 and row["tpot_mean_s"] > 0
    assert row["output_tokens"] == sum(c.generated_tokens for job in jobs for c in job.calls)


def test_connections_stay_within_the_bound(server) -> None:
    jobs = [dataclasses.replace(job, arrival_s=0.0) for job in small_trees(num_mapreduce=6, num_debate=0)]
    replay(FixedJobs(jobs), config(f"http://127.0.0.1:{server.port}/v1", max_connections=3))
    assert server.max_in_flight == 3  # 18 workers ready at once: the bound is reached, never passed


def test_failed_attempts_are_retried_and_counted(server) -> None:
    jobs = small_trees(num_mapreduce=2, num_debate=1)
    server.plan = {
        "j0:0:planner:0": ["500"],
        "j0:2:worker:1": ["drop", "hang"],  # a connection error, then a timeout
        "j2:1:debater:0": ["500", "500", "500"],  # more failures than retries: the tree fails
    }
    result = replay(FixedJobs(jobs), config(f"http://127.0.0.1:{server.port}/v1", max_retries=2))
    calls = calls_frame(result).set_index("tag")
    assert calls.loc["j0:0:planner:0", "retries"] == 1 and calls.loc["j0:0:planner:0", "ok"]
    assert calls.loc["j0:2:worker:1", "retries"] == 2 and calls.loc["j0:2:worker:1", "ok"]
    assert "no complete answer" in " ".join(server_errors(result, "j0:2:worker:1"))
    failed = calls.loc["j2:1:debater:0"]
    assert (failed["attempts"], failed["ok"], failed["skipped"]) == (3, False, False)
    assert "HTTP 500" in failed["error"]
    trees = jobs_frame(result).set_index("job_id")
    assert not trees.loc["j0", "failed"] and not trees.loc["j1", "failed"] and trees.loc["j2", "failed"]
    # descendants of the failed call were never sent, and are counted as skipped
    skipped = calls[calls.skipped]
    assert len(skipped) > 0 and all(server.received(tag) == [] for tag in skipped.index)
    assert len(calls) == sum(len(job.calls) for job in jobs)  # every call accounted for
    row = run_row(result, calls_frame(result), jobs_frame(result))
    assert (row["retries"], row["jobs_failed"], row["calls_failed"]) == (1 + 2 + 2, 1, 1)
    # each successful call has exactly one successful exchange on the server
    for tag in calls[calls.ok].index:
        assert sum(r.mode == "ok" for r in server.received(tag)) == 1


def server_errors(result, tag: str) -> list[str]:
    return next(r.completion.errors for r in result.calls if r.tag == tag)


def test_a_client_error_is_not_retried(server) -> None:
    (job,) = small_trees(num_mapreduce=1, num_debate=0)
    server.plan = {"j0:0:planner:0": ["400"]}
    result = replay(FixedJobs([job]), config(f"http://127.0.0.1:{server.port}/v1", max_retries=3))
    calls = calls_frame(result)
    assert (
        len(server.log) == 1 and calls.attempts.tolist()[0] == 1 and calls.skipped.sum() == len(job.calls) - 1
    )


def test_prompts_share_prefixes_by_key_and_carry_outputs() -> None:
    builder = PromptBuilder(vocab_size=50)
    system, other = Text("sys/worker", 8), Text("sys/critic", 8)
    assert builder.text(system) == PromptBuilder(vocab_size=50).text(system)  # stable across builders
    assert builder.text(system) != builder.text(other) and len(builder.text(system).split()) == 8
    (job,) = small_trees(num_mapreduce=1, num_debate=0)
    prompt = builder.prompt(job, 1, {0: " the plan "})
    assert "the plan" in prompt
    with pytest.raises(KeyError, match="output of call 0"):
        builder.prompt(job, 1, {})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("base_url", "127.0.0.1:8000", "http"),
        ("max_connections", 0, "max_connections"),
        ("request_timeout_s", float("inf"), "request_timeout_s"),
        ("tag_field", "header", "tag_field"),
        ("tool_time_scale", -1.0, "tool_time_scale"),
    ],
)
def test_bad_config_is_a_clear_error(field, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        ReplayConfig(**{field: value})


def test_priority_route_sends_global_priorities(server) -> None:
    """With a priority policy each request carries vLLM's ``priority``: a tree that arrived more
    than the horizon after another never gets a lower (earlier) priority than its calls."""
    jobs = small_trees(num_mapreduce=3, num_debate=0, gap_s=0.3)
    settings = {"priority_policy": "servegym.agents.policies.heuristics:FCFS", "priority_horizon_s": 0.1}
    replay(FixedJobs(jobs), config(f"http://127.0.0.1:{server.port}/v1", **settings))
    priority = {r.tag: r.body["priority"] for r in server.log}
    assert all(isinstance(p, int) for p in priority.values()) and len(priority) == 15
    first = [p for tag, p in priority.items() if tag.startswith("j0:")]
    last = [p for tag, p in priority.items() if tag.startswith("j2:")]
    assert max(first) < min(last)
