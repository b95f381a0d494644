"""The headroom table: how much better than the best tuned heuristic any schedule can do, per
scenario family and load, measured before anyone claims that a learned policy wins.

Command line (Hydra, ``conf/bounds.yaml``)::

    python scripts/bounds.py                                   # mapreduce, debate at load 0.5 and 8
    python scripts/bounds.py bounds.families=[mapreduce,debate,react,mixed] bounds.loads=[4.0]
    python scripts/bounds.py bounds.rollout.k=4 bounds.rollout.decision_budget=64 bounds.jobs=4
    python scripts/bounds.py bounds.families=[react_long] bounds.max_num_seqs=[16,64,256]  # KV-tight: caps from 16

Definitions
-----------
* **Families and loads** are names of ``conf/workload/*.yaml`` and multipliers of their offered
  load, as in the evaluation suite (``servegym.agents.evaluate.apply_load``); the engine and
  cluster are the base config's (``engine=``, ``cluster=``), as in the suite.
* **Seeds** are split explicitly: configurations are chosen on ``train_seeds`` (below 10000,
  the training range) and every reported number comes from ``test_seeds`` (10000+, the
  evaluation suite's held-out range). The config check refuses overlapping lists.
* **FCFS**: the ``baseline`` policy at the base engine config (untuned).
* **Best tuned heuristic**: every non-clairvoyant heuristic of the default suite
  (``conf/suite/default.yaml``'s policies, built from ``conf/agent/*.yaml`` with the suite's
  ``HydraPolicyFactory``) at every point of a static grid: ``engine.max_num_seqs`` x
  ``engine.max_num_batched_tokens``, times the policy's own keys in ``agent_grids`` (for
  Continuum's pinning, ``grace_s``, which its retention hints make ``engine.pin_ttl_s``). The
  (heuristic, config) pair with the lowest mean tree time over the training seeds is the best
  tuned heuristic of that family and load; it is reported on the held-out seeds.
* **Clairvoyant**: oracle orders that read true lengths: ``sjf_oracle`` (shortest true
  remaining output of the call) and ``tree_srpt`` (``TreeSRPT``: least true remaining output
  of the call's whole tree), each at its own best cap (the same grid, chosen on the training
  seeds); the column shows the oracle with the better training mean.
* **Rollout-improved**: the best tuned heuristic at its config, except at up to
  ``decision_budget`` ORDER decisions per run, spread evenly over the decisions where the
  queue does not all fit this iteration (``contended``) and at least two candidates fit
  (counted in the base policy's own run of that seed): there each of
  the base policy's top-``k`` fitting candidates is tried as the first admitted call (the rest
  in the base order) in a forked copy of the engine that then runs the base policy until the
  workload drains (``horizon_s: null``) or for ``horizon_s`` virtual seconds; the parent keeps
  the candidate with the least total tree time (the base choice on ties). With no horizon the
  result is never worse than the base policy on the same seed (policy improvement on a
  deterministic simulator; a test holds it).
* **Bound**: per held-out seed, the lowest mean tree time of every schedule measured for it
  (FCFS, best tuned, rollout-improved, each clairvoyant oracle at its best cap). It is the
  best schedule found, not a proof of optimality: the true optimum may be lower, so the
  headroom below is a lower bound on the room there is.
* **Headroom** = best tuned mean / bound mean; in brackets the 95% Student-t interval of the
  per-seed ratios (paired: a seed gives every schedule the same trees and arrivals). Cells
  where it is below 1.15 say "< 15% room".
* **Tree time**: a tree's completion time (last call done - arrival); mean and p99 per run,
  then mean +- 95% t half-width over the held-out seeds. A rollout branch scores the total
  tree time (the sum, which orders branches as the mean does) censored at the horizon.

Outputs (``<output_dir>/``): ``headroom.md`` and ``headroom.csv`` (one row per family and
load, columns ``HEADROOM_COLUMNS``), ``sweep.csv`` (every training-seed run of the grid),
``runs.csv`` (every held-out run).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from servegym.agents.evaluate import (
    DEFAULT_CONF_DIR,
    HydraPolicyFactory,
    apply_load,
    build_source,
    load_option,
    t_interval,
)
from servegym.envs.engine.calls import TERMINAL
from servegym.envs.engine.config import ClusterConfig, EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    Decision,
    DecisionKind,
    Policy,
    check_scores,
    fcfs_scores,
)

ROOM_THRESHOLD = 1.15
"""Headroom below this is flagged "< 15% room" in the table."""

HEADROOM_COLUMNS: tuple[str, ...] = (
    "family",
    "load",
    "n",  # held-out seeds
    "fcfs_mean_s",
    "fcfs_mean_ci",
    "fcfs_p99_s",
    "fcfs_p99_ci",
    "tuned_policy",
    "tuned_config",
    "tuned_mean_s",
    "tuned_mean_ci",
    "tuned_p99_s",
    "tuned_p99_ci",
    "rollout_mean_s",
    "rollout_mean_ci",
    "rollout_p99_s",
    "rollout_p99_ci",
    "rollout_branched",  # decisions branched, summed over seeds
    "rollout_improved",  # of those, where a candidate beat the base choice
    "rollout_decisions",  # ORDER decisions of the rollout runs, summed over seeds
    "rollout_wall_s",  # wall time of the rollout runs (children included), summed over seeds
    "clairvoyant_policy",
    "clairvoyant_config",
    "clairvoyant_mean_s",
    "clairvoyant_mean_ci",
    "clairvoyant_p99_s",
    "clairvoyant_p99_ci",
    "bound_mean_s",
    "bound_mean_ci",
    "bound_p99_s",
    "bound_p99_ci",
    "headroom",  # tuned mean / bound mean
    "headroom_lo",  # 95% t-interval of the per-seed ratios
    "headroom_hi",
    "room_below_15pct",  # headroom < ROOM_THRESHOLD
)
"""Columns of ``headroom.csv``: *_mean_s / *_p99_s are means over held-out seeds of the per-run
mean / p99 tree time, *_ci their 95% t half-widths."""

_BLOCKS_NEEDED = CANDIDATE_FEATURES.index("blocks_needed_frac")
_PROMPT = CANDIDATE_FEATURES.index("prompt_tokens_log")
_CACHED = CANDIDATE_FEATURES.index("cached_prefix_frac")
_OUTPUT = CANDIDATE_FEATURES.index("output_tokens_log")
_RUNNING = GLOBAL_FEATURES.index("running_log")
_BUDGET_LEFT = GLOBAL_FEATURES.index("token_budget_left_frac")
_KV_FREE = GLOBAL_FEATURES.index("kv_free_frac")


class BoundsConfigError(ValueError):
    """A ``bounds.*`` setting is wrong; the message names the key and what to do."""


# ---------------------------------------------------------------------------- config
@dataclass
class RolloutConfig:
    """``bounds.rollout``: the cost of the rollout-improved policy is bounded by these."""

    k: int = 3
    """Candidates tried per branched decision: the base policy's top-k among those that fit."""
    horizon_s: float | None = None
    """Virtual seconds each branch simulates ahead; null: until the workload drains (then the
    result is never worse than the base policy)."""
    decision_budget: int = 8
    """Most ORDER decisions branched per run, spread evenly over the branchable ones."""
    max_parallel: int = 2
    """Forked branches alive at once."""


