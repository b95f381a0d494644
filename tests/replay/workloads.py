"""Small agent trees for the replay tests: prompts of tens of words, a few calls each."""

from __future__ import annotations

import numpy as np

from servegym.envs.workloads.generators import Debate, MapReduce
from servegym.envs.workloads.job import Job

SMALL = {
    "system_tokens": 12,
    "input_tokens_mean": 10.0,
    "tool_tokens_mean": 6.0,
    "output_tokens_mean": 6.0,
    "max_tokens": 12,
    "max_context_tokens": 512,
}


def small_trees(num_mapreduce: int = 3, num_debate: int = 2, gap_s: float = 0.02) -> list[Job]:
    """Map-reduce and debate trees with prompts of tens of words, arriving ``gap_s`` apart."""
    rng = np.random.default_rng(0)
    generators = [MapReduce(fan_out=3, **SMALL)] * num_mapreduce + [
        Debate(num_agents=2, num_rounds=2, **SMALL)
    ] * num_debate
    return [gen.sample(rng, f"j{i}", i * gap_s) for i, gen in enumerate(generators)]
