"""One replica's waiting queue, and what admitting each waiting call would take right now.

Admission asks every iteration how many blocks each waiting call needs (its prefix-cache hits
subtract, hits sitting in the free queue add back) and whether a chunk of it fits. The queue
plans all its calls at once from the prefix watch's columns (``queue_needs``), or in plain
Python when it is short; ``admission_plan`` plans one call (the scheduler's admission, and the
reference a test compares the vectorised plan with).

With ``EngineConfig.reserve_output_frac`` > 0 admission also holds KV back for decodes to come,
as SGLang's scheduler does (its ``new_token_ratio``): every running call reserves that fraction
of its unspent budget (``max_tokens`` minus tokens generated), and a waiting call fits only if
its chunk's blocks plus its own reservation fit in what the free blocks leave after the running
calls'. An idle replica reserves nothing (a lone call always starts), so a reservation never
stalls a run. vLLM reserves nothing (0, the default).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from servegym.envs.engine.block_manager import BlockManager
from servegym.envs.engine.calls import CallState, CallTable
from servegym.envs.engine.prefix_watch import PrefixWatch

_SCALAR_QUEUE = 4
"""Queues at most this long are planned in plain Python (``WaitingQueue._queue_needs_scalar``)."""


@dataclass
class AdmissionPlan:
    """What admitting a waiting call would take right now."""

    hit_blocks: list[int]
    chunk_tokens: int
    new_blocks: int
    reclaimed_blocks: int  # prefix hits that sit in the free queue
    swap_in_blocks: int
    reserve_blocks: int = 0  # KV it would hold back for its decode (reserve_output_frac)

    @property
    def total_blocks(self) -> int:
        return self.new_blocks + self.reclaimed_blocks


@dataclass
class QueueNeeds:
    """``admission_plan`` for every waiting call at once, as columns aligned with ``calls``."""

    calls: np.ndarray  # (n,) call ids, queue order
    hit_blocks: np.ndarray  # (n,) leading blocks the prefix cache holds
    needed_blocks: np.ndarray  # (n,) blocks admitting it takes from the free queue (new + reclaimed)
    fits: np.ndarray  # (n,) bool: a chunk is schedulable and its blocks are free


class WaitingQueue(deque[int]):
    """The replica's WAITING and SWAPPED calls in admission order (a deque), with their prefix
    hits tracked (``watch``) once the queue is long enough to plan in numpy."""

    def __init__(
        self,
        calls: CallTable,
        blocks: BlockManager,
        block_size: int,
        long_prefill_token_threshold: int,
        running: list[int] | None = None,
        reserve_output_frac: float = 0.0,
    ) -> None:
        super().__init__()
        self.calls = calls
        self.blocks = blocks
        self.block_size = block_size
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: no cap on a chunk
        self.running = running if running is not None else []  # the replica's running calls
        self.reserve_output_frac = reserve_output_frac
        self.watch = PrefixWatch(blocks, calls)  # prefix hits of the waiting calls
        self._unwatched: list[int] = []  # waiting calls the watch does not track yet

    def enqueue(self, call: int, front: bool = False) -> None:
        """Queue a waiting (or swapped) call. Its hits are tracked once the queue is planned in
        numpy; a call admitted from a short queue never pays for the tracking."""
        if front:
            self.appendleft(call)
        else:
            self.append(call)
        self._unwatched.append(call)

    def dequeue(self, call: int) -> None:
        self.remove(call)
        if call in self.watch:
            self.watch.unwatch(call)
        else:
            self._unwatched.remove(call)

    def reserve(self, calls: np.ndarray) -> np.ndarray:
        """KV blocks each of ``calls`` holds back for its decode: ``reserve_output_frac`` of its
        unspent budget, rounded up to blocks (int64)."""
        c = self.calls
        left = np.maximum(c.max_tokens[calls] - c.num_output[calls], 0)
        blocks: np.ndarray = np.ceil(self.reserve_output_frac * left / self.block_size).astype(np.int64)
        return blocks

    def admittable_blocks(self) -> int:
        """Free blocks a waiting call may plan on: all of them, less the running calls'
        reservations (none with no reservation, or on an idle replica)."""
        free = self.blocks.num_free_blocks
        if not self.reserve_output_frac or not self.running:
            return free
        return free - int(self.reserve(np.array(self.running, dtype=np.int64)).sum())

    def hit_limit(self, call: int) -> int:
        """Most leading blocks a prefix hit may cover: a swapped call's full computed blocks
        (the rest swaps in); otherwise all but the last token, so a token is computed and sampled."""
        calls, bs = self.calls, self.block_size
        if calls.state[call] == CallState.SWAPPED:
            return int(calls.num_computed[call]) // bs
        return int(calls.prompt_tokens[call] + calls.num_output[call] - 1) // bs

    def admission_plan(self, call: int, budget_tokens: int) -> AdmissionPlan:
        calls, bs, bm = self.calls, self.block_size, self.blocks
        total = int(calls.prompt_tokens[call] + calls.num_output[call])
        limit = self.hit_limit(call)
        if call in self.watch:  # waiting: its hits are kept current
            hits = self.watch.hits(call)
        else:
            hits = bm.match_prefix(calls.hash_chain(call, limit, bs), limit) if limit else []
        if calls.state[call] == CallState.SWAPPED:
            computed = int(calls.num_computed[call])
            swap_in = -(-computed // bs) - len(hits)
        else:
            computed = len(hits) * bs
            swap_in = 0
        chunk = min(total - computed, budget_tokens)
        if self.long_prefill_token_threshold:
            chunk = min(chunk, self.long_prefill_token_threshold)
        new = -(-(computed + chunk) // bs) - len(hits)
        reserve = int(self.reserve(np.array([call]))[0]) if self.reserve_output_frac and self.running else 0
        return AdmissionPlan(hits, chunk, new, bm.num_reclaimed_by_taking(hits), swap_in, reserve)

    def fits(self, plan: AdmissionPlan) -> bool:
        return plan.chunk_tokens > 0 and plan.total_blocks + plan.reserve_blocks <= self.admittable_blocks()

    def queue_needs(self, budget_tokens: int) -> QueueNeeds:
        """``admission_plan`` of every waiting call, vectorised over the watch's columns: equal
        to planning each one (a test checks it), without walking any hash chain."""
        calls, bs = self.calls, self.block_size
        if len(self) <= _SCALAR_QUEUE:
            return self._queue_needs_scalar(budget_tokens)
        self._watch_all()
        q = np.fromiter(self, dtype=np.int64, count=len(self))
        hits = calls.prefix_hits[q]
        total = calls.prompt_tokens[q] + calls.num_output[q]
        computed = np.where(calls.state[q] == CallState.SWAPPED, calls.num_computed[q], hits * bs)
        chunk = np.minimum(total - computed, budget_tokens)
        if self.long_prefill_token_threshold:
            chunk = np.minimum(chunk, self.long_prefill_token_threshold)
        needed = -(-(computed + chunk) // bs) - hits + calls.prefix_free_hits[q]
        room = self.admittable_blocks()
        own = self.reserve(q) if self.reserve_output_frac and self.running else 0
        fits = (chunk > 0) & (needed + own <= room)
        return QueueNeeds(q, hits, needed, fits)

    def _watch_all(self) -> None:
        """Track every waiting call's hits (before planning the queue from the watch's columns)."""
        for call in self._unwatched:
            self.watch.watch(call, self.hit_limit(call))
        self._unwatched.clear()

    def _queue_needs_scalar(self, budget_tokens: int) -> QueueNeeds:
        """``queue_needs`` for a short queue in plain Python (a dozen numpy calls cost more)."""
        calls, bs = self.calls, self.block_size
        threshold, free = self.long_prefill_token_threshold, self.admittable_blocks()
        queue = list(self)
        reserving = bool(self.reserve_output_frac and self.running)
        reserves = self.reserve(np.array(queue, dtype=np.int64)).tolist() if reserving else [0] * len(queue)
        hits, needed, fits = [], [], []
        bm, watch = self.blocks, self.watch
        for call, reserve in zip(queue, reserves, strict=True):
            if call in watch:
                m, free_hits = int(calls.prefix_hits[call]), int(calls.prefix_free_hits[call])
            else:  # not tracked yet: match it now
                limit = self.hit_limit(call)
                matched = bm.match_prefix(calls.hash_chain(call, limit, bs), limit) if limit else []
                m, free_hits = len(matched), bm.num_reclaimed_by_taking(matched)
            swapped = calls.state[call] == CallState.SWAPPED
            computed = int(calls.num_computed[call]) if swapped else m * bs
            chunk = min(int(calls.prompt_tokens[call] + calls.num_output[call]) - computed, budget_tokens)
            if threshold:
                chunk = min(chunk, threshold)
            need = -(-(computed + chunk) // bs) - m + free_hits
            hits.append(m)
            needed.append(need)
            fits.append(chunk > 0 and need + reserve <= free)
        return QueueNeeds(
            np.array(queue, dtype=np.int64),
            np.array(hits, dtype=np.int64),
            np.array(needed, dtype=np.int64),
            np.array(fits, dtype=bool),
        )