@dataclass
class BoundsConfig:
    """``bounds:`` in ``conf/bounds.yaml``; also the Python API's config (module docstring)."""

    families: list[str] = field(default_factory=lambda: ["mapreduce", "debate"])
    """Names of ``conf/workload/*.yaml``."""
    loads: list[float] = field(default_factory=lambda: [0.5, 8.0])
    """Multipliers of each family's offered load."""
    train_seeds: list[int] = field(default_factory=lambda: [0])
    """Workload seeds the configurations are chosen on (keep them below 10000)."""
    test_seeds: list[int] = field(default_factory=lambda: [10000, 10001, 10002, 10003, 10004])
    """Held-out workload seeds every reported number comes from (the evaluation's 10000+)."""
    num_jobs: int | None = None
    """Trees per run, overriding the families' ``num_jobs``; null keeps them (200)."""
    heuristics: list[str] | None = None
    """Policies swept for the best tuned heuristic; null: ``conf/suite/default.yaml``'s policies
    minus ``clairvoyant``."""
    clairvoyant: list[str] = field(default_factory=lambda: ["sjf_oracle", "tree_srpt"])
    """Oracle policies (they read true lengths), each swept over the caps."""
    baseline: str = "fcfs"
    """The untuned reference, run at the base engine config."""
    max_num_seqs: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Grid of ``engine.max_num_seqs``."""
    max_num_batched_tokens: list[int] = field(default_factory=lambda: [2048, 8192])
    """Grid of ``engine.max_num_batched_tokens``."""
    agent_grids: dict[str, Any] = field(
        default_factory=lambda: {"program_fcfs_pinning": {"grace_s": [0.0, 4.0]}}
    )
    """Per policy, extra agent keys and their grids, e.g. ``{program_fcfs_pinning: {grace_s: [0, 4]}}``."""
    agents: dict[str, Any] = field(
        default_factory=lambda: {"tree_srpt": {"_target_": "servegym.agents.bounds.TreeSRPT"}}
    )
    """Agent configs not in ``conf/agent/`` (name -> node with a ``_target_``), e.g. tree_srpt."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    jobs: int = 1
    """Worker processes for the grid and held-out runs (results do not depend on it)."""

    def check(self, conf_dir: Path) -> None:
        """Fail with the offending key named."""
        known_agents = _group_options(conf_dir, "agent") | set(self.agents)
        known_workloads = _group_options(conf_dir, "workload")
        for key, values, known in (
            ("bounds.families", self.families, known_workloads),
            ("bounds.clairvoyant", self.clairvoyant, known_agents),
            ("bounds.heuristics", self.heuristics or [], known_agents),
            ("bounds.baseline", [self.baseline], known_agents),
        ):
            for value in values:
                if value not in known:
                    raise BoundsConfigError(f"{key}: unknown name {value!r}; known: {sorted(known)}")
        for key in (
            "families",
            "loads",
            "train_seeds",
            "test_seeds",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            values = getattr(self, key)
            if not values:
                raise BoundsConfigError(f"bounds.{key} is empty; list at least one value")
            if len(set(values)) != len(values):
                raise BoundsConfigError(f"bounds.{key} repeats a value: {list(values)}")
        if overlap := sorted(set(self.train_seeds) & set(self.test_seeds)):
            raise BoundsConfigError(
                f"bounds.train_seeds and bounds.test_seeds share {overlap}: configurations must be "
                "chosen on seeds the table does not report"
            )
        for load in self.loads:
            if not (isinstance(load, int | float) and math.isfinite(load) and load > 0):
                raise BoundsConfigError(f"bounds.loads must be finite numbers > 0, got {load!r}")
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(self, key)):
                raise BoundsConfigError(f"bounds.{key} must be ints >= 1, got {getattr(self, key)}")
        for name, grid in self.agent_grids.items():
            if name not in known_agents:
                raise BoundsConfigError(f"bounds.agent_grids.{name}: unknown policy {name!r}")
            for key, values in dict(grid).items():
                if not isinstance(values, list | tuple) or not values:
                    raise BoundsConfigError(f"bounds.agent_grids.{name}.{key} must be a non-empty list")
        r = self.rollout
        if not isinstance(r.k, int) or r.k < 1:
            raise BoundsConfigError(f"bounds.rollout.k must be an int >= 1, got {r.k!r}")
        if not isinstance(r.decision_budget, int) or r.decision_budget < 0:
            raise BoundsConfigError(
                f"bounds.rollout.decision_budget must be an int >= 0, got {r.decision_budget!r}"
            )
        if r.horizon_s is not None and not (math.isfinite(r.horizon_s) and r.horizon_s > 0):
            raise BoundsConfigError(
                f"bounds.rollout.horizon_s must be > 0 seconds or null, got {r.horizon_s!r}"
            )
        if not isinstance(r.max_parallel, int) or r.max_parallel < 1:
            raise BoundsConfigError(
                f"bounds.rollout.max_parallel must be an int >= 1, got {r.max_parallel!r}"
            )
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise BoundsConfigError(f"bounds.jobs must be an int >= 1, got {self.jobs!r}")

    def tuned_policies(self, conf_dir: Path) -> list[str]:
        """The heuristics swept for the best tuned one (see ``heuristics``)."""
        if self.heuristics is not None:
            return list(self.heuristics)
        suite = OmegaConf.load(Path(conf_dir) / "suite" / "default.yaml")
        return [name for name in suite.policies if name not in self.clairvoyant]


