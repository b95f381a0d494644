"""The vLLM adapter's feature mapping, tree book and orderings on plain stand-in requests: no vLLM
needed, so these run in the main venv and in CI."""

from __future__ import annotations

import importlib.util
from collections import deque
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from servegym.agents.deploy.runtime import GLOBAL_COLUMNS, ScoreRuntime
from servegym.agents.deploy.vllm_adapter import (
    CLOCK_ENV,
    HORIZON_ENV,
    POLICY_ENV,
    STEP_S_ENV,
    TREE_TAG_KEY,
    KvView,
    PendingRequest,
    PriorityRoute,
    SchedulerAdapter,
    StepClock,
    TreeBook,
    TreeTag,
    WallClock,
    as_policy,
    candidate_table,
    clock_from_env,
    global_vector,
    guarded_order,
    horizon_from_env,
    parse_tree_tag,
    policy_from_env,
    priorities,
    tree_tag_of,
)
from servegym.envs.engine.policy import CANDIDATE_FEATURES, GLOBAL_FEATURES, DecisionKind, column
from servegym.envs.workloads.job import role_id

NOW_S = 1000.0


def request(
    request_id: str, prompt: int, *, computed: int = 0, output: int = 0, max_tokens: int = 64, **extra
):
    fields = {
        "request_id": request_id,
        "arrival_time": NOW_S - 3.0,
        "num_prompt_tokens": prompt,
        "num_computed_tokens": computed,
        "num_output_tokens": output,
        "num_tokens": prompt + output,
        "num_preemptions": 0,
        "sampling_params": SimpleNamespace(max_tokens=max_tokens, extra_args=extra.pop("extra_args", None)),
    }
    return SimpleNamespace(**{**fields, **extra})


def kv(**overrides) -> KvView:
    fields = {"num_blocks": 100, "num_free_blocks": 60, "block_size": 16, "max_num_batched_tokens": 256}
    return KvView(**{**fields, **overrides})


def test_tree_tags_round_trip_and_ignore_vllms_suffix() -> None:
    tag = TreeTag("job-3", 2, "worker", 1)
    assert parse_tree_tag(tag.encode()) == tag
    assert parse_tree_tag(tag.encode() + "-0a1b2c3d") == tag  # vLLM's internal request id
    assert parse_tree_tag("cmpl-123") is None and parse_tree_tag("a:b:c:d") is None
    with pytest.raises(ValueError, match="free of ':'"):
        TreeTag("a:b", 0, "worker", 0)


def test_extra_args_win_over_the_request_id_and_untagged_is_its_own_tree() -> None:
    tagged = request("t1:0:planner:0-ffff0000", 10, extra_args={TREE_TAG_KEY: "t9:4:critic:2"})
    assert tree_tag_of(tagged) == TreeTag("t9", 4, "critic", 2)
    assert tree_tag_of(request("t1:0:planner:0-ffff0000", 10)) == TreeTag("t1", 0, "planner", 0)
    assert tree_tag_of(request("cmpl-42", 10)) == TreeTag("cmpl-42", 0, "other", 0)
    with pytest.raises(ValueError, match="not a tree tag"):
        tree_tag_of(request("x", 10, extra_args={TREE_TAG_KEY: "nonsense"}))


def test_waiting_rows_follow_the_engines_scaling() -> None:
    book = TreeBook()
    parent = request("t1:0:planner:0-aaaa0000", 50, arrival_time=NOW_S - 9.0)
    child = request("t1:1:worker:1-bbbb0000", 200, output=0, max_tokens=30)
    book.add(parent, NOW_S - 9.0)
    book.serve(parent.request_id, 57, NOW_S - 5.0)
    book.finish(parent, NOW_S - 4.0)
    view = kv(cached_tokens=lambda r: 48)
    (row,) = candidate_table([child], DecisionKind.ORDER, book, view, NOW_S, time_scale_s=30.0)
    assert row.shape == (len(CANDIDATE_FEATURES),)
    expected = {
        "is_running": 0,
        "is_swapped": 0,
        "prompt_tokens_log": np.log1p(200),
        "cached_prefix_frac": 48 / 200,
        "computed_tokens_log": 0,
        "output_tokens_log": 0,
        "budget_left_log": np.log1p(30),
        "blocks_held_frac": 0,
        "blocks_needed_frac": (13 - 3) / 100,  # ceil(200 / 16) blocks, 3 of them hit
        "wait_s": 3.0 / 30.0,
        "tree_age_s": 9.0 / 30.0,  # from the parent's arrival
        "role_id": role_id("worker"),
        "depth": 1,
        "tree_service_log": np.log1p(57),
        "critical_path_service_log": 0,
        "tree_calls_done": 1,
        "tree_calls_total_log": np.log1p(2),
        "tenant_vtc_log": 0,
        "preemptions": 0,
        "replica": 0,
        "predicted_output_log": np.log1p(30),  # no worker finished yet: its budget
        "pinned_prefix_frac": 0,
        "tree_ready_log": np.log1p(1),  # the child is its tree's one waiting row
        "tree_running_log": 0,  # the parent finished: nothing of the tree runs
        "tree_blocked_log": 0,
        "tree_tool_paused_log": 0,
        "tree_predicted_left_log": np.log1p(30),
        "tree_depth_left": 1,
    }
    assert set(expected) == set(CANDIDATE_FEATURES)
    for name, value in expected.items():
        assert row[column(name)] == pytest.approx(value, rel=1e-6), name


