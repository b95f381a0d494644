"""The engine's invariants as a public check (``Engine.check_invariants``), for tests, soak runs,
``scripts/simulate.py check_every=N`` and anyone debugging a policy.

Live (at any point between decisions):

* every KV block is owned, cached-free or empty exactly once (``BlockManager.check_invariants``);
  references taken = allocated + prefix hits taken - freed; each block's ref count equals the
  block tables and TTL pins that hold it;
* a call is in its replica's running list iff RUNNING, in its waiting queue iff WAITING or
  SWAPPED, never twice; at most ``max_num_seqs`` run; only running calls hold blocks, enough for
  their computed tokens; swapped calls' host blocks add up to the host tier's use;
* the waiting calls' incrementally kept prefix hits equal a fresh prefix match, and the
  vectorised admission plans equal planning each call alone.

Drained (once the workload has drained): every call reached one terminal state and its tree
counted it once; nothing waits, runs or is pinned; the pool is whole again (every reference
given back, no host blocks left).

A violation raises ``InvariantError`` (an ``AssertionError``) naming what broke. Cost:
O(calls + blocks) per check, so call it every N events, not every event, on long runs.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from servegym.envs.engine.calls import TERMINAL, CallState

if TYPE_CHECKING:
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.scheduler import Replica


class InvariantError(AssertionError):
    """The engine's state broke one of its invariants (a bug: please report it with the seed)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvariantError(message)


def check_live(engine: Engine) -> None:
    """The invariants that hold between any two decisions (see the module docstring)."""
    calls, n = engine.calls, engine.calls.size
    state = calls.state[:n]
    for replica in engine.replicas:
        bm, bs, r = replica.blocks, replica.config.block_size, replica.index
        bm.check_invariants()
        referenced = bm.num_allocated_total + bm.num_taken_total - bm.num_freed_total
        _require(
            referenced == sum(bm.ref_count),
            f"replica {r}: {referenced} references out, ref counts sum differs",
        )
        here = np.flatnonzero(calls.replica[:n] == r).tolist()
        owners = Counter(block for call in here for block in calls.blocks[call])
        owners.update(block for blocks in replica.pins.values() for block in blocks)  # a pin owns
        for pinned in replica.pins:
            _require(
                state[pinned] == CallState.FINISHED and not calls.blocks[pinned],
                f"replica {r}: pinned call {pinned} is not a finished call without blocks",
            )
        bad = [b for b in range(bm.num_blocks) if bm.ref_count[b] != owners[b]]
        _require(not bad, f"replica {r}: ref counts differ from block tables and pins on blocks {bad[:5]}")
        running, waiting = list(replica.running), list(replica.waiting)
        _require(len(set(running)) == len(running), f"replica {r}: a call runs twice")
        _require(len(set(waiting)) == len(waiting), f"replica {r}: a call waits twice")
        _require(
            set(running) == {c for c in here if state[c] == CallState.RUNNING},
            f"replica {r}: running list differs from the RUNNING calls",
        )
        _require(
            set(waiting) == {c for c in here if state[c] in (CallState.WAITING, CallState.SWAPPED)},
            f"replica {r}: waiting queue differs from the WAITING and SWAPPED calls",
        )
        # a CONFIG decision that lowered the cap preempts nothing: the calls running then may finish
        cap = max(replica.config.max_num_seqs, replica.config_mark.running)
        _require(len(running) <= cap, f"replica {r}: more than max_num_seqs run")
        host_blocks = 0
        for call in here:
            table = calls.blocks[call]
            _require(len(table) == calls.num_held_blocks[call], f"call {call}: block table length != held")
            if state[call] == CallState.RUNNING:
                _require(
                    len(table) * bs >= calls.num_computed[call], f"call {call}: KV larger than its blocks"
                )
            else:
                _require(not table, f"call {call} in {CallState(state[call]).name} holds blocks {table[:5]}")
            if state[call] == CallState.SWAPPED:
                _require(calls.host_blocks[call] > 0, f"swapped call {call} has no host blocks")
                host_blocks += int(calls.host_blocks[call])
            else:
                _require(calls.host_blocks[call] == 0, f"call {call} holds host blocks while not swapped")
        _require(
            host_blocks == bm.num_host_used_blocks <= bm.num_host_blocks,
            f"replica {r}: swapped calls hold {host_blocks} host blocks, the tier counts {bm.num_host_used_blocks}",
        )
        check_prefix_watch(replica)


