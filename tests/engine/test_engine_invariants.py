"""Engine invariants (listed in envs/README.md) over random agent workloads, policies and tight KV caches:

* every KV block is free, cached or owned exactly once, between decisions and at the end, and
  the pool is whole again when the workload drains (no leaked blocks, no host blocks left);
* every call of every tree runs to completion exactly once, after its parents and their tools;
* the same seed and config give the same trajectory bit for bit, and fast-forwarding decode runs
  gives the trajectory stepping gives;
* decisions carry the documented feature table, without the privileged columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from servegym.agents.policies.heuristics import FCFS, RandomPolicy, RoundRobinRouting
from servegym.envs.engine.backend import SimBackend
from servegym.envs.engine.calls import CallState
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.cost_model import load_profile
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.features import predicted_output_tokens
from servegym.envs.engine.metrics import RunMetrics
from servegym.envs.engine.policy import (
    BUDGET_FEATURES,
    CANDIDATE_FEATURES,
    CONFIG_FEATURES,
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    RETAIN_FEATURES,
    ROUTE_FEATURES,
    Decision,
    DecisionKind,
    Policy,
    column,
)
from servegym.envs.soak import generators
from servegym.envs.workloads.generators import (
    Debate,
    ReactChain,
)
from servegym.envs.workloads.job import Call, Job, Output, Text
from servegym.envs.workloads.source import FixedJobs, JobSource
from servegym.envs.workloads.workload import Workload

PROFILE = "tiny_cpu"  # a cheap cost model; the scheduling logic is the same for every profile
MAX_CONTEXT_TOKENS = 512  # no generated call exceeds this (prompt + max_tokens)
# outputs long next to prompts, so decodes outgrow what admission reserved
GENERATORS = generators(40.0, 64, max_context_tokens=MAX_CONTEXT_TOKENS)
_REACT, _MAP_REDUCE, _DEBATE = GENERATORS["react"], GENERATORS["map_reduce"], GENERATORS["debate"]


# ---------------------------------------------------------------- policies
class LIFO:
    """Newest ready call first, oldest running call evicted: FCFS's mirror image."""

    def __init__(self) -> None:
        self.router = RoundRobinRouting()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.router.route(decision)
        return -decision.features[:, column("wait_s")].astype(np.float64)


class Linear:
    """A fixed random linear score of every feature column: a feature that differs between
    two runs changes its answers, so trajectories compare through what the policy sees."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=len(CANDIDATE_FEATURES))
        self.w_route = rng.normal(size=len(ROUTE_FEATURES))
        self.w_retain = rng.normal(size=len(RETAIN_FEATURES))  # drawn last: w, w_route as before
        self.w_config = rng.normal(size=len(CONFIG_FEATURES))
        self.w_budget = rng.normal(size=len(BUDGET_FEATURES))

    def scores(self, decision: Decision) -> np.ndarray:
        weights = {
            DecisionKind.ROUTE: self.w_route,
            DecisionKind.RETAIN: self.w_retain,
            DecisionKind.CONFIG: self.w_config,
            DecisionKind.BUDGET: self.w_budget,
        }
        return decision.features.astype(np.float64) @ weights.get(decision.kind, self.w)


class Stopper:
    """Random scores, and a random STOP score where the decision offers STOP (pick-next)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.router = RoundRobinRouting()

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            return self.router.route(decision)
        return self.rng.random(len(decision) + int(decision.stop))


POLICIES = ("fcfs", "random", "lifo", "linear", "stopper")


def make_policy(name: str, seed: int) -> Policy:
    if name == "fcfs":
        return FCFS()
    if name == "random":
        return RandomPolicy(seed)
    if name == "lifo":
        return LIFO()
    if name == "stopper":
        return Stopper(seed)
    return Linear(seed)


class Recorder:
    """Wraps a policy and keeps what it was shown: the decision trajectory."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.trace: list[tuple] = []

    def scores(self, decision: Decision) -> np.ndarray:
        self.trace.append(
            (
                int(decision.kind),
                decision.replica,
                decision.now_s,
                decision.call,
                decision.candidates.tobytes(),
                decision.features.tobytes(),
                decision.global_features.tobytes(),
                decision.mask.tobytes(),
            )
        )
        return self.policy.scores(decision)


# ---------------------------------------------------------------- scenarios
RETAIN_TTLS_S = [0.0, 0.01, 0.05, 1.0]
FAULTS = dict(
    tool_failure_prob=0.3,
    tool_timeout_s=0.02,
    tool_retries=1,
    network_jitter_s=0.002,
    slowdowns=[{"replica": 0, "start_s": 0.005, "duration_s": 0.03, "factor": 8.0}],
    outages=[{"replica": 0, "start_s": 0.004, "duration_s": 0.02}],
)
"""Scenario.faults: tool failures, jitter, a slowdown and an outage on the scenarios' millisecond time scale."""
"""pin_ttl_rule=policy: a RETAIN menu on these scenarios' millisecond time scale."""


