"""Reads the engine's state into the feature tables of ``Decision``s. Each builder measures raw
quantities by column name and ``servegym.envs.engine.schema`` scales and orders them, so nothing
here knows a column's position or scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from servegym.envs.engine.calls import CallState
from servegym.envs.engine.policy import Decision, DecisionKind
from servegym.envs.engine.schema import (
    BUDGET,
    CANDIDATE,
    CONFIG,
    GLOBAL,
    PRIVILEGED,
    RETAIN,
    ROUTE,
    ScaleContext,
    Table,
)
from servegym.envs.workloads.job import KNOWN_ROLES

if TYPE_CHECKING:
    from servegym.envs.engine.config import EngineConfig
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.scheduler import ConfigMark, QueueNeeds, Replica


def global_features(engine: Engine, replica: Replica, budget_left: int) -> np.ndarray:
    bm = replica.blocks
    raw = {
        "time_s": engine.now_s,
        "kv_used_frac": bm.num_used_blocks,
        "kv_cached_frac": bm.num_cached_free_blocks,
        "kv_free_frac": bm.num_free_blocks,
        "host_used_frac": bm.num_host_used_blocks / max(bm.num_host_blocks, 1),
        "waiting_log": len(replica.waiting),
        "running_log": len(replica.running),
        "live_trees_log": engine.num_live_jobs,
        "token_budget_left_frac": budget_left,
        "free_slots_frac": (replica.config.max_num_seqs - len(replica.running)) / replica.config.max_num_seqs,
    }
    row: np.ndarray = GLOBAL.encode(raw, _context(engine, replica), 1)[0]  # (len(GLOBAL),)
    return row


def _context(engine: Engine, replica: Replica) -> ScaleContext:
    return ScaleContext(engine.time_scale_s, replica.blocks.num_blocks, replica.config.max_num_batched_tokens)


def predicted_output_tokens(engine: Engine, ids: np.ndarray) -> np.ndarray:
    """Online output-length predictor: the mean output of finished calls of the same (role,
    tenant), else of the role, else the call's budget (``max_tokens``). Non-privileged: it
    learns only from calls that already finished."""
    out: np.ndarray = engine.calls.max_tokens[ids].astype(np.float64)
    if not engine.stats.role_output_stats:
        return out
    calls = engine.calls
    predicted = _mean_outputs(engine)[calls.role[ids], engine.job_table.tenant[calls.job[ids]]]
    known = ~np.isnan(predicted)
    out[known] = predicted[known]
    return out


def _mean_outputs(engine: Engine) -> np.ndarray:
    """(roles, tenants) table of the predictor's means, NaN where nothing finished yet, kept in
    ``engine.stats.mean_outputs`` until a call finishes or a tenant appears (the engine drops it then):
    a lookup per call costs one fancy index, not a dictionary walk."""
    if engine.stats.mean_outputs is None:
        table = np.full((len(KNOWN_ROLES), max(len(engine.stats.tenants), 1)), np.nan)
        for role, (total, count) in engine.stats.role_output_stats.items():
            table[role, :] = total / count
        for (role, tenant), (total, count) in engine.stats.output_stats.items():
            table[role, tenant] = total / count
        engine.stats.mean_outputs = table
    return engine.stats.mean_outputs


TREE_STATE_COLUMNS = (
    "tree_ready_log",
    "tree_running_log",
    "tree_blocked_log",
    "tree_tool_paused_log",
    "tree_predicted_left_log",
    "tree_depth_left",
)
"""The candidate columns ``tree_state`` measures, in its output's column order."""
_PREDICTED_LEFT = TREE_STATE_COLUMNS.index("tree_predicted_left_log")


# call state -> tree-state category: 0 queued, 1 running, 3 pending (2 once a parent is
# unfinished: blocked), 4 terminal
_CATEGORY = np.array([3, 0, 1, 0, 4, 4], dtype=np.int64)  # indexed by CallState
_CATEGORIES = 5
_NO_DEPTH = np.iinfo(np.int64).max


