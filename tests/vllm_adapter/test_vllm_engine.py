"""The adapter inside real vLLM (CPU build, in-process engine, a tiny random Llama built here).

Skipped where vLLM is absent (the main venv, CI); ``make test-vllm`` builds ``.venv-vllm`` and runs
these. With ``max_num_seqs=1`` requests run one at a time, so the order of their first tokens is
the order the scheduler admitted them: it must be the exported policy's order on the scheduler's
own feature table, which differs from the submission (FCFS) order.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from servegym.agents.deploy.runtime import ScoreRuntime  # noqa: E402
from servegym.agents.deploy.vllm_adapter import (  # noqa: E402
    POLICY_ENV,
    TREE_TAG_KEY,
    VLLM_VERSION,
    PendingRequest,
    TreeTag,
    priorities,
)
from servegym.envs.engine.policy import DecisionKind, column  # noqa: E402
from servegym.envs.workloads.job import role_id  # noqa: E402
from tests.vllm_adapter.conftest import TINY_VOCAB  # noqa: E402

SCHEDULER = "servegym.agents.deploy.vllm_adapter.ServegymScheduler"
PROMPT_LENGTHS = (37, 150, 12, 90, 200, 64, 25, 120)  # submission order; the policy wants longest first


@pytest.fixture(scope="module", autouse=True)
def vllm_env(tmp_path_factory) -> Iterator[None]:
    """vLLM's settings for a CPU-only, offline, in-process run, for this module only."""
    settings = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default asks for more than a small machine has
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm_cache")),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: one scheduler to inspect
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key, value)
        yield


@contextmanager
def engine(model: Path, policy: Path | None = None, **kwargs) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as patch:
        if policy is not None:
            patch.setenv(POLICY_ENV, str(policy))
        settings = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0}
        llm = LLM(model=str(model), **{**settings, **kwargs})
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler  # in-process engine core only


def prompt(num_tokens: int, seed: int) -> TokensPrompt:
    ids = np.random.default_rng(seed).integers(4, TINY_VOCAB, num_tokens)
    return TokensPrompt(prompt_token_ids=ids.tolist())


def params(max_tokens: int = 4, tag: str | None = None) -> SamplingParams:
    extra = {TREE_TAG_KEY: tag} if tag else None
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, extra_args=extra)


def run_to_completion(llm: LLM, requests: list[tuple[str, TokensPrompt, SamplingParams]]) -> list[str]:
    """Submit all, then step; returns request ids in the order their first token appeared."""
    for request_id, tokens, sampling in requests:
        llm.llm_engine.add_request(request_id, tokens, sampling)
    first_tokens: list[str] = []
    while llm.llm_engine.has_unfinished_requests():
        for output in llm.llm_engine.step():
            if output.outputs[0].token_ids and output.request_id not in first_tokens:
                first_tokens.append(output.request_id)
    return first_tokens


def test_pinned_vllm_version() -> None:
    assert vllm.__version__.split("+")[0] == VLLM_VERSION


def test_scheduler_admits_in_the_exported_policys_order(tiny_llama, length_policy) -> None:
    tags = [TreeTag(f"tree{i}", 0, "worker", 0).encode() for i in range(len(PROMPT_LENGTHS))]
    requests = [
        (tag, prompt(n, i), params()) for i, (tag, n) in enumerate(zip(tags, PROMPT_LENGTHS, strict=True))
    ]
    with engine(tiny_llama, length_policy, max_num_seqs=1, scheduler_cls=SCHEDULER) as llm:
        adapter = scheduler_of(llm).servegym
        decisions = []  # (request ids, decision) of every ORDER decision, in turn
        rank = adapter.rank

        def spy(scheduler, kind, candidates, kv):
            order = rank(scheduler, kind, candidates, kv)
            decisions.append(adapter.last_decisions[kind])
            return order

        adapter.rank = spy
        first_tokens = run_to_completion(llm, requests)
    # the first ORDER decision saw all 8 waiting requests; the runtime's order on its table:
    first_ids, first_decision = decisions[0]
    assert len(first_ids) == len(PROMPT_LENGTHS)
    table = first_decision.features
    np.testing.assert_allclose(table[:, column("prompt_tokens_log")], np.log1p(PROMPT_LENGTHS), rtol=1e-6)
    runtime = ScoreRuntime(length_policy)
    scores = runtime.scores(
        np.concatenate([first_decision.global_features, np.eye(len(DecisionKind))[DecisionKind.ORDER]]),
        table,
        np.ones(len(first_ids)),
    )
    expected = [first_ids[i].split("-")[0] for i in np.argsort(-scores, kind="stable")]
    assert first_tokens == expected
    assert first_tokens != tags  # not FCFS: the test can tell the policy from vLLM's default
    assert first_tokens == [tags[i] for i in np.argsort(PROMPT_LENGTHS)[::-1]]  # longest first
    sizes = [len(ids) for ids, _ in decisions]  # one ORDER decision per step while 2+ wait
    assert sizes[-1] == 2 and sizes == sorted(sizes, reverse=True)


