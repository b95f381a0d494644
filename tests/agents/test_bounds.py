"""The headroom table's library: forked rollout branches, the rollout-improved policy, the
tree-SRPT oracle, the choice of configurations on training seeds, and the table itself."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from servegym.agents.bounds import (
    HEADROOM_COLUMNS,
    BoundsConfig,
    BoundsConfigError,
    RolloutConfig,
    TreeSRPT,
    alternatives,
    bounds_from_cfg,
    branch_costs,
    choose_best,
    grid,
    headroom,
    promote,
    run_policy,
    run_rollout,
    tree_time_until,
    write,
)
from servegym.agents.evaluation.api import DEFAULT_CONF_DIR, compose_config
from servegym.agents.policies.heuristics import FCFS, OracleSJF, ProgramFCFS
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import DecisionKind
from servegym.envs.workloads.generators import Debate, MapReduce
from servegym.envs.workloads.job import Call, Job, Text
from servegym.envs.workloads.source import FixedJobs
from servegym.envs.workloads.workload import Workload

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(  # the invariant tests' tiny trees (tests/engine/test_engine_invariants.py)
    system_tokens=16,
    input_tokens_mean=24.0,
    tool_tokens_mean=16.0,
    output_tokens_mean=40.0,
    max_tokens=64,
    max_context_tokens=512,
)
TIGHT = EngineConfig(profile="tiny_cpu", block_size=4, num_gpu_blocks=192, max_num_seqs=8)
WORKLOADS = {
    "map_reduce": Workload(generator=MapReduce(fan_out=3, **SMALL), arrival_rate=20.0, num_jobs=10),
    "debate": Workload(generator=Debate(num_agents=2, num_rounds=2, **SMALL), arrival_rate=20.0, num_jobs=8),
}


def tiny_engine(seed: int, family: str = "map_reduce") -> Engine:
    return Engine(WORKLOADS[family].build(seed), engine=TIGHT)


def plain_tree_time(seed: int, policy_cls: type, family: str = "map_reduce") -> float:
    engine = tiny_engine(seed, family)
    metrics, _ = run_policy(engine, policy_cls())
    assert metrics.complete
    return tree_time_until(engine)


def digest(engine: Engine, policy) -> tuple[str, int]:
    """A run driven by ``policy``: hash of every decision it saw and the final metrics."""
    h = hashlib.sha256()
    count = 0
    while (decision := engine.next_decision()) is not None:
        for array in (decision.candidates, decision.features, decision.privileged, decision.global_features):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(repr((int(decision.kind), decision.now_s)).encode())
        engine.decide(policy(engine, decision))
        count += 1
    h.update(repr(sorted(engine.metrics().as_dict().items())).encode())
    return h.hexdigest(), count


# ---------------------------------------------------------------- branching
@pytest.mark.parametrize(
    ("family", "seed"), [("map_reduce", 2), pytest.param("debate", 3, marks=pytest.mark.slow)]
)
def test_branching_and_discarding_leaves_the_parent_run_unchanged(family: str, seed: int) -> None:
    base = FCFS()
    plain, plain_count = digest(tiny_engine(seed, family), lambda engine, d: base.scores(d))
    branched = {"decisions": 0, "differ": 0}

    def branch_then_base(engine: Engine, decision) -> np.ndarray:
        scores = base.scores(decision)
        others = alternatives(decision, scores, 2) if decision.kind == DecisionKind.ORDER else []
        if others and branched["decisions"] < 10:  # this seed's first differing branches lie within
            costs = branch_costs(engine, FCFS(), [scores, promote(scores, others[0])])
            branched["decisions"] += 1
            branched["differ"] += costs[0] != costs[1]
        return scores  # discard every branch: the parent follows the base policy

    forked, forked_count = digest(tiny_engine(seed, family), branch_then_base)
    assert branched["decisions"] >= 3, "the workload must offer decisions to branch"
    assert branched["differ"] >= 1, "some branch must lead elsewhere, or the test proves nothing"
    assert (forked, forked_count) == (plain, plain_count)


def test_a_branch_reproduces_the_parent_continuation_exactly() -> None:
    """The branch of the base's own answer, run to the end, costs exactly what the parent's
    run of the base policy costs: forked copies are faithful, bit for bit."""
    engine = tiny_engine(1)
    base = FCFS()
    while (decision := engine.next_decision()) is not None:
        if decision.kind == DecisionKind.ORDER and len(decision) > 1:
            break
        engine.decide(base.scores(decision))
    scores = base.scores(decision)
    (cost,) = branch_costs(engine, FCFS(), [scores])
    engine.decide(scores)
    run_policy(engine, base)
    assert cost == tree_time_until(engine) == pytest.approx(engine.tree_seconds, rel=1e-12)


def test_a_failing_branch_raises_with_its_traceback() -> None:
    engine = tiny_engine(0)
    decision = engine.next_decision()
    while decision.kind != DecisionKind.ORDER:
        engine.decide(FCFS().scores(decision))
        decision = engine.next_decision()
    with pytest.raises(RuntimeError, match="(?s)rollout branch 0 failed.*ValueError: ORDER decision has"):
        branch_costs(engine, FCFS(), [np.full(len(decision) + 1, 1.0)])  # wrong length: decide() raises
    engine.decide(FCFS().scores(decision))  # the parent goes on


def test_tree_time_until_censors_at_the_horizon() -> None:
    engine = tiny_engine(2)
    run_policy(engine, FCFS())
    n = len(engine.jobs)
    arrival, finish = engine.job_table.arrival_s[:n], engine.job_table.finish_s[:n]
    assert tree_time_until(engine) == pytest.approx(float((finish - arrival).sum()), rel=1e-12)
    until = float(np.median(finish))
    expected = float(np.clip(np.minimum(finish, until) - arrival, 0, None).sum())
    assert tree_time_until(engine, until) == pytest.approx(expected, rel=1e-12)
    assert tree_time_until(engine, until) < tree_time_until(engine)


# ---------------------------------------------------------------- rollout-improved
@pytest.mark.slow
@pytest.mark.parametrize("base_cls", [FCFS, ProgramFCFS])
def test_rollout_is_never_worse_than_its_base_and_sometimes_better(base_cls: type) -> None:
    improved_somewhere, branched = False, 0
    for seed in range(6):
        base_time = plain_tree_time(seed, base_cls)
        engine = tiny_engine(seed)
        metrics, stats = run_rollout(engine, base_cls(), k=3, horizon_s=None, decision_budget=1000)
        assert metrics.complete
        rollout_time = tree_time_until(engine)
        assert stats.branched == stats.branchable  # the budget does not bind
        assert rollout_time <= base_time  # it includes the base's own answer at every branch
        if stats.branched:  # after the last branch the parent follows the base, as the kept branch did
            assert stats.last_best_cost == rollout_time
        branched += stats.branched
        improved_somewhere |= stats.improved > 0 and rollout_time < base_time
    assert branched > 0
    assert improved_somewhere, "no seed improved: the rollout never chose an alternative"


def test_rollout_spends_at_most_its_budget() -> None:
    engine = tiny_engine(3)
    _, stats = run_rollout(engine, FCFS(), k=2, decision_budget=2, stride=3)
    assert stats.branched == 2 and stats.branchable > 2
    # k=2: one alternative; the base's own cost is known after the first branch
    assert stats.children == 2 + 1
    assert stats.decisions >= stats.branchable


def test_alternatives_skip_the_base_choice_and_what_does_not_fit() -> None:
    engine = tiny_engine(3)
    while (decision := engine.next_decision()) is not None:
        if decision.kind == DecisionKind.ORDER and len(decision) > 2:
            break
        engine.decide(FCFS().scores(decision))
    scores = np.arange(len(decision), dtype=np.float64)  # the last candidate is the base's first
    others = alternatives(decision, scores, 3)
    assert len(decision) - 1 not in others and len(others) <= 2
    assert others == sorted(others, reverse=True)  # best-scored first
    assert alternatives(decision, scores, 1) == []
    decision.global_features[:] = 0.0  # no free block: nothing fits
    decision.features[:, :] = 1.0
    assert alternatives(decision, scores, 3) == []
    np.testing.assert_array_equal(np.argsort(-promote(scores, 0))[:2], [0, len(decision) - 1])


# ---------------------------------------------------------------- tree-SRPT
def test_tree_srpt_serves_the_tree_with_least_remaining_work_first() -> None:
    """A tree whose first call is short but whose child is long (310 tokens left) against a
    one-call tree (30 left), one slot: call-level SJF starts the short first call, tree-SRPT
    the small tree."""
    jobs = [
        Job(
            "big",
            0.0,
            (
                Call(0, "worker", (Text("a", 16),), 10, 400),
                Call(1, "worker", (Text("b", 16),), 300, 400, parents=(0,)),
            ),
        ),
        Job("small", 0.0, (Call(0, "worker", (Text("c", 16),), 30, 400),)),
    ]
    engine_cfg = EngineConfig(profile="tiny_cpu", max_num_seqs=1)

    def first_finished(policy) -> str:
        engine = Engine(FixedJobs(jobs), engine=engine_cfg)
        metrics, _ = run_policy(engine, policy)
        assert metrics.complete
        calls = engine.calls
        first = int(np.argmin(calls.finish_s[: calls.size]))
        return engine.jobs[int(calls.job[first])].job_id

    assert first_finished(TreeSRPT()) == "small"
    assert first_finished(OracleSJF()) == "big"
    with pytest.raises(RuntimeError, match="attach"):
        TreeSRPT().tree_remaining_tokens(np.array([0]))


# ---------------------------------------------------------------- choosing on training seeds
def test_the_sweep_chooses_on_training_seeds_only() -> None:
    rows = []
    for seed, a, b, c in [(0, 10.0, 12.0, 9.0), (1, 11.0, 12.0, 9.0), (10000, 30.0, 5.0, 1.0)]:
        for config, value, complete in (("A", a, True), ("B", b, True), ("C", c, seed != 1)):
            rows.append(
                dict(
                    family="f",
                    load=8.0,
                    seed=seed,
                    policy="p",
                    config=config,
                    jct_mean_s=value,
                    complete=complete,
                )
            )
    sweep = pd.DataFrame(rows)
    best = choose_best(sweep, train_seeds=[0, 1])
    # B wins on the held-out seed and C on seed 0, but C did not finish seed 1: A
    assert best[["policy", "config"]].values.tolist() == [["p", "A"]]
    assert best["train_mean_s"].iloc[0] == pytest.approx(10.5)
    assert choose_best(sweep, train_seeds=[10000])["config"].iloc[0] == "C"
    with pytest.raises(BoundsConfigError, match="training seeds"):
        choose_best(sweep, train_seeds=[7])


def test_grid_covers_caps_and_agent_keys() -> None:
    config = BoundsConfig(
        max_num_seqs=[8, 16],
        max_num_batched_tokens=[512],
        agent_grids={"program_fcfs_pinning": {"grace_s": [0.0, 4.0]}},
    )
    assert [s.config for s in grid("fcfs", config)] == [
        "max_num_seqs=8 max_num_batched_tokens=512",
        "max_num_seqs=16 max_num_batched_tokens=512",
    ]
    pinning = grid("program_fcfs_pinning", config)
    assert len(pinning) == 4 and pinning[1].agent == (("grace_s", 4.0),)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(BoundsConfigError, match="share"):
        BoundsConfig(train_seeds=[0, 10000]).check(DEFAULT_CONF_DIR)
    with pytest.raises(BoundsConfigError, match="bounds.families"):
        BoundsConfig(families=["nope"]).check(DEFAULT_CONF_DIR)
    with pytest.raises(BoundsConfigError, match="horizon_s"):
        BoundsConfig(rollout=RolloutConfig(horizon_s=-1.0)).check(DEFAULT_CONF_DIR)
    with pytest.raises(BoundsConfigError, match="lodas"):
        bounds_from_cfg({"lodas": [1.0]})
    assert bounds_from_cfg({"loads": [4]}).loads == [4.0]
    default = BoundsConfig()
    assert "sjf_oracle" not in default.tuned_policies(DEFAULT_CONF_DIR)
    assert {"fcfs", "program_fcfs", "program_fcfs_pinning"} <= set(default.tuned_policies(DEFAULT_CONF_DIR))


def test_every_default_suite_workload_is_a_bounds_family() -> None:
    """The headroom table can be computed for every family the default suite reports (the
    scenario families of issue 14 included), and their committed rows keep the columns."""
    from omegaconf import OmegaConf

    suite = OmegaConf.load(DEFAULT_CONF_DIR / "suite" / "default.yaml")
    assert {"mixed_bursty", "react_long"} <= set(suite.workloads)
    BoundsConfig(families=list(suite.workloads)).check(DEFAULT_CONF_DIR)
    rows = pd.read_csv(DEFAULT_CONF_DIR.parent / "scripts" / "results" / "headroom_families.csv")
    assert tuple(rows.columns) == HEADROOM_COLUMNS
    assert sorted(zip(rows.family, rows.load, strict=True)) == [
        ("mixed_bursty", 0.5),
        ("mixed_bursty", 8.0),
        ("react_long", 0.5),
        ("react_long", 8.0),
    ]
    assert (rows.headroom >= 1.0 - 1e-9).all()  # the bound is never worse than the tuned heuristic


# ---------------------------------------------------------------- the table
def tiny_bounds(**changes) -> BoundsConfig:
    fields = dict(
        families=["mapreduce"],
        loads=[8.0],
        num_jobs=8,
        train_seeds=[0],
        test_seeds=[10000, 10001],
        heuristics=["fcfs", "program_fcfs"],
        clairvoyant=["sjf_oracle", "tree_srpt"],
        agents={"tree_srpt": {"_target_": "servegym.agents.bounds.TreeSRPT"}},
        max_num_seqs=[4, 256],
        max_num_batched_tokens=[8192],
        rollout=RolloutConfig(k=2, decision_budget=2),
    )
    return BoundsConfig(**{**fields, **changes})


@pytest.mark.slow
def test_headroom_table_has_the_documented_columns_and_a_sound_bound(tmp_path: Path) -> None:
    config = tiny_bounds()
    result = headroom(config, compose_config())
    table = result.table
    assert tuple(table.columns) == HEADROOM_COLUMNS and len(table) == 1
    assert set(result.sweep["seed"]) == {0} and set(result.runs["seed"]) == {10000, 10001}
    assert set(result.sweep["policy"]) == {"fcfs", "program_fcfs", "sjf_oracle", "tree_srpt"}
    assert set(result.runs["role"]) == {"fcfs", "tuned", "rollout", "oracle:sjf_oracle", "oracle:tree_srpt"}
    row = table.iloc[0]
    assert row["tuned_policy"] in ("fcfs", "program_fcfs") and row["clairvoyant_policy"] in config.clairvoyant
    # the tuned choice is the best training mean of the non-clairvoyant settings
    train = result.sweep[result.sweep.policy.isin(["fcfs", "program_fcfs"])]
    best = train.loc[train["jct_mean_s"].idxmin()]
    assert (row["tuned_policy"], row["tuned_config"]) == (best["policy"], best["config"])
    # per seed the bound is the best measured run: never above FCFS, the tuned or the rollout run
    for _seed, runs in result.runs.groupby("seed"):
        assert runs["jct_mean_s"].min() <= runs.loc[runs.role == "fcfs", "jct_mean_s"].iloc[0]
    for column in ("fcfs_mean_s", "tuned_mean_s", "rollout_mean_s", "clairvoyant_mean_s"):
        assert row["bound_mean_s"] <= row[column] + 1e-9
    assert row["headroom"] >= 1.0 and row["room_below_15pct"] == (row["headroom"] < 1.15)
    assert row["rollout_branched"] <= 2 * len(config.test_seeds) and row["rollout_wall_s"] > 0
    markdown = write(result, config, tmp_path)
    assert pd.read_csv(tmp_path / "headroom.csv").columns.tolist() == list(HEADROOM_COLUMNS)
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "runs.csv").exists()
    header = markdown.splitlines()[0]
    for label in ("FCFS", "best tuned heuristic", "rollout-improved", "clairvoyant", "bound", "headroom"):
        assert label in header
    assert f"{row['headroom']:.3f}" in markdown and math.isfinite(row["headroom_lo"])


@pytest.mark.slow
def test_script_writes_the_table_and_refuses_a_bad_config(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "bounds.py"),
        f"output_dir={tmp_path}",
        "bounds.families=[debate]",
        "bounds.loads=[8.0]",
        "bounds.num_jobs=6",
        "bounds.train_seeds=[0]",
        "bounds.test_seeds=[10000,10001]",
        "bounds.heuristics=[fcfs,program_fcfs]",
        "bounds.max_num_seqs=[256]",
        "bounds.max_num_batched_tokens=[8192]",
        "bounds.rollout.decision_budget=1",
        "bounds.jobs=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "headroom" in done.stdout and (tmp_path / "headroom.md").read_text() in done.stdout
    assert pd.read_csv(tmp_path / "headroom.csv")["family"].tolist() == ["debate"]
    bad = subprocess.run(
        [*command[:2], f"output_dir={tmp_path}", "bounds.train_seeds=[10000]"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "share" in bad.stderr