def test_predicted_output_is_the_roles_mean_of_finished_requests() -> None:
    book = TreeBook()
    for i, output in enumerate((10, 30)):
        done = request(f"t{i}:1:worker:1", 20, output=output)
        book.add(done, NOW_S - 5.0)
        book.finish(done, NOW_S - 1.0)
    rows = candidate_table(
        [request("t9:1:worker:1", 20, max_tokens=500), request("t9:2:critic:2", 20, max_tokens=70)],
        DecisionKind.ORDER,
        book,
        kv(),
        NOW_S,
    )
    assert rows[0, column("predicted_output_log")] == pytest.approx(np.log1p(20.0))
    assert rows[1, column("predicted_output_log")] == pytest.approx(np.log1p(70.0))  # no critic finished


def test_first_chunk_caps_blocks_needed_and_running_rows_hold_blocks() -> None:
    book = TreeBook()
    long_prompt = request("a:0:user:0", 1000)
    running = request("b:0:user:0", 40, computed=45, output=6, num_preemptions=2)
    view = kv(held_blocks=lambda r: 3)
    (waiting_row,) = candidate_table([long_prompt], DecisionKind.ORDER, book, view, NOW_S)
    assert waiting_row[column("blocks_needed_frac")] == pytest.approx(16 / 100)  # 256 tokens this step
    (row,) = candidate_table([running], DecisionKind.EVICT, book, view, NOW_S)
    assert row[column("is_running")] == 1
    assert row[column("blocks_held_frac")] == pytest.approx(3 / 100)
    assert row[column("blocks_needed_frac")] == pytest.approx(1 / 100)
    assert row[column("cached_prefix_frac")] == 1.0  # its whole prompt is in KV
    assert row[column("preemptions")] == 2


def test_tree_book_counts_service_calls_and_restarts_the_wait_on_preemption() -> None:
    book = TreeBook()
    a, b = request("t:0:planner:0", 10), request("t:1:worker:1", 10)
    book.add(a, NOW_S)
    book.add(b, NOW_S)
    book.serve(a.request_id, 10, NOW_S)
    book.serve(b.request_id, 4, NOW_S)
    book.serve("unknown", 99, NOW_S)  # not ours: ignored
    assert book.trees["t"].service_tokens == 14 and book.num_live_trees == 1
    book.preempted(b, NOW_S + 2.0)
    (row,) = candidate_table([b], DecisionKind.ORDER, book, kv(), NOW_S + 5.0, time_scale_s=1.0)
    assert row[column("wait_s")] == pytest.approx(3.0)
    book.finish(a, NOW_S)
    book.finish(b, NOW_S)
    book.finish(b, NOW_S)  # a second finish of the same request counts once
    assert (book.trees["t"].calls_done, book.trees["t"].live, book.num_live_trees) == (2, 0, 0)


def test_global_vector_is_the_engines_schema() -> None:
    view = kv(num_cached_free_blocks=10)
    g = global_vector(
        view, num_waiting=3, num_running=2, num_live_trees=4, elapsed_s=15.0, token_budget_left=64
    )
    assert g.shape == (len(GLOBAL_FEATURES),)
    expected = [0.5, 0.4, 0.1, 0.6, 0.0, np.log1p(3), np.log1p(2), np.log1p(4), 0.25, 1.0]
    assert g.tolist() == pytest.approx(expected)  # no max_num_seqs in the view: every slot free
    capped = global_vector(replace(view, max_num_seqs=8), 3, 2, 4, 15.0, 64)
    assert capped[column("free_slots_frac", GLOBAL_FEATURES)] == pytest.approx(6 / 8)


def test_priorities_of_one_batch_follow_the_exported_policy(length_policy) -> None:
    lengths = [37, 150, 12, 90]
    pending = [PendingRequest(n, 8, TreeTag(f"t{i}", 0, "worker", 0)) for i, n in enumerate(lengths)]
    prios = priorities(pending, ScoreRuntime(length_policy), now_s=NOW_S)
    assert np.argsort(prios).tolist() == [1, 3, 0, 2]  # longest first: lower priority runs first in vLLM
    assert len(set(prios)) == len(prios)  # no ties left to vLLM's arrival order
    assert priorities(pending, length_policy, now_s=NOW_S) == prios  # a path works too
    assert priorities([], length_policy) == []


