"""Train/serve parity: on the same state, the vLLM adapter's feature rows equal the engine's in
every column the schema says it reads exactly.

The engine runs; at each ORDER and EVICT decision the test mirrors the candidates into the
stand-in requests, tree book and KV view the adapter reads inside vLLM (one tenant, one replica,
recompute preemption: a world vLLM can express) and compares the two tables column by column.
A column whose engine reader and adapter reader drift apart (a different chunk, a different
clock, a different scale) fails here, not in an exported policy's decisions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from servegym.agents.deploy.vllm_adapter import (
    KvView,
    TreeBook,
    TreeStats,
    TreeTag,
    candidate_table,
    global_vector,
)
from servegym.agents.deploy.vllm_adapter import _RequestEntry as RequestEntry
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Decision, DecisionKind, fcfs_scores
from servegym.envs.engine.schema import CANDIDATE, GLOBAL, VllmReading
from servegym.envs.workloads.generators import TreeOfThoughts
from servegym.envs.workloads.job import KNOWN_ROLES
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TIGHT, TINY

EXACT_CANDIDATE = [f.name for f in CANDIDATE.features if f.vllm_reading is VllmReading.EXACT]
EXACT_GLOBAL = [f.name for f in GLOBAL.features if f.vllm_reading is VllmReading.EXACT]


class MirrorCheck:
    """FCFS, checking every ORDER/EVICT decision against the adapter's reading of a mirror."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.checked = {DecisionKind.ORDER: 0, DecisionKind.EVICT: 0}

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind in self.checked:
            self.compare(decision)
            self.checked[decision.kind] += 1
        return (
            -np.arange(len(decision), dtype=np.float64)
            if decision.kind == DecisionKind.EVICT
            else (fcfs_scores(decision))
        )

    def compare(self, decision: Decision) -> None:
        engine = self.engine
        assert engine is not None
        calls, replica = engine.calls, engine.replicas[decision.replica]
        bm, bs = replica.blocks, replica.config.block_size
        book = TreeBook()
        for role, (total, count) in engine.stats.role_output_stats.items():
            book.role_outputs[KNOWN_ROLES[role]] = (int(total), int(count))
        requests, hits = [], {}
        for c in decision.candidates.tolist():
            job = int(calls.job[c])
            tag = TreeTag(
                f"j{job}",
                c - engine.job_table.first_call[job],
                KNOWN_ROLES[calls.role[c]],
                int(calls.depth[c]),
            )
            book.trees.setdefault(
                tag.tree_id,
                TreeStats(
                    first_arrival_s=float(engine.job_table.arrival_s[job]),
                    service_tokens=int(engine.job_table.service[job]),
                    calls_seen=int(engine.job_table.num_calls[job]),
                    calls_done=int(engine.job_table.calls_done[job]),
                ),
            )
            request = SimpleNamespace(
                request_id=tag.encode(),
                num_prompt_tokens=int(calls.prompt_tokens[c]),
                num_computed_tokens=int(calls.num_computed[c]),
                num_output_tokens=int(calls.num_output[c]),
                num_preemptions=int(calls.num_preemptions[c]),
                sampling_params=SimpleNamespace(max_tokens=int(calls.max_tokens[c]), extra_args=None),
                call=c,
            )
            book.requests[request.request_id] = RequestEntry(tag, enqueue_s=float(calls.enqueue_s[c]))
            max_hit = replica.waiting.hit_limit(c)  # as vLLM's lookup: all tokens (outputs too) but the last
            chain = calls.hash_chain(c, max_hit, bs)
            matched = bm.match_prefix(chain, max_hit) if max_hit else []
            hits[c] = (len(matched) * bs, bm.num_reclaimed_by_taking(matched))
            requests.append(request)
        kv = KvView(
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            block_size=bs,
            max_num_batched_tokens=replica.config.max_num_batched_tokens,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            max_num_seqs=replica.config.max_num_seqs,
            long_prefill_token_threshold=replica.config.long_prefill_token_threshold,
            cached_tokens=lambda r: hits[r.call][0],
            cached_free_blocks=lambda r: hits[r.call][1],
            held_blocks=lambda r: int(calls.num_held_blocks[r.call]),
        )
        budget_frac = decision.global_features[GLOBAL.index("token_budget_left_frac")]
        budget = round(float(budget_frac) * replica.config.max_num_batched_tokens)
        table = candidate_table(requests, decision.kind, book, kv, engine.now_s, engine.time_scale_s, budget)
        for name in EXACT_CANDIDATE:
            i = CANDIDATE.index(name)
            np.testing.assert_array_equal(table[:, i], decision.features[:, i], err_msg=name)
        vector = global_vector(
            kv,
            len(replica.waiting),
            len(replica.running),
            engine.num_live_jobs,
            engine.now_s,
            0,
            engine.time_scale_s,
        )
        for name in EXACT_GLOBAL:
            i = GLOBAL.index(name)
            assert vector[i] == decision.global_features[i], name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_adapter_reads_every_exact_column_as_the_engine_does(seed: int) -> None:
    workload = Workload(generator=TreeOfThoughts(depth=2, **TINY), arrival_rate=20.0, num_jobs=10)
    config = TIGHT
    check = MirrorCheck()
    engine = Engine(workload.build(seed), engine=config)
    check.engine = engine
    engine.run(check)
    assert check.checked[DecisionKind.ORDER] > 20 and check.checked[DecisionKind.EVICT] > 0, check.checked
