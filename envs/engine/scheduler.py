"""One replica's continuous-batching scheduler, in the style of vLLM V1.

Each iteration: running calls first (decodes, then prefill chunks) within the token budget
``max_num_batched_tokens``; a running call that cannot get a block preempts a victim chosen by
the policy (by recompute, or by swap to the host tier); then, if nothing was preempted,
waiting calls are admitted in the policy's order while slots, budget and blocks allow.

``schedule`` is a generator: it yields a ``Decision`` whenever the policy must choose and
receives the scores back, so the engine can hand decisions to an RL agent step by step.
Continuum's TTL pins (``pins``, ``retention.Pins``): a finished call's leading blocks that its
children will reuse stay referenced by the pin until every child was admitted here or the TTL
expires. The scheduler drops a pin early, oldest first, only when running calls would otherwise
be preempted for blocks, or when nothing runs and no waiting call fits (a stall otherwise).

Runs of decode-only iterations with nothing else going on are folded into one ``Batch`` in
closed form (``fast_forward``); the result equals stepping them one at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from servegym.envs.engine.backend import Backend, Batch, SwapListener
from servegym.envs.engine.block_manager import BlockManager, NextUse
from servegym.envs.engine.calls import CallState, CallTable
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.cost_model import ModelProfile
from servegym.envs.engine.policy import Decision, DecisionKind, pick
from servegym.envs.engine.prefix_watch import PrefixWatch
from servegym.envs.engine.retention import Pins

_SCALAR_QUEUE = 4
"""Queues at most this long are planned in plain Python (``Replica._queue_needs_scalar``)."""

MAX_FAST_FORWARD_ITERATIONS = 4096
"""Longest decode run folded at once (bounds the size of the vectorised arrays)."""


@dataclass
class AdmissionPlan:
    """What admitting a waiting call would take right now."""

    hit_blocks: list[int]
    chunk_tokens: int
    new_blocks: int
    reclaimed_blocks: int  # prefix hits that sit in the free queue
    swap_in_blocks: int

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


DecisionBuilder = Callable[..., Decision]
"""(replica, kind, candidates, queue needs or None, token budget left, stop=False) -> Decision"""


class Replica:
    """A model instance: its KV cache, queues and iteration timeline."""

    def __init__(
        self,
        index: int,
        profile: ModelProfile,
        config: EngineConfig,
        calls: CallTable,
        backend: Backend,
        build_decision: DecisionBuilder,
    ) -> None:
        self.index = index
        self.profile = profile
        self.config = config
        self.calls = calls
        self.backend = backend
        self.build_decision = build_decision
        bs = config.block_size
        self.block_bytes = profile.kv_bytes_per_token * bs
        if config.num_gpu_blocks is not None:
            num_blocks = config.num_gpu_blocks
        else:
            budget = config.kv_budget_bytes if config.kv_budget_bytes is not None else profile.kv_budget_bytes
            num_blocks = int(budget // self.block_bytes)
            if num_blocks < 1:
                raise ValueError(
                    f"replica {index} ({profile.name}): a KV budget of {budget:.3g} bytes holds no "
                    f"{bs}-token block of {self.block_bytes} bytes; raise engine.kv_budget_bytes"
                )
        self.blocks = BlockManager(
            num_blocks,
            bs,
            num_host_blocks=int(config.swap_space_bytes // self.block_bytes),
            enable_prefix_caching=config.enable_prefix_caching,
            prefix_eviction=config.prefix_eviction,
        )
        self.watch = PrefixWatch(self.blocks, calls)  # prefix hits of the waiting calls
        self._unwatched: list[int] = []  # waiting calls the watch does not track yet
        self.pins = Pins(self.blocks)  # TTL pins (retention.py)
        self.capacity_tokens = num_blocks * bs
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.in_flight: Batch | None = None
        self.swap_listener: SwapListener | None = None  # set by a backend that holds real KV
        self.step_version = 0  # only the latest STEP event pushed for this replica counts
        self.slowdown = 1.0  # iteration time factor of an open ClusterConfig.slowdowns window
        # statistics
        self.num_iterations = 0
        self.busy_s = 0.0
        self.kv_used_block_s = 0.0
        self.num_preemptions = 0
        self.swap_bytes = 0.0
        self.prompt_tokens_admitted = 0
        self.prompt_tokens_hit = 0

    # ---------------------------------------------------------------- admission
    def admission_plan(self, call: int, budget_tokens: int) -> AdmissionPlan:
        calls, bs, bm = self.calls, self.config.block_size, self.blocks
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
        if self.config.long_prefill_token_threshold:
            chunk = min(chunk, self.config.long_prefill_token_threshold)
        new = -(-(computed + chunk) // bs) - len(hits)
        return AdmissionPlan(hits, chunk, new, bm.num_reclaimed_by_taking(hits), swap_in)

    def hit_limit(self, call: int) -> int:
        """Most leading blocks a prefix hit may cover: a swapped call's full computed blocks
        (the rest swaps in); otherwise all but the last token, so a token is computed and sampled."""
        calls, bs = self.calls, self.config.block_size
        if calls.state[call] == CallState.SWAPPED:
            return int(calls.num_computed[call]) // bs
        return int(calls.prompt_tokens[call] + calls.num_output[call] - 1) // bs

    def fits(self, plan: AdmissionPlan) -> bool:
        return plan.chunk_tokens > 0 and plan.total_blocks <= self.blocks.num_free_blocks

    def enqueue(self, call: int, front: bool = False) -> None:
        """Queue a waiting (or swapped) call. Its prefix hits are tracked (``watch``) once the
        queue is long enough to plan in numpy; a call admitted from a short queue never pays
        for the tracking."""
        if front:
            self.waiting.appendleft(call)
        else:
            self.waiting.append(call)
        self._unwatched.append(call)

    def dequeue(self, call: int) -> None:
        self.waiting.remove(call)
        if call in self.watch:
            self.watch.unwatch(call)
        else:
            self._unwatched.remove(call)

    def _watch_all(self) -> None:
        """Track every waiting call's hits (before planning the queue from the watch's columns)."""
        for call in self._unwatched:
            self.watch.watch(call, self.hit_limit(call))
        self._unwatched.clear()

    def queue_needs(self, budget_tokens: int) -> QueueNeeds:
        """``admission_plan`` of every waiting call, vectorised over the watch's columns: equal
        to planning each one (a test checks it), without walking any hash chain."""
        calls, bs = self.calls, self.config.block_size
        if len(self.waiting) <= _SCALAR_QUEUE:
            return self._queue_needs_scalar(budget_tokens)
        self._watch_all()
        q = np.fromiter(self.waiting, dtype=np.int64, count=len(self.waiting))
        hits = calls.prefix_hits[q]
        total = calls.prompt_tokens[q] + calls.num_output[q]
        computed = np.where(calls.state[q] == CallState.SWAPPED, calls.num_computed[q], hits * bs)
        chunk = np.minimum(total - computed, budget_tokens)
        if self.config.long_prefill_token_threshold:
            chunk = np.minimum(chunk, self.config.long_prefill_token_threshold)
        needed = -(-(computed + chunk) // bs) - hits + calls.prefix_free_hits[q]
        fits = (chunk > 0) & (needed <= self.blocks.num_free_blocks)
        return QueueNeeds(q, hits, needed, fits)

    def _queue_needs_scalar(self, budget_tokens: int) -> QueueNeeds:
        """``queue_needs`` for a short queue in plain Python (a dozen numpy calls cost more)."""
        calls, bs, cfg = self.calls, self.config.block_size, self.config
        threshold, free = cfg.long_prefill_token_threshold, self.blocks.num_free_blocks
        queue = list(self.waiting)
        hits, needed, fits = [], [], []
        bm, watch = self.blocks, self.watch
        for call in queue:
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
            fits.append(chunk > 0 and need <= free)
        return QueueNeeds(
            np.array(queue, dtype=np.int64),
            np.array(hits, dtype=np.int64),
            np.array(needed, dtype=np.int64),
            np.array(fits, dtype=bool),
        )

    def _admit(self, call: int, plan: AdmissionPlan) -> float:
        """Move a waiting call into the running set; returns the swap-in bytes it costs."""
        calls, bm, bs = self.calls, self.blocks, self.config.block_size
        bm.take(plan.hit_blocks)
        table = calls.blocks[call]
        table[:] = plan.hit_blocks + bm.allocate(plan.new_blocks)
        calls.num_held_blocks[call] = len(table)
        swap_bytes = 0.0
        if calls.state[call] == CallState.SWAPPED:
            bm.release_host(int(calls.host_blocks[call]))
            calls.host_blocks[call] = 0
            calls.num_registered_blocks[call] = len(plan.hit_blocks)
            swap_bytes = plan.swap_in_blocks * self.block_bytes
            if self.swap_listener is not None:
                self.swap_listener.swap_in(call, len(plan.hit_blocks))
        else:
            hit_tokens = len(plan.hit_blocks) * bs
            calls.num_computed[call] = hit_tokens
            calls.num_registered_blocks[call] = len(plan.hit_blocks)
            lost = int(calls.lost_tokens[call])
            if lost:
                calls.recomputed_tokens[call] += max(0, lost - hit_tokens)
                calls.lost_tokens[call] = 0
            else:
                if np.isnan(calls.first_token_s[call]):
                    calls.cached_prompt_tokens[call] = hit_tokens
                self.prompt_tokens_admitted += int(calls.prompt_tokens[call])
                self.prompt_tokens_hit += hit_tokens
        calls.state[call] = CallState.RUNNING
        self.running.append(call)
        self.pins.admitted(call)
        return swap_bytes

    # ---------------------------------------------------------------- preemption
    def register_full_blocks(self, call: int, num_tokens: int) -> None:
        """Publish hashes of the call's full blocks covering its first ``num_tokens`` tokens."""
        if not self.blocks.enable_prefix_caching:
            return
        calls, bs = self.calls, self.config.block_size
        full = min(num_tokens // bs, int(calls.num_held_blocks[call]))
        done = int(calls.num_registered_blocks[call])
        if full <= done:
            return
        chain = calls.hash_chain(call, full, bs)
        self.blocks.register(calls.blocks[call][done:full], chain[done:full])
        calls.num_registered_blocks[call] = full

    def release_blocks(self, call: int, levels: list[int] | None = None, pin_blocks: int = 0) -> list[int]:
        """Free the call's blocks (``levels``: their ``NextUse``, aligned with its block table),
        first taking a reference (a TTL pin's, returned) on the cached blocks holding its first
        ``pin_blocks`` full blocks."""
        calls, bm = self.calls, self.blocks
        self.register_full_blocks(call, int(calls.num_computed[call]))
        keep = min(pin_blocks, int(calls.num_registered_blocks[call]))
        # pin what a child's lookup finds: where the call recomputed a block another copy
        # already held, the cached copy (its own stays unhashed), so the pin is a hit reference
        pinned = bm.match_prefix(calls.hash_chain(call, keep, self.config.block_size), keep) if keep else []
        bm.take(pinned)
        bm.free(calls.blocks[call], levels)
        calls.blocks[call] = []
        calls.num_held_blocks[call] = 0
        calls.num_registered_blocks[call] = 0
        return pinned

    def preempt(self, call: int) -> float:
        """Take a running call off the GPU; returns the swap-out bytes it costs."""
        calls = self.calls
        held = int(calls.num_held_blocks[call])
        self.running.remove(call)
        calls.num_preemptions[call] += 1
        self.num_preemptions += 1
        swap = self.config.preemption_mode == "swap" and self.blocks.reserve_host(held)
        if swap and self.swap_listener is not None:
            self.swap_listener.swap_out(call)  # copy the KV before its blocks can be reused
        self.release_blocks(call, [NextUse.NEXT] * held)  # it waits at the queue front
        if swap:
            calls.state[call] = CallState.SWAPPED
            calls.host_blocks[call] = held
            swap_bytes = held * self.block_bytes
        else:
            calls.state[call] = CallState.WAITING
            calls.lost_tokens[call] = calls.num_computed[call]
            calls.num_computed[call] = 0
            swap_bytes = 0.0
        self.enqueue(call, front=True)  # vLLM puts a preempted request at the queue front
        return swap_bytes

    # ---------------------------------------------------------------- one iteration
    def schedule(self) -> Generator[Decision, np.ndarray, Batch | None]:
        cfg, calls, bm, bs = self.config, self.calls, self.blocks, self.config.block_size
        budget = cfg.max_num_batched_tokens
        order: list[int] = []
        grants: list[int] = []
        swap_bytes = 0.0
        preempted = False
        if self.running:
            run = np.array(self.running, dtype=np.int64)
            remaining = calls.prompt_tokens[run] + calls.num_output[run] - calls.num_computed[run]
            is_decode = remaining == 1
            run = np.concatenate([run[is_decode], run[~is_decode]])  # decodes first
            want = np.concatenate([remaining[is_decode], remaining[~is_decode]])
            if cfg.long_prefill_token_threshold:
                want = np.minimum(want, cfg.long_prefill_token_threshold)
            before = np.cumsum(want) - want
            grant = np.minimum(want, np.maximum(budget - before, 0))
            count = int(np.count_nonzero(grant))
            run, grant = run[:count], grant[:count]
            need = -(-(calls.num_computed[run] + grant) // bs) - calls.num_held_blocks[run]
            if self.pins and int(need.sum()) > bm.num_free_blocks:
                self.pins.drop_until_free(int(need.sum()))  # a pin yields before a running call does
            if int(need.sum()) <= bm.num_free_blocks:
                new_blocks = bm.allocate(int(need.sum()))
                takers = np.flatnonzero(need)
                pos = 0
                for call, n in zip(run[takers].tolist(), need[takers].tolist(), strict=True):
                    calls.blocks[call].extend(new_blocks[pos : pos + n])
                    pos += n
                calls.num_held_blocks[run] += need
                order, grants = run.tolist(), grant.tolist()
            else:
                order, grants, swap_bytes = yield from self._schedule_under_pressure(run, grant)
                preempted = True
            budget -= sum(grants)
            self.register_prefill_blocks(order, grants)

        admitted = False
        blocked_waiting = False
        if not preempted and self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            admitted, spent, swap_in, blocked_waiting = yield from self._admit_waiting(order, grants, budget)
            budget -= spent
            swap_bytes += swap_in
        if not order:
            return None
        batch = self._make_batch(order, grants, swap_bytes)
        # Later iterations are pure decodes of this same set, and nothing else can happen on
        # this replica until an event, when: nothing was preempted, every running call is in
        # the batch and has all its known tokens computed after this iteration, and no waiting
        # call could be admitted later (none waits, every slot is taken until a call finishes
        # and so ends the run, or none fits while the budget stays put).
        batch.fast_forwardable = (
            cfg.fast_forward
            and self.backend.supports_fast_forward
            and not preempted
            and len(order) == len(self.running)
            and bool(np.all(batch.num_new_tokens == batch.remaining_tokens))
            and (
                not self.waiting
                or len(self.running) >= cfg.max_num_seqs
                or (blocked_waiting and not admitted and batch.prefill_tokens == 0)
            )
        )
        return batch

    def _schedule_under_pressure(self, run: np.ndarray, grant: np.ndarray):
        """The slow path: allocate call by call, preempting victims the policy picks."""
        calls, bm, bs = self.calls, self.blocks, self.config.block_size
        order: list[int] = []
        grants: list[int] = []
        swap_bytes = 0.0
        pending = dict(zip(run.tolist(), grant.tolist(), strict=True))
        for call in run.tolist():
            if call not in pending:  # preempted as a victim earlier in this loop
                continue
            n = pending.pop(call)
            stop = False
            while True:
                need = -(-(int(calls.num_computed[call]) + n) // bs) - int(calls.num_held_blocks[call])
                if need <= bm.num_free_blocks:
                    break
                candidates = [c for c in self.running if c not in order]
                victim = call
                if len(candidates) > 1:
                    decision = self.build_decision(self, DecisionKind.EVICT, candidates, None, 0)
                    scores = yield decision
                    victim = candidates[int(np.argmin(scores))]
                swap_bytes += self.preempt(victim)
                pending.pop(victim, None)
                if victim == call:
                    stop = True
                    break
            if stop:
                break
            calls.blocks[call].extend(bm.allocate(need))
            calls.num_held_blocks[call] += need
            order.append(call)
            grants.append(n)
        return order, grants, swap_bytes

    def _admit_waiting(self, order: list[int], grants: list[int], budget: int):
        cfg = self.config
        if cfg.admission == "pick":
            return (yield from self._pick_waiting(order, grants, budget))
        needs = self._needs_dropping_pins(order, budget)
        if not needs.fits.any():
            return False, 0, 0.0, True
        queue = needs.calls.tolist()
        ranked = range(len(queue))
        if len(queue) > 1:
            decision = self.build_decision(self, DecisionKind.ORDER, queue, needs, budget)
            scores = yield decision
            ranked = np.argsort(-np.asarray(scores), kind="stable").tolist()
        spent = 0
        swap_bytes = 0.0
        for rank, index in enumerate(ranked):
            if len(self.running) >= cfg.max_num_seqs or budget - spent <= 0:
                break
            call = queue[index]
            # plans must see the blocks taken by the calls admitted before
            plan = self.admission_plan(call, budget - spent)
            while rank == 0 and not order and self.pins and not self.fits(plan):
                # nothing runs and the policy's first choice waits on pinned blocks: drop pins
                self.pins.drop_oldest()
                plan = self.admission_plan(call, budget)
            if not self.fits(plan):
                break  # head-of-line: the policy's order is respected, as in vLLM
            swap_bytes += self._admit_into(order, grants, call, plan)
            spent += plan.chunk_tokens
        return spent > 0, spent, swap_bytes, False

    def _admit_into(self, order: list[int], grants: list[int], call: int, plan: AdmissionPlan) -> float:
        """Admit a waiting call into this iteration's batch; returns its swap-in bytes."""
        self.dequeue(call)
        swap_bytes = self._admit(call, plan)
        order.append(call)
        grants.append(plan.chunk_tokens)
        self.register_prefill_blocks([call], [plan.chunk_tokens])
        return swap_bytes

    def _needs_dropping_pins(self, order: list[int], budget: int) -> QueueNeeds:
        """``queue_needs``; when nothing runs and nothing fits, pins are dropped oldest first
        until something does or none is left (waiting for a TTL would idle the replica)."""
        needs = self.queue_needs(budget)
        while not order and self.pins and not needs.fits.any():
            self.pins.drop_oldest()
            needs = self.queue_needs(budget)
        return needs

    def _pick_waiting(self, order: list[int], grants: list[int], budget: int):
        """Pick-next admission: each decision admits one call among those that fit now, or
        STOP; asked again until STOP, nothing fits, or no slot or budget is left. Returns as
        ``_admit_waiting``: (admitted, tokens spent, swap-in bytes, blocked: nothing fitted)."""
        cfg = self.config
        spent, swap_bytes, admitted = 0, 0.0, False
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget - spent > 0:
            needs = self._needs_dropping_pins(order, budget - spent)
            if not needs.fits.any():
                return admitted, spent, swap_bytes, not admitted
            queue = needs.calls.tolist()
            stop = bool(order)  # an idle replica may not stop: no time would pass
            fitting = np.flatnonzero(needs.fits)
            if len(fitting) == 1 and not stop:
                choice: int | None = int(fitting[0])  # no choice to make
            else:
                decision = self.build_decision(
                    self, DecisionKind.ORDER, queue, needs, budget - spent, stop=stop
                )
                scores = yield decision
                choice = pick(decision, np.asarray(scores, dtype=np.float64))
            if choice is None:
                break
            call = queue[choice]
            plan = self.admission_plan(call, budget - spent)
            swap_bytes += self._admit_into(order, grants, call, plan)
            spent += plan.chunk_tokens
            admitted = True
        return admitted, spent, swap_bytes, False

    def register_prefill_blocks(self, order: list[int], grants: list[int]) -> None:
        """Publish prompt blocks as soon as they are scheduled (vLLM caches at allocation),
        so a sibling admitted next iteration already hits them."""
        if not self.blocks.enable_prefix_caching:
            return
        calls = self.calls
        for call, n in zip(order, grants, strict=True):
            if n > 1:
                self.register_full_blocks(
                    call, min(int(calls.num_computed[call]) + n, int(calls.prompt_tokens[call]))
                )

    def _make_batch(self, order: list[int], grants: list[int], swap_bytes: float) -> Batch:
        calls = self.calls
        ids = np.array(order, dtype=np.int64)
        new = np.array(grants, dtype=np.int64)
        computed = calls.num_computed[ids]
        remaining = calls.prompt_tokens[ids] + calls.num_output[ids] - computed
        is_decode = remaining == 1
        prefill_new = new[~is_decode]
        prefill_ctx = computed[~is_decode]
        self.swap_bytes += swap_bytes
        return Batch(
            calls=ids,
            num_new_tokens=new,
            remaining_tokens=remaining,
            num_decodes=int(np.count_nonzero(is_decode)),
            prefill_tokens=int(prefill_new.sum()),
            prefill_attn_tokens=float((prefill_new * (prefill_ctx + (prefill_new + 1) / 2)).sum()),
            kv_read_tokens=int((computed[is_decode] + 1).sum() + prefill_ctx.sum()),
            swap_bytes=swap_bytes,
        )

    # ---------------------------------------------------------------- timing
    def time_batch(self, batch: Batch, now_s: float) -> None:
        """Time the batch and, when allowed, fold the decode-only iterations after it into a
        run that lasts until a call completes or the blocks run out (``MAX_FAST_FORWARD_ITERATIONS``
        at most). Events that touch this replica meanwhile split the run (``Engine._sync``,
        ``truncate``).

        Iteration 0 is the scheduled batch; in iteration k >= 1 every call decodes, writing KV
        slot ``c1 + k - 1`` and reading ``c1 + k`` tokens, where ``c1`` is its computed count
        after iteration 0. Times are summed sequentially (``cumsum``), exactly as stepping adds
        them, so both paths give bit-identical clocks. Blocks of later iterations are taken
        lazily, in stepping's order (iteration, then running order).
        """
        dt0 = self.backend.iteration_time_s(batch)
        if self.slowdown != 1.0:
            dt0 *= self.slowdown
        batch.starts = np.array([now_s, now_s + dt0])
        batch.used_blocks_0 = self.blocks.num_used_blocks
        if not batch.fast_forwardable:
            return
        calls, bs = self.calls, self.config.block_size
        ids = np.array(self.running, dtype=np.int64)  # stepping schedules decodes in running order
        n = min(int((calls.target_tokens[ids] - calls.num_output[ids]).min()), MAX_FAST_FORWARD_ITERATIONS)
        if n <= 1:
            return
        if np.array_equal(batch.calls, ids):
            grant = batch.num_new_tokens
        else:
            sort = np.argsort(batch.calls)
            grant = batch.num_new_tokens[sort[np.searchsorted(batch.calls[sort], ids)]]
        c1 = calls.num_computed[ids] + grant
        num = len(ids)
        # iteration k >= 1 takes a new block for each call whose KV slot c1 + k - 1 opens one
        first = (1 - c1) % bs
        first[first == 0] = bs
        free = self.blocks.num_free_blocks
        if num * (1 + (n - 1) // bs) > free:  # a shortage is possible: stop before it
            k = np.arange(1, n, dtype=np.int64)
            per_k = np.zeros(n, dtype=np.int64)
            per_k[1:] = np.bincount(first % bs, minlength=bs)[k % bs]
            n = int(np.searchsorted(np.cumsum(per_k), free, side="right"))
            if n <= 1:
                return
        k = np.arange(1, n, dtype=np.int64)
        batch.decode_times_s = self.backend.decode_run_times_s(num, int(c1.sum()) + k * num)
        if self.slowdown != 1.0:
            batch.decode_times_s = batch.decode_times_s * self.slowdown
        batch.starts = np.cumsum(np.concatenate(([now_s, dt0], batch.decode_times_s)))
        counts = np.where(first <= n - 1, (n - 1 - first) // bs + 1, 0)
        total = int(counts.sum())
        if total:
            owner = np.repeat(np.arange(num), counts)
            offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            when = np.repeat(first, counts) + offset * bs
            order = np.lexsort((owner, when))
            batch.block_when, batch.block_owner = when[order], ids[owner[order]]
        batch.calls = ids
        batch.num_new_tokens = batch.remaining_tokens = grant  # a run's first iteration completes them
        batch.num_iterations = n

    def iterations_done(self, batch: Batch, time_s: float, before_ties: bool) -> int:
        """Iterations of the run that stepping would have completed before an event at
        ``time_s`` (``before_ties``: an iteration ending exactly then completes first)."""
        side = "right" if before_ties else "left"
        return int(np.searchsorted(batch.starts[1 : batch.num_iterations + 1], time_s, side=side))

    def take_run_blocks(self, batch: Batch, iterations: int) -> None:
        """Allocate the run's deferred blocks for iterations < ``iterations``."""
        stop = int(np.searchsorted(batch.block_when, iterations, side="left"))
        if stop <= batch.blocks_taken:
            return
        owners = batch.block_owner[batch.blocks_taken : stop]
        table = self.calls.blocks
        for call, block in zip(owners.tolist(), self.blocks.allocate(len(owners)), strict=True):
            table[call].append(block)
        np.add.at(self.calls.num_held_blocks, owners, 1)
        batch.blocks_taken = stop

    def truncate(self, batch: Batch, iterations: int) -> None:
        """Cut the run to its first ``iterations`` iterations (the last one is in flight)."""
        if iterations >= batch.num_iterations:
            return
        batch.num_iterations = iterations
        keep = int(np.searchsorted(batch.block_when, iterations, side="left"))
        batch.block_when, batch.block_owner = batch.block_when[:keep], batch.block_owner[:keep]

    def account(self, batch: Batch) -> None:
        """Add a finished batch (or run) to the replica's statistics."""
        n = batch.num_iterations
        taken = np.zeros(n, dtype=np.int64)
        np.add.at(taken, batch.block_when, 1)
        used = batch.used_blocks_0 + np.cumsum(taken)
        dt0 = float(batch.starts[1] - batch.starts[0])
        self.num_iterations += n
        self.busy_s += batch.end_s - batch.start_s
        self.kv_used_block_s += float(used[0] * dt0 + np.dot(used[1:], batch.decode_times_s[: n - 1]))