def tree_state(engine: Engine, jobs: np.ndarray) -> np.ndarray:
    """(len(jobs), len(TREE_STATE_COLUMNS)) raw tree state of each row's tree (schema v3): counts
    of ready, running, blocked and tool-paused calls, predicted work left, levels left.

    Computed when a decision is built, not kept up to date on every transition: a job's calls
    hold consecutive ids (``_arrive``), so one gather over the distinct trees' id ranges and one
    bincount give every count, with no per-tree Python loop on the hot path (only trees that grew
    continuations, whose ids lie past their range, are listed one by one)."""
    calls, table = engine.calls, engine.job_table
    trees, row_tree = np.unique(jobs, return_inverse=True)
    n = len(trees)
    sizes = table.num_calls[trees]
    starts = np.cumsum(sizes) - sizes  # where each tree's range starts in the gather
    if table.num_extra[trees].any():
        ids = np.fromiter((c for j in trees.tolist() for c in table.call_ids(j)), np.int64, int(sizes.sum()))
    else:
        first = np.fromiter((table.first_call[j] for j in trees.tolist()), np.int64, n)
        ids = np.repeat(first - starts, sizes) + np.arange(int(sizes.sum()))
    group = np.repeat(np.arange(n), sizes)
    category = _CATEGORY[calls.state[ids]]
    category -= (category == 3) & (calls.pending_parents[ids] > 0)
    counts = np.bincount(group * _CATEGORIES + category, minlength=n * _CATEGORIES)
    out = np.empty((n, len(TREE_STATE_COLUMNS)), dtype=np.float64)
    out[:, :4] = counts.reshape(n, _CATEGORIES)[:, :4]
    unfinished = category < 4
    left = ids[unfinished]
    work = np.maximum(predicted_output_tokens(engine, left) - calls.num_output[left], 0.0)
    out[:, 4] = np.bincount(group[unfinished], work, n)
    depth = calls.depth[ids]
    deepest = np.maximum.reduceat(np.where(unfinished, depth, -1), starts)
    shallowest = np.minimum.reduceat(np.where(unfinished, depth, _NO_DEPTH), starts)
    out[:, 5] = np.where(deepest >= 0, deepest - shallowest + 1, 0)
    return out[row_tree]


def candidate_decision(
    engine: Engine,
    replica: Replica,
    kind: DecisionKind,
    candidates: list[int],
    needs: QueueNeeds | None,
    budget_left: int,
) -> Decision:
    calls = engine.calls
    ids = np.array(candidates, dtype=np.int64)
    prompt = calls.prompt_tokens[ids]
    jobs = calls.job[ids]
    if needs is not None:
        hit = needs.hit_blocks.astype(np.float64) * replica.config.block_size
        needed = needs.needed_blocks.astype(np.float64)
    else:
        hit = np.minimum(calls.num_computed[ids], prompt).astype(np.float64)
        needed = np.ones(len(ids))
    tenant_vtc = engine.stats.tenant_service[engine.job_table.tenant[jobs]]
    state = calls.state[ids]
    output = calls.num_output[ids]
    pinned = np.zeros(len(ids))
    if replica.pins.of_child:
        pins, of_child = replica.pins, replica.pins.of_child
        for i, call in enumerate(candidates):
            pinned[i] = sum(len(pins[p]) for p in of_child.get(call, ()))
    raw = {
        "is_running": state == CallState.RUNNING,
        "is_swapped": state == CallState.SWAPPED,
        "prompt_tokens_log": prompt,
        "cached_prefix_frac": hit / np.maximum(prompt, 1),
        "computed_tokens_log": calls.num_computed[ids],
        "output_tokens_log": output,
        "budget_left_log": calls.max_tokens[ids] - output,
        "blocks_held_frac": calls.num_held_blocks[ids],
        "blocks_needed_frac": needed,
        "wait_s": engine.now_s - calls.enqueue_s[ids],
        "tree_age_s": engine.now_s - engine.job_table.arrival_s[jobs],
        "role_id": calls.role[ids],
        "depth": calls.depth[ids],
        "tree_service_log": engine.job_table.service[jobs],
        "critical_path_service_log": calls.path_service[ids],
        "tree_calls_done": engine.job_table.calls_done[jobs],
        "tree_calls_total_log": engine.job_table.num_calls[jobs],
        "tenant_vtc_log": tenant_vtc - tenant_vtc.min(),
        "preemptions": calls.num_preemptions[ids],
        "replica": replica.index,
        "predicted_output_log": predicted_output_tokens(engine, ids),
        "pinned_prefix_frac": np.minimum(pinned * replica.config.block_size / np.maximum(prompt, 1), 1.0),
    }
    raw.update(zip(TREE_STATE_COLUMNS, tree_state(engine, jobs).T, strict=True))
    privileged = {
        "true_remaining_output_tokens": calls.target_tokens[ids] - output,
        "true_tool_latency_s": calls.tool_latency_s[ids],
    }
    context = _context(engine, replica)
    return Decision(
        kind=kind,
        replica=replica.index,
        candidates=ids,
        features=CANDIDATE.encode(raw, context, len(ids)),
        privileged=PRIVILEGED.encode(privileged, context, len(ids)),
        global_features=global_features(engine, replica, budget_left),
        mask=np.ones(len(ids), dtype=bool),
        now_s=engine.now_s,
    )