def bounds_from_cfg(node: DictConfig | dict | None) -> BoundsConfig:
    """The ``bounds:`` node as a ``BoundsConfig``; a misspelt key or a wrong type fails, named."""
    schema = OmegaConf.structured(BoundsConfig)
    try:
        merged = OmegaConf.merge(schema, node or {})
    except Exception as error:  # omegaconf's errors name the key
        raise BoundsConfigError(f"bounds: {error}") from error
    return OmegaConf.to_object(merged)


def _group_options(conf_dir: Path, group: str) -> set[str]:
    return {path.stem for path in (Path(conf_dir) / group).glob("*.yaml")}


# ---------------------------------------------------------------------------- clairvoyant order
class TreeSRPT:
    """Tree-level shortest remaining processing time on the *true* lengths: calls of the tree
    with the fewest true remaining output tokens (over all its unfinished calls, including
    those not yet ready) first, FCFS among equals; EVICT: a call of the tree with the most.
    An upper-bound oracle: it reads the engine's call table (``attach``), far beyond the
    feature table, so it is never a baseline a learned policy must beat, nor exportable.
    """

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Give the oracle the engine whose trees it ranks (``run_policy`` calls it)."""
        self.engine = engine

    def tree_remaining_tokens(self, calls_ids: np.ndarray) -> np.ndarray:
        if self.engine is None:
            raise RuntimeError("TreeSRPT needs the engine: call attach(engine) before the run")
        calls = self.engine.calls
        n = calls.size
        live = ~np.isin(calls.state[:n], [int(s) for s in TERMINAL])
        remaining = np.where(live, np.maximum(calls.target_tokens[:n] - calls.num_output[:n], 0), 0)
        per_job = np.bincount(calls.job[:n], weights=remaining, minlength=len(self.engine.jobs))
        return per_job[calls.job[calls_ids]]

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind == DecisionKind.ROUTE:
            raise ValueError("TreeSRPT answers ORDER and EVICT; pair it with a router for ROUTE")
        primary = -self.tree_remaining_tokens(decision.candidates)
        wait = fcfs_scores(decision)
        gaps = np.diff(np.unique(primary))
        unit = gaps.min() if len(gaps) else 1.0
        return primary + 0.5 * unit * wait / (1.0 + np.abs(wait).max())


# ---------------------------------------------------------------------------- runs and branches
def run_policy(engine: Engine, policy: Policy, count_branchable_k: int = 0) -> tuple[Any, int]:
    """Drive ``engine`` with ``policy`` to the end (``Engine.run``'s loop, plus ``attach`` for
    oracles); returns (metrics, ORDER decisions with >= 2 fitting candidates among the top
    ``count_branchable_k``; 0 when not counted)."""
    if hasattr(policy, "attach"):
        policy.attach(engine)
    engine.apply_retention(policy)
    branchable = 0
    while (decision := engine.next_decision()) is not None:
        scores = policy.scores(decision)
        if count_branchable_k and decision.kind == DecisionKind.ORDER:
            branchable += contended(decision, engine.config) and bool(
                alternatives(decision, check_scores(decision, scores), count_branchable_k)
            )
        engine.decide(scores)
    return engine.metrics(), branchable


def contended(decision: Decision, config: EngineConfig) -> bool:
    """Whether an ORDER decision's order can matter: the whole queue does not fit this
    iteration by the feature table (more candidates than free slots, more prefill tokens than
    the budget left, or more blocks needed than free). When it all fits, every order admits
    the same calls, so a rollout does not spend a branch there. Approximate (each candidate's
    need is counted alone): it skips a few decisions whose order still matters within one
    admission (a sibling admitted first can publish a prefix the next one hits)."""
    f = decision.features.astype(np.float64)
    g = decision.global_features.astype(np.float64)
    free_slots = config.max_num_seqs - round(float(np.expm1(g[_RUNNING])))
    prompt = np.expm1(f[:, _PROMPT])
    chunks = prompt * (1.0 - f[:, _CACHED]) + np.expm1(f[:, _OUTPUT])
    return bool(
        len(decision) > free_slots
        or chunks.sum() > g[_BUDGET_LEFT] * config.max_num_batched_tokens
        or f[:, _BLOCKS_NEEDED].sum() > g[_KV_FREE]
    )


def alternatives(decision: Decision, scores: np.ndarray, k: int) -> list[int]:
    """Candidates a rollout tries first instead of the base policy's own answer: of the ``k``
    highest-scored candidates that fit the replica's free blocks now (the feature table's
    ``blocks_needed_frac`` against ``kv_free_frac``), best first, ties in queue order, those
    that are not already the base's first choice; at most ``k - 1``, so with the base's own
    answer a branched decision tries ``k`` choices."""
    fits = decision.features[:, _BLOCKS_NEEDED] <= decision.global_features[_KV_FREE]
    order = np.argsort(-scores, kind="stable")
    first = int(order[0])
    return [int(i) for i in order if fits[i] and i != first][: k - 1] if k >= 2 else []


def promote(scores: np.ndarray, index: int) -> np.ndarray:
    """``scores`` with candidate ``index`` ranked first and the others kept in their order."""
    out = np.array(scores, dtype=np.float64)
    top = float(out.max())
    out[index] = top + max(1.0, abs(top) * 1e-6)
    return out


def tree_time_until(engine: Engine, until_s: float = math.inf) -> float:
    """Total tree time (sum over trees of completion - arrival) counted up to ``until_s``:
    each tree contributes min(finish, until) - arrival, unfinished ones until ``until_s``.
    With ``until_s`` = inf on a drained engine this is the total tree time; a tree that
    never finished makes it inf."""
    n = len(engine.jobs)
    arrival, finish = engine.job_arrival_s[:n], engine.job_finish_s[:n]
    end = np.minimum(np.where(np.isnan(finish), until_s, finish), until_s)
    return float(np.maximum(end - arrival, 0.0).sum())


def _child(engine: Engine, policy: Policy, scores: np.ndarray, until_s: float, out_fd: int) -> None:
    """The forked branch: apply ``scores``, run ``policy`` to ``until_s``, write the cost."""
    code = 0
    try:
        engine.decide(scores)
        while (decision := engine.next_decision()) is not None and decision.now_s < until_s:
            engine.decide(policy.scores(decision))
        message = b"o" + struct.pack("d", tree_time_until(engine, until_s))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        message = b"e" + traceback.format_exc().encode()
        code = 1
    try:
        os.write(out_fd, message)
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers


def branch_costs(
    engine: Engine,
    policy: Policy,
    choices: Sequence[np.ndarray],
    until_s: float = math.inf,
    max_parallel: int = 2,
) -> list[float]:
    """For each answer in ``choices`` to the engine's pending decision: fork, apply it in the
    child, run ``policy`` there up to ``until_s`` (virtual; inf: until the workload drains)
    and return the child's ``tree_time_until``. The parent's engine, policy and decision are
    untouched: the generator-based engine cannot be copied in-process, so ``os.fork`` gives
    each branch its own copy of the whole interpreter."""
    if engine.config.backend != "sim":
        raise ValueError("rollouts branch the simulator only (engine.backend=sim)")
    sys.stdout.flush()
    sys.stderr.flush()
    costs: list[float] = [math.nan] * len(choices)
    running: list[tuple[int, int, int]] = []  # (choice index, pid, read fd)

    def reap(entry: tuple[int, int, int]) -> None:
        index, pid, fd = entry
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        os.waitpid(pid, 0)
        data = b"".join(chunks)
        if data[:1] != b"o" or len(data) != 9:
            detail = data[1:].decode(errors="replace") if data[:1] == b"e" else f"no result ({data!r})"
            raise RuntimeError(f"rollout branch {index} failed:\n{detail}")
        costs[index] = struct.unpack("d", data[1:])[0]

    for index, scores in enumerate(choices):
        if len(running) >= max_parallel:
            reap(running.pop(0))
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns
            os.close(read_fd)
            _child(engine, policy, scores, until_s, write_fd)
        os.close(write_fd)
        running.append((index, pid, read_fd))
    for entry in running:
        reap(entry)
    return costs


@dataclass
class RolloutStats:
    """What a rollout-improved run spent and changed."""

    decisions: int = 0
    """ORDER decisions of the run."""
    branchable: int = 0
    """Of those, decisions with >= 2 fitting candidates among the base's top k."""
    branched: int = 0
    """Decisions where the top-k were simulated."""
    improved: int = 0
    """Branched decisions where a candidate other than the base choice was strictly better."""
    children: int = 0
    """Forked branches."""
    last_best_cost: float = math.nan
    """The kept branch's cost at the last branched decision (the run's total tree time when
    the horizon is unbounded: after it the parent follows the base policy, as that child did)."""
    wall_s: float = 0.0


