"""The exported scheduler inside vLLM's OpenAI server: ``--scheduler-cls ServegymScheduler`` with
the length policy, on 127.0.0.1, the tiny Llama; the replay sends map-reduce trees through HTTP
(tags in ``vllm_xargs``), every tree completes, and the scheduler's counters (``SERVEGYM_STATS_PATH``)
show it saw the trees and ranked a queue of several requests.

Skipped where vLLM is absent; ``make test-vllm`` runs it (about a minute: the server starts in
~25 s on 2 cores)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("vllm")

from servegym.agents.deploy.vllm_adapter import POLICY_ENV, STATS_PATH_ENV  # noqa: E402
from servegym.agents.replay import ReplayConfig, calls_frame, jobs_frame, replay  # noqa: E402
from servegym.agents.replay.vllm_server import free_port, running_server, serve_command  # noqa: E402
from servegym.envs.workloads.generators import MapReduce  # noqa: E402
from servegym.envs.workloads.source import FixedJobs  # noqa: E402
from tests.vllm_adapter.conftest import TINY_VOCAB  # noqa: E402

NUM_TREES = 6
SMALL = {
    "system_tokens": 16,
    "input_tokens_mean": 16.0,
    "output_tokens_mean": 8.0,
    "max_tokens": 12,
    "max_context_tokens": 480,
}


def test_served_scheduler_completes_replayed_trees_and_ranks_the_queue(
    tiny_llama, length_policy, tmp_path
) -> None:
    rng = np.random.default_rng(0)
    jobs = [MapReduce(fan_out=3, **SMALL).sample(rng, f"t{i}", 0.05 * i) for i in range(NUM_TREES)]
    stats_path = tmp_path / "stats.json"
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache"),
        POLICY_ENV: str(length_policy),
        STATS_PATH_ENV: str(stats_path),
    }
    port = free_port()
    args = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "2"]
    args += ["--served-model-name", "tiny", "--seed", "0"]
    with running_server(
        serve_command(tiny_llama, port, extra_args=args), port, env, tmp_path / "server.log"
    ) as url:
        config = ReplayConfig(
            base_url=url,
            model="tiny",
            label="servegym",
            max_connections=16,
            request_timeout_s=60,
            max_retries=0,
            tool_time_scale=0.0,
            vocab_size=TINY_VOCAB,
        )
        result = replay(FixedJobs(jobs), config)
        stats = {}
        deadline = time.monotonic() + 10  # written when the engine goes idle; bounded wait
        while stats.get("num_requests_seen") != NUM_TREES * 5 and time.monotonic() < deadline:
            time.sleep(0.2)
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    calls, trees = calls_frame(result), jobs_frame(result)
    assert len(trees) == NUM_TREES and not trees.failed.any(), calls.error.tolist()
    assert len(calls) == NUM_TREES * 5 and calls.ok.all() and (calls.attempts == 1).all()
    budgets = {(job.job_id, c.call_id): c.generated_tokens for job in jobs for c in job.calls}
    assert all(row.output_tokens == budgets[row.job_id, row.call_id] for row in calls.itertuples())
    assert (calls.prompt_tokens >= calls.prompt_words).all()  # word-level tokenizer (+ BOS)
    assert stats["num_orderings"] > 0 and stats["max_ordering_size"] >= 2  # it ranked a real queue
    assert stats["num_trees_seen"] == NUM_TREES  # the tags arrived: 30 requests, 6 trees
    assert stats["num_requests_seen"] == NUM_TREES * 5
