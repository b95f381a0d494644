"""Every workload option in conf/workload/ composes and builds jobs (a Hydra config that only
fails when a run starts is a trap: workload=mixed once handed its generators over as dicts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from servegym.agents.evaluate import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "workload").glob("*.yaml") if p.stem != "trace")


@pytest.mark.parametrize("name", OPTIONS)
def test_workload_option_builds_jobs(name: str) -> None:
    cfg = compose_config([f"workload={name}", "workload.num_jobs=3"], CONF)
    source = instantiate(cfg.workload).build(0)
    jobs = list(source.initial_jobs())
    assert jobs and all(job.calls for job in jobs)