@dataclass(frozen=True)
class Scenario:
    generator: str
    seed: int
    arrival: str
    arrival_rate: float
    num_jobs: int
    replicas: str  # "1", "2" or "hetero" (a 2-replica cluster of different models)
    block_size: int
    kv_slack: float  # blocks = ceil(largest call / block_size) * kv_slack
    max_num_batched_tokens: int
    max_num_seqs: int
    long_prefill_token_threshold: int
    preemption_mode: str
    swap_blocks: int  # host tier, in blocks of the tiny profile
    prefix_caching: bool
    network_delay_s: float
    policy: str
    policy_seed: int
    fast_forward: bool = True
    pin_ttl_rule: str = "off"
    prefix_eviction: str = "lru"
    admission: str = "rank"
    faults: bool = False  # tool failures (retried after a timeout) and network jitter
    config_every_s: float = 0.0  # CONFIG decisions over CONFIG_GRID
    budgets: bool = False  # continuations of truncated outputs, and BUDGET decisions over BUDGET_MULTIPLIERS
    reserve_output_frac: float = 0.0  # SGLang-style KV reservation for decodes at admission


@st.composite
def scenarios(draw: st.DrawFn, tight: bool = True) -> Scenario:
    return Scenario(
        generator=draw(st.sampled_from(sorted(GENERATORS))),
        seed=draw(st.integers(0, 2**32 - 1)),
        arrival=draw(st.sampled_from(["poisson", "gamma", "gamma", "closed"])),
        arrival_rate=draw(st.sampled_from([5.0, 100.0, 1000.0, 10_000.0])),
        num_jobs=draw(st.integers(3, 15)),
        replicas=draw(st.sampled_from(["1", "2", "hetero"])),
        block_size=draw(st.sampled_from([4, 8, 16])),
        kv_slack=draw(st.one_of(st.just(1.0), st.floats(1.0, 3.0))) if tight else 50.0,
        max_num_batched_tokens=draw(st.sampled_from([8, 24, 64, 8192])),
        max_num_seqs=draw(st.sampled_from([3, 256, 256])),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 12])),
        preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
        swap_blocks=draw(st.sampled_from([0, 8, 10_000])),
        prefix_caching=draw(st.booleans()),
        network_delay_s=draw(st.sampled_from([0.0, 0.0, 0.003])),
        policy=draw(st.sampled_from(POLICIES)),
        policy_seed=draw(st.integers(0, 2**16)),
        pin_ttl_rule=draw(st.sampled_from(["off", "off", "fixed", "tool_mean", "oracle", "policy"])),
        prefix_eviction=draw(st.sampled_from(["lru", "workflow"])),
        admission=draw(st.sampled_from(["rank", "rank", "pick"])),
        faults=draw(st.sampled_from([False, False, True])),
        config_every_s=draw(st.sampled_from([0.0, 0.0, 0.02])),
        budgets=draw(st.sampled_from([False, False, True])),
        reserve_output_frac=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),  # drawn last: the others as before
    )


BUDGET_MULTIPLIERS = [0.25, 1.0, 2.0]
CONTINUATION_TOKENS = 8


def largest_call_tokens(source: JobSource, continued: bool = False) -> int:
    """Prompt + max_tokens of the largest call (a bound for a closed loop, whose jobs come later).
    ``continued``: outputs are whole (continuations resume what a budget cut), so prompts read
    true output lengths, and a chain's last continuation also holds its call's output and one
    instruction per link (a link makes at least a quarter of the workload budget)."""
    if not isinstance(source, FixedJobs):
        return MAX_CONTEXT_TOKENS
    if not continued:
        return max(job.prompt_tokens(c.call_id) + c.max_tokens for job in source.jobs for c in job.calls)
    largest = 0
    for job in source.jobs:
        for c in job.calls:
            prompt = sum(
                seg.num_tokens if isinstance(seg, Text) else job.calls[seg.call].output_tokens
                for seg in c.prompt
            )
            links = 1 + math.ceil(4 * c.output_tokens / c.max_tokens)
            largest = max(largest, prompt + c.output_tokens + links * CONTINUATION_TOKENS + c.max_tokens)
    return largest


