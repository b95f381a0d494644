"""Pick-next admission (``EngineConfig(admission="pick")``): one call per decision among those
that fit, or STOP; STOP is never offered to an idle replica; heuristics keep working."""

from __future__ import annotations

import numpy as np
import pytest

from servegym.agents.policies.heuristics import FCFS, ProgramFCFS
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine, assert_all_terminal
from servegym.envs.engine.policy import Decision, DecisionKind, check_scores, pick
from servegym.envs.workloads.generators import MapReduce
from servegym.envs.workloads.workload import Workload

WORKLOAD = Workload(generator=MapReduce(fan_out=6), arrival_rate=8.0, num_jobs=12)


def engine(admission: str, **overrides) -> Engine:
    config = EngineConfig(max_num_seqs=16, num_gpu_blocks=1500, admission=admission, **overrides)
    return Engine(WORKLOAD.build(3), engine=config)


class AlwaysStop:
    """Admits the oldest fitting call, and stops as soon as STOP is offered."""

    def __init__(self) -> None:
        self.offered = self.asked = 0
        self.idle_offers = 0

    def scores(self, decision: Decision) -> np.ndarray:
        fcfs = FCFS().scores(decision)
        if decision.kind == DecisionKind.ORDER:
            self.asked += 1
            self.offered += decision.stop
        return np.append(fcfs, np.inf) if decision.stop else fcfs


@pytest.mark.slow
def test_always_stop_admits_one_call_per_iteration_and_still_drains() -> None:
    eng, policy = engine("pick"), AlwaysStop()
    admitted = []
    for replica in eng.replicas:
        admit = replica._admit

        def counted(call, plan, admit=admit):
            admitted.append(eng.now_s)
            return admit(call, plan)

        replica._admit = counted
    metrics = eng.run(policy)
    assert metrics.jobs_completed == 12 and not metrics.stalled
    assert_all_terminal(eng)
    assert policy.offered > 0
    # STOP at every offer: at most one admission per instant, except none ran yet (no offer)
    _, counts = np.unique(admitted, return_counts=True)
    assert counts.max() == 1


def test_heuristics_never_stop_and_fill_what_fits() -> None:
    for policy in (FCFS(), ProgramFCFS()):
        picked = engine("pick").run(policy)
        ranked = engine("rank").run(policy)
        assert picked.jobs_completed == ranked.jobs_completed == 12
        assert not picked.stalled


def test_stop_is_never_offered_to_an_idle_replica() -> None:
    eng = engine("pick")
    while (decision := eng.next_decision()) is not None:
        if decision.kind == DecisionKind.ORDER and decision.stop:
            replica = eng.replicas[decision.replica]
            assert replica.running, "STOP offered with nothing scheduled"
        eng.decide(np.append(FCFS().scores(decision), -np.inf) if decision.stop else FCFS().scores(decision))


def test_scores_with_a_stop_entry_only_where_offered() -> None:
    decision = Decision(
        kind=DecisionKind.ORDER,
        replica=0,
        candidates=np.arange(3),
        features=np.zeros((3, 2), np.float32),
        privileged=np.zeros((3, 2), np.float32),
        global_features=np.zeros(2, np.float32),
        mask=np.array([True, False, True]),
    )
    with pytest.raises(ValueError, match="3 candidates"):
        check_scores(decision, np.zeros(4))
    assert pick(decision, np.array([0.1, 5.0, 0.2])) == 2  # the masked best is skipped
    decision.stop = True
    assert check_scores(decision, np.zeros(4)).shape == (4,)
    assert pick(decision, np.array([0.1, 5.0, 0.2, 0.3])) is None
    assert pick(decision, np.array([0.1, 5.0, 0.2, 0.2])) == 2  # a tie admits
    assert pick(decision, np.array([0.1, 5.0, 0.2])) == 2  # no STOP score: never stops


def test_admission_must_be_known() -> None:
    with pytest.raises(ValueError, match="engine.admission"):
        EngineConfig(admission="greedy")
