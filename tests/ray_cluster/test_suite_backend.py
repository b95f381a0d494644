"""``suite.backend=ray``: its config checks, and the suite on a real two-node Ray cluster on
loopback giving the process pool's results, journal, resume, timeout and crash handling."""

from __future__ import annotations

import importlib.util
import json
import re

import pandas as pd
import pytest

from servegym.agents.evaluation.api import SuiteConfigError, evaluate, run_suite_full
from servegym.agents.policies.heuristics import FCFS
from tests.agents.conftest import tiny_suite


# ---------------------------------------------------------------- config (no Ray needed)
@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"backend": "slurm"}, "suite.backend must be one of ['process', 'ray']"),
        ({"ray_address": "10.0.0.1:6379"}, "add suite.backend=ray"),
        ({"backend": "ray", "ray_address": ""}, "suite.ray_address must be host:port"),
    ],
)
def test_a_bad_backend_setting_names_the_key(changes: dict, needle: str) -> None:
    with pytest.raises(SuiteConfigError, match=re.escape(needle)):
        run_suite_full(tiny_suite(**changes), progress=False)


def test_the_ray_backend_without_ray_names_the_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(SuiteConfigError, match=r"pip install 'servegym\[ray\]'"):
        run_suite_full(tiny_suite(backend="ray"), progress=False)


def test_the_backend_is_not_part_of_a_suites_identity() -> None:
    """A suite started on the pool may be resumed on a cluster (and back)."""
    assert tiny_suite(backend="ray", ray_address="auto").identity() == tiny_suite().identity()


# ---------------------------------------------------------------- on the two-node cluster
# (all marked slow: the first to run starts the cluster, so make test-fast starts none)
@pytest.mark.slow
def test_the_cluster_has_two_nodes_on_loopback(ray_cluster) -> None:
    import ray

    ray.init(address=ray_cluster.address, logging_level="WARNING")
    try:
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert len(nodes) == 2 and {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
        assert ray.cluster_resources()["CPU"] == 2

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        ids = [node["NodeID"] for node in nodes]
        pinned = [
            where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote()
            for i in ids
        ]
        assert ray.get(pinned) == ids  # each node runs work
    finally:
        ray.shutdown()


def tables(result) -> dict[str, pd.DataFrame]:
    return {
        "runs": result.runs.drop(columns="wall_s"),
        "jobs": result.jobs,
        "kv": result.kv,
        "failures": result.failures,
    }


@pytest.mark.slow
def test_ray_gives_the_process_pools_results(ray_cluster) -> None:
    pooled = run_suite_full(tiny_suite(jobs=2), progress=False)
    on_ray = run_suite_full(tiny_suite(backend="ray", ray_address=ray_cluster.address), progress=False)
    assert len(pooled.runs) == 8 and pooled.failures.empty
    for name, frame in tables(pooled).items():
        pd.testing.assert_frame_equal(frame, tables(on_ray)[name], obj=name)


@pytest.mark.slow
def test_a_suite_interrupted_on_the_pool_resumes_on_ray(ray_cluster, tmp_path) -> None:
    out = tmp_path / "suite"
    whole = evaluate(tiny_suite(loads=[8.0]), out, progress=False, plots=False)
    journal = out / "runs.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) == 4  # one record per run
    journal.write_text("".join(lines[:2]))  # two runs kept, as if the suite had been stopped there
    (out / "report.json").unlink()
    resumed = evaluate(
        tiny_suite(loads=[8.0], resume=True, backend="ray", ray_address=ray_cluster.address),
        out,
        progress=False,
        plots=False,
    )
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(records) == 4 and all("row" in record for record in records)
    pd.testing.assert_frame_equal(tables(whole)["runs"], tables(resumed)["runs"])


@pytest.mark.slow
def test_a_run_past_the_timeout_and_a_crashed_worker_are_failures_on_ray(ray_cluster) -> None:
    import os
    import time

    class Stuck(FCFS):  # local classes travel by value (cloudpickle): the workers cannot import tests/
        def scores(self, decision):
            time.sleep(60)
            return super().scores(decision)

    class Crashing(FCFS):
        def scores(self, decision):
            os._exit(3)

    config = tiny_suite(
        policies=["fcfs", "stuck", "crashing"],
        loads=[8.0],
        seeds=[0],
        run_timeout_s=2.0,
        backend="ray",
        ray_address=ray_cluster.address,
    )
    start = time.perf_counter()
    result = run_suite_full(config, extra_policies={"stuck": Stuck, "crashing": Crashing}, progress=False)
    assert time.perf_counter() - start < 40
    assert list(result.runs.policy) == ["fcfs"]
    errors = dict(zip(result.failures.policy, result.failures.error, strict=True))
    assert errors["stuck"] == "RunTimeout"
    assert errors["crashing"] in {"WorkerCrashedError", "ActorDiedError", "RayTaskError"}, errors


@pytest.mark.slow
def test_without_an_address_the_suite_starts_and_stops_a_local_instance(monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    # Without this, Ray turns token authentication on for a local instance and this process
    # keeps it: actors it later creates on the (tokenless) loopback cluster die unstarted.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    serial = run_suite_full(tiny_suite(loads=[8.0], seeds=[0]), progress=False)
    local = run_suite_full(tiny_suite(loads=[8.0], seeds=[0], backend="ray", jobs=2), progress=False)
    pd.testing.assert_frame_equal(tables(serial)["runs"], tables(local)["runs"])
    assert not ray.is_initialized()