def test_priority_route_orders_requests_arriving_one_by_one(length_policy) -> None:
    """An agent framework submits calls as they become ready. A newer tree's call that the policy
    prefers must not pass an older tree's calls once the trees arrived more than the horizon
    apart (per-batch ranks gave every lone request priority 0, ahead of all older ones)."""
    route = PriorityRoute(length_policy, horizon_s=2.0)
    old = [PendingRequest(n, 8, TreeTag("old", i, "worker", 1)) for i, n in enumerate((20, 30, 40))]
    old_prios = route.priorities(old, now_s=0.0)
    assert np.argsort(old_prios).tolist() == [2, 1, 0]  # longest first within the batch
    close = route.priorities([PendingRequest(500, 8, TreeTag("close", 0, "planner", 0))], now_s=0.5)
    late = [
        route.priorities([PendingRequest(500, 8, TreeTag(f"late{k}", 0, "planner", 0))], now_s=10.0 + k)
        for k in range(3)
    ]
    assert (
        close[0] < sorted(old_prios)[1]
    )  # 0.5 s later, within the horizon: passes what the policy ranks lower
    assert all(p[0] > max(old_prios) for p in late)  # beyond the horizon: the old tree goes first
    assert [p[0] for p in late] == sorted(p[0] for p in late)  # equal scores: tree arrival order
    # a later call of the old tree keeps its tree's arrival, so it still goes before the late trees
    (child,) = route.priorities([PendingRequest(20, 8, TreeTag("old", 3, "aggregator", 2))], now_s=20.0)
    assert child < min(p[0] for p in late)
    done = old[0]
    done.num_output_tokens = 8
    route.finish(done, now_s=21.0)
    assert route.book.trees["old"].calls_done == 1


def test_guarded_order_bounds_overtaking_by_the_horizon() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 9))
        arrivals = rng.uniform(0, 10, n).round(1).tolist()
        order = rng.permutation(n).tolist()
        horizon = float(rng.choice([0.0, 0.5, 2.0, 5.0]))
        guarded = guarded_order(order, arrivals, horizon)
        assert sorted(guarded) == list(range(n))
        for i, first in enumerate(guarded):
            for later in guarded[i + 1 :]:  # `first` passed `later` only if its tree is not much younger
                assert arrivals[first] - arrivals[later] <= horizon + 1e-9
        if horizon == 0.0:
            assert [arrivals[j] for j in guarded] == sorted(arrivals)
    assert guarded_order([2, 0, 1], [0.0, 0.0, 0.0], 1.0) == [2, 0, 1]  # one arrival: the policy's order
    assert guarded_order([2, 0, 1], [9.0, 5.0, 0.0], float("inf")) == [2, 0, 1]
    with pytest.raises(ValueError, match="horizon_s"):
        guarded_order([0, 1], [0.0, 1.0], -1.0)


def test_step_clock_makes_time_columns_count_steps(length_policy) -> None:
    clock = StepClock(step_s=0.5)
    adapter = SchedulerAdapter(
        as_policy(length_policy), time_scale_s=1.0, clock=clock, horizon_s=float("inf")
    )
    first = request("a:0:user:0", 30, arrival_time=123456.0)  # vLLM's wall-clock arrival is not used
    adapter.add(first)
    scheduler = fake_scheduler([first], [])
    for _ in range(3):
        adapter.before_schedule(scheduler)
    second = request("b:0:user:0", 300)
    adapter.add(second)
    scheduler.waiting.append(second)
    adapter.before_schedule(scheduler)
    assert clock.num_steps == 4
    _, decision = adapter.last_decisions[DecisionKind.ORDER]
    assert decision.features[:, column("wait_s")].tolist() == [2.0, 0.5]  # 4 and 1 steps of 0.5 s since added
    assert decision.global_features[0] == pytest.approx(2.0)


def test_identical_runs_make_identical_decisions(length_policy) -> None:
    def run() -> list[list[int]]:
        adapter = SchedulerAdapter(as_policy(length_policy), clock=StepClock(0.02), horizon_s=0.05)
        scheduler = fake_scheduler([], [])
        orders = []
        for step, n in enumerate((30, 300, 3, 120, 64, 7)):
            new = request(f"t{step}:0:user:0", n)
            adapter.add(new)
            scheduler.waiting.append(new)
            adapter.before_schedule(scheduler)
            orders.append([r.num_prompt_tokens for r in scheduler.waiting])
        return orders

    first = run()
    assert first == run()
    assert first[-1] != sorted(first[-1], reverse=True)  # the guard kept old trees ahead of longer prompts


