"""One replica's continuous-batching scheduler, in the style of vLLM V1.

Each iteration: running calls first (decodes, then prefill chunks) within the token budget
``max_num_batched_tokens``; a running call that cannot get a block preempts a victim chosen by
the policy (by recompute, or by swap to the host tier); then, if nothing was preempted,
waiting calls are admitted in the policy's order while slots, budget and blocks allow (what
each would take: ``waiting.py``).

``schedule`` is a generator: it yields a ``Decision`` whenever the policy must choose and
receives the scores back, so the engine can hand decisions to an RL agent step by step.
Continuum's TTL pins (``pins``, ``retention.Pins``): a finished call's leading blocks that its
children will reuse stay referenced by the pin until every child was admitted here or the TTL
expires. The scheduler drops a pin early, oldest first, only when running calls would otherwise
be preempted for blocks, or when nothing runs and no waiting call fits (a stall otherwise).

Runs of decode-only iterations with nothing else going on are folded into one ``Batch`` in
closed form (``fast_forward``, ``runs.py``); the result equals stepping them one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np

from servegym.envs.engine.backend import Backend, Batch, SwapListener
from servegym.envs.engine.block_manager import BlockManager, NextUse
from servegym.envs.engine.calls import CallState, CallTable
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.cost_model import ModelProfile
from servegym.envs.engine.policy import Decision, DecisionKind, pick
from servegym.envs.engine.retention import Pins
from servegym.envs.engine.runs import fold
from servegym.envs.engine.waiting import AdmissionPlan, QueueNeeds, WaitingQueue
from servegym.envs.workloads.job import Call

DecisionBuilder = Callable[..., Decision]
"""(replica, kind, candidates, queue needs or None, token budget left, stop=False) -> Decision"""

__all__ = [
    "AdmissionPlan",
    "DecisionBuilder",
    "QueueNeeds",
    "Replica",
    "eligible_replicas",
]  # the plans live in waiting.py


def _num_gpu_blocks(index: int, profile: ModelProfile, config: EngineConfig) -> int:
    """The replica's KV blocks: ``engine.num_gpu_blocks``, else its KV budget over a block's bytes."""
    if config.num_gpu_blocks is not None:
        return config.num_gpu_blocks
    block_bytes = profile.kv_bytes_per_token * config.block_size
    budget = config.kv_budget_bytes if config.kv_budget_bytes is not None else profile.kv_budget_bytes
    num_blocks = int(budget // block_bytes)
    if num_blocks < 1:
        raise ValueError(
            f"replica {index} ({profile.name}): a KV budget of {budget:.3g} bytes holds no "
            f"{config.block_size}-token block of {block_bytes} bytes; raise engine.kv_budget_bytes"
        )
    return num_blocks


def eligible_replicas(
    replicas: list[Replica], spec: Call, prompt_tokens: int, max_tokens: int, min_params: float = 0.0
) -> tuple[np.ndarray, str | None]:
    """Which replicas can take a ready call: those that serve its model, have at least
    ``min_params`` parameters (its role's hard minimum, ``ClusterConfig.role_min_params``) and
    whose KV cache holds its prompt plus ``max_tokens``; with none, also the reason the call must
    be rejected."""
    need_tokens = prompt_tokens + max_tokens
    serves = np.array(
        [
            spec.model in (None, r.profile.name, r.profile.model) and r.profile.num_params >= min_params
            for r in replicas
        ]
    )
    fits = np.array([need_tokens <= r.capacity_tokens for r in replicas])
    eligible = serves & fits
    if eligible.any():
        return eligible, None
    if not serves.any():
        if min_params > 0:
            return eligible, f"no replica has the {min_params:g} parameters role {spec.role!r} needs"
        return eligible, f"no replica serves model {spec.model!r}"
    largest = max(r.capacity_tokens for r, ok in zip(replicas, serves, strict=True) if ok)
    return eligible, (
        f"prompt {prompt_tokens} + max_tokens {max_tokens} tokens exceeds the KV cache "
        f"({largest} tokens) of every replica serving it"
    )


@dataclass
class ConfigMark:
    """A replica's counters when it last answered a CONFIG decision: what the next decision's
    "since then" columns subtract."""

    time_s: float = 0.0
    preemptions: int = 0
    calls_finished: int = 0
    running_call_iterations: int = 0
    iterations: int = 0
    running: int = 0  # calls running then: past a lowered cap they may run on until they finish


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
        num_blocks = _num_gpu_blocks(index, profile, config)
        self.blocks = BlockManager(
            num_blocks,
            bs,
            num_host_blocks=int(config.swap_space_bytes // self.block_bytes),
            enable_prefix_caching=config.enable_prefix_caching,
            prefix_eviction=config.prefix_eviction,
        )
        self.pins = Pins(self.blocks)  # TTL pins (retention.py)
        self.capacity_tokens = num_blocks * bs
        self.running: list[int] = []
        self.waiting = WaitingQueue(
            calls,
            self.blocks,
            bs,
            config.long_prefill_token_threshold,
            self.running,
            config.reserve_output_frac,
        )
        self.in_flight: Batch | None = None
        self.swap_listener: SwapListener | None = None  # set by a backend that holds real KV
        self.step_version = 0  # only the latest STEP event pushed for this replica counts
        self.slowdown = 1.0  # iteration time factor of an open ClusterConfig.slowdowns window
        self.down_until_s = -np.inf  # in a ClusterConfig.outages window until then
        self.num_outages = 0
        # statistics
        self.num_iterations = 0
        self.busy_s = 0.0
        self.kv_used_block_s = 0.0
        self.num_preemptions = 0
        self.num_calls_finished = 0
        self.running_call_iterations = 0  # sum over iterations of the calls that ran in them
        self.config_mark = ConfigMark()  # the counters at the replica's last CONFIG decision
        self.swap_bytes = 0.0
        self.prompt_tokens_admitted = 0
        self.prompt_tokens_hit = 0

    # ---------------------------------------------------------------- admission
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

    def release_blocks(
        self, call: int, levels: Sequence[int] | None = None, pin_blocks: int = 0
    ) -> list[int]:
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
        self.waiting.enqueue(call, front=True)  # vLLM puts a preempted request at the queue front
        return swap_bytes

    # ---------------------------------------------------------------- outages
    def is_down(self, now_s: float) -> bool:
        return now_s < self.down_until_s

    def fail(self, until_s: float) -> list[int]:
        """The replica goes down until ``until_s``: its in-flight iteration is lost, and so is
        everything its GPU held: every running, queued and swapped call loses its KV (its
        generated tokens survive, as a recompute preemption's do), pins and the prefix cache are
        gone. Returns the calls it held, oldest-queued first, for the engine to requeue."""
        calls, bm = self.calls, self.blocks
        self.in_flight = None
        self.step_version += 1  # the lost iteration's STEP event is void
        held = [*self.running, *self.waiting]
        for call in self.running:
            bm.free(calls.blocks[call])
        for call in list(self.waiting):
            self.waiting.dequeue(call)
            if calls.state[call] == CallState.SWAPPED:
                bm.release_host(int(calls.host_blocks[call]))
                calls.host_blocks[call] = 0
        self.running.clear()
        for call in held:
            if self.swap_listener is not None:
                self.swap_listener.drop(call)
            calls.blocks[call] = []
            calls.num_held_blocks[call] = 0
            calls.num_registered_blocks[call] = 0
            calls.lost_tokens[call] = max(int(calls.lost_tokens[call]), int(calls.num_computed[call]))
            calls.num_computed[call] = 0
        for pinned in list(self.pins):
            self.pins.unpin(pinned)  # each pin takes its waiters and children's entries with it
        bm.drop_cache()
        self.down_until_s = until_s
        self.num_outages += 1
        return held

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
        batch = Batch.from_calls(calls, order, grants, swap_bytes)
        self.swap_bytes += swap_bytes
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
                # (a reservation shrinks as the running calls decode: a blocked call may fit later)
                or (
                    blocked_waiting
                    and not admitted
                    and batch.prefill_tokens == 0
                    and not cfg.reserve_output_frac
                )
            )
        )
        return batch

    def _schedule_under_pressure(
        self, run: np.ndarray, grant: np.ndarray
    ) -> Generator[Decision, np.ndarray, tuple[list[int], list[int], float]]:
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

    def _admit_waiting(
        self, order: list[int], grants: list[int], budget: int
    ) -> Generator[Decision, np.ndarray, tuple[bool, int, float, bool]]:
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
            plan = self.waiting.admission_plan(call, budget - spent)
            while rank == 0 and not order and self.pins and not self.waiting.fits(plan):
                # nothing runs and the policy's first choice waits on pinned blocks: drop pins
                self.pins.drop_oldest()
                plan = self.waiting.admission_plan(call, budget)
            if not self.waiting.fits(plan):
                break  # head-of-line: the policy's order is respected, as in vLLM
            swap_bytes += self._admit_into(order, grants, call, plan)
            spent += plan.chunk_tokens
        return spent > 0, spent, swap_bytes, False

    def _admit_into(self, order: list[int], grants: list[int], call: int, plan: AdmissionPlan) -> float:
        """Admit a waiting call into this iteration's batch; returns its swap-in bytes."""
        self.waiting.dequeue(call)
        swap_bytes = self._admit(call, plan)
        order.append(call)
        grants.append(plan.chunk_tokens)
        self.register_prefill_blocks([call], [plan.chunk_tokens])
        return swap_bytes

    def _needs_dropping_pins(self, order: list[int], budget: int) -> QueueNeeds:
        """``queue_needs``; when nothing runs and nothing fits, pins are dropped oldest first
        until something does or none is left (waiting for a TTL would idle the replica)."""
        needs = self.waiting.queue_needs(budget)
        while not order and self.pins and not needs.fits.any():
            self.pins.drop_oldest()
            needs = self.waiting.queue_needs(budget)
        return needs

    def _pick_waiting(
        self, order: list[int], grants: list[int], budget: int
    ) -> Generator[Decision, np.ndarray, tuple[bool, int, float, bool]]:
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
            plan = self.waiting.admission_plan(call, budget - spent)
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

    # ---------------------------------------------------------------- timing
    def time_batch(self, batch: Batch, now_s: float) -> None:
        """Time the batch and, when allowed, fold the decode-only iterations after it into a
        run (``runs.fold``); events that touch this replica meanwhile split the run."""
        dt0 = self.backend.iteration_time_s(batch)
        if self.slowdown != 1.0:
            dt0 *= self.slowdown
        batch.starts = np.array([now_s, now_s + dt0])
        batch.used_blocks_0 = self.blocks.num_used_blocks
        if batch.fast_forwardable:
            fold(batch, self, now_s, dt0)

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

    def account(self, batch: Batch) -> None:
        """Add a finished batch (or run) to the replica's statistics."""
        n = batch.num_iterations
        taken = np.zeros(n, dtype=np.int64)
        np.add.at(taken, batch.block_when, 1)
        used = batch.used_blocks_0 + np.cumsum(taken)
        dt0 = float(batch.starts[1] - batch.starts[0])
        self.num_iterations += n
        self.running_call_iterations += len(batch.calls) * n
        self.busy_s += batch.end_s - batch.start_s
        self.kv_used_block_s += float(used[0] * dt0 + np.dot(used[1:], batch.decode_times_s[: n - 1]))