def run_rollout(
    engine: Engine,
    base: Policy,
    k: int = 3,
    horizon_s: float | None = None,
    decision_budget: int = 8,
    stride: int = 1,
    max_parallel: int = 2,
) -> tuple[Any, RolloutStats]:
    """The rollout-improved ``base`` policy on ``engine`` (see the module docstring): at every
    ``stride``-th branchable ORDER decision, until ``decision_budget`` are spent, try the base's
    own answer and its ``alternatives`` (each admitted first) and keep the cheapest. Returns
    (metrics, stats)."""
    start = time.perf_counter()
    stats = RolloutStats()
    if hasattr(base, "attach"):
        base.attach(engine)
    engine.apply_retention(base)
    stride = max(1, int(stride))
    while (decision := engine.next_decision()) is not None:
        scores = check_scores(decision, base.scores(decision))
        if decision.kind == DecisionKind.ORDER:
            stats.decisions += 1
            others = alternatives(decision, scores, k) if contended(decision, engine.config) else []
            if others:
                stats.branchable += 1
                if stats.branched < decision_budget and (stats.branchable - 1) % stride == 0:
                    until_s = math.inf if horizon_s is None else decision.now_s + horizon_s
                    choices = [scores, *(promote(scores, i) for i in others)]  # the base's own answer first
                    # Without a horizon, the base's answer costs what the branch kept last time
                    # costs: the parent has followed that branch's trajectory since, and the base
                    # continues it. One child fewer per decision after the first.
                    known = horizon_s is None and stats.branched > 0
                    costs = branch_costs(
                        engine, base, choices[1:] if known else choices, until_s, max_parallel
                    )
                    if known:
                        costs = [stats.last_best_cost, *costs]
                    stats.children += len(choices) - known
                    best = int(np.argmin(costs))  # the base's answer on ties
                    stats.branched += 1
                    stats.last_best_cost = costs[best]
                    if best != 0:
                        stats.improved += 1
                        scores = choices[best]
        engine.decide(scores)
    stats.wall_s = time.perf_counter() - start
    return engine.metrics(), stats


