"""Jobs (agent trees) in the engine: the ``Job`` objects, a table of per-job columns, and the
trees' lifecycle over the call table.

A job is one agent tree. The engine numbers jobs in the order it adds them (the job index);
every column here is indexed by it. The numpy columns are what the metrics, the reward and the
features read for many jobs at once, so they are arrays (grown by doubling, like
``CallTable``); the structural per-job data that only the engine walks one job at a time (first
call id, children, replicas) stays in Python lists.

``Trees`` holds the agent-tree semantics: a tree's calls get consecutive ids when it arrives; a
call becomes ready once its parents finished and their tools returned (plus the network hop);
its prompt is then resolved from its ancestors' outputs; a rejected call takes the rest of its
tree with it. The engine owns the clock: it pushes the events these transitions return.

Trees may grow while they run: with ``EngineConfig.continue_truncated`` a call stopped by its
budget gets a continuation call (``continue_call``), which takes a new id past the table's end
(ids of one tree are then no longer consecutive: ``JobTable.call_ids``) and a call index past its
job's calls (its ``Call`` lives in ``Trees.extra_specs``). The continuation inherits the stopped
call's children and tool, and a child's ``Output`` of the stopped call reads the whole output of
the chain.

A streaming engine drops a finished tree's ``Job`` and structure (``Trees.release``) but keeps
its row of columns: arrival, finish, service and counts are all that per-tree metrics need once
a tree is done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

from servegym.envs.engine.calls import CallState, CallTable
from servegym.envs.engine.config import ClusterConfig
from servegym.envs.engine.stats import OnlineStats
from servegym.envs.workloads.job import Call, Job, Output, Text, role_id
from servegym.envs.workloads.source import JobSource

# A dropped call's segments, hashes and (empty) block table: one shared empty tuple in place of the
# columns' lists (no list per released call; nothing reads or extends a released call's rows again).
_RELEASED: tuple[()] = ()
CONTINUE_KEY = "sys/continue"
"""Content key of a continuation's instruction text (one text for every continuation)."""


class JobLog(Sequence[Job]):
    """``Engine.jobs`` of a streaming source: the jobs in engine order, a finished one dropped
    (``release``) and read again from the source's ``jobs`` (every job, in engine order) if
    asked for; and the source's jobs not pulled yet, which the engine pulls one arrival ahead of
    its clock (``pull``)."""

    def __init__(self, source: JobSource) -> None:
        self._jobs: list[Job | None] = []
        self._source = source
        self._pending: Iterator[Job] | None = iter(source.initial_jobs())
        self._last_arrival_s = -np.inf  # of the latest job appended
        self.num_held = 0  # jobs held now (the live trees)

    def append(self, job: Job) -> None:
        self._jobs.append(job)
        self._last_arrival_s = job.arrival_s
        self.num_held += 1

    def pull(self) -> Job | None:
        """The source's next job (not appended yet), or None once it has no more."""
        job = None if self._pending is None else next(self._pending, None)
        if job is None:
            self._pending = None
        elif job.arrival_s < self._last_arrival_s:
            raise ValueError(
                f"streaming source {type(self._source).__name__}: job {job.job_id!r} arrives at "
                f"{job.arrival_s!r} s, before the previous job ({self._last_arrival_s!r} s); a "
                "streaming source must yield jobs in arrival order"
            )
        return job

    def release(self, index: int) -> None:
        if self._jobs[index] is not None:
            self._jobs[index] = None
            self.num_held -= 1

    def __len__(self) -> int:
        return len(self._jobs)

    @overload
    def __getitem__(self, index: int) -> Job: ...
    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...
    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        job = self._jobs[index]
        # a streaming source's ``jobs`` (``StreamedJobs.jobs``): ``JobSource`` does not declare it, and
        # an isinstance check on a Protocol with ``jobs`` would load the whole trace
        return self._source.jobs[index if index >= 0 else len(self) + index] if job is None else job  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Job]:
        return (self[i] for i in range(len(self)))


def _extended(column: np.ndarray, extra: int, fill: float) -> np.ndarray:
    return np.concatenate([column, np.full(extra, fill, dtype=column.dtype)])