def check_prefix_watch(replica: Replica) -> None:
    """Watched hits equal a fresh prefix match; vectorised queue plans equal one-by-one plans."""
    calls, bm, bs, queue = replica.calls, replica.blocks, replica.config.block_size, replica.waiting
    for call in queue:
        if call not in queue.watch:  # not tracked yet (a short queue plans it afresh)
            continue
        limit = queue.hit_limit(call)
        fresh = bm.match_prefix(calls.hash_chain(call, limit, bs), limit) if limit else []
        _require(queue.watch.hits(call) == fresh, f"call {call}: watched prefix hits drifted from the cache")
        _require(calls.prefix_hits[call] == len(fresh), f"call {call}: prefix_hits column drifted")
        _require(
            calls.prefix_free_hits[call] == bm.num_reclaimed_by_taking(fresh),
            f"call {call}: prefix_free_hits column drifted",
        )
    for budget in (1, 17, replica.config.max_num_batched_tokens):
        needs = queue.queue_needs(budget)
        for i, call in enumerate(needs.calls.tolist()):
            plan = queue.admission_plan(call, budget)
            _require(
                needs.hit_blocks[i] == len(plan.hit_blocks)
                and needs.needed_blocks[i] == plan.total_blocks
                and needs.fits[i] == queue.fits(plan),
                f"call {call}: the queue's plan at budget {budget} differs from planning it alone",
            )


def check_drained(engine: Engine) -> None:
    """Once the workload drained: every call terminal and counted once, the pool whole again."""
    calls, n, jobs = engine.calls, engine.calls.size, engine.jobs
    states = calls.state[:n]
    bad = np.flatnonzero(~np.isin(states, [int(s) for s in TERMINAL]))
    _require(not len(bad), f"{len(bad)} calls not terminal, e.g. call {bad[0] if len(bad) else -1}")
    done = engine.job_table.calls_done[: len(jobs)].tolist()
    want = engine.job_table.num_calls[: len(jobs)].tolist()  # len(job.calls), set at arrival
    _require(done == want, "a tree counted a call more or less than once")
    _require(not np.isnan(engine.job_table.finish_s[: len(jobs)]).any(), "a tree has no finish time")
    for replica in engine.replicas:
        bm, r = replica.blocks, replica.index
        bm.check_invariants()
        _require(not replica.waiting and not replica.running, f"replica {r}: calls left waiting or running")
        _require(
            not replica.pins and not replica.pins.waiters and not replica.pins.of_child,
            f"replica {r}: pins left",
        )
        _require(bm.ref_count == [0] * bm.num_blocks, f"replica {r}: blocks still referenced")
        _require(bm.num_free_blocks == bm.num_blocks, f"replica {r}: blocks missing from the free queue")
        _require(bm.num_host_used_blocks == 0, f"replica {r}: host blocks left")
        _require(
            bm.num_freed_total == bm.num_allocated_total + bm.num_taken_total,
            f"replica {r}: freed {bm.num_freed_total} != allocated {bm.num_allocated_total} + taken {bm.num_taken_total}",
        )


def diagnose_stall(engine: Engine, unfinished: list[int]) -> str:
    """Why a run stalled (``Engine.stall``): each busy replica's queue head and what it needs."""
    lines = [f"stalled at t={engine.now_s:.3f}s with {len(unfinished)} unfinished jobs and no event left"]
    for replica in engine.replicas:
        if replica.waiting or replica.running:
            head = replica.waiting[0] if replica.waiting else replica.running[0]
            plan = replica.waiting.admission_plan(head, replica.config.max_num_batched_tokens)
            lines.append(
                f"replica {replica.index}: {len(replica.waiting)} waiting, {len(replica.running)} running, "
                f"{replica.blocks.num_free_blocks}/{replica.blocks.num_blocks} blocks free; "
                f"head call {head} needs {plan.total_blocks} blocks for a {plan.chunk_tokens}-token chunk"
            )
    return "; ".join(lines)


__all__ = ["InvariantError", "check_drained", "check_live", "check_prefix_watch", "diagnose_stall"]