# ---------------------------------------------------------------------------- settings and tasks
@dataclass(frozen=True)
class Setting:
    """A policy at a static configuration: engine field overrides and agent key overrides."""

    policy: str
    engine: tuple[tuple[str, Any], ...] = ()
    agent: tuple[tuple[str, Any], ...] = ()

    @property
    def config(self) -> str:
        """e.g. ``max_num_seqs=128 max_num_batched_tokens=8192 grace_s=4``; "default" when empty."""
        items = [*self.engine, *self.agent]
        return (
            " ".join(
                f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in items
            )
            or "default"
        )


def grid(policy: str, config: BoundsConfig) -> list[Setting]:
    """Every static configuration of ``policy``: the cap grid times its ``agent_grids``."""
    extra = dict(config.agent_grids.get(policy) or {})
    keys = sorted(extra)
    settings = []
    for seqs, tokens in itertools.product(config.max_num_seqs, config.max_num_batched_tokens):
        for values in itertools.product(*(extra[key] for key in keys)):
            settings.append(
                Setting(
                    policy,
                    (("max_num_seqs", int(seqs)), ("max_num_batched_tokens", int(tokens))),
                    tuple(zip(keys, values, strict=True)),
                )
            )
    return settings


@dataclass
class World:
    """What every run shares, picklable for worker processes."""

    base: dict
    engine: EngineConfig
    cluster: ClusterConfig
    time_scale_s: float
    workloads: dict[str, dict]
    agents: dict[str, dict]
    num_jobs: int | None


@dataclass
class Task:
    """One run: a setting on a family, load and seed; ``role`` names its column of the table
    (sweep, fcfs, tuned, rollout, oracle:<name>)."""

    setting: Setting
    family: str
    load: float
    seed: int
    role: str = "sweep"
    count_branchable_k: int = 0
    """Count the ORDER decisions a rollout with this k could branch (``run_policy``)."""
    rollout: RolloutConfig | None = None
    stride: int = 1


def make_world(config: BoundsConfig, base_cfg: DictConfig, conf_dir: Path, policies: Iterable[str]) -> World:
    """Load every workload and agent node once (failing at start on a bad one)."""
    base = OmegaConf.to_container(base_cfg, resolve=False)
    base.pop("bounds", None)
    agents = {}
    for name in dict.fromkeys(policies):
        if name in config.agents:
            agents[name] = OmegaConf.to_container(OmegaConf.create(config.agents[name]))
        else:
            agents[name] = load_option(conf_dir, "agent", name)
    workloads = {name: load_option(conf_dir, "workload", name) for name in config.families}
    world = World(
        base=base,
        engine=_as(base_cfg.engine, EngineConfig),
        cluster=_as(base_cfg.cluster, ClusterConfig),
        time_scale_s=float(base_cfg.get("time_scale_s", 30.0)),
        workloads=workloads,
        agents=agents,
        num_jobs=config.num_jobs,
    )
    for name in workloads:  # fail at start, naming the family, rather than in every run
        try:
            _workload(world, name, 1.0, 0)
        except Exception as error:
            raise BoundsConfigError(f"bounds.families: {name!r} does not build: {error}") from error
    return world


def _as(node: Any, kind: type) -> Any:
    obj = OmegaConf.to_object(node) if isinstance(node, DictConfig) else node
    return obj if isinstance(obj, kind) else kind(**obj)


def _workload(world: World, family: str, load: float, seed: int) -> Any:
    from hydra.utils import instantiate

    root = OmegaConf.create({**world.base, "seed": seed, "workload": world.workloads[family]})
    # _convert_=all: conf/workload/mixed.yaml nests generators in lists of lists, which Hydra's
    # default conversion hands to Mixed as configs instead of objects
    workload, compress = apply_load(instantiate(root.workload, _convert_="all"), load, world.num_jobs)
    return build_source(workload, seed, compress)


