"""A real multi-node Ray cluster on this machine's loopback interface, for tests and benchmarks.

Each node is its own ``ray start --block`` process (a head, then workers joining it), as on a
real cluster, with a fixed number of CPUs, so a suite or a trainer is scheduled across nodes
exactly as it would be across machines. Nothing listens beyond 127.0.0.1: Ray turns a loopback
address into the machine's routable one by design (so other machines can join), and each node
process and this driver are kept on loopback by replacing that one function,
``ray._private.services.resolve_ip_for_localhost``, with the identity (Ray 2.60; the only
private name used here, and only by this harness).

Every process a node starts stays in that node's process group, so stopping the cluster
ends exactly those processes (SIGTERM, then SIGKILL after a grace period), never another
user's Ray (``ray stop`` would end every Ray process on the machine).

    with LoopbackCluster(num_nodes=2, cpus_per_node=1) as cluster:
        run_suite_full(SuiteConfig(..., backend="ray", ray_address=cluster.address))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"
_LAUNCH = (
    "import ray._private.services as services; "
    "services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()"
)
"""``ray start`` with loopback addresses kept as they are (see the module docstring)."""
NODE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
"""No usage report, and no token: Ray turns token authentication on when ``~/.ray/auth_token``
exists (a local ``ray.init`` writes one), and nothing but this machine can reach loopback."""


class ClusterStartError(RuntimeError):
    """A node did not come up; the message holds the tail of its log."""


@contextlib.contextmanager
def keep_loopback() -> Iterator[None]:
    """In this process, let ``ray.init(address="127.0.0.1:PORT")`` stay on loopback and join
    without a token (``NODE_ENV``), whatever an earlier local ``ray.init`` set."""
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    saved = {name: os.environ.get(name) for name in NODE_ENV}
    services.resolve_ip_for_localhost = lambda host: host
    os.environ.update(NODE_ENV)
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LoopbackCluster:
    """``num_nodes`` Ray nodes (the first the head) of ``cpus_per_node`` CPUs each on 127.0.0.1.

    A context manager: entering starts the nodes and waits until all are alive (or raises
    ``ClusterStartError``); leaving stops them whatever happened inside. ``address`` is the
    head's ``host:port`` for ``ray.init`` / ``suite.ray_address``; inside the block this process
    keeps loopback addresses as they are (``keep_loopback``)."""

    def __init__(
        self,
        num_nodes: int = 2,
        cpus_per_node: int = 1,
        object_store_bytes: int = 100_000_000,
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if num_nodes < 1 or cpus_per_node < 1:
            raise ValueError(f"need num_nodes >= 1 and cpus_per_node >= 1, got {num_nodes}, {cpus_per_node}")
        self.num_nodes, self.cpus_per_node = num_nodes, cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.start_timeout_s = start_timeout_s
        self.env = {**os.environ, **NODE_ENV, **(env or {})}
        self.port = _free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.temp_dir = Path(
            tempfile.mkdtemp(prefix="sg-ray-")
        )  # short: Ray's socket paths have a length limit
        self.nodes: list[subprocess.Popen] = []
        self._loopback: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> LoopbackCluster:
        self._loopback = keep_loopback()
        self._loopback.__enter__()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _node_command(self, head: bool) -> list[str]:
        common = [
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}",
        ]
        if head:
            role = [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}",
            ]
        else:
            role = [f"--address={self.address}"]
        return [sys.executable, "-c", _LAUNCH, "start", *role, *common]

    def _launch(self, head: bool) -> None:
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115 (the node owns it)
        with log:
            self.nodes.append(
                subprocess.Popen(
                    self._node_command(head),
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() ends it and all it started
                )
            )

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        self._launch(head=True)
        while not _port_open(self.port):
            self._check_alive(deadline)
            time.sleep(0.2)
        for _ in range(self.num_nodes - 1):
            self._launch(head=False)
        self._wait_for_nodes(deadline)

    def _wait_for_nodes(self, deadline: float) -> None:
        import ray

        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        try:
            while _alive_nodes(ray) < self.num_nodes:
                self._check_alive(deadline)
                time.sleep(0.2)
        finally:
            ray.shutdown()

    def _check_alive(self, deadline: float) -> None:
        for i, node in enumerate(self.nodes):
            if node.poll() is not None:
                raise ClusterStartError(
                    f"Ray node {i} exited with status {node.returncode} while starting; its log:\n"
                    + self.log_tail(i)
                )
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"the {self.num_nodes}-node Ray cluster was not up after {self.start_timeout_s:g} s; "
                f"head log:\n{self.log_tail(0)}"
            )

    def log_tail(self, node: int, num_lines: int = 20) -> str:
        path = self.temp_dir / f"node{node}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-num_lines:])

    def stop(self, grace_s: float = 3.0) -> None:
        """End every node's process group: SIGTERM, then SIGKILL after ``grace_s`` (Ray drains
        a node for up to 30 s on SIGTERM; a test cluster has nothing to drain)."""
        for node in reversed(self.nodes):
            _signal_group(node, signal.SIGTERM)
        end = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(max(0.0, end - time.monotonic()))
            _signal_group(node, signal.SIGKILL)  # the group's other processes, even if its leader left
            node.wait()
        self.nodes.clear()
        if self._loopback is not None:
            self._loopback.__exit__(None, None, None)
            self._loopback = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(node: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signum)


def _alive_nodes(ray: Any) -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
        return True
    return False
