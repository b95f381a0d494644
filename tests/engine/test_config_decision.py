"""CONFIG decisions: the batching cap and token budget chosen every ``config_every_s``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from servegym.agents.policies.batching import Batching, option_pairs
from servegym.agents.policies.heuristics import FCFS
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.features import config_options
from servegym.envs.engine.policy import CONFIG_FEATURES, Decision, DecisionKind, Policy, column
from servegym.envs.workloads.generators import ReactChain, TreeOfThoughts
from servegym.envs.workloads.workload import Workload
from tests.envs.small import TIGHT, TINY

WORKLOAD = Workload(generator=TreeOfThoughts(depth=2, **TINY), arrival_rate=20.0, num_jobs=12)
CONFIG = replace(
    TIGHT, max_num_seqs=256, config_max_num_seqs=[2, 4, 8, 16, 256], config_max_num_batched_tokens=[64, 8192]
)


class Watch:
    """Checks the engine's invariants at every decision and keeps the CONFIG answers."""

    def __init__(self, engine: Engine, policy: Policy) -> None:
        self.engine, self.policy = engine, policy
        self.configs: list[tuple[float, float]] = []

    def scores(self, decision: Decision) -> np.ndarray:
        self.engine.check_invariants()
        scores = np.asarray(self.policy.scores(decision), dtype=np.float64)
        if decision.kind == DecisionKind.CONFIG:
            seqs, tokens = option_pairs(decision)[int(np.argmax(scores))]
            self.configs.append((seqs, tokens))
        return scores


def run(config: EngineConfig, policy: Policy, seed: int = 0) -> tuple[Engine, Watch]:
    engine = Engine(WORKLOAD.build(seed), engine=config)
    watch = Watch(engine, policy)
    engine.run(watch)
    assert_all_terminal(engine)
    return engine, watch


def finish_times(engine: Engine) -> np.ndarray:
    return engine.job_table.finish_s[: len(engine.jobs)].copy()


def test_keeping_the_cap_is_the_static_engine() -> None:
    static, _ = run(CONFIG, FCFS())
    asked, watch = run(replace(CONFIG, config_every_s=0.05), FCFS())
    assert len(watch.configs) >= 3 and set(watch.configs) == {(256.0, 8192.0)}
    np.testing.assert_allclose(finish_times(asked), finish_times(static), rtol=0, atol=1e-9)


def test_a_fixed_answer_is_the_engine_launched_with_it() -> None:
    launched, _ = run(replace(CONFIG, max_num_seqs=4, max_num_batched_tokens=64), FCFS())
    chosen, watch = run(replace(CONFIG, config_every_s=0.05), Batching(FCFS(), "fixed", 4, 64))
    assert set(watch.configs) == {(4.0, 64.0)}
    np.testing.assert_allclose(finish_times(chosen), finish_times(launched), rtol=0, atol=1e-9)
    assert launched.metrics().jobs_completed == chosen.metrics().jobs_completed == WORKLOAD.num_jobs


def test_lowering_the_cap_below_the_running_calls_preempts_nothing_and_drains() -> None:
    """From cap 256 to 2 mid-run: the calls running then finish, nothing new is admitted until
    fewer than 2 run, and the invariants (running <= max(cap, running at the decision)) hold."""

    class Lower:
        def __init__(self) -> None:
            self.asked = 0

        def scores(self, decision: Decision) -> np.ndarray:
            if decision.kind != DecisionKind.CONFIG:
                return FCFS().scores(decision)
            self.asked += 1
            pairs = option_pairs(decision)
            wanted = (256.0, 8192.0) if self.asked == 1 else (2.0, 8192.0)
            return (pairs == wanted).all(axis=1).astype(np.float64)

    config = replace(CONFIG, config_every_s=0.03, num_gpu_blocks=4000)
    engine, watch = run(config, Lower())
    assert (2.0, 8192.0) in watch.configs
    assert engine.metrics().jobs_completed == WORKLOAD.num_jobs


def test_kv_fit_lowers_the_cap_when_contexts_grow() -> None:
    react = Workload(generator=ReactChain(turns_mean=4.0, **TINY), arrival_rate=50.0, num_jobs=16)
    config = replace(CONFIG, config_every_s=0.02)
    engine = Engine(react.build(1), engine=config)
    watch = Watch(engine, Batching(FCFS(), "kv_fit", kv_target=1.0))
    engine.run(watch)
    caps = {seqs for seqs, _ in watch.configs}
    assert 256.0 in caps and caps & {2.0, 4.0, 8.0, 16.0}, caps  # opens when idle, closes under load
    assert engine.metrics().jobs_completed == 16


def test_the_options_are_the_grid_then_an_off_grid_current_pair() -> None:
    grid = [(s, t) for s in CONFIG.config_max_num_seqs for t in CONFIG.config_max_num_batched_tokens]
    assert config_options(CONFIG) == grid  # 256 x 8192 is on the grid
    off = replace(CONFIG, max_num_seqs=5)
    assert config_options(off) == [*grid, (5, 8192)]
    engine = Engine(WORKLOAD.build(0), engine=replace(off, config_every_s=0.05))
    decision = engine.next_decision()
    assert decision is not None and decision.kind == DecisionKind.CONFIG and decision.now_s == 0.0
    current = decision.features[:, column("is_current", CONFIG_FEATURES)]
    assert current.tolist() == [0.0] * len(grid) + [1.0]


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="strictly ascending"):
        EngineConfig(config_max_num_seqs=[16, 8])
    with pytest.raises(ValueError, match=r"config_max_num_batched_tokens\[0\]"):
        EngineConfig(config_max_num_batched_tokens=[0, 8])
    with pytest.raises(ValueError, match="config_every_s"):
        EngineConfig(config_every_s=float("nan"))