def build_run(world: World, task: Task) -> tuple[Engine, Policy]:
    """The engine (the task's family, load, seed and engine overrides) and a fresh policy."""
    engine_cfg = dataclasses.replace(world.engine, **dict(task.setting.engine))
    engine = Engine(
        _workload(world, task.family, task.load, task.seed),
        cluster=world.cluster,
        engine=engine_cfg,
        time_scale_s=world.time_scale_s,
    )
    agent = {**world.agents[task.setting.policy], **dict(task.setting.agent)}
    policy = HydraPolicyFactory(agent, world.base)(task.seed)
    return engine, policy


def run_task(world: World, task: Task) -> dict:
    """One run: a row of keys, the setting, tree-time metrics and, for rollouts, their stats."""
    start = time.perf_counter()
    row: dict[str, Any] = {
        "family": task.family,
        "load": task.load,
        "seed": task.seed,
        "policy": task.setting.policy,
        "config": task.setting.config,
        "role": task.role,
    }
    try:
        engine, policy = build_run(world, task)
        if task.rollout is None:
            metrics, branchable = run_policy(engine, policy, task.count_branchable_k)
            row["branchable"] = branchable
        else:
            r = task.rollout
            metrics, stats = run_rollout(
                engine, policy, r.k, r.horizon_s, r.decision_budget, task.stride, r.max_parallel
            )
            row.update({f"rollout_{key}": value for key, value in dataclasses.asdict(stats).items()})
        row.update(
            jct_mean_s=metrics.jct_mean_s,
            jct_p99_s=metrics.jct_p99_s,
            tree_time_s=tree_time_until(engine),
            complete=bool(metrics.complete),
            error=""
            if metrics.complete
            else (metrics.stall_reason or metrics.first_rejection or "incomplete"),
        )
    except Exception as error:  # reported with its setting; the table marks the cell
        row.update(jct_mean_s=math.nan, jct_p99_s=math.nan, tree_time_s=math.nan, complete=False)
        row["error"] = f"{type(error).__name__}: {error}"
    row["wall_s"] = time.perf_counter() - start
    return row