def test_priority_route_runs_in_the_policys_order(tiny_llama, length_policy) -> None:
    runtime = ScoreRuntime(length_policy)
    pending = [
        PendingRequest(n, 4, TreeTag(f"tree{i}", 0, "worker", 0)) for i, n in enumerate(PROMPT_LENGTHS)
    ]
    prios = priorities(pending, runtime)
    with engine(tiny_llama, max_num_seqs=1, scheduling_policy="priority", disable_log_stats=False) as llm:
        outputs = llm.generate(
            [prompt(n, i) for i, n in enumerate(PROMPT_LENGTHS)], params(), priority=prios, use_tqdm=False
        )
    first_token_s = [output.metrics.first_token_ts for output in outputs]
    assert len(set(prios)) == len(PROMPT_LENGTHS)  # no ties left to vLLM's arrival order
    assert np.argsort(first_token_s).tolist() == np.argsort(prios).tolist()
    assert np.argsort(first_token_s).tolist() == np.argsort(PROMPT_LENGTHS)[::-1].tolist()


def test_a_trees_calls_flow_through_with_their_counters(tiny_llama, length_policy) -> None:
    """A child submitted after its parent finished runs, and sees its tree's counters."""
    parent_tokens = prompt(64, 1)
    with engine(tiny_llama, length_policy, max_num_seqs=1, scheduler_cls=SCHEDULER, block_size=32) as llm:
        scheduler = scheduler_of(llm)
        adapter = scheduler.servegym
        run_to_completion(llm, [("job7:0:planner:0", parent_tokens, params(max_tokens=8))])
        tree = adapter.book.trees["job7"]
        assert (tree.calls_done, tree.calls_seen, tree.live) == (1, 1, 0)
        assert tree.service_tokens >= 64 + 7  # the prompt and every output but the last were computed
        parent_service = tree.service_tokens

        child_ids = parent_tokens["prompt_token_ids"] + list(range(10, 50))  # shares the parent's prompt
        llm.llm_engine.add_request("job7:1:worker:1", TokensPrompt(prompt_token_ids=child_ids), params())
        (child,) = scheduler.waiting
        kv = adapter.kv_view(scheduler)
        row = adapter.decision(scheduler, DecisionKind.ORDER, [child], kv).features[0]
        assert row[column("tree_calls_done")] == 1
        assert row[column("depth")] == 1 and row[column("role_id")] == role_id("worker")
        assert row[column("tree_service_log")] == pytest.approx(np.log1p(parent_service))
        assert row[column("tree_calls_total_log")] == pytest.approx(np.log1p(2))
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        assert row[column("cached_prefix_frac")] == pytest.approx(64 / len(child_ids))  # 2 full blocks
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        assert (tree.calls_done, tree.calls_seen, tree.live) == (2, 2, 0)
        assert tree.service_tokens > parent_service


def _preempt_workload() -> list[tuple[str, TokensPrompt, SamplingParams]]:
    lengths = (20, 60, 100, 40)  # vLLM's own victim is the newest (40); the policy's the shortest (20)
    return [(f"t{n}:0:worker:0", prompt(n, n), params(max_tokens=96)) for n in lengths]


def test_eviction_picks_the_lowest_scored_running_request(tiny_llama, evict_only_policy) -> None:
    # 11 usable blocks of 32 tokens hold the four prompts (9 blocks) but not their outputs
    settings = {"max_num_seqs": 4, "num_gpu_blocks_override": 12, "block_size": 32, "max_model_len": 256}
    with engine(tiny_llama, **settings) as llm:  # vLLM's own scheduler: the baseline
        preempted = []
        scheduler = scheduler_of(llm)
        original = scheduler._preempt_request

        def spy(request, *args, **kwargs):
            preempted.append(request.request_id.split("-")[0])
            return original(request, *args, **kwargs)

        scheduler._preempt_request = spy
        run_to_completion(llm, _preempt_workload())
    assert preempted, "the KV cache was large enough for all four: no preemption to test"
    assert preempted[0] == "t40:0:worker:0"
    with engine(tiny_llama, evict_only_policy, scheduler_cls=SCHEDULER, **settings) as llm:
        adapter = scheduler_of(llm).servegym
        run_to_completion(llm, _preempt_workload())
        assert adapter.num_evict_rankings > 0
        assert adapter.recent_preemptions[0].split("-")[0] == "t20:0:worker:0"


def test_scheduler_refuses_the_priority_policy(tiny_llama, length_policy) -> None:
    with (
        pytest.raises(Exception, match="scheduling_policy='fcfs'"),
        engine(tiny_llama, length_policy, scheduler_cls=SCHEDULER, scheduling_policy="priority"),
    ):
        pass
