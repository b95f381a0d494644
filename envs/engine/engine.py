"""The cluster engine: one discrete-event virtual clock over replicas, jobs and tools.

Events are job arrivals, calls becoming ready (parents done, tools returned, network crossed),
replica iterations ending, replicas slowing down or going down (``ClusterConfig.slowdowns``,
``outages``: a replica that goes down loses its KV and its calls are requeued elsewhere) and TTL
pins expiring (Continuum; ``EngineConfig.pin_ttl_rule``, whose
TTL may itself be a RETAIN decision). The engine does not call a policy: ``next_decision()`` advances
the clock until a choice is needed and returns it, ``decide(scores)`` applies the answer, and
``run(policy)`` is the plain driver loop that does both. Nothing here reads wall-clock time.

Memory follows the live work when the source streams (``JobSource.streaming``, e.g. a trace
replayed by ``StreamedJobs``): the engine holds one arrival event ahead of its clock, pulling
the next job from the source when that one arrives, and when a tree finishes it drops the
tree's ``Job``, its call tree and its calls' prompt segments and block hashes. What stays per
tree is its row of per-job columns (arrival, finish, service, counts; what the metrics read)
and per call its row of the call table (call ids are never reused or renumbered). Event order,
ids and every result are those of the same jobs given as a list. ``jobs[i]`` of a dropped tree
is read again from the source on demand (``StreamedJobs.jobs``: the whole trace, for per-tree
analysis after a run).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Generator
from enum import IntEnum
from typing import Any

import numpy as np

from servegym.envs.engine.backend import Backend, Batch, make_backend_factory
from servegym.envs.engine.calls import TERMINAL, CallState, CallTable
from servegym.envs.engine.config import RETENTION_FIELDS, ClusterConfig, EngineConfig
from servegym.envs.engine.cost_model import ModelProfile, load_profile
from servegym.envs.engine.features import (
    budget_decision,
    budget_options,
    candidate_decision,
    config_decision,
    config_options,
    retain_decision,
    route_decision,
)
from servegym.envs.engine.invariants import check_drained, check_live, diagnose_stall
from servegym.envs.engine.jobs import JobLog, JobTable, Trees
from servegym.envs.engine.metrics import KvSamples, RunMetrics, collect_metrics
from servegym.envs.engine.policy import Decision, DecisionKind, Policy, check_scores
from servegym.envs.engine.retention import Retention
from servegym.envs.engine.runs import apply_tokens, iterations_done, truncate
from servegym.envs.engine.scheduler import ConfigMark, Replica, eligible_replicas
from servegym.envs.engine.stats import OnlineStats
from servegym.envs.engine.waiting import QueueNeeds
from servegym.envs.workloads.job import Job
from servegym.envs.workloads.source import JobSource


class EventKind(IntEnum):
    """Also the tie-break at equal times: arrivals, then ready calls, then iterations."""

    ARRIVAL = 0
    READY = 1
    CONFIG = 2  # a replica asks for its cap and budget (key: the replica; config_every_s > 0),
    # before the iteration that starts at the same instant, which then runs under the answer
    STEP = 3
    UNPIN = 4  # a TTL pin expires (key: the pinned call, payload: its replica)
    SLOW = 5  # a slowdown window opens or closes (key: the replica, payload: its new speed factor)
    DOWN = 6  # an outage starts (key: the replica, payload: when it ends); it ends by itself


class Engine:
    """The cluster's virtual clock, driven by ``next_decision``/``decide`` (or ``run``).

    It owns the events and the replicas (``scheduler.Replica``: queues, KV, iterations) and
    routes ready calls to them; the state it shares lives in tables read by features, metrics
    and tests: ``calls`` (``CallTable``), ``jobs`` and ``job_table`` (``jobs.py``, with the
    trees' lifecycle in ``trees``), ``stats`` (``OnlineStats``: what a policy may learn from),
    and ``retention`` (what a finished call's KV becomes, ``retention.py``).
    """

    def __init__(
        self,
        source: JobSource,
        cluster: ClusterConfig | None = None,
        engine: EngineConfig | None = None,
        time_scale_s: float = 30.0,
        backend_factory: Callable[[ModelProfile], Backend] | None = None,
    ) -> None:
        self.cluster = cluster or ClusterConfig()
        self.config = engine or EngineConfig()
        if not time_scale_s > 0:
            raise ValueError(f"time_scale_s must be > 0, got {time_scale_s!r}")
        self.time_scale_s = time_scale_s
        self.source = source
        self.streaming = bool(getattr(source, "streaming", False))
        self.calls = CallTable()
        self._keys: dict[str, int] = {}  # prompt content key -> id for block hashing
        backend_factory = backend_factory or make_backend_factory(self.config)  # by engine.backend
        self.replicas = [
            Replica(i, profile, self.config, self.calls, backend_factory(profile), self._build_decision)
            for i, profile in enumerate(
                load_profile(name) for name in self.cluster.profiles(self.config.profile)
            )
        ]
        for replica in self.replicas:  # a backend holding real KV reads block tables, calls, prompt keys
            attach = getattr(replica.backend, "attach", None)
            if attach is not None:
                attach(replica, self._keys)
        self.now_s = 0.0
        # (time, kind, key, payload); the payload's type follows the kind (STEP: the step version,
        # UNPIN: the replica index, SLOW: the speed factor), which a tuple type cannot tie together
        self._events: list[tuple[float, int, int, Any]] = []
        self.jobs: list[Job] | JobLog = JobLog(source) if self.streaming else []
        self.job_table = JobTable()
        self.stats = OnlineStats()  # what features may learn from (nothing privileged)
        continuation = self.config.continuation_prompt_tokens if self.config.continue_truncated else None
        self.trees = Trees(
            self.calls, self.jobs, self.job_table, self.stats, self.cluster, self._keys, continuation
        )
        self.retention = Retention(self.trees, self._retain_decision)
        self.num_jobs_finished = 0  # trees whose every call is terminal (finished or rejected)
        self.rejections: list[tuple[str, int, str]] = []  # (job id, call index, reason)
        self.num_live_jobs = 0
        self.tree_seconds = 0.0  # integral of unfinished trees over virtual time = total tree time
        self.stall: str | None = None
        self.kv_samples = KvSamples()  # (time, replica, used fraction) per scheduled batch
        self._loop: Generator[Decision, np.ndarray | None, None] | None = self._run()
        self._event: tuple[int, int] = (EventKind.ARRIVAL, -1)  # latest event key handled at now_s
        self._event_time = -np.inf
        self._pending: Decision | None = None
        self._answer: np.ndarray | None = None
        self._started = False
        for window in self.cluster.slowdowns:
            self._push(window.start_s, EventKind.SLOW, window.replica, float(window.factor))
            self._push(window.end_s, EventKind.SLOW, window.replica, 1.0)
        for outage in self.cluster.outages:
            self._push(outage.start_s, EventKind.DOWN, outage.replica, float(outage.end_s))
        self._requeued: set[int] = set()  # calls an outage took off their replica, not routed again yet
        self.num_requeued = 0
        if self.config.config_every_s > 0:
            for replica in self.replicas:
                self._push(0.0, EventKind.CONFIG, replica.index)
        if self.streaming:
            self._pull_arrival()
        else:
            for job in source.initial_jobs():
                self._add_job(job)

    # ------------------------------------------------------------------ driver API
    @property
    def done(self) -> bool:
        """True once the workload has drained (or the run stalled; see ``stall``)."""
        return self._started and self._loop is None

    @property
    def num_jobs_done(self) -> int:
        """Trees done (finished or failed) so far; O(1), a driver may ask every decision."""
        return self.num_jobs_finished

    def next_decision(self) -> Decision | None:
        """Advance the clock to the next choice; None once the workload has drained."""
        if self._pending is not None:
            return self._pending
        if self._started and self._loop is None:
            return None
        self._started = True
        assert self._loop is not None  # None only once the loop returned, after the first start
        try:
            self._pending = self._loop.send(self._answer)  # None starts the generator
        except StopIteration:
            self._pending = None
            self._loop = None
        self._answer = None
        return self._pending

    def decide(self, scores: np.ndarray) -> None:
        if self._pending is None:
            raise RuntimeError("decide() called with no pending decision; call next_decision() first")
        scores = check_scores(self._pending, scores)
        if self._pending.kind == DecisionKind.ROUTE:
            scores = np.where(self._pending.mask, scores, -np.inf)
        self._answer = scores
        self._pending = None

    def apply_retention(self, policy: object) -> None:
        """Adopt a policy's KV-retention hints before the run starts: its optional ``retention``
        attribute, a mapping of ``RETENTION_FIELDS`` (pin_ttl_rule, pin_ttl_s, prefix_eviction)
        to values, overrides this engine's config. A driver calls it once (``run`` does); the
        engine still calls no one during the run."""
        hints = getattr(policy, "retention", None)
        if not hints:
            return
        unknown = set(hints) - set(RETENTION_FIELDS)
        if unknown:
            raise ValueError(
                f"retention hints {sorted(unknown)} unknown; a policy may set {RETENTION_FIELDS}"
            )
        if self._started:
            raise RuntimeError("apply_retention() must come before the first next_decision()")
        self.config = dataclasses.replace(self.config, **dict(hints))  # validates the values
        for replica in self.replicas:
            replica.config = self.config
            replica.blocks.set_eviction_order(self.config.prefix_eviction)

    def run(self, policy: Policy, progress: Callable[[Engine], None] | None = None) -> RunMetrics:
        """Drive the engine with ``policy`` (after ``apply_retention(policy)``) until the
        workload drains; returns the metrics. A policy that only routes (``routing_only``) is
        refused in a one-replica cluster, where it would never decide and run as FCFS."""
        if getattr(policy, "routing_only", False) and len(self.replicas) == 1:
            raise ValueError(
                f"{type(policy).__name__} only decides where calls go, and this cluster has one "
                "replica: it would run as FCFS. Use a cluster of several replicas (e.g. cluster=four)"
            )
        if not self._started:
            self.apply_retention(policy)
        while (decision := self.next_decision()) is not None:
            self.decide(policy.scores(decision))
            if progress is not None:
                progress(self)
        return self.metrics()

    def metrics(self) -> RunMetrics:
        return collect_metrics(self)

    def check_invariants(self) -> None:
        """Check every invariant of the engine's state (``invariants.py``), and once the
        workload has drained without a stall, that it drained cleanly. Raises
        ``InvariantError``; O(calls + blocks), so call it every N decisions on long runs."""
        check_live(self)
        if self.done and self.stall is None:
            check_drained(self)

    # ------------------------------------------------------------------ events
    def _push(self, time_s: float, kind: EventKind, key: int, payload: object = None) -> None:
        heapq.heappush(self._events, (time_s, int(kind), key, payload))

    def _run(self) -> Generator[Decision, np.ndarray | None, None]:
        events = self._events
        while events:
            time_s, kind, key, payload = heapq.heappop(events)
            if kind == EventKind.STEP and payload != self.replicas[key].step_version:
                continue  # a run that an event cut short was rescheduled
            if kind == EventKind.UNPIN and key not in self.replicas[payload].pins:
                continue  # released earlier (its children were admitted, or memory was short)
            # the latest (kind, key) processed at this instant: an event pushed for "now" while
            # handling a later-keyed one still runs after everything handled before it
            same_instant = time_s == self._event_time
            self._event = max(self._event, (kind, key)) if same_instant else (kind, key)
            self.tree_seconds += self.num_live_jobs * (time_s - self.now_s)
            self._event_time = self.now_s = time_s
            if kind == EventKind.ARRIVAL:
                self._arrive(key)
            elif kind == EventKind.READY:
                yield from self._route(key)
            elif kind == EventKind.UNPIN:
                self._expire_pin(self.replicas[payload], key)
            elif kind == EventKind.SLOW:
                self._cut_run(self.replicas[key])  # what starts from now runs at the new speed
                self.replicas[key].slowdown = payload
            elif kind == EventKind.CONFIG:
                yield from self._configure(self.replicas[key])
            elif kind == EventKind.DOWN:
                self._fail(self.replicas[key], payload)
            else:
                yield from self._step(self.replicas[key])
        self._drain_arrivals()
        unfinished = self.job_table.unfinished()
        if unfinished and self.stall is None:
            self.stall = diagnose_stall(self, unfinished)

    def _sync(self, replica: Replica) -> int:
        """Bring a replica in the middle of a folded run up to the current event, as stepping
        would have it: blocks of started iterations taken, tokens of finished ones applied.
        Returns the index of the iteration in flight."""
        batch = replica.in_flight
        if batch is None or batch.num_iterations == 1:
            return 0
        kind, key = self._event
        done = iterations_done(batch, self.now_s, (EventKind.STEP, replica.index) < (kind, key))
        replica.take_run_blocks(batch, done + 1)
        self._apply(replica, batch, done)
        return done

    def _sync_all(self) -> None:
        """Before anyone observes the engine (a decision), every replica is as stepping left it."""
        for replica in self.replicas:
            self._sync(replica)

    # ------------------------------------------------------------------ jobs and calls
    def _pull_arrival(self) -> None:
        """Streaming: schedule the source's next job, one arrival ahead of the clock. Its
        arrival event sorts exactly where it would have had every job been pushed at start."""
        assert isinstance(self.jobs, JobLog)  # streaming: __init__ made jobs a JobLog
        job = self.jobs.pull()
        if job is not None:
            self._add_job(job)

    def _drain_arrivals(self) -> None:
        """Streaming, after a stall: count the jobs that never arrived (as a list source would
        have them) without scheduling or holding them."""
        while isinstance(self.jobs, JobLog) and (job := self.jobs.pull()) is not None:  # streaming
            index = len(self.jobs)
            self._add_job(job, schedule=False)
            self.trees.release(index)

    def _add_job(self, job: Job, schedule: bool = True) -> None:
        self.jobs.append(job)
        index = self.job_table.add(job, self.stats.tenant_id(job.tenant))
        if schedule:
            self._push(job.arrival_s, EventKind.ARRIVAL, index)

    def _arrive(self, index: int) -> None:
        if self.streaming and index == len(self.jobs) - 1:
            self._pull_arrival()  # the next arrival joins the heap before anything later runs
        self.num_live_jobs += 1
        arrival_s = self.jobs[index].arrival_s
        for call in self.trees.arrive(index):
            self._push(arrival_s, EventKind.READY, call)

    def _route(self, call: int) -> Generator[Decision, np.ndarray, None]:
        calls = self.calls
        if calls.state[call] != CallState.PENDING:  # rejected with its tree meanwhile
            return
        requeued = call in self._requeued  # back from a replica that went down: already resolved
        if np.isnan(calls.ready_s[call]):  # ready now, whatever waits for a replica to come back
            calls.ready_s[call] = self.now_s
        if not requeued:
            self.trees.resolve_prompt(call)
        spec = self.trees.spec(call)
        min_params = self.cluster.role_min_params.get(spec.role, 0.0)
        hard = self.cluster.below_min_output_factor == 0
        eligible, reason = eligible_replicas(
            self.replicas,
            spec,
            int(calls.prompt_tokens[call]),
            int(calls.max_tokens[call]),
            min_params * hard,
        )
        if reason is not None:
            self._reject(call, reason)
            return
        up = eligible
        if self.cluster.outages:
            up = eligible & np.array([not r.is_down(self.now_s) for r in self.replicas])
        if not up.any():  # every replica that could take it is down: it waits for the first back
            back_s = min(r.down_until_s for r, ok in zip(self.replicas, eligible, strict=True) if ok)
            self._push(back_s, EventKind.READY, call)
            return
        if up.sum() == 1:
            target = int(np.flatnonzero(up)[0])
        else:
            self._sync_all()
            scores = yield route_decision(self, call, up)
            allowed = np.flatnonzero(up)
            target = int(allowed[np.argmax(scores[allowed])])  # ties and -inf: first eligible
        replica = self.replicas[target]
        self._cut_run(replica)  # the new call is scheduled when stepping would schedule it
        if not requeued:
            if replica.profile.num_params < min_params:  # below its role's minimum: it rambles
                grown = int(
                    np.ceil(calls.true_output_tokens[call] * (1 + self.cluster.below_min_output_factor))
                )
                calls.true_output_tokens[call] = grown
                calls.target_tokens[call] = min(grown, int(calls.max_tokens[call]))
            if self.config.budget_rule == "policy" and calls.continues[call] < 0:
                yield from self._budget(replica, call, spec.max_tokens)
            self.trees.observe_tools(call)
        self._requeued.discard(call)  # it keeps its ready time and place (as a preempted call)
        self._backlog(call, +1)
        calls.replica[call] = target
        calls.state[call] = CallState.WAITING
        calls.enqueue_s[call] = self.now_s
        tree_replicas = self.job_table.replicas[int(calls.job[call])]
        assert tree_replicas is not None  # released only once every call of the tree is terminal
        tree_replicas.add(target)
        replica.waiting.enqueue(call)
        if replica.in_flight is None:  # idle: wake it now
            self._wake(replica)

    def _backlog(self, call: int, delta: int) -> None:
        """Count the tenant's queued/running calls; a tenant turning backlogged gets VTC's lift."""
        stats = self.stats
        tenant = int(self.job_table.tenant[int(self.calls.job[call])])
        if delta > 0 and self.config.vtc_lift and stats.lift_due(tenant):
            self._sync_all()  # counters of folded runs elsewhere must be current
            stats.lift(tenant)
        stats.tenant_backlog[tenant] += delta

    def _reject(self, call: int, reason: str) -> None:
        """Reject a call and, with it, every call of its tree that has not run yet."""
        calls = self.calls
        job_id = self.jobs[int(calls.job[call])].job_id
        self.rejections.append((job_id, int(calls.call_in_job[call]), reason))
        for other in self.trees.cut(call, self.now_s):
            self._call_done(other)

    def _call_done(self, call: int) -> None:
        job_index = int(self.calls.job[call])
        if self.job_table.call_done(job_index, self.now_s):
            self.num_live_jobs -= 1
            self.num_jobs_finished += 1
            for job in self.source.on_job_finished(self.jobs[job_index], self.now_s):
                self._add_job(job)
            if self.streaming:
                self.trees.release(job_index)

    def _finish(self, call: int) -> None:
        self._backlog(call, -1)
        for ready_s, child in self.trees.finish(call, self.now_s):
            self._push(ready_s, EventKind.READY, child)
        self._call_done(call)

    # ------------------------------------------------------------------ iterations
    def _build_decision(
        self,
        replica: Replica,
        kind: DecisionKind,
        candidates: list[int],
        needs: QueueNeeds | None,
        budget_left: int,
        stop: bool = False,
    ) -> Decision:
        self._sync_all()
        decision = candidate_decision(self, replica, kind, candidates, needs, budget_left)
        if replica.config.admission == "pick" and needs is not None:
            decision.mask = needs.fits.copy()  # pick-next: only calls that fit now may be picked
            decision.stop = stop
        return decision

    def _push_step(self, replica: Replica) -> None:
        assert replica.in_flight is not None  # every caller has just set or checked it
        replica.step_version += 1
        self._push(replica.in_flight.end_s, EventKind.STEP, replica.index, replica.step_version)

    def _step(self, replica: Replica) -> Generator[Decision, np.ndarray, None]:
        batch = replica.in_flight
        if batch is not None and len(batch.calls):
            replica.take_run_blocks(batch, batch.num_iterations)
            self._apply(replica, batch, batch.num_iterations)
            yield from self._finish_run(replica, batch)
            replica.account(batch)
        replica.in_flight = None
        batch = yield from replica.schedule()
        if batch is None and replica.waiting:  # everything was preempted: admit afresh
            batch = yield from replica.schedule()
        if batch is None:
            if replica.waiting:  # waiting work, nothing running, nothing admissible: a stall
                self._drain_arrivals()  # the trees that never arrived count as unfinished
                self.stall = diagnose_stall(self, self.job_table.unfinished())
                self._events.clear()
            return
        replica.time_batch(batch, self.now_s)
        replica.in_flight = batch
        self.kv_samples.append(
            self.now_s, replica.index, replica.blocks.num_used_blocks / replica.blocks.num_blocks
        )
        self._push_step(replica)

    def _apply(self, replica: Replica, batch: Batch, upto: int) -> None:
        """Apply the tokens of iterations ``batch.applied`` .. ``upto - 1`` and count them as
        their trees' and tenants' service (the run's calls that reach their stop finish in
        ``_finish_run``, when the run ends)."""
        applied = apply_tokens(self.calls, batch, upto)
        if applied is None:
            return
        tokens, outputs = applied
        jobs = self.calls.job[batch.calls]
        table = self.job_table
        np.add.at(table.service, jobs, tokens)
        # VTC's weights: a prompt token costs 1, a generated token 2 (processed once, sampled once)
        np.add.at(self.stats.tenant_service, table.tenant[jobs], tokens + outputs)

    def _finish_run(self, replica: Replica, batch: Batch) -> Generator[Decision, np.ndarray, None]:
        """The run ended: its calls that reached their stop finish, in batch order, each
        releasing its KV first (``Retention.release``; a RETAIN decision when
        ``pin_ttl_rule=policy``), a pin's expiry scheduled here."""
        calls, ids, trees = self.calls, batch.calls, self.trees
        done = ids[calls.num_output[ids] >= calls.target_tokens[ids]]
        for call in done.tolist():
            if trees.needs_continuation(call):  # first: its children and tool pass to the continuation
                trees.continue_call(call, self.now_s)
            ttl_s = yield from self.retention.release(replica, call)  # asked while it holds slot and KV
            if ttl_s is not None:
                self._push(self.now_s + ttl_s, EventKind.UNPIN, call, replica.index)
            replica.running.remove(call)
            replica.num_calls_finished += 1
            self._finish(call)

    # ------------------------------------------------------------------ KV retention
    def _retain_decision(self, replica: Replica, call: int, children: int, pin_blocks: int) -> Decision:
        self._sync_all()
        return retain_decision(self, replica, call, children, pin_blocks)

    # ------------------------------------------------------------------ token budgets (BUDGET)
    def _budget(
        self, replica: Replica, call: int, workload_max_tokens: int
    ) -> Generator[Decision, np.ndarray, None]:
        """``budget_rule=policy``: the call's ``max_tokens``, a BUDGET decision among the
        multiples of its workload budget that the replica's KV cache can hold with its prompt."""
        calls = self.calls
        budgets = budget_options(replica.config, workload_max_tokens)
        fits = int(calls.prompt_tokens[call]) + budgets <= replica.capacity_tokens
        self._sync_all()
        scores = yield budget_decision(self, replica, call, budgets, fits)
        allowed = np.flatnonzero(fits)  # never empty: the workload's own budget fits (routing checked it)
        budget = int(budgets[allowed[np.argmax(scores[allowed])]])
        calls.max_tokens[call] = budget
        calls.target_tokens[call] = min(int(calls.true_output_tokens[call]), budget)

    # ------------------------------------------------------------------ batching (CONFIG)
    def _configure(self, replica: Replica) -> Generator[Decision, np.ndarray, None]:
        """Every ``config_every_s``: the replica's cap and budget, a CONFIG decision, applied
        from its next iteration (a folded run is cut there, as for any change). Once every tree
        is done nobody asks any more, so the clock stops with the workload."""
        quiet = (EventKind.CONFIG, EventKind.DOWN)  # events that bring no work
        if self.num_jobs_finished == len(self.jobs) and all(e[1] in quiet for e in self._events):
            return  # the workload drained: nothing more will arrive
        if replica.is_down(self.now_s):  # nothing to configure: ask again once it is back
            self._push(self.now_s + self.config.config_every_s, EventKind.CONFIG, replica.index)
            return
        self._cut_run(replica)
        self._sync_all()
        now = self._config_counters(replica)
        options = config_options(replica.config)
        scores = yield config_decision(self, replica, options, now)
        seqs, tokens = options[int(np.argmax(scores))]
        changed = (seqs, tokens) != (replica.config.max_num_seqs, replica.config.max_num_batched_tokens)
        replica.config = dataclasses.replace(replica.config, max_num_seqs=seqs, max_num_batched_tokens=tokens)
        replica.config_mark = now
        if changed and replica.in_flight is None and replica.waiting:  # idle behind the old cap
            self._wake(replica)
        self._push(self.now_s + self.config.config_every_s, EventKind.CONFIG, replica.index)

    def _config_counters(self, replica: Replica) -> ConfigMark:
        """The replica's counters now, as stepping would have them. Called after ``_cut_run``,
        so a folded run in flight ends with the iteration in flight: the ones before it are
        complete and count already (stepping would have accounted each)."""
        iterations, running = replica.num_iterations, replica.running_call_iterations
        batch = replica.in_flight
        if batch is not None:
            done = max(batch.num_iterations - 1, 0)
            iterations += done
            running += done * len(batch.calls)
        return ConfigMark(
            self.now_s,
            replica.num_preemptions,
            replica.num_calls_finished,
            running,
            iterations,
            len(replica.running),
        )

    def _fail(self, replica: Replica, until_s: float) -> None:
        """An outage (``ClusterConfig.outages``): the replica loses its KV until ``until_s``, and
        the calls it held are requeued, each one network hop later, to the replicas that are up
        (or wait for the first eligible one to come back). Iterations that ended before now count;
        the one in flight is lost."""
        done = self._sync(replica)
        batch = replica.in_flight
        if batch is not None and done > 0:  # a folded run's completed iterations count, as stepped ones would
            truncate(batch, done)
            replica.account(batch)
        calls = self.calls
        held = replica.fail(until_s)
        for call in held:
            assert (
                calls.num_output[call] < calls.target_tokens[call]
            )  # a call at its stop finished at its STEP
            self._backlog(call, -1)
            calls.state[call] = CallState.PENDING
            self._requeued.add(call)
            self._push(self.now_s + self.cluster.network_delay_s, EventKind.READY, call)
        self.num_requeued += len(held)

    def _expire_pin(self, replica: Replica, call: int) -> None:
        """A TTL ran out: the pinned blocks join the prefix cache, and the replica sees them at
        its next iteration exactly as stepping would (a folded run is cut there)."""
        self._cut_run(replica)
        replica.pins.unpin(call)
        if replica.in_flight is None and replica.waiting:  # idle behind the pin: wake it now
            self._wake(replica)

    def _cut_run(self, replica: Replica) -> None:
        """Something changed on a replica in the middle of a folded decode run: end the run
        after the iteration in flight, where stepping would next schedule."""
        if replica.in_flight is not None and replica.in_flight.num_iterations > 1:
            in_flight = self._sync(replica)
            truncate(replica.in_flight, in_flight + 1)
            self._push_step(replica)

    def _wake(self, replica: Replica) -> None:
        """An idle replica schedules now: an empty batch that ends at this instant."""
        replica.in_flight = Batch(*(np.zeros(0, np.int64),) * 3, 0, 0, 0.0, 0)
        replica.in_flight.starts = np.array([self.now_s, self.now_s])
        self._push_step(replica)


def assert_all_terminal(engine: Engine) -> None:
    """Every call reached exactly one terminal state (used by tests and debug runs)."""
    states = engine.calls.state[: engine.calls.size]
    bad = np.flatnonzero(~np.isin(states, [int(s) for s in TERMINAL]))
    if len(bad):
        raise AssertionError(
            f"{len(bad)} calls not terminal, e.g. call {bad[0]} in {CallState(states[bad[0]]).name}"
        )
