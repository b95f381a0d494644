"""Invariant soak: a random policy runs 10^5 env steps over every workload family and env id,
with the engine's invariants checked between steps and the drain checks after every episode.

Live checks (``Engine.check_invariants``: block accounting, ref counts == block tables,
queues == call states, host tier, prefix hits) run every ``CHECK_EVERY`` steps and at every
episode end; tests/engine's ``check_drained`` then asserts every call of every tree finished
exactly once and the pool is whole. Settings (``servegym.envs.soak``) are small (tiny_cpu profile, short calls, bursts of 12 jobs) so steps are
cheap; EVICT decisions also come from Scheduling-v0 and Serving-v0. ~90 s on a loaded 2-core box.
"""

from __future__ import annotations

import pytest
from engine.test_engine_invariants import check_drained

from servegym.envs.soak import soak

SOAK_STEPS = 100_000
STEPS = {  # env steps per env id, split evenly over the families
    "servegym/Scheduling-v0": 14_000,  # ~800 steps/s (react and plan-execute chains: ~300)
    "servegym/PickNext-v0": 10_000,  # pick-next with STOP: a decision per admitted call
    "servegym/Eviction-v0": 1_800,  # EVICT decisions are rare per iteration: ~150 steps/s
    "servegym/Routing-v0": 36_000,  # ~1,500-2,000 steps/s
    "servegym/Serving-v0": 38_200,
}
CHECK_EVERY = 10


@pytest.mark.slow
def test_random_policy_soak_keeps_every_invariant(time_limit) -> None:
    with time_limit(600):
        result = soak(
            STEPS,
            check_every=CHECK_EVERY,
            on_episode=lambda engine, metrics: check_drained(engine, metrics, len(engine.jobs)),
        )
    assert not result.violations, result.violations[:3]
    assert not result.unfinished, result.unfinished[:3]
    assert sum(STEPS.values()) == SOAK_STEPS <= result.steps
    kinds = result.decisions
    assert kinds["order"] and kinds["evict"] and kinds["route"]
    print(
        f"soak: {result.steps} steps, {result.episodes} episodes in {result.seconds:.1f}s "
        f"({result.steps / result.seconds:,.0f} steps/s); {dict(kinds)}; seconds per env id: "
        f"{ {k: round(v, 1) for k, v in result.seconds_by_env.items()} }"
    )