def build(sc: Scenario) -> Engine:
    workload = Workload(
        generator=GENERATORS[sc.generator],
        # budgets: a list of jobs, whose whole outputs bound the cache the run needs
        arrival="poisson" if sc.budgets and sc.arrival == "closed" else sc.arrival,
        arrival_rate=sc.arrival_rate,
        num_jobs=sc.num_jobs,
        num_users=4,
        think_time_s=0.02,
    )
    source = workload.build(sc.seed)
    fit_blocks = -(-largest_call_tokens(source, sc.budgets) // sc.block_size)  # every call fits alone
    block_bytes = load_profile(PROFILE).kv_bytes_per_token * sc.block_size
    config = EngineConfig(
        profile=PROFILE,
        block_size=sc.block_size,
        num_gpu_blocks=max(fit_blocks, int(fit_blocks * sc.kv_slack)),
        max_num_batched_tokens=sc.max_num_batched_tokens,
        max_num_seqs=sc.max_num_seqs,
        long_prefill_token_threshold=sc.long_prefill_token_threshold,
        preemption_mode=sc.preemption_mode,
        swap_space_bytes=float(sc.swap_blocks * block_bytes),
        enable_prefix_caching=sc.prefix_caching,
        fast_forward=sc.fast_forward,
        pin_ttl_rule=sc.pin_ttl_rule,
        pin_ttl_s=0.05 if sc.pin_ttl_rule != "off" else 0.0,
        retain_ttls_s=RETAIN_TTLS_S,
        prefix_eviction=sc.prefix_eviction,
        admission=sc.admission,
        config_every_s=sc.config_every_s,
        config_max_num_seqs=[2, 4, 256],
        config_max_num_batched_tokens=[16, 8192],
        continue_truncated=sc.budgets,
        continuation_prompt_tokens=CONTINUATION_TOKENS,
        budget_rule="policy" if sc.budgets else "workload",
        budget_multipliers=BUDGET_MULTIPLIERS,
        reserve_output_frac=sc.reserve_output_frac,
    )
    faults = FAULTS if sc.faults else {}
    if sc.replicas == "hetero":  # with faults, critics and aggregators need the larger model
        sizes = {"role_min_params": {"critic": 1e9, "aggregator": 1e9}} if sc.faults else {}
        cluster = ClusterConfig(
            replicas=[PROFILE, "llama1b_h100"], network_delay_s=sc.network_delay_s, **faults, **sizes
        )
    else:
        cluster = ClusterConfig(num_replicas=int(sc.replicas), network_delay_s=sc.network_delay_s, **faults)
    return Engine(source, cluster, config)


# ---------------------------------------------------------------- invariant checks
def check_live(engine: Engine, decision: Decision | None = None) -> None:
    """Invariants that hold at every point where the engine hands out a decision: the engine's
    own check (``Engine.check_invariants``), and the decision's table."""
    engine.check_invariants()
    if decision is not None:
        check_decision(engine, decision)


def check_decision(engine: Engine, decision: Decision) -> None:
    calls, k = engine.calls, len(decision)
    assert k >= 1 and decision.candidates.shape == (k,) and decision.mask.shape == (k,)
    assert np.isfinite(decision.features).all() and np.isfinite(decision.global_features).all()
    if decision.kind == DecisionKind.ROUTE:
        assert decision.features.shape == (len(engine.replicas), len(ROUTE_FEATURES))
        assert calls.state[decision.call] == CallState.PENDING
        assert decision.mask.sum() >= 2  # a single eligible replica needs no decision
        return
    replica = engine.replicas[decision.replica]
    if decision.kind == DecisionKind.RETAIN:
        check_retain(engine, replica, decision)
        return
    if decision.kind == DecisionKind.CONFIG:
        check_config(replica, decision)
        return
    if decision.kind == DecisionKind.BUDGET:
        check_budget(engine, replica, decision)
        return
    assert decision.features.shape == (k, len(CANDIDATE_FEATURES))
    assert decision.features.dtype == np.float32
    picking = replica.config.admission == "pick" and decision.kind == DecisionKind.ORDER
    if picking:  # pick-next: the mask is what fits now; a choice exists (STOP or two that fit)
        assert decision.mask.any() and (decision.stop or decision.mask.sum() >= 2)
        needs = replica.waiting.queue_needs(
            int(
                round(
                    decision.global_features[column("token_budget_left_frac", GLOBAL_FEATURES)]
                    * replica.config.max_num_batched_tokens
                )
            )
        )
        assert (decision.mask == needs.fits).all()
    else:
        assert decision.mask.all() and not decision.stop
    assert decision.global_features.shape == (len(GLOBAL_FEATURES),)
    candidates = decision.candidates.tolist()
    if decision.kind == DecisionKind.ORDER:
        assert (k >= 1 if picking else k >= 2) and sorted(candidates) == sorted(replica.waiting)
    else:
        assert k >= 2 and set(candidates) <= set(replica.running)
        assert (decision.features[:, column("is_running")] == 1).all()
    free_slots = decision.global_features[column("free_slots_frac", GLOBAL_FEATURES)]
    assert np.isclose(free_slots, 1 - len(replica.running) / replica.config.max_num_seqs)
    check_tree_state(engine, decision)


def check_config(replica, decision: Decision) -> None:
    """A CONFIG decision: the grid's options (plus the current pair when off it), exactly one
    of them the current pair, and a full batch's KV demand growing with the cap."""
    config = replica.config
    assert config.config_every_s > 0
    grid = len(config.config_max_num_seqs) * len(config.config_max_num_batched_tokens)
    assert decision.features.shape in ((grid, len(CONFIG_FEATURES)), (grid + 1, len(CONFIG_FEATURES)))
    assert decision.features[:, column("is_current", CONFIG_FEATURES)].sum() == 1
    seqs = np.expm1(decision.features[:, column("max_num_seqs_log", CONFIG_FEATURES)].astype(np.float64))
    demand = decision.features[:, column("kv_demand_frac", CONFIG_FEATURES)]
    order = np.argsort(seqs, kind="stable")
    assert (np.diff(demand[order]) >= -1e-6).all()


def check_retain(engine: Engine, replica, decision: Decision) -> None:
    """A RETAIN decision: asked for a call that just stopped (still RUNNING and on the running
    list, holding its blocks), one row per option of the menu."""
    calls, call, ttls = engine.calls, decision.call, np.asarray(replica.config.retain_ttls_s)
    assert replica.config.pin_ttl_rule == "policy"
    assert decision.features.shape == (len(ttls), len(RETAIN_FEATURES))
    assert (decision.candidates == np.arange(len(ttls))).all() and decision.mask.all()
    assert calls.state[call] == CallState.RUNNING and call in replica.running
    assert calls.num_output[call] >= calls.target_tokens[call] and call not in replica.pins
    ttl = decision.features[:, column("ttl_s", RETAIN_FEATURES)] * engine.time_scale_s
    assert np.allclose(ttl, ttls, atol=1e-4)
    assert (decision.features[:, column("is_release", RETAIN_FEATURES)] == (ttls == 0)).all()
    pinned = sum(len(b) for b in replica.pins.values()) / replica.blocks.num_blocks
    assert np.isclose(decision.features[0, column("pinned_frac", RETAIN_FEATURES)], pinned)
    assert 0 < decision.features[0, column("pin_blocks_frac", RETAIN_FEATURES)] <= 1
    truth = decision.privileged[:, PRIVILEGED_FEATURES.index("true_tool_latency_s")]
    assert np.allclose(truth, calls.tool_latency_s[call] + engine.cluster.network_delay_s, atol=1e-5)


def check_budget(engine: Engine, replica, decision: Decision) -> None:
    """A BUDGET decision: asked for a workload call (never a continuation) routed to the replica
    but not queued yet, one row per multiplier, the mask what the replica's cache holds."""
    calls, call = engine.calls, decision.call
    assert replica.config.budget_rule == "policy" and calls.continues[call] == -1
    assert calls.state[call] == CallState.PENDING and call not in replica.waiting
    multipliers = np.asarray(replica.config.budget_multipliers)
    assert decision.features.shape == (len(multipliers), len(BUDGET_FEATURES))
    assert np.allclose(decision.features[:, column("multiplier", BUDGET_FEATURES)], multipliers)
    budgets = np.expm1(decision.features[:, column("max_tokens_log", BUDGET_FEATURES)].astype(np.float64))
    workload = engine.trees.spec(call).max_tokens
    assert np.allclose(budgets, np.maximum(np.rint(multipliers * workload), 1), rtol=1e-5)
    fits = calls.prompt_tokens[call] + np.rint(budgets) <= replica.capacity_tokens
    assert (decision.mask == fits).all() and decision.mask[multipliers == 1.0].all()
    truth = decision.privileged[:, PRIVILEGED_FEATURES.index("true_remaining_output_tokens")]
    assert (truth == calls.true_output_tokens[call]).all()


TREE_STATE = ("tree_ready_log", "tree_running_log", "tree_blocked_log", "tree_tool_paused_log")


def check_tree_state(engine: Engine, decision: Decision) -> None:
    """The tree-state columns (schema v3) against a call-by-call count over each row's tree."""
    calls = engine.calls
    for row, call in enumerate(decision.candidates.tolist()):
        tree = engine.job_table.call_ids(int(calls.job[call]))
        states = [CallState(int(calls.state[c])) for c in tree]
        counts = (
            sum(s in (CallState.WAITING, CallState.SWAPPED) for s in states),
            states.count(CallState.RUNNING),
            sum(
                s == CallState.PENDING and calls.pending_parents[c] > 0
                for c, s in zip(tree, states, strict=True)
            ),
            sum(
                s == CallState.PENDING and calls.pending_parents[c] == 0
                for c, s in zip(tree, states, strict=True)
            ),
        )
        got = decision.features[row, [column(name) for name in TREE_STATE]]
        assert np.allclose(got, np.log1p(counts), atol=1e-5), (call, got, counts)
        assert counts[0] >= 1 or calls.state[call] == CallState.RUNNING  # it counts itself
        depths = [int(calls.depth[c]) for c, s in zip(tree, states, strict=True) if s < CallState.FINISHED]
        assert decision.features[row, column("tree_depth_left")] == max(depths) - min(depths) + 1
        left = [c for c, s in zip(tree, states, strict=True) if s < CallState.FINISHED]
        work = sum(
            max(predicted_output_tokens(engine, np.array([c]))[0] - calls.num_output[c], 0) for c in left
        )
        assert np.isclose(
            decision.features[row, column("tree_predicted_left_log")], np.log1p(work), atol=1e-4
        )


def check_drained(engine: Engine, metrics: RunMetrics, num_jobs: int) -> None:
    """The run completed every call of every tree once, and gave every block back."""
    assert not metrics.stalled, metrics.stall_reason
    assert_all_terminal(engine)
    calls, n = engine.calls, engine.calls.size
    jobs = engine.jobs
    assert len(jobs) == num_jobs
    assert metrics.jobs_completed + metrics.jobs_failed == num_jobs
    assert metrics.jobs_failed == 0 and metrics.calls_rejected == 0 and engine.rejections == []
    trees, continued = engine.trees, engine.config.continue_truncated
    assert n == sum(len(job.calls) for job in jobs) + metrics.continuations == metrics.calls_completed
    assert (calls.state[:n] == CallState.FINISHED).all()
    # each call finished exactly once: a double finish would overcount its job
    extra = engine.job_table.num_extra[: len(jobs)]
    assert engine.job_table.calls_done[: len(jobs)].tolist() == [
        len(job.calls) + e for job, e in zip(jobs, extra, strict=False)
    ]
    assert int(extra.sum()) == metrics.continuations and (continued or metrics.continuations == 0)
    assert not np.isnan(engine.job_table.finish_s[: len(jobs)]).any()
    delay = engine.cluster.network_delay_s

    def chain(call: int) -> list[int]:  # a call and the continuations that resumed its output
        links = [call]
        while links[-1] in trees.continued:
            links.append(trees.continued[links[-1]])
        return links

    for index, job in enumerate(jobs):
        base = engine.job_table.first_call[index]
        for spec in job.calls:
            call = base + spec.call_id
            links = chain(call)
            assert calls.call_in_job[call] == spec.call_id and calls.job[call] == index
            # the whole output when truncation is continued (each link to its own stop), else the budget's
            assert (calls.num_output[links] == calls.target_tokens[links]).all()
            whole = int(calls.num_output[links].sum())
            assert whole == (spec.output_tokens if continued else spec.generated_tokens)
            assert calls.prompt_tokens[call] == sum(
                seg.num_tokens
                if isinstance(seg, Text)
                else int(calls.num_output[chain(base + seg.call)].sum())
                for seg in spec.prompt
            )
            for before, after in zip(
                links, links[1:], strict=False
            ):  # a continuation: one hop after the stop
                assert calls.continues[after] == before and calls.tool_latency_s[before] == 0
                assert calls.ready_s[after] == calls.finish_s[before] + delay
                assert calls.prompt_tokens[after] == (
                    calls.prompt_tokens[before] + calls.num_output[before] + CONTINUATION_TOKENS
                )
            # the last sampled token is never computed: KV holds prompt + output - 1 tokens
            assert (
                calls.num_computed[links] == calls.prompt_tokens[links] + calls.num_output[links] - 1
            ).all()
            # its pause (after its last continuation): the tool's latency; with faults, failed
            # attempts' timeouts and jitter too
            pause, failures = calls.tool_latency_s[links[-1]], int(calls.tool_failures[links[-1]])
            if not engine.cluster.faults:
                assert pause == spec.tool_latency_s and failures == 0
            else:
                c = engine.cluster
                tries = c.tool_retries + 1
                bare = failures * c.tool_timeout_s + (spec.tool_latency_s if failures < tries else 0.0)
                assert 0 <= failures <= (tries if spec.tool_latency_s > 0 else 0)
                assert pause >= bare - 1e-12 and (c.network_jitter_s > 0 or pause == bare)
            # ready exactly when the last parent finished, its tool returned and the network crossed
            if spec.parents:
                ends = [chain(base + p)[-1] for p in spec.parents]
                release = max(calls.finish_s[end] + calls.tool_latency_s[end] for end in ends)
                assert calls.ready_s[call] == max(job.arrival_s, release) + delay
            else:
                assert calls.ready_s[call] == job.arrival_s
            assert (calls.ready_s[links] < calls.first_token_s[links]).all()
            assert (calls.first_token_s[links] <= calls.finish_s[links]).all()
        assert engine.job_table.finish_s[index] == max(calls.finish_s[engine.job_table.call_ids(index)])
    for replica in engine.replicas:
        bm = replica.blocks
        bm.check_invariants()
        assert not replica.waiting and not replica.running
        assert not replica.pins and not replica.pins.waiters and not replica.pins.of_child
        assert bm.ref_count == [0] * bm.num_blocks
        assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
        assert bm.num_host_used_blocks == 0
        assert bm.num_freed_total - bm.num_allocated_total == bm.num_taken_total
    assert all(not table for table in calls.blocks[:n])
    assert not calls.num_held_blocks[:n].any() and not calls.host_blocks[:n].any()
    assert not calls.lost_tokens[:n].any()
    assert metrics.preemptions == int(calls.num_preemptions[:n].sum())
    assert 0.0 <= metrics.prefix_hit_rate <= 1.0 and 0.0 <= metrics.kv_utilization_mean <= 1.0
    if engine.config.preemption_mode == "recompute" or engine.config.swap_space_bytes == 0:
        assert metrics.swapped_bytes == 0
    if not engine.config.enable_prefix_caching:
        assert metrics.prefix_hit_rate == 0.0


def drive(engine: Engine, policy: Policy, max_decisions: int = 200_000) -> RunMetrics:
    """``engine.run`` by hand, checking the live invariants at every decision."""
    check_live(engine)
    for _ in range(max_decisions):
        decision = engine.next_decision()
        if decision is None:
            return engine.metrics()
        check_live(engine, decision)
        engine.decide(policy.scores(decision))
        check_live(engine)
    raise AssertionError(f"no end after {max_decisions} decisions")


# ---------------------------------------------------------------- every call once, no leaks
# Every engine run below sits under a wall-clock limit (typical runs take 10-200 ms): a livelock
# fails the example instead of hanging the suite.
RUN_LIMIT_S = 60


@given(sc=scenarios())
def test_random_workloads_drain_without_leaks(time_limit, sc: Scenario) -> None:
    engine = build(sc)
    with time_limit(RUN_LIMIT_S):
        metrics = engine.run(make_policy(sc.policy, sc.policy_seed))
    check_drained(engine, metrics, sc.num_jobs)
    event(f"preempted: {metrics.preemptions > 0}")
    event(f"swapped: {metrics.swapped_bytes > 0}")
    event(f"continued: {metrics.continuations > 0}")
    event(f"requeued: {metrics.requeued_calls > 0}")


@given(sc=scenarios())
@pytest.mark.slow
def test_invariants_hold_between_decisions(time_limit, sc: Scenario) -> None:
    engine = build(sc)
    with time_limit(RUN_LIMIT_S):
        metrics = drive(engine, make_policy(sc.policy, sc.policy_seed))
    check_drained(engine, metrics, sc.num_jobs)


def _contended_jobs() -> list[Job]:
    """Six 40-token-prompt calls arriving together, each generating 40 tokens: far more KV than
    a 30-block cache of 4-token blocks holds at once, while any one call fits alone."""
    calls = lambda j: (Call(0, "worker", (Text(f"q{j}", 40),), output_tokens=40, max_tokens=40),)  # noqa: E731
    return [Job(f"j{j}", 0.0, calls(j)) for j in range(6)]


def _contended_engine(mode: str, **overrides) -> Engine:
    config = dict(
        profile=PROFILE,
        block_size=4,
        num_gpu_blocks=30,
        preemption_mode=mode,
        swap_space_bytes=1e7,
        enable_prefix_caching=False,
    )
    return Engine(FixedJobs(_contended_jobs()), engine=EngineConfig(**{**config, **overrides}))


@pytest.mark.parametrize("policy", ["fcfs", "random", "lifo"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tight_kv_preempts_and_still_completes_everything(mode: str, policy: str) -> None:
    engine = _contended_engine(mode)
    metrics = drive(engine, make_policy(policy, 1))
    check_drained(engine, metrics, 6)
    assert metrics.preemptions > 0
    if mode == "swap":
        assert metrics.swapped_bytes > 0 and metrics.recomputed_tokens == 0
    else:
        assert metrics.swapped_bytes == 0 and metrics.recomputed_tokens > 0


def test_swap_falls_back_to_recompute_when_the_host_tier_is_full() -> None:
    engine = _contended_engine("swap", swap_space_bytes=0.0)
    metrics = drive(engine, FCFS())
    check_drained(engine, metrics, 6)
    assert metrics.preemptions > 0 and metrics.swapped_bytes == 0 and metrics.recomputed_tokens > 0


# ---------------------------------------------------------------- decisions and features
def test_order_decision_feature_table() -> None:
    engine = _contended_engine("recompute")
    decision = engine.next_decision()
    assert decision is not None and decision.kind == DecisionKind.ORDER
    k = len(decision)
    assert k == 6 and decision.features.shape == (k, len(CANDIDATE_FEATURES))
    assert decision.features.dtype == np.float32 and np.isfinite(decision.features).all()
    assert decision.privileged.shape == (k, len(PRIVILEGED_FEATURES))
    assert decision.global_features.shape == (len(GLOBAL_FEATURES),)
    assert decision.global_features.dtype == np.float32
    assert np.isfinite(decision.global_features).all()
    assert not set(PRIVILEGED_FEATURES) & set(CANDIDATE_FEATURES)
    # nothing ran yet: every candidate waits with a 40-token prompt and its full budget
    table = decision.features
    assert (table[:, column("is_running")] == 0).all()
    assert np.allclose(table[:, column("prompt_tokens_log")], np.log1p(40))
    assert np.allclose(table[:, column("budget_left_log")], np.log1p(40))


def test_privileged_columns_do_not_reach_the_features() -> None:
    """Two workloads that differ only in what an oracle knows (true output length, tool time)
    show a policy identical features but different privileged columns."""

    def first_decision(output_tokens: int, tool_s: float) -> Decision:
        jobs = [
            Job(
                f"j{j}",
                0.0,
                (
                    Call(0, "worker", (Text(f"q{j}", 30),), output_tokens + j, 64, tool_latency_s=tool_s),
                    Call(1, "worker", (Text(f"q{j}", 30), Output(0)), 5, 64, parents=(0,)),
                ),
            )
            for j in range(3)
        ]
        engine = Engine(FixedJobs(jobs), engine=EngineConfig(profile=PROFILE, num_gpu_blocks=64))
        decision = engine.next_decision()
        assert decision is not None and decision.kind == DecisionKind.ORDER
        return decision

    a, b = first_decision(10, 0.5), first_decision(50, 7.0)
    assert a.features.tobytes() == b.features.tobytes()
    assert a.global_features.tobytes() == b.global_features.tobytes()
    remaining = column("true_remaining_output_tokens", PRIVILEGED_FEATURES)
    tool = column("true_tool_latency_s", PRIVILEGED_FEATURES)
    assert a.privileged[:, remaining].tolist() == [10, 11, 12]
    assert b.privileged[:, remaining].tolist() == [50, 51, 52]
    assert a.privileged[:, tool].tolist() == [0.5] * 3 and b.privileged[:, tool].tolist() == [7.0] * 3


def test_evict_decisions_appear_under_tight_kv() -> None:
    engine = _contended_engine("recompute")
    seen: list[Decision] = []
    policy = FCFS()

    class Watch:
        def scores(self, decision: Decision) -> np.ndarray:
            if decision.kind == DecisionKind.EVICT:
                seen.append(decision)
                check_live(engine, decision)
            return policy.scores(decision)

    metrics = engine.run(Watch())
    check_drained(engine, metrics, 6)
    assert seen, "a cache this tight must ask the policy for victims"
    for decision in seen:
        assert len(decision) > 1
        assert decision.features.shape == (len(decision), len(CANDIDATE_FEATURES))
        assert decision.features.dtype == np.float32 and np.isfinite(decision.features).all()


# ---------------------------------------------------------------- determinism
def run_recorded(sc: Scenario) -> tuple[Engine, RunMetrics, Recorder]:
    engine = build(sc)
    recorder = Recorder(make_policy(sc.policy, sc.policy_seed))
    return engine, engine.run(recorder), recorder


def per_call(engine: Engine) -> dict[str, bytes]:
    """Per-call results as raw bytes: equal bytes means bit-identical, NaNs included."""
    calls, n = engine.calls, engine.calls.size
    names = (
        "finish_s",
        "first_token_s",
        "ready_s",
        "num_output",
        "num_preemptions",
        "recomputed_tokens",
        "cached_prompt_tokens",
        "replica",
    )
    return {name: getattr(calls, name)[:n].tobytes() for name in names}


def same_metrics(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of metrics that differ (NaN equals NaN; every other float must match exactly)."""
    differ = []
    for key in a:
        if key in skip:
            continue
        x, y = a[key], b[key]
        both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        if not both_nan and x != y:
            differ.append(f"{key}: {x!r} != {y!r}")
    return differ


@given(sc=scenarios())
@pytest.mark.slow
def test_same_seed_same_trajectory_bit_for_bit(time_limit, sc: Scenario) -> None:
    with time_limit(RUN_LIMIT_S):
        engine_a, metrics_a, rec_a = run_recorded(sc)
        engine_b, metrics_b, rec_b = run_recorded(sc)
    assert same_metrics(metrics_a.as_dict(), metrics_b.as_dict()) == []
    assert per_call(engine_a) == per_call(engine_b)
    assert rec_a.trace == rec_b.trace
    # a different workload seed gives a different run
    with time_limit(RUN_LIMIT_S):
        engine_c, _, _ = run_recorded(replace(sc, seed=(sc.seed + 1) % 2**32))
    assert per_call(engine_c)["finish_s"] != per_call(engine_a)["finish_s"]


# ---------------------------------------------------------------- fast-forward == stepping
@given(sc=scenarios(), tight=st.booleans())
@pytest.mark.slow
def test_fast_forward_equals_stepping(time_limit, sc: Scenario, tight: bool) -> None:
    if not tight:
        sc = replace(sc, kv_slack=50.0)
    with time_limit(RUN_LIMIT_S):
        engine_ff, metrics_ff, rec_ff = run_recorded(replace(sc, fast_forward=True))
        engine_step, metrics_step, rec_step = run_recorded(replace(sc, fast_forward=False))
    a, b = metrics_ff.as_dict(), metrics_step.as_dict()
    assert same_metrics(a, b, skip=("kv_utilization_mean",)) == []
    assert a["kv_utilization_mean"] == pytest.approx(b["kv_utilization_mean"], rel=1e-9, abs=0.0)
    assert per_call(engine_ff) == per_call(engine_step)
    assert len(rec_ff.trace) == len(rec_step.trace)
    assert rec_ff.trace == rec_step.trace


def test_decisions_during_another_replicas_fold_see_what_stepping_shows() -> None:
    """Regression (HEAD 60e648d): a folded run applied its tokens to the tree's service only when
    it ended, so an ORDER decision on the other replica meanwhile saw a stale tree_service_log.
    Self-contained (own generator and config) so the workload cannot drift."""
    debate = Debate(
        num_agents=2,
        num_rounds=2,
        system_tokens=32,
        input_tokens_mean=32.0,
        tool_tokens_mean=16.0,
        output_tokens_mean=16.0,
        max_tokens=32,
        max_context_tokens=512,
    )

    def trace(fast_forward: bool) -> list[tuple]:
        source = Workload(generator=debate, arrival_rate=20.0, num_jobs=3).build(0)
        config = EngineConfig(
            profile=PROFILE,
            block_size=4,
            num_gpu_blocks=50,  # the largest call (200 tokens) just fits
            max_num_batched_tokens=8,
            max_num_seqs=2,
            swap_space_bytes=0.0,
            enable_prefix_caching=False,
            fast_forward=fast_forward,
        )
        engine = Engine(source, ClusterConfig(replicas=[PROFILE, "llama1b_h100"]), config)
        recorder = Recorder(FCFS())
        engine.run(recorder)
        return recorder.trace

    folded, stepped = trace(True), trace(False)
    assert len(folded) == len(stepped) > 10
    for i, (a, b) in enumerate(zip(folded, stepped, strict=True)):
        assert a == b, f"decision {i} differs"


def test_call_ready_at_an_iteration_boundary_joins_when_stepping_would() -> None:
    """Two identical replicas keep identical clocks. The short root on replica 1 finishes at
    exactly the end of an iteration of replica 0's decode run, and its child is routed to
    replica 0 at that instant. Stepping processes replica 0's STEP (key 0) before replica 1's
    (key 1), whose completion only then creates the child's READY: the child waits for the
    next iteration. A folded run must give the child the same iteration (regression: the run
    splitting compared the STEP with the current event's kind and key, and admitted the child
    one iteration early)."""
    jobs = [
        Job("long", 0.0, (Call(0, "worker", (Text("p", 16),), 40, 40),)),
        Job(
            "short",
            0.0,
            (
                Call(0, "worker", (Text("q", 16),), 10, 40),
                Call(1, "worker", (Text("q", 16), Output(0)), 5, 40, parents=(0,)),
            ),
        ),
    ]

    def run(fast_forward: bool) -> Engine:
        config = EngineConfig(profile=PROFILE, fast_forward=fast_forward)
        engine = Engine(FixedJobs(jobs), ClusterConfig(num_replicas=2), config)
        engine.run(FCFS())
        return engine

    folded, stepped = run(True), run(False)
    assert stepped.calls.replica[:3].tolist() == [0, 1, 0]
    assert stepped.calls.ready_s[2] == stepped.calls.finish_s[1]  # ready the instant its parent ends
    assert per_call(folded) == per_call(stepped)


class CountingBackend(SimBackend):
    """The sim backend, counting the batches it is asked to time."""

    def __init__(self, profile) -> None:
        super().__init__(profile)
        self.batches = 0

    def iteration_time_s(self, batch) -> float:
        self.batches += 1
        return super().iteration_time_s(batch)


def test_fast_forward_really_folds_decode_runs() -> None:
    """Guards the equivalence test against passing vacuously: folding must happen."""

    def run(fast_forward: bool) -> tuple[int, int]:
        jobs = [Job("j", 0.0, (Call(0, "worker", (Text("q", 20),), output_tokens=200, max_tokens=200),))]
        config = EngineConfig(profile=PROFILE, fast_forward=fast_forward)
        engine = Engine(FixedJobs(jobs), engine=config, backend_factory=CountingBackend)
        metrics = engine.run(FCFS())
        return metrics.iterations, engine.replicas[0].backend.batches

    iterations_ff, batches_ff = run(True)
    iterations_step, batches_step = run(False)
    assert iterations_ff == iterations_step == batches_step == 200
    assert batches_ff < 10


# ---------------------------------------------------------------- prefix caching
def test_prefix_caching_serves_react_chains() -> None:
    """A ReAct step's prompt is the previous step's whole context: with caching most prompt
    tokens are hits and trees finish sooner; without it nothing hits."""

    def run(caching: bool) -> RunMetrics:
        source = Workload(generator=ReactChain(), arrival_rate=1.0, num_jobs=12).build(7)
        config = EngineConfig(profile="llama8b_h100", enable_prefix_caching=caching)
        engine = Engine(source, engine=config)
        metrics = engine.run(FCFS())
        assert metrics.jobs_completed == 12 and not metrics.stalled
        return metrics

    cached, uncached = run(True), run(False)
    assert cached.prefix_hit_rate > 0.5
    assert uncached.prefix_hit_rate == 0.0
    assert cached.jct_mean_s < uncached.jct_mean_s


def test_check_invariants_names_a_broken_invariant() -> None:
    """The public check fails loudly on a corrupted state (a check that cannot fail is no check)."""
    from servegym.envs.engine.invariants import InvariantError

    engine = Engine(
        Workload(generator=_MAP_REDUCE, arrival_rate=100.0, num_jobs=4).build(0),
        engine=EngineConfig(profile=PROFILE),
    )
    engine.check_invariants()
    while (decision := engine.next_decision()) is not None:
        engine.decide(FCFS().scores(decision))
        replica = engine.replicas[0]
        if replica.running:
            engine.check_invariants()
            replica.blocks.ref_count[engine.calls.blocks[replica.running[0]][0]] += 1  # a leaked reference
            with pytest.raises(InvariantError, match="ref count"):
                engine.check_invariants()
            return
    pytest.fail("nothing ran")


def test_a_drained_engine_passes_the_drain_check() -> None:
    engine = Engine(
        Workload(generator=_DEBATE, arrival_rate=50.0, num_jobs=4).build(1),
        engine=EngineConfig(profile=PROFILE),
    )
    engine.run(FCFS())
    engine.check_invariants()  # live and drained
    engine.job_table.calls_done[0] += 1  # a call counted twice by its tree
    with pytest.raises(AssertionError, match="counted a call"):
        engine.check_invariants()
