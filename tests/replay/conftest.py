"""A fake OpenAI-compatible server on 127.0.0.1 per test (``fake_openai.FakeServer``), stopped
when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.replay.fake_openai import FakeServer


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