def route_decision(engine: Engine, call: int, eligible: np.ndarray) -> Decision:
    """Rows are replicas; ``eligible`` masks those that serve the call's model and can fit it."""
    calls = engine.calls
    prompt = int(calls.prompt_tokens[call])
    tree_replicas = engine.job_table.replicas[int(calls.job[call])]
    assert tree_replicas is not None  # released only once every call of the tree is terminal
    rows = [_route_row(engine, replica, call, prompt, tree_replicas) for replica in engine.replicas]
    raw: dict[str, np.ndarray | int] = {name: np.array([row[name] for row in rows]) for name in rows[0]}
    raw["call_prompt_tokens_log"] = prompt
    raw["call_role_id"] = calls.role[call]
    num_blocks = np.array([replica.blocks.num_blocks for replica in engine.replicas])
    table = ROUTE.encode(raw, ScaleContext(engine.time_scale_s, num_blocks), len(rows))
    ids = np.arange(len(engine.replicas), dtype=np.int64)
    # no deciding replica: only the cluster-wide global columns mean something
    global_features = np.zeros(len(GLOBAL), dtype=np.float32)
    global_features[GLOBAL.index("time_s")] = engine.now_s / engine.time_scale_s
    global_features[GLOBAL.index("live_trees_log")] = np.log1p(engine.num_live_jobs)
    return Decision(
        kind=DecisionKind.ROUTE,
        replica=-1,
        candidates=ids,
        features=table,
        privileged=np.zeros((len(ids), len(PRIVILEGED)), dtype=np.float32),
        global_features=global_features,
        mask=eligible.copy(),
        call=call,
        now_s=engine.now_s,
    )


def _route_row(
    engine: Engine, replica: Replica, call: int, prompt: int, tree_replicas: set[int]
) -> dict[str, float]:
    """The raw per-replica ROUTE columns of one replica for routing ``call``."""
    calls = engine.calls
    bm, bs = replica.blocks, replica.config.block_size
    max_hit = (prompt - 1) // bs
    hits = len(bm.match_prefix(calls.hash_chain(call, max_hit, bs), max_hit)) if max_hit else 0
    if len(replica.waiting) <= 16:  # a short queue: numpy's fixed cost exceeds the sum
        queued = sum(int(calls.prompt_tokens[c] - calls.num_computed[c]) for c in replica.waiting)
    else:
        waiting = np.fromiter(replica.waiting, dtype=np.int64, count=len(replica.waiting))
        queued = int((calls.prompt_tokens[waiting] - calls.num_computed[waiting]).sum())
    return {
        "kv_used_frac": bm.num_used_blocks,
        "kv_free_frac": bm.num_free_blocks,
        "waiting_log": len(replica.waiting),
        "running_log": len(replica.running),
        "queued_prefill_tokens_log": max(queued, 0),
        "cached_prefix_frac": hits * bs / max(prompt, 1),
        "model_params_log10": float(np.log10(replica.profile.num_params)),
        "is_tree_replica": replica.index in tree_replicas,
    }