class JobTable:
    """Per-job columns, indexed by engine job index. The numpy columns are longer than
    ``size`` (rows past it hold their fill value), so slice them with ``[:size]``; a column is
    a new array after growing, so hold it in a local only while no job is added."""

    def __init__(self) -> None:
        self.size = 0  # rows in use: the jobs added so far (== len(Engine.jobs))
        self.arrival_s = np.zeros(0)  # (capacity,) float: when the tree arrived
        self.finish_s = np.full(0, np.nan)  # (capacity,) float: when its last call turned terminal, else NaN
        self.service = np.zeros(0)  # (capacity,) float: tokens computed for its calls (attained service)
        self.calls_done = np.zeros(0, dtype=np.int64)  # (capacity,) its calls that are terminal
        self.num_calls = np.zeros(0, dtype=np.int64)  # (capacity,) len(job.calls) + its continuations
        self.num_extra = np.zeros(0, dtype=np.int64)  # (capacity,) its continuations (ids past the range)
        self.tenant = np.zeros(0, dtype=np.int64)  # (capacity,) tenant id (``OnlineStats.tenants``)
        self.failed = np.zeros(0, dtype=np.bool_)  # (capacity,) a call was rejected and its tree cut
        # Python lists, exactly ``size`` long; a released tree's structure is None
        self.first_call: list[int] = []  # id of its first call (its ids are consecutive); -1 until it arrives
        self.children: list[list[list[int]] | None] = []  # call index -> child call indices
        self.replicas: list[set[int] | None] = []  # replicas its calls were routed to (a route feature)
        self.extra_calls: list[list[int] | None] = []  # ids of its continuation calls, in creation order

    def add(self, job: Job, tenant: int) -> int:
        """A row for a new job (not arrived yet: its calls have no ids); returns its index."""
        index = self.size
        if index == len(self.arrival_s):
            self._grow(max(16, index))
        self.size += 1
        self.arrival_s[index] = job.arrival_s
        self.num_calls[index] = len(job.calls)
        self.tenant[index] = tenant
        self.replicas.append(set())
        self.first_call.append(-1)
        self.children.append(job.children())
        self.extra_calls.append([])
        return index

    def _grow(self, extra: int) -> None:
        self.arrival_s = _extended(self.arrival_s, extra, 0.0)
        self.finish_s = _extended(self.finish_s, extra, np.nan)
        self.service = _extended(self.service, extra, 0.0)
        self.calls_done = _extended(self.calls_done, extra, 0)
        self.num_calls = _extended(self.num_calls, extra, 0)
        self.num_extra = _extended(self.num_extra, extra, 0)
        self.tenant = _extended(self.tenant, extra, 0)
        self.failed = _extended(self.failed, extra, False)

    def call_done(self, index: int, now_s: float) -> bool:
        """Count one more terminal call of job ``index``; True (and its finish time set) when
        it was the tree's last."""
        self.calls_done[index] += 1
        if self.calls_done[index] == self.num_calls[index]:
            self.finish_s[index] = now_s
            return True
        return False

    def call_ids(self, index: int) -> list[int]:
        """Ids of job ``index``'s calls (it arrived): its consecutive range, then its continuations."""
        first = self.first_call[index]
        extra = self.extra_calls[index] or []
        return [*range(first, first + int(self.num_calls[index]) - len(extra)), *extra]

    def unfinished(self) -> list[int]:
        """Indices of the jobs whose tree has not finished (or failed) yet."""
        return np.flatnonzero(np.isnan(self.finish_s[: self.size])).tolist()

    def release(self, index: int) -> None:
        """Drop a finished tree's structure (streaming); its row of columns stays."""
        self.children[index] = None
        self.replicas[index] = None
        self.extra_calls[index] = None


