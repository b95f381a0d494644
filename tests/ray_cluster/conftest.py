"""A two-node Ray cluster on 127.0.0.1 (``servegym.agents.evaluation.ray_loopback``), one CPU per node so
that it fits this 2-core machine, shared by the Ray tests of a session and stopped at its end
whatever happened (the fixture's context manager ends every node's process group)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    pytest.importorskip("ray")
    from servegym.agents.evaluation.ray_loopback import LoopbackCluster

    with LoopbackCluster(num_nodes=2, cpus_per_node=1) as cluster:
        yield cluster
