"""Each baseline reproduces its defining behaviour on a hand-built decision, and every one of
them drives the engine to completion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from servegym.agents.policies import heuristics as H
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    ROUTE_FEATURES,
    Decision,
    DecisionKind,
)
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload


def decision(kind: DecisionKind, rows: list[dict], privileged: list[dict] | None = None) -> Decision:
    """A decision whose rows set the named columns (log1p for *_log, as the engine does)."""
    schema = ROUTE_FEATURES if kind == DecisionKind.ROUTE else CANDIDATE_FEATURES
    table = np.zeros((len(rows), len(schema)), dtype=np.float32)
    for i, row in enumerate(rows):
        for name, value in row.items():
            table[i, schema.index(name)] = math.log1p(value) if name.endswith("_log") else value
    extra = np.zeros((len(rows), len(PRIVILEGED_FEATURES)), dtype=np.float32)
    for i, row in enumerate(privileged or []):
        for name, value in row.items():
            extra[i, PRIVILEGED_FEATURES.index(name)] = value
    return Decision(
        kind=kind,
        replica=0,
        candidates=np.arange(len(rows)),
        features=table,
        privileged=extra,
        global_features=np.zeros(len(GLOBAL_FEATURES), dtype=np.float32),
        mask=np.ones(len(rows), dtype=bool),
    )


def admission_order(policy, d: Decision) -> list[int]:
    return np.argsort(-np.asarray(policy.scores(d)), kind="stable").tolist()


def evicted(policy, d: Decision) -> int:
    return int(np.argmin(policy.scores(d)))


def routed(policy, d: Decision) -> int:
    return int(np.argmax(policy.scores(d)))


def test_fcfs_admits_the_oldest_and_evicts_the_newest() -> None:
    rows = [{"wait_s": 0.2}, {"wait_s": 0.9}, {"wait_s": 0.5}]
    assert admission_order(H.FCFS(), decision(DecisionKind.ORDER, rows)) == [1, 2, 0]
    assert evicted(H.FCFS(), decision(DecisionKind.EVICT, rows)) == 0


def test_lpm_admits_the_longest_cached_prefix_first_then_fcfs() -> None:
    rows = [
        {"prompt_tokens_log": 1000, "cached_prefix_frac": 0.0, "wait_s": 0.9},
        {"prompt_tokens_log": 1000, "cached_prefix_frac": 0.512, "wait_s": 0.1},
        {"prompt_tokens_log": 2000, "cached_prefix_frac": 0.256, "wait_s": 0.2},  # 512 cached, older
        {"prompt_tokens_log": 1000, "cached_prefix_frac": 0.256, "wait_s": 0.3},
    ]
    assert admission_order(H.SGLangLPM(), decision(DecisionKind.ORDER, rows)) == [2, 1, 3, 0]
    # a long queue falls back to FCFS
    assert admission_order(H.SGLangLPM(fcfs_queue_len=3), decision(DecisionKind.ORDER, rows)) == [0, 3, 2, 1]


def test_lpm_retracts_the_call_with_fewest_outputs_longest_prompt_first() -> None:
    rows = [
        {"output_tokens_log": 50, "prompt_tokens_log": 100},
        {"output_tokens_log": 3, "prompt_tokens_log": 100},
        {"output_tokens_log": 3, "prompt_tokens_log": 900},
        {"output_tokens_log": 400, "prompt_tokens_log": 5000},
    ]
    assert evicted(H.SGLangLPM(), decision(DecisionKind.EVICT, rows)) == 2


def test_vtc_serves_the_least_served_tenant_first() -> None:
    rows = [
        {"tenant_vtc_log": 500, "wait_s": 0.9},
        {"tenant_vtc_log": 0, "wait_s": 0.1},
        {"tenant_vtc_log": 0, "wait_s": 0.4},
    ]
    assert admission_order(H.VTC(), decision(DecisionKind.ORDER, rows)) == [2, 1, 0]


def test_oracle_sjf_runs_the_shortest_first_but_not_forever() -> None:
    rows = [{"wait_s": 0.1}, {"wait_s": 0.2}, {"wait_s": 0.3}]
    remaining = [{"true_remaining_output_tokens": n} for n in (300, 20, 700)]
    sjf = H.OracleSJF(starvation_s=60.0, time_scale_s=30.0)
    assert admission_order(sjf, decision(DecisionKind.ORDER, rows, remaining)) == [1, 0, 2]
    assert evicted(sjf, decision(DecisionKind.EVICT, rows, remaining)) == 2
    starving = [{"wait_s": 0.1}, {"wait_s": 0.2}, {"wait_s": 2.5}]  # 75 s > 60 s
    assert admission_order(sjf, decision(DecisionKind.ORDER, starving, remaining))[0] == 2


def test_plas_runs_the_tree_with_least_attained_service_first() -> None:
    rows = [
        {"tree_service_log": 50_000, "wait_s": 0.05},
        {"tree_service_log": 100, "wait_s": 0.01},
        {"tree_service_log": 9_000, "wait_s": 0.02},
    ]
    assert admission_order(H.AutellixPLAS(), decision(DecisionKind.ORDER, rows)) == [1, 2, 0]
    assert evicted(H.AutellixPLAS(), decision(DecisionKind.EVICT, rows)) == 0


def test_plas_sends_a_starved_program_back_to_the_top_queue() -> None:
    rows = [{"tree_service_log": 100, "wait_s": 0.0}, {"tree_service_log": 50_000, "wait_s": 10.0}]
    plas = H.AutellixPLAS(beta=16.0, time_scale_s=30.0, tokens_per_s=5000.0)
    # waited 300 s ~ 1.5M token-equivalents > 16 x 50k service: starved, back to queue 0, and older
    assert admission_order(plas, decision(DecisionKind.ORDER, rows)) == [1, 0]


def test_atlas_uses_the_critical_path_not_the_whole_tree() -> None:
    rows = [
        {"tree_service_log": 100, "critical_path_service_log": 60_000},
        {"tree_service_log": 60_000, "critical_path_service_log": 100},
    ]
    d = decision(DecisionKind.ORDER, rows)
    assert admission_order(H.AutellixPLAS(), d)[0] == 0
    assert admission_order(H.AutellixPLAS(critical_path=True), d)[0] == 1


def test_program_fcfs_orders_by_tree_arrival() -> None:
    rows = [{"tree_age_s": 0.1, "wait_s": 0.9}, {"tree_age_s": 2.0, "wait_s": 0.0}]
    assert admission_order(H.ProgramFCFS(), decision(DecisionKind.ORDER, rows)) == [1, 0]


def test_llumnix_routes_to_the_freest_replica() -> None:
    rows = [
        {"kv_free_frac": 0.9, "running_log": 60, "queued_prefill_tokens_log": 0},
        {"kv_free_frac": 0.5, "running_log": 3, "queued_prefill_tokens_log": 0},
        {"kv_free_frac": 0.9, "running_log": 3, "queued_prefill_tokens_log": 400_000},
    ]
    assert routed(H.LlumnixRouting(capacity_tokens=450_000), decision(DecisionKind.ROUTE, rows)) == 1


def test_autellix_balancer_keeps_long_calls_with_their_program() -> None:
    def rows(prompt: int) -> list[dict]:
        return [
            {"running_log": 1, "kv_free_frac": 0.9, "call_prompt_tokens_log": prompt},
            {"running_log": 40, "kv_free_frac": 0.2, "is_tree_replica": 1, "call_prompt_tokens_log": prompt},
        ]

    balancer = H.AutellixRouting(short_prompt_tokens=2048)
    assert routed(balancer, decision(DecisionKind.ROUTE, rows(500))) == 0
    assert routed(balancer, decision(DecisionKind.ROUTE, rows(9000))) == 1


def test_threshold_router_sends_only_hard_calls_to_the_large_model() -> None:
    def rows(prompt: int) -> list[dict]:
        return [
            {"model_params_log10": 9.9, "kv_free_frac": 0.9, "call_prompt_tokens_log": prompt},
            {"model_params_log10": 10.8, "kv_free_frac": 0.1, "call_prompt_tokens_log": prompt},
        ]

    router = H.ThresholdModelRouting(threshold_tokens=4096)
    assert routed(router, decision(DecisionKind.ROUTE, rows(1000))) == 0
    assert routed(router, decision(DecisionKind.ROUTE, rows(8000))) == 1


def test_round_robin_skips_masked_replicas() -> None:
    d = decision(DecisionKind.ROUTE, [{}, {}, {}])
    d.mask[1] = False
    router = H.RoundRobinRouting()
    assert [routed_once(router, d) for _ in range(4)] == [0, 2, 0, 2]


def routed_once(router: H.RoundRobinRouting, d: Decision) -> int:
    return int(np.argmax(router.route(d)))


CONF_AGENTS = Path(__file__).parents[2] / "conf" / "agent"


def heuristic_agents() -> dict[str, Any]:
    """Every agent config in ``conf/agent/`` that builds a policy on its own (not a trained one,
    which needs a checkpoint or an exported file): a new heuristic's YAML joins the drain test
    without editing this file."""
    root = OmegaConf.create({"time_scale_s": 30.0, "seed": 0})
    agents = {}
    for path in sorted(CONF_AGENTS.glob("*.yaml")):
        node = OmegaConf.load(path)
        if {"checkpoint", "path"} & set(node.keys()):  # a trained policy: needs its file
            continue
        merged = OmegaConf.merge(root, {"agent": node})
        agents[path.stem] = OmegaConf.to_container(merged.agent, resolve=True)
    return agents


HEURISTIC_AGENTS = heuristic_agents()


def test_the_drain_test_covers_every_heuristic_in_the_agent_configs() -> None:
    assert len(HEURISTIC_AGENTS) >= 18 and "tree_srpt_retain_tool_mean" in HEURISTIC_AGENTS
    assert not {"ppo", "maskable_ppo", "onnx"} & set(HEURISTIC_AGENTS)


POLICIES = [lambda cfg=cfg: instantiate(cfg) for cfg in HEURISTIC_AGENTS.values()]


@pytest.mark.parametrize("make", POLICIES, ids=list(HEURISTIC_AGENTS))
def test_every_baseline_drains_a_tight_two_replica_run(make) -> None:
    workload = Workload(generator=MapReduce(fan_out=4, max_tokens=256), arrival_rate=4.0, num_jobs=12)
    engine = Engine(
        workload.build(2),
        cluster=ClusterConfig(replicas=["llama8b_h100", "llama70b_h100x4"]),
        engine=EngineConfig(num_gpu_blocks=700),
    )
    metrics = engine.run(make())
    assert_all_terminal(engine)
    assert metrics.jobs_completed == 12 and not metrics.stalled


def test_ltr_sjf_runs_the_shortest_predicted_first_and_guards_against_starvation() -> None:
    rows = [
        {"predicted_output_log": 300, "output_tokens_log": 0, "wait_s": 0.01},
        {"predicted_output_log": 40, "output_tokens_log": 0, "wait_s": 0.02},
        {"predicted_output_log": 500, "output_tokens_log": 480, "wait_s": 0.03},  # 20 left
    ]
    sjf = H.LTRSJF(starvation_factor=10.0, tokens_per_s=50.0, min_starvation_s=5.0, time_scale_s=30.0)
    assert admission_order(sjf, decision(DecisionKind.ORDER, rows)) == [2, 1, 0]
    assert evicted(sjf, decision(DecisionKind.EVICT, rows)) == 0
    # call 0's predicted service is 300 / 50 = 6 s: after 10 x 6 = 60 s of waiting it goes first
    rows[0]["wait_s"] = 61.0 / 30.0
    assert admission_order(sjf, decision(DecisionKind.ORDER, rows))[0] == 0
    rows[0]["wait_s"] = 59.0 / 30.0
    assert admission_order(sjf, decision(DecisionKind.ORDER, rows))[0] == 2


def test_predicted_tree_srpt_runs_the_tree_with_least_predicted_work_first() -> None:
    rows = [
        {"tree_predicted_left_log": 900, "wait_s": 0.03},
        {"tree_predicted_left_log": 50, "wait_s": 0.01},
        {"tree_predicted_left_log": 50, "wait_s": 0.02},  # same tree as row 1, waited longer
        {"tree_predicted_left_log": 400, "wait_s": 0.04},
    ]
    srpt = H.PredictedTreeSRPT()
    assert admission_order(srpt, decision(DecisionKind.ORDER, rows)) == [2, 1, 3, 0]
    assert evicted(srpt, decision(DecisionKind.EVICT, rows)) == 0  # the most work left goes


def test_engine_predicts_output_lengths_online_per_role_and_tenant() -> None:
    from servegym.envs.engine.features import predicted_output_tokens

    source = Workload(generator=MapReduce(fan_out=3), arrival_rate=2.0, num_jobs=3).build(0)
    engine = Engine(source, engine=EngineConfig(profile="tiny_cpu"))
    engine.run(H.LTRSJF())
    calls, n = engine.calls, engine.calls.size
    ids = np.arange(n)
    predicted = predicted_output_tokens(engine, ids)
    for role in set(calls.role[:n].tolist()):  # one tenant: the per-role mean of finished outputs
        mine = calls.role[:n] == role
        assert np.allclose(predicted[mine], calls.num_output[:n][mine].mean())