def retain_decision(engine: Engine, replica: Replica, call: int, children: int, pin_blocks: int) -> Decision:
    """Rows are the TTL options of ``retain_ttls_s`` for the finished ``call``, whose
    ``children`` will reuse its first ``pin_blocks`` blocks. Asked before the call turns
    FINISHED and leaves the running list, so it still counts as running in its tree's state
    and in the replica's global features (it holds its slot and blocks until the answer)."""
    calls = engine.calls
    ttls = np.asarray(replica.config.retain_ttls_s, dtype=np.float64)
    role = int(calls.role[call])
    tool_mean, seen = engine.stats.observed_tool_pause_s(role)
    expected = tool_mean + engine.cluster.network_delay_s
    job = int(calls.job[call])
    raw = {
        "ttl_s": ttls,
        "is_release": ttls == 0,
        "ttl_over_tool_mean": (
            np.minimum(ttls / expected, 8.0) if expected > 0 else np.where(ttls > 0, 8.0, 0.0)
        ),
        "tool_mean_s": expected,
        "tools_seen_log": seen,
        "pin_blocks_frac": pin_blocks,
        "context_tokens_log": calls.prompt_tokens[call] + calls.num_output[call],
        "children_log": children,
        "role_id": role,
        "depth": calls.depth[call],
        "tree_age_s": engine.now_s - engine.job_table.arrival_s[job],
        "tree_predicted_left_log": tree_state(engine, np.array([job]))[0, _PREDICTED_LEFT],
        "pinned_frac": sum(len(blocks) for blocks in replica.pins.values()),
        "pins_log": len(replica.pins),
    }
    true_pause = calls.tool_latency_s[call] + engine.cluster.network_delay_s
    privileged = {"true_remaining_output_tokens": 0.0, "true_tool_latency_s": true_pause}
    return _menu_decision(engine, replica, DecisionKind.RETAIN, RETAIN, raw, len(ttls), privileged, call)


def config_options(config: EngineConfig) -> list[tuple[int, int]]:
    """The (max_num_seqs, max_num_batched_tokens) options of a CONFIG decision: the grid, cap
    outer, then the replica's current pair when it lies off the grid."""
    grid = [(s, t) for s in config.config_max_num_seqs for t in config.config_max_num_batched_tokens]
    current = (config.max_num_seqs, config.max_num_batched_tokens)
    return grid if current in grid else [*grid, current]


def config_decision(
    engine: Engine, replica: Replica, options: list[tuple[int, int]], now: ConfigMark
) -> Decision:
    """Rows are ``options`` for the replica's cap and budget until its next CONFIG decision;
    ``now`` holds the replica's counters at this instant (``replica.config_mark`` at the last)."""
    calls, config, mark = engine.calls, replica.config, replica.config_mark
    pairs = np.array(options, dtype=np.float64)
    seqs, tokens = pairs[:, 0], pairs[:, 1]
    running = np.fromiter(replica.running, dtype=np.int64, count=len(replica.running))
    waiting = np.fromiter(replica.waiting, dtype=np.int64, count=len(replica.waiting))
    held = float(calls.num_held_blocks[running].mean()) if len(running) else 0.0
    queued = float((calls.prompt_tokens[waiting] - calls.num_computed[waiting]).sum()) + len(running)
    iterations = now.iterations - mark.iterations
    ran = now.running_call_iterations - mark.running_call_iterations
    raw = {
        "max_num_seqs_log": seqs,
        "max_num_batched_tokens_log": tokens,
        "is_current": (seqs == config.max_num_seqs) & (tokens == config.max_num_batched_tokens),
        "seqs_over_demand": np.minimum(seqs / max(len(running) + len(waiting), 1), 4.0),
        "kv_demand_frac": np.minimum(seqs * held / replica.blocks.num_blocks, 4.0),
        "budget_over_queued": np.minimum(tokens / max(queued, 1.0), 4.0),
        "interval_s": engine.now_s - mark.time_s,
        "preemptions_since_log": now.preemptions - mark.preemptions,
        "finished_since_log": now.calls_finished - mark.calls_finished,
        "mean_running_frac": ran / max(iterations, 1) / config.max_num_seqs,
    }
    return _menu_decision(engine, replica, DecisionKind.CONFIG, CONFIG, raw, len(options))