class Trees:
    """The trees' transitions over the call table, the job table and the online statistics."""

    def __init__(
        self,
        calls: CallTable,
        jobs: list[Job] | JobLog,
        table: JobTable,
        stats: OnlineStats,
        cluster: ClusterConfig,
        keys: dict[str, int],
        continuation_prompt_tokens: int | None = None,
    ) -> None:
        self.calls = calls
        self.jobs = jobs
        self.table = table
        self.stats = stats
        self.cluster = cluster
        self.keys = keys  # prompt content key -> id for block hashing (shared with real backends)
        # EngineConfig.continue_truncated: the instruction tokens of a continuation, else None
        self.continuation_prompt_tokens = continuation_prompt_tokens
        self.extra_specs: dict[int, list[Call]] = {}  # job index -> its continuations' calls
        self.continued: dict[int, int] = {}  # call -> the continuation of its truncated output

    def spec(self, call: int) -> Call:
        """The workload's description of an engine call (a continuation's, made by ``continue_call``)."""
        calls = self.calls
        index, position = int(calls.job[call]), int(calls.call_in_job[call])
        job_calls = self.jobs[index].calls
        return (
            job_calls[position]
            if position < len(job_calls)
            else self.extra_specs[index][position - len(job_calls)]
        )

    def call_id(self, index: int, position: int) -> int:
        """The engine id of call ``position`` of job ``index`` (a continuation's past its job's calls)."""
        job_calls = len(self.jobs[index].calls)
        if position < job_calls:
            return self.table.first_call[index] + position
        extra = self.table.extra_calls[index]
        assert extra is not None  # released only once every call of the tree is terminal
        return extra[position - job_calls]

    def last_of(self, call: int) -> int:
        """The last call of ``call``'s continuation chain (itself when it was not continued)."""
        while (after := self.continued.get(call)) is not None:
            call = after
        return call

    def chain_output(self, call: int) -> int:
        """Tokens generated by ``call`` and its continuations so far: its whole output."""
        total = int(self.calls.num_output[call])
        while (call := self.continued.get(call, -1)) >= 0:
            total += int(self.calls.num_output[call])
        return total

    def needs_continuation(self, call: int) -> bool:
        """The call stopped at its budget before its natural end, and truncation is continued."""
        calls = self.calls
        return (
            self.continuation_prompt_tokens is not None
            and calls.num_output[call] < calls.true_output_tokens[call]
        )

    def continue_call(self, call: int, now_s: float) -> int:
        """The call stopped at its budget with ``true_output_tokens - num_output`` tokens missing:
        add a continuation to its tree (PENDING, one parent: the call) and return its id. It has
        the call's role, depth and model, the workload's budget, and takes over the call's
        children and tool (its pause and failures): the call itself hands over at once."""
        calls, table = self.calls, self.table
        index = int(calls.job[call])
        spec = self.spec(call)
        extra = self.extra_specs.setdefault(index, [])
        position = len(self.jobs[index].calls) + len(extra)
        missing = int(calls.true_output_tokens[call] - calls.num_output[call])
        assert missing > 0 and self.continuation_prompt_tokens is not None
        instruction = Text(CONTINUE_KEY, self.continuation_prompt_tokens)
        extra.append(
            Call(position, spec.role, (*spec.prompt, Output(spec.call_id), instruction), missing,
                 spec.max_tokens, (spec.call_id,), spec.tool_latency_s, spec.model)
        )  # fmt: skip
        (new,) = calls.add(1)
        calls.job[new] = index
        calls.call_in_job[new] = position
        calls.replica[new] = -1
        calls.state[new] = CallState.PENDING
        calls.max_tokens[new] = spec.max_tokens
        calls.true_output_tokens[new] = missing
        calls.target_tokens[new] = min(missing, spec.max_tokens)
        calls.tool_latency_s[new], calls.tool_latency_s[call] = calls.tool_latency_s[call], 0.0
        calls.tool_failures[new], calls.tool_failures[call] = calls.tool_failures[call], 0
        calls.role[new] = calls.role[call]
        calls.depth[new] = calls.depth[call]
        calls.pending_parents[new] = 1
        calls.release_s[new] = now_s
        calls.path_service[new] = 0.0
        calls.continues[new] = call
        table.num_calls[index] += 1
        table.num_extra[index] += 1
        extra_ids, children = table.extra_calls[index], table.children[index]
        assert extra_ids is not None and children is not None  # the tree is live
        extra_ids.append(new)
        children.append(children[spec.call_id])
        children[spec.call_id] = [position]
        self.continued[call] = new
        return new

    def arrive(self, index: int) -> list[int]:
        """Job ``index`` arrived: its calls get ids and rows (PENDING); returns its roots, ready now."""
        job = self.jobs[index]
        calls = self.calls
        ids = calls.add(len(job.calls))
        self.table.first_call[index] = ids.start
        depths = job.depth()
        for call, spec, depth in zip(ids, job.calls, depths, strict=True):
            calls.job[call] = index
            calls.call_in_job[call] = spec.call_id
            calls.replica[call] = -1
            calls.state[call] = CallState.PENDING
            calls.max_tokens[call] = spec.max_tokens
            calls.true_output_tokens[call] = spec.output_tokens
            calls.target_tokens[call] = spec.generated_tokens
            calls.tool_latency_s[call] = spec.tool_latency_s
            calls.tool_failures[call] = 0
            calls.role[call] = role_id(spec.role)
            calls.depth[call] = depth
            calls.pending_parents[call] = len(spec.parents)
            calls.release_s[call] = job.arrival_s
            calls.path_service[call] = 0.0
            calls.continues[call] = -1
        if self.cluster.faults:
            self._draw_faults(index, ids, job)
        return [call for call, spec in zip(ids, job.calls, strict=True) if not spec.parents]

    def _draw_faults(self, index: int, ids: range, job: Job) -> None:
        """Each call's tool attempts and hop jitter, from a generator keyed by (fault_seed, job
        index, call index) alone, so a call meets the same faults under every schedule. A
        failed attempt costs the timeout; the pause is the timeouts, the successful attempt's
        latency (none when every attempt failed: the error returns at the last timeout) and the
        jitter. Only calls that run a tool (latency > 0) fail."""
        cluster, calls = self.cluster, self.calls
        for call, spec in zip(ids, job.calls, strict=True):
            rng = np.random.default_rng((cluster.fault_seed, index, spec.call_id))
            if spec.tool_latency_s > 0 and cluster.tool_failure_prob > 0:
                attempts = cluster.tool_retries + 1
                succeeded = np.flatnonzero(rng.random(attempts) >= cluster.tool_failure_prob)
                failures = int(succeeded[0]) if len(succeeded) else attempts
                calls.tool_failures[call] = failures
                pause = failures * cluster.tool_timeout_s + (
                    spec.tool_latency_s if failures < attempts else 0.0
                )
            else:
                pause = spec.tool_latency_s
            if cluster.network_jitter_s > 0:
                pause += float(rng.exponential(cluster.network_jitter_s))
            calls.tool_latency_s[call] = pause

    def resolve_prompt(self, call: int) -> None:
        """Turn the call's segments into (content id, tokens) now that its ancestors ran."""
        calls, keys = self.calls, self.keys
        job_index = int(calls.job[call])
        spec = self.spec(call)
        segments = []
        if calls.continues[call] >= 0:  # the stopped call's prompt and output, then the instruction
            source = int(calls.continues[call])
            segments = [*calls.segments[source], (-1 - source, int(calls.num_output[source]))]
            assert self.continuation_prompt_tokens is not None  # it made the continuation
            segments.append((keys.setdefault(CONTINUE_KEY, len(keys)), self.continuation_prompt_tokens))
        else:
            for seg in spec.prompt:
                if isinstance(seg, Output):  # the whole output, continuations included
                    source = self.call_id(job_index, seg.call)
                    segments.append((-1 - source, self.chain_output(source)))
                else:
                    segments.append((keys.setdefault(seg.key, len(keys)), seg.num_tokens))
        calls.segments[call] = segments
        calls.prompt_tokens[call] = sum(length for _, length in segments)
        parents = [self.call_id(job_index, p) for p in spec.parents]
        # ATLAS's priority: the critical-path service of its parents (a call adds its own on
        # finishing; a continued parent's whole chain counts, up to its last continuation)
        ends = parents if calls.continues[call] >= 0 else [self.last_of(p) for p in parents]
        calls.path_service[call] = max((calls.path_service[p] for p in ends), default=0.0)
        # A continuing agent's prompt starts with its parent's prompt and output: the parent's
        # block hashes are this call's first ones, so reuse them instead of hashing again.
        for source in parents:
            inherited = calls.segments[source] + [(-1 - source, int(calls.num_output[source]))]
            if (
                len(calls.hashes[source]) > len(calls.hashes[call])
                and segments[: len(inherited)] == inherited
            ):
                calls.hashes[call] = list(calls.hashes[source])

    def observe_tools(self, call: int) -> None:
        """The parents' tools have returned by now: their pauses join the per-role means that
        ``pin_ttl_rule=tool_mean`` predicts from."""
        calls = self.calls
        if calls.continues[call] >= 0:
            return  # no tool ran between the stopped call and its continuation
        job_index = int(calls.job[call])
        for parent in self.spec(call).parents:
            source = self.last_of(self.call_id(job_index, parent))  # whose tool ran
            self.stats.observe_tool(source, int(calls.role[source]), float(calls.tool_latency_s[source]))

    def finish(self, call: int, now_s: float) -> list[tuple[float, int]]:
        """The call finished at ``now_s``; returns the children this makes ready, as (time the
        tool returns and the hop is crossed, child)."""
        calls = self.calls
        job_index = int(calls.job[call])
        calls.state[call] = CallState.FINISHED
        calls.finish_s[call] = now_s
        calls.path_service[call] += calls.prompt_tokens[call] + calls.num_output[call]
        after = self.continued.get(call)
        if after is not None:  # its continuation follows one hop later, with no tool between
            calls.pending_parents[after] = 0
            calls.release_s[after] = now_s
            return [(now_s + self.cluster.network_delay_s, after)]
        head = call
        while calls.continues[head] >= 0:
            head = int(calls.continues[head])
        self.stats.observe_output(  # the whole output, once its last continuation finished
            int(calls.role[call]), int(self.table.tenant[job_index]), float(self.chain_output(head))
        )
        release = now_s + calls.tool_latency_s[call]
        ready = []
        children = self.table.children[job_index]
        assert children is not None  # released only once every call of the tree is terminal
        for child in children[int(calls.call_in_job[call])]:
            child_id = self.call_id(job_index, child)
            calls.release_s[child_id] = max(calls.release_s[child_id], release)
            calls.pending_parents[child_id] -= 1
            if calls.pending_parents[child_id] == 0 and calls.state[child_id] == CallState.PENDING:
                ready.append((calls.release_s[child_id] + self.cluster.network_delay_s, child_id))
        return ready

    def cut(self, call: int, now_s: float) -> list[int]:
        """The call was rejected: its tree failed, and every call of it that has not run yet
        is rejected too; returns the calls now terminal."""
        calls = self.calls
        job_index = int(calls.job[call])
        self.table.failed[job_index] = True
        cut = []
        for other in self.table.call_ids(job_index):
            if calls.state[other] == CallState.PENDING:
                calls.state[other] = CallState.REJECTED
                calls.finish_s[other] = now_s
                cut.append(other)
        return cut

    def release(self, index: int) -> None:
        """Streaming: drop a finished tree's heavy state (its ``Job``, call tree, replica set,
        and its calls' prompt segments, block hashes and tool marks); nothing reads them again
        once every call of the tree is terminal. Its per-job and per-call rows stay."""
        calls, table = self.calls, self.table
        if table.first_call[index] >= 0:  # it arrived: its calls have ids
            for call in table.call_ids(index):
                self.continued.pop(call, None)
                calls.segments[call] = _RELEASED  # type: ignore[call-overload]  # see _RELEASED
                calls.hashes[call] = _RELEASED  # type: ignore[call-overload]
                if not calls.blocks[call]:
                    calls.blocks[call] = _RELEASED  # type: ignore[call-overload]
                self.stats.forget_call(call)
        self.extra_specs.pop(index, None)
        assert isinstance(self.jobs, JobLog)  # streaming: the engine made its jobs a JobLog
        self.jobs.release(index)
        table.release(index)