def run_tasks(
    world: World, tasks: Sequence[Task], jobs: int = 1, log: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Run ``tasks`` (in ``jobs`` worker processes); one row each, in task order. ``log`` gets
    a progress line every ~10% of the runs."""
    from joblib import Parallel, delayed

    if jobs == 1:
        results: Iterable[dict] = (run_task(world, task) for task in tasks)
    else:
        results = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(run_task)(world, task) for task in tasks
        )
    start = time.perf_counter()
    rows = []
    step = max(1, len(tasks) // 10)
    for row in results:
        rows.append(row)
        if log and (len(rows) % step == 0 or len(rows) == len(tasks)):
            log(f"  {len(rows)}/{len(tasks)} runs, {time.perf_counter() - start:.0f} s")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- selection
def choose_best(sweep: pd.DataFrame, train_seeds: Iterable[int]) -> pd.DataFrame:
    """Per (family, load, policy), the config with the lowest mean tree time over
    ``train_seeds`` (rows of other seeds are ignored); a config with an incomplete or failed
    run is never chosen. Returns one row per (family, load, policy): its config and training
    mean, in the sweep's order of first appearance."""
    train = sweep[sweep["seed"].isin(list(train_seeds))]
    if train.empty:
        raise BoundsConfigError("no sweep run on the training seeds; nothing to choose from")
    scored = (
        train.groupby(["family", "load", "policy", "config"], sort=False)
        .agg(train_mean_s=("jct_mean_s", "mean"), ok=("complete", "all"), n=("seed", "nunique"))
        .reset_index()
    )
    scored.loc[~scored["ok"], "train_mean_s"] = math.inf
    best = scored.loc[scored.groupby(["family", "load", "policy"], sort=False)["train_mean_s"].idxmin()]
    return best.reset_index(drop=True)


def _best_of(best: pd.DataFrame, family: str, load: float, policies: Iterable[str]) -> dict:
    cell = best[(best.family == family) & (best.load == load) & best.policy.isin(list(policies))]
    if cell.empty or not np.isfinite(cell["train_mean_s"]).any():
        raise RuntimeError(f"no complete configuration of {list(policies)} on {family} at load {load:g}")
    return cell.loc[cell["train_mean_s"].idxmin()].to_dict()


# ---------------------------------------------------------------------------- end to end
@dataclass
class HeadroomResult:
    table: pd.DataFrame
    """One row per (family, load), columns ``HEADROOM_COLUMNS``."""
    sweep: pd.DataFrame
    """Every training-seed run of the grid."""
    runs: pd.DataFrame
    """Every held-out run (FCFS, best tuned, each oracle at its best cap, rollout-improved)."""
    choices: pd.DataFrame
    """Per (family, load, policy): the config chosen on the training seeds and its mean."""
    wall_s: float = 0.0


def headroom(
    config: BoundsConfig,
    base_cfg: DictConfig,
    conf_dir: Path | str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> HeadroomResult:
    """Sweep on the training seeds, choose, run the chosen settings, the oracles and the
    rollout-improved policy on the held-out seeds, and build the table."""
    start = time.perf_counter()
    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR)
    config.check(conf_dir)
    tuned = config.tuned_policies(conf_dir)
    oracles = list(config.clairvoyant)
    world = make_world(config, base_cfg, conf_dir, [config.baseline, *tuned, *oracles])
    settings = {(s.policy, s.config): s for name in [*tuned, *oracles] for s in grid(name, config)}
    cells = [(family, float(load)) for family in config.families for load in config.loads]

    sweep_tasks = [
        Task(setting, family, load, seed, "sweep")
        for family, load in cells
        for setting in settings.values()
        for seed in config.train_seeds
    ]
    log(f"sweep: {len(sweep_tasks)} runs on training seeds {list(config.train_seeds)}")
    sweep = run_tasks(world, sweep_tasks, config.jobs, log)
    choices = choose_best(sweep, config.train_seeds)

    picks: dict[tuple[str, float], dict] = {}
    held_tasks = []
    k = config.rollout.k
    for family, load in cells:
        tuned_pick = _best_of(choices, family, load, tuned)
        oracle_picks = [_best_of(choices, family, load, [name]) for name in oracles]
        picks[(family, load)] = {"tuned": tuned_pick, "oracles": oracle_picks}
        for seed in config.test_seeds:
            tuned_setting = settings[(tuned_pick["policy"], tuned_pick["config"])]
            held_tasks.append(Task(Setting(config.baseline), family, load, seed, "fcfs"))
            held_tasks.append(Task(tuned_setting, family, load, seed, "tuned", count_branchable_k=k))
            held_tasks += [
                Task(settings[(o["policy"], o["config"])], family, load, seed, f"oracle:{o['policy']}")
                for o in oracle_picks
            ]
    log(f"held out: {len(held_tasks)} runs on seeds {list(config.test_seeds)}")
    held = run_tasks(world, held_tasks, config.jobs, log)

    rollout_rows = []
    budget = config.rollout.decision_budget
    for family, load in cells:
        pick = picks[(family, load)]["tuned"]
        setting = settings[(pick["policy"], pick["config"])]
        base_runs = held[(held.family == family) & (held.load == load) & (held.role == "tuned")]
        for seed in config.test_seeds:
            branchable = int(base_runs.loc[base_runs.seed == seed, "branchable"].iloc[0])
            stride = max(1, math.ceil(branchable / budget)) if budget else 1
            log(
                f"rollout: {family} load {load:g} seed {seed} ({pick['policy']} {pick['config']}, stride {stride})"
            )
            task = Task(setting, family, load, seed, "rollout", rollout=config.rollout, stride=stride)
            rollout_rows.append(run_task(world, task))
    runs = pd.concat([held, pd.DataFrame(rollout_rows)], ignore_index=True)
    table = headroom_table(runs, picks, cells)
    return HeadroomResult(table, sweep, runs, choices, time.perf_counter() - start)


def headroom_table(runs: pd.DataFrame, picks: dict, cells: Sequence[tuple[str, float]]) -> pd.DataFrame:
    """The headroom table from the held-out runs (``runs.role``: fcfs, tuned, rollout,
    oracle:<name>); columns ``HEADROOM_COLUMNS``."""
    records = []
    for family, load in cells:
        cell = runs[(runs.family == family) & (runs.load == load)]
        by_role = {role: group.set_index("seed").sort_index() for role, group in cell.groupby("role")}
        pick = picks[(family, load)]
        oracle = min(pick["oracles"], key=lambda o: o["train_mean_s"])
        record: dict[str, Any] = {"family": family, "load": load}
        columns = {
            "fcfs": "fcfs",
            "tuned": "tuned",
            "rollout": "rollout",
            f"oracle:{oracle['policy']}": "clairvoyant",
        }
        for role, prefix in columns.items():
            frame = by_role[role]
            for metric, suffix in (("jct_mean_s", "mean"), ("jct_p99_s", "p99")):
                values = frame[metric].where(frame["complete"])
                record[f"{prefix}_{suffix}_s"], record[f"{prefix}_{suffix}_ci"] = t_interval(
                    values.to_numpy()
                )
        rollout = by_role["rollout"]
        for key in ("branched", "improved", "decisions"):
            record[f"rollout_{key}"] = int(rollout[f"rollout_{key}"].sum())
        record["rollout_wall_s"] = float(rollout["wall_s"].sum())
        record["tuned_policy"], record["tuned_config"] = pick["tuned"]["policy"], pick["tuned"]["config"]
        record["clairvoyant_policy"], record["clairvoyant_config"] = oracle["policy"], oracle["config"]
        # the bound: per seed, the complete run with the lowest mean tree time of all measured
        bound = []
        for seed, runs_of_seed in cell[cell["complete"].astype(bool)].groupby("seed"):
            best = runs_of_seed.loc[runs_of_seed["jct_mean_s"].idxmin()]
            bound.append((seed, best["jct_mean_s"], best["jct_p99_s"]))
        bound_runs = pd.DataFrame(bound, columns=["seed", "mean", "p99"]).set_index("seed")
        bound_mean = bound_runs["mean"].reindex(sorted(cell["seed"].unique()))
        record["n"] = int(cell["seed"].nunique())
        record["bound_mean_s"], record["bound_mean_ci"] = t_interval(bound_mean.to_numpy())
        record["bound_p99_s"], record["bound_p99_ci"] = t_interval(bound_runs["p99"].to_numpy())
        tuned_mean = by_role["tuned"]["jct_mean_s"].where(by_role["tuned"]["complete"])
        ratio_mean, ratio_half = t_interval((tuned_mean / bound_mean).to_numpy())
        record["headroom"] = float(tuned_mean.mean() / bound_mean.mean())
        record["headroom_lo"], record["headroom_hi"] = ratio_mean - ratio_half, ratio_mean + ratio_half
        record["room_below_15pct"] = bool(record["headroom"] < ROOM_THRESHOLD)
        records.append(record)
    return pd.DataFrame(records, columns=list(HEADROOM_COLUMNS))


# ---------------------------------------------------------------------------- reporting
def _cell(mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.1f} ± {half:.1f}" if np.isfinite(half) else f"{mean:.1f}"


def _headroom_text(row: dict, sep: str = " ") -> str:
    text = f"{row['headroom']:.3f}"
    if np.isfinite(row["headroom_lo"]):
        text += f"{sep}[{row['headroom_lo']:.3f}, {row['headroom_hi']:.3f}]"
    if row["room_below_15pct"]:
        text += f"{sep}< 15% room"
    return text


def short_config(config: str) -> str:
    """A setting's config for tables: ``seqs`` = max_num_seqs, ``tokens`` = max_num_batched_tokens."""
    return config.replace("max_num_seqs=", "seqs=").replace("max_num_batched_tokens=", "tokens=")


def table_rows(table: pd.DataFrame, sep: str = " / ") -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table, each time cell "mean ± ci<sep>p99 ± ci" (Markdown:
    " / "; the terminal: a line break)."""
    header = [
        "family",
        "load",
        "FCFS",
        "best tuned heuristic",
        "best tuned",
        "rollout-improved",
        "clairvoyant",
        "bound",
        "headroom: tuned / bound [95% CI]",
    ]
    rows = []
    for row in table.to_dict("records"):

        def both(prefix: str, row: dict = row) -> str:
            mean = _cell(row[f"{prefix}_mean_s"], row[f"{prefix}_mean_ci"])
            return f"{mean}{sep}{_cell(row[f'{prefix}_p99_s'], row[f'{prefix}_p99_ci'])}"

        name_sep = " " if sep == " / " else "\n"
        rows.append(
            [
                row["family"],
                f"{row['load']:g}",
                both("fcfs"),
                f"{row['tuned_policy']}{name_sep}({short_config(row['tuned_config'])})",
                both("tuned"),
                both("rollout"),
                f"{both('clairvoyant')}{name_sep}({row['clairvoyant_policy']}, "
                f"{short_config(row['clairvoyant_config'])})",
                both("bound"),
                _headroom_text(row, " " if sep == " / " else "\n"),
            ]
        )
    return header, rows


def to_markdown(result: HeadroomResult, config: BoundsConfig) -> str:
    """headroom.md: the table, the rollout's cost and the definitions in a few lines."""
    header, rows = table_rows(result.table)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| family | load | rollout: decisions branched / ORDER decisions | improved | wall (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result.table.to_dict("records"):
        lines.append(
            f"| {row['family']} | {row['load']:g} | {row['rollout_branched']} / {row['rollout_decisions']} | "
            f"{row['rollout_improved']} | {row['rollout_wall_s']:.0f} |"
        )
    r = config.rollout
    horizon = "to the end of the run" if r.horizon_s is None else f"{r.horizon_s:g} s ahead"
    lines += [
        "",
        f"Tree time in seconds, mean / p99 per run, then mean ± 95% Student-t half-width over the "
        f"{len(config.test_seeds)} held-out seeds {_span(config.test_seeds)}; configurations chosen on "
        f"training seeds {_span(config.train_seeds)} from max_num_seqs (seqs) {list(config.max_num_seqs)} x "
        f"max_num_batched_tokens (tokens) {list(config.max_num_batched_tokens)}"
        + "".join(
            f" (x {name} {key} {list(values)})"
            for name, grid_ in config.agent_grids.items()
            for key, values in dict(grid_).items()
        )
        + f", {len(config.tuned_policies(DEFAULT_CONF_DIR))} heuristics. FCFS at the engine's default config. "
        f"Rollout-improved: the best tuned heuristic, branching at most {r.decision_budget} ORDER decisions "
        f"per run into its own answer and its {r.k - 1} best-scored fitting alternatives (each admitted "
        f"first), each simulated {horizon}. Clairvoyant: the "
        f"oracle ({', '.join(config.clairvoyant)}) with the better training mean, at its own best cap. "
        "Bound: per seed, the best schedule measured (any column); the true optimum may be lower, so "
        "the headroom is a lower bound on the room. Headroom: best tuned mean / bound mean, in brackets "
        f"the t-interval of per-seed ratios; < 15% room where it is below {ROOM_THRESHOLD}. "
        f"Wall time of the whole table: {result.wall_s:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _span(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def rich_table(table: pd.DataFrame) -> Any:
    """The main table as a ``rich.table.Table`` for the terminal."""
    from rich.table import Table

    header, rows = table_rows(table, sep="\n")
    out = Table(title="headroom: tree time (s), mean then p99, over held-out seeds", show_lines=True)
    for i, name in enumerate(header):
        out.add_column(name, justify="left" if i in (0, 3) else "right", overflow="fold")
    for row in rows:
        out.add_row(*row)
    return out


def write(result: HeadroomResult, config: BoundsConfig, out_dir: Path | str) -> str:
    """headroom.md, headroom.csv, sweep.csv, choices.csv and runs.csv into ``out_dir``; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(result, config)
    (out / "headroom.md").write_text(markdown)
    result.table.to_csv(out / "headroom.csv", index=False)
    result.sweep.to_csv(out / "sweep.csv", index=False)
    result.choices.to_csv(out / "choices.csv", index=False)
    result.runs.to_csv(out / "runs.csv", index=False)
    return markdown


__all__ = [
    "HEADROOM_COLUMNS",
    "BoundsConfig",
    "BoundsConfigError",
    "HeadroomResult",
    "RolloutConfig",
    "RolloutStats",
    "Setting",
    "TreeSRPT",
    "branch_costs",
    "bounds_from_cfg",
    "choose_best",
    "grid",
    "headroom",
    "headroom_table",
    "promote",
    "rich_table",
    "run_policy",
    "run_rollout",
    "to_markdown",
    "alternatives",
    "contended",
    "tree_time_until",
    "write",
]