def budget_options(config: EngineConfig, workload_max_tokens: int) -> np.ndarray:
    """The max_tokens options of a BUDGET decision: ``budget_multipliers`` times the call's
    workload budget, rounded, at least 1 (int64, ascending)."""
    multipliers = np.asarray(config.budget_multipliers, dtype=np.float64)
    return np.maximum(np.rint(multipliers * workload_max_tokens), 1).astype(np.int64)


def budget_decision(
    engine: Engine, replica: Replica, call: int, budgets: np.ndarray, fits: np.ndarray
) -> Decision:
    """Rows are the ``budgets`` for ``call``, which joins ``replica``'s queue; ``fits`` (the
    mask) says which the replica's KV cache holds with the call's prompt."""
    calls, config = engine.calls, replica.config
    role, job = int(calls.role[call]), int(calls.job[call])
    predicted = float(predicted_output_tokens(engine, np.array([call]))[0])
    prompt = int(calls.prompt_tokens[call])
    children = engine.job_table.children[job]
    assert children is not None  # the tree is live
    bs = config.block_size
    raw = {
        "multiplier": np.asarray(config.budget_multipliers, dtype=np.float64),
        "is_workload": np.asarray(config.budget_multipliers) == 1.0,
        "max_tokens_log": budgets,
        "over_predicted": np.minimum(budgets / max(predicted, 1.0), 8.0),
        "budget_blocks_frac": -(-(prompt + budgets) // bs),
        "predicted_output_log": predicted,
        "outputs_seen_log": engine.stats.role_output_stats.get(role, [0.0, 0.0])[1],
        "prompt_tokens_log": prompt,
        "children_log": len(children[int(calls.call_in_job[call])]),
        "role_id": role,
        "depth": calls.depth[call],
        "tree_age_s": engine.now_s - engine.job_table.arrival_s[job],
        "tree_predicted_left_log": tree_state(engine, np.array([job]))[0, _PREDICTED_LEFT],
    }
    truth = {
        "true_remaining_output_tokens": float(calls.true_output_tokens[call]),
        "true_tool_latency_s": 0.0,
    }
    return _menu_decision(engine, replica, DecisionKind.BUDGET, BUDGET, raw, len(budgets), truth, call, fits)


def _menu_decision(
    engine: Engine,
    replica: Replica,
    kind: DecisionKind,
    table: Table,
    raw: dict[str, Any],
    rows: int,
    truth: dict[str, Any] | None = None,
    call: int = -1,
    mask: np.ndarray | None = None,
) -> Decision:
    """A decision among a fixed menu of ``rows`` options (RETAIN's TTLs, CONFIG's caps, BUDGET's
    budgets), ``raw`` read into ``table`` and ``truth`` into the privileged columns (zeros when
    None): candidates are the option indices, every option is allowed unless ``mask`` says
    otherwise, and the global features are the replica's with its whole token budget (no
    iteration is being scheduled)."""
    context = _context(engine, replica)
    privileged = (
        PRIVILEGED.encode(truth, context, rows)
        if truth is not None
        else np.zeros((rows, len(PRIVILEGED)), dtype=np.float32)
    )
    return Decision(
        kind=kind,
        replica=replica.index,
        candidates=np.arange(rows, dtype=np.int64),
        features=table.encode(raw, context, rows),
        privileged=privileged,
        global_features=global_features(engine, replica, replica.config.max_num_batched_tokens),
        mask=np.ones(rows, dtype=bool) if mask is None else np.asarray(mask, dtype=bool),
        call=call,
        now_s=engine.now_s,
    )


__all__ = [
    "TREE_STATE_COLUMNS",
    "budget_decision",
    "budget_options",
    "candidate_decision",
    "config_decision",
    "config_options",
    "global_features",
    "predicted_output_tokens",
    "retain_decision",
    "route_decision",
    "tree_state",
]
