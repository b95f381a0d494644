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
  load, as in the evaluation suite (``servegym.agents.evaluation.api.apply_load``); the engine and
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

Modules, one concept each (this package re-exports the public names, so
``from servegym.agents.bounds import headroom`` and ``_target_: servegym.agents.bounds.TreeSRPT``
keep working): ``config`` (``BoundsConfig``, ``RolloutConfig``, ``bounds_from_cfg``),
``tree_srpt`` (the clairvoyant ``TreeSRPT`` order), ``branches`` (forked rollout branches:
``branch_costs``, ``tree_time_until``), ``rollout`` (the rollout-improved policy, ``run_rollout``,
and the plain driver ``run_policy``), ``sweep`` (``Setting``, ``grid``, ``World``, ``Task``, one run
and many), ``table`` (choosing on the training seeds, ``headroom``, ``headroom_table``),
``report`` (``headroom.md``, the terminal table, the CSV files).
"""

from .branches import branch_costs, tree_time_until
from .config import BoundsConfig, BoundsConfigError, RolloutConfig, bounds_from_cfg
from .report import rich_table, short_config, table_rows, to_markdown, write
from .rollout import RolloutStats, alternatives, contended, promote, run_policy, run_rollout
from .sweep import Setting, Task, World, build_run, grid, make_world, run_task, run_tasks
from .table import HEADROOM_COLUMNS, ROOM_THRESHOLD, HeadroomResult, choose_best, headroom, headroom_table
from .tree_srpt import TreeSRPT

__all__ = [
    "HEADROOM_COLUMNS",
    "ROOM_THRESHOLD",
    "BoundsConfig",
    "BoundsConfigError",
    "HeadroomResult",
    "RolloutConfig",
    "RolloutStats",
    "Setting",
    "Task",
    "TreeSRPT",
    "World",
    "alternatives",
    "bounds_from_cfg",
    "branch_costs",
    "build_run",
    "choose_best",
    "contended",
    "grid",
    "headroom",
    "headroom_table",
    "make_world",
    "promote",
    "rich_table",
    "run_policy",
    "run_rollout",
    "run_task",
    "run_tasks",
    "short_config",
    "table_rows",
    "to_markdown",
    "tree_time_until",
    "write",
]
