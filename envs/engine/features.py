"""Builds the feature tables of ``Decision``s (schema and scaling documented in policy.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servegym.envs.engine.calls import CallState
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    PRIVILEGED_FEATURES,
    RETAIN_FEATURES,
    ROUTE_FEATURES,
    Decision,
    DecisionKind,
)
from servegym.envs.workloads.job import KNOWN_ROLES

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.scheduler import QueueNeeds, Replica


def global_features(engine: Engine, replica: Replica, budget_left: int) -> np.ndarray:
    bm = replica.blocks
    return np.array(
        [
            engine.now_s / engine.time_scale_s,
            bm.num_used_blocks / bm.num_blocks,
            bm.num_cached_free_blocks / bm.num_blocks,
            bm.num_free_blocks / bm.num_blocks,
            bm.num_host_used_blocks / max(bm.num_host_blocks, 1),
            np.log1p(len(replica.waiting)),
            np.log1p(len(replica.running)),
            np.log1p(engine.num_live_jobs),
            budget_left / replica.config.max_num_batched_tokens,
            (replica.config.max_num_seqs - len(replica.running)) / replica.config.max_num_seqs,
        ],
        dtype=np.float32,
    )


def predicted_output_tokens(engine: Engine, ids: np.ndarray) -> np.ndarray:
    """Online output-length predictor: the mean output of finished calls of the same (role,
    tenant), else of the role, else the call's budget (``max_tokens``). Non-privileged: it
    learns only from calls that already finished."""
    out = engine.calls.max_tokens[ids].astype(np.float64)
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


_TREE_STATE = CANDIDATE_FEATURES.index("tree_ready_log")
TREE_STATE_COLUMNS = 6  # tree_ready_log .. tree_depth_left, consecutive in CANDIDATE_FEATURES


# call state -> tree-state category: 0 queued, 1 running, 3 pending (2 once a parent is
# unfinished: blocked), 4 terminal
_CATEGORY = np.array([3, 0, 1, 0, 4, 4], dtype=np.int64)  # indexed by CallState
_CATEGORIES = 5
_NO_DEPTH = np.iinfo(np.int64).max


def tree_state(engine: Engine, jobs: np.ndarray) -> np.ndarray:
    """(len(jobs), TREE_STATE_COLUMNS): the tree-state columns of each row's tree (schema v3).

    Computed when a decision is built, not kept up to date on every transition: a job's calls
    hold consecutive ids (``_arrive``), so one gather over the distinct trees' id ranges and one
    bincount give every count, with no per-tree Python loop on the hot path."""
    calls = engine.calls
    trees, row_tree = np.unique(jobs, return_inverse=True)
    n = len(trees)
    first_call = engine.job_table.first_call
    first = np.fromiter((first_call[j] for j in trees.tolist()), np.int64, n)
    sizes = engine.job_table.num_calls[trees]
    starts = np.cumsum(sizes) - sizes  # where each tree's range starts in the gather
    ids = np.repeat(first - starts, sizes) + np.arange(int(sizes.sum()))
    group = np.repeat(np.arange(n), sizes)
    category = _CATEGORY[calls.state[ids]]
    category -= (category == 3) & (calls.pending_parents[ids] > 0)
    counts = np.bincount(group * _CATEGORIES + category, minlength=n * _CATEGORIES)
    out = np.empty((n, TREE_STATE_COLUMNS), dtype=np.float64)
    out[:, :4] = counts.reshape(n, _CATEGORIES)[:, :4]
    unfinished = category < 4
    left = ids[unfinished]
    work = np.maximum(predicted_output_tokens(engine, left) - calls.num_output[left], 0.0)
    out[:, 4] = np.bincount(group[unfinished], work, n)
    depth = calls.depth[ids]
    deepest = np.maximum.reduceat(np.where(unfinished, depth, -1), starts)
    shallowest = np.minimum.reduceat(np.where(unfinished, depth, _NO_DEPTH), starts)
    out[:, 5] = np.where(deepest >= 0, deepest - shallowest + 1, 0)
    np.log1p(out[:, :5], out=out[:, :5])
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
    num_blocks = replica.blocks.num_blocks
    prompt = calls.prompt_tokens[ids]
    jobs = calls.job[ids]
    if needs is not None:
        hit = needs.hit_blocks.astype(np.float64) * replica.config.block_size
        needed = needs.needed_blocks.astype(np.float64)
    else:
        hit = np.minimum(calls.num_computed[ids], prompt).astype(np.float64)
        needed = np.ones(len(ids))
    tenant_vtc = engine.stats.tenant_service[engine.job_table.tenant[jobs]]
    table = np.empty((len(ids), len(CANDIDATE_FEATURES)), dtype=np.float32)
    state = calls.state[ids]
    table[:, 0] = state == CallState.RUNNING
    table[:, 1] = state == CallState.SWAPPED
    table[:, 2] = np.log1p(prompt)
    table[:, 3] = hit / np.maximum(prompt, 1)
    table[:, 4] = np.log1p(calls.num_computed[ids])
    table[:, 5] = np.log1p(calls.num_output[ids])
    table[:, 6] = np.log1p(calls.max_tokens[ids] - calls.num_output[ids])
    table[:, 7] = calls.num_held_blocks[ids] / num_blocks
    table[:, 8] = needed / num_blocks
    table[:, 9] = (engine.now_s - calls.enqueue_s[ids]) / engine.time_scale_s
    table[:, 10] = (engine.now_s - engine.job_table.arrival_s[jobs]) / engine.time_scale_s
    table[:, 11] = calls.role[ids]
    table[:, 12] = calls.depth[ids]
    table[:, 13] = np.log1p(engine.job_table.service[jobs])
    table[:, 14] = np.log1p(calls.path_service[ids])
    table[:, 15] = engine.job_table.calls_done[jobs]
    table[:, 16] = np.log1p(engine.job_table.num_calls[jobs])
    table[:, 17] = np.log1p(tenant_vtc - tenant_vtc.min())
    table[:, 18] = calls.num_preemptions[ids]
    table[:, 19] = replica.index
    table[:, 20] = np.log1p(predicted_output_tokens(engine, ids))
    pinned = np.zeros(len(ids))
    if replica.pins.of_child:
        pins, of_child = replica.pins, replica.pins.of_child
        for i, call in enumerate(candidates):
            pinned[i] = sum(len(pins[p]) for p in of_child.get(call, ()))
    table[:, 21] = np.minimum(pinned * replica.config.block_size / np.maximum(prompt, 1), 1.0)
    table[:, _TREE_STATE : _TREE_STATE + TREE_STATE_COLUMNS] = tree_state(engine, jobs)
    privileged = np.empty((len(ids), len(PRIVILEGED_FEATURES)), dtype=np.float32)
    privileged[:, 0] = calls.target_tokens[ids] - calls.num_output[ids]
    privileged[:, 1] = calls.tool_latency_s[ids]
    return Decision(
        kind=kind,
        replica=replica.index,
        candidates=ids,
        features=table,
        privileged=privileged,
        global_features=global_features(engine, replica, budget_left),
        mask=np.ones(len(ids), dtype=bool),
        now_s=engine.now_s,
    )


def route_decision(engine: Engine, call: int, eligible: np.ndarray) -> Decision:
    """Rows are replicas; ``eligible`` masks those that serve the call's model and can fit it."""
    calls = engine.calls
    prompt = int(calls.prompt_tokens[call])
    table = np.zeros((len(engine.replicas), len(ROUTE_FEATURES)), dtype=np.float32)
    tree_replicas = engine.job_table.replicas[int(calls.job[call])]
    for r, replica in enumerate(engine.replicas):
        bm, bs = replica.blocks, replica.config.block_size
        max_hit = (prompt - 1) // bs
        hits = len(bm.match_prefix(calls.hash_chain(call, max_hit, bs), max_hit)) if max_hit else 0
        if len(replica.waiting) <= 16:  # a short queue: numpy's fixed cost exceeds the sum
            queued = sum(int(calls.prompt_tokens[c] - calls.num_computed[c]) for c in replica.waiting)
        else:
            waiting = np.fromiter(replica.waiting, dtype=np.int64, count=len(replica.waiting))
            queued = int((calls.prompt_tokens[waiting] - calls.num_computed[waiting]).sum())
        table[r] = (
            bm.num_used_blocks / bm.num_blocks,
            bm.num_free_blocks / bm.num_blocks,
            np.log1p(len(replica.waiting)),
            np.log1p(len(replica.running)),
            np.log1p(max(queued, 0)),
            hits * bs / max(prompt, 1),
            np.log10(replica.profile.num_params),
            r in tree_replicas,
            np.log1p(prompt),
            calls.role[call],
        )
    ids = np.arange(len(engine.replicas), dtype=np.int64)
    # no deciding replica: only the cluster-wide global columns mean something
    global_features = np.zeros(len(GLOBAL_FEATURES), dtype=np.float32)
    global_features[GLOBAL_FEATURES.index("time_s")] = engine.now_s / engine.time_scale_s
    global_features[GLOBAL_FEATURES.index("live_trees_log")] = np.log1p(engine.num_live_jobs)
    return Decision(
        kind=DecisionKind.ROUTE,
        replica=-1,
        candidates=ids,
        features=table,
        privileged=np.zeros((len(ids), len(PRIVILEGED_FEATURES)), dtype=np.float32),
        global_features=global_features,
        mask=eligible.copy(),
        call=call,
        now_s=engine.now_s,
    )


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
    num_blocks = replica.blocks.num_blocks
    job = int(calls.job[call])
    table = np.empty((len(ttls), len(RETAIN_FEATURES)), dtype=np.float32)
    table[:, 0] = ttls / engine.time_scale_s
    table[:, 1] = ttls == 0
    table[:, 2] = np.minimum(ttls / expected, 8.0) if expected > 0 else np.where(ttls > 0, 8.0, 0.0)
    table[:, 3] = expected / engine.time_scale_s
    table[:, 4] = np.log1p(seen)
    table[:, 5] = pin_blocks / num_blocks
    table[:, 6] = np.log1p(calls.prompt_tokens[call] + calls.num_output[call])
    table[:, 7] = np.log1p(children)
    table[:, 8] = role
    table[:, 9] = calls.depth[call]
    table[:, 10] = (engine.now_s - engine.job_table.arrival_s[job]) / engine.time_scale_s
    table[:, 11] = tree_state(engine, np.array([job]))[0, 4]
    table[:, 12] = sum(len(blocks) for blocks in replica.pins.values()) / num_blocks
    table[:, 13] = np.log1p(len(replica.pins))
    privileged = np.zeros((len(ttls), len(PRIVILEGED_FEATURES)), dtype=np.float32)
    true_pause = calls.tool_latency_s[call] + engine.cluster.network_delay_s
    privileged[:, PRIVILEGED_FEATURES.index("true_tool_latency_s")] = true_pause
    return Decision(
        kind=DecisionKind.RETAIN,
        replica=replica.index,
        candidates=np.arange(len(ttls), dtype=np.int64),
        features=table,
        privileged=privileged,
        global_features=global_features(engine, replica, replica.config.max_num_batched_tokens),
        mask=np.ones(len(ttls), dtype=bool),
        call=call,
        now_s=engine.now_s,
    )


__all__ = [
    "TREE_STATE_COLUMNS",
    "candidate_decision",
    "global_features",
    "predicted_output_tokens",
    "retain_decision",
    "route_decision",
    "tree_state",
]
