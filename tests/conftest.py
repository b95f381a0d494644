"""Shared test settings: hypothesis profiles and a wall-clock guard for tests that could hang."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
from hypothesis import HealthCheck, settings

# Engine runs take tens of milliseconds, far past hypothesis' default 200 ms deadline on a slow
# CI core now and then, so no deadline anywhere. `ci` (the default) keeps the suite quick;
# HYPOTHESIS_PROFILE=thorough runs many more examples when hunting for bugs.
# `ci` is derandomized: the same examples every run, so CI is reproducible and a rare livelock
# found while hunting (see the note in test_engine_invariants) cannot stall it by chance.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield  # no alarm available: the test still runs, unguarded
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: the engine hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")  # stateless; session scope lets @given tests use it too
def time_limit() -> Callable[[int], AbstractContextManager[None]]:
    """``with time_limit(10): engine.run(policy)`` fails the test instead of hanging it."""
    return _time_limit