def test_clock_and_horizon_settings_are_checked(monkeypatch) -> None:
    monkeypatch.setenv(CLOCK_ENV, "wall")
    assert isinstance(clock_from_env(), WallClock)
    monkeypatch.setenv(CLOCK_ENV, "sundial")
    with pytest.raises(ValueError, match="step"):
        clock_from_env()
    monkeypatch.setenv(CLOCK_ENV, "step")
    monkeypatch.setenv(STEP_S_ENV, "0")
    with pytest.raises(ValueError, match=STEP_S_ENV):
        clock_from_env()
    monkeypatch.setenv(HORIZON_ENV, "inf")
    assert horizon_from_env() == float("inf")
    monkeypatch.setenv(HORIZON_ENV, "-1")
    with pytest.raises(ValueError, match=HORIZON_ENV):
        horizon_from_env()


class FakeManager:
    """What ``SchedulerAdapter.kv_view`` reads from vLLM's KV cache manager."""

    def __init__(self, num_blocks: int, num_free: int) -> None:
        self.block_pool = SimpleNamespace(
            num_gpu_blocks=num_blocks + 1,
            get_num_free_blocks=lambda: num_free,
            cached_block_hash_to_block=None,
        )

    def get_computed_blocks(self, request):
        return None, 0, 0

    def get_block_ids(self, request_id):
        return ([1, 2],)


def fake_scheduler(waiting, running, free_blocks: int = 1000):
    return SimpleNamespace(
        waiting=deque(waiting),
        running=list(running),
        kv_cache_manager=FakeManager(1000, free_blocks),
        block_size=16,
        max_num_scheduled_tokens=256,
    )


def test_adapter_orders_waiting_and_ranks_running_only_when_kv_is_short(length_policy) -> None:
    lengths = [30, 300, 3, 120]
    waiting = [request(f"w{n}:0:user:0", n) for n in lengths]
    running = [request(f"r{n}:0:user:0", n, computed=n, output=1) for n in (10, 500, 60)]
    adapter = SchedulerAdapter(as_policy(length_policy), clock=lambda: NOW_S)
    scheduler = fake_scheduler(waiting, running)
    adapter.before_schedule(scheduler)
    assert [r.num_prompt_tokens for r in scheduler.waiting] == [300, 120, 30, 3]
    assert [r.num_prompt_tokens for r in scheduler.running] == [10, 500, 60]  # plenty of blocks: untouched
    assert adapter.num_evict_rankings == 0
    scheduler = fake_scheduler(waiting, running, free_blocks=2)
    adapter.before_schedule(scheduler)
    assert [r.num_prompt_tokens for r in scheduler.running] == [500, 60, 10]  # vLLM evicts running[-1]
    ids, decision = adapter.last_decisions[DecisionKind.EVICT]
    assert decision.features[:, column("is_running")].tolist() == [1, 1, 1]
    assert decision.global_features.shape == (len(GLOBAL_FEATURES),) and len(GLOBAL_COLUMNS) == len(
        GLOBAL_FEATURES
    ) + len(DecisionKind)


def test_a_policy_answers_only_its_kinds(evict_only_policy) -> None:
    waiting = [request(f"w{n}:0:user:0", n) for n in (30, 300, 3)]
    adapter = SchedulerAdapter(as_policy(evict_only_policy), clock=lambda: NOW_S)
    scheduler = fake_scheduler(waiting, [])
    adapter.before_schedule(scheduler)
    assert [r.num_prompt_tokens for r in scheduler.waiting] == [30, 300, 3]  # FCFS kept
    assert adapter.num_orderings == 0


def test_a_policy_with_nothing_to_answer_inside_vllm_is_refused() -> None:
    """A RETAIN-only (or ROUTE-only) policy would change nothing in vLLM's scheduler: refused."""
    policy = SimpleNamespace(kinds={DecisionKind.RETAIN}, scores=lambda decision: None)
    with pytest.raises(ValueError, match="RETAIN"):
        SchedulerAdapter(policy, clock=lambda: NOW_S)


def test_policy_from_env_says_what_to_set(monkeypatch) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=POLICY_ENV):
        policy_from_env()
    monkeypatch.setenv(POLICY_ENV, "servegym.envs.engine.policy:DefaultPolicy")
    assert type(policy_from_env()).__name__ == "DefaultPolicy"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_scheduler_class_without_vllm_is_a_clear_error() -> None:
    import servegym.agents.deploy.vllm_adapter as adapter

    with pytest.raises(ImportError, match="setup_vllm.sh"):
        adapter.ServegymScheduler  # noqa: B018
