"""The golden runs (``golden.py``) replay bit-identically: same decisions, same features, same
metrics. A failure names the run and the first 64-decision stretch that diverged."""

from __future__ import annotations

import json
import math

import pytest

from tests.engine.golden import CHUNK, GOLDEN_PATH, all_runs

GOLDEN = json.loads(GOLDEN_PATH.read_text())
RUNS = all_runs()


def test_golden_set_is_the_recorded_set() -> None:
    assert sorted(RUNS) == sorted(GOLDEN), "golden runs added or removed: re-record (see golden.py)"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_replays(name: str) -> None:
    want, got = GOLDEN[name], RUNS[name]()
    for i, (a, b) in enumerate(zip(want["digests"], got["digests"], strict=False)):
        assert a == b, f"{name}: trajectories diverge within decisions {i * CHUNK}..{(i + 1) * CHUNK - 1}"
    assert got["decisions"] == want["decisions"], f"{name}: decision count changed"
    assert got["digests"] == want["digests"]
    for i, (a, b) in enumerate(zip(want.get("rewards", []), got.get("rewards", []), strict=True)):
        assert same(a, b), f"{name}: reward of decisions {i * CHUNK}.. {b!r} != {a!r}"
    # metrics recorded then must be equal now (fields added since are not compared)
    for key, value in want.get("metrics", {}).items():
        assert same(value, got["metrics"][key]), f"{name}: metric {key} {got['metrics'][key]!r} != {value!r}"
    assert len(got.get("episodes", [])) == len(want.get("episodes", []))
    for episode, (a, b) in enumerate(zip(want.get("episodes", []), got.get("episodes", []), strict=True)):
        for key, value in a.items():
            assert same(value, b[key]), f"{name}: episode {episode} metric {key} {b[key]!r} != {value!r}"


def same(want: object, got: object) -> bool:
    """Integers and strings exactly; floats to 1e-9 relative (sums over events, see golden.py)."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)
    return want == got
