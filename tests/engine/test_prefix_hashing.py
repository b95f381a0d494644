"""Block hashes: equal chains mean equal token prefixes, and reused chains equal fresh ones."""

from __future__ import annotations

import numpy as np

from servegym.agents.heuristics import FCFS
from servegym.envs.engine.calls import CallTable
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.engine import Engine
from servegym.envs.workloads.generators import Debate, ReactChain
from servegym.envs.workloads.workload import Workload


def test_same_content_same_hashes_regardless_of_segment_split() -> None:
    table = CallTable(capacity=4)
    a, b, c = table.add(3)
    table.segments[a] = [(7, 40), (8, 30)]
    table.segments[b] = [(7, 40), (8, 30), (9, 50)]
    table.segments[c] = [(7, 39), (8, 31)]
    assert table.hash_chain(b, 4, 16)[:4] == table.hash_chain(a, 4, 16)
    chain_c = table.hash_chain(c, 4, 16)
    assert chain_c[:2] == table.hash_chain(a, 2, 16)[:2]  # the first 32 tokens are key 7 in both
    assert chain_c[2] != table.hashes[a][2]  # block 2 straddles the boundary at a different place


def test_chains_extend_incrementally_to_the_same_result() -> None:
    table = CallTable(capacity=4)
    a, b = table.add(2)
    for call in (a, b):
        table.segments[call] = [(1, 100), (2, 77)]
    table.num_output[a] = table.num_output[b] = 60
    whole = list(table.hash_chain(a, 14, 16))
    for n in (1, 5, 11, 14):
        table.hash_chain(b, n, 16)
    assert table.hashes[b] == whole


def test_inherited_chains_equal_chains_hashed_from_scratch() -> None:
    for generator in (ReactChain(), Debate()):
        engine = Engine(
            Workload(generator=generator, arrival_rate=2.0, num_jobs=8).build(5),
            engine=EngineConfig(profile="llama8b_h100"),
        )
        engine.run(FCFS())
        calls = engine.calls
        checked = 0
        for call in range(calls.size):
            chain = calls.hashes[call]
            if not chain:
                continue
            again = CallTable(capacity=4)
            (copy,) = again.add(1)
            again.segments[copy] = list(calls.segments[call])
            again.num_output[copy] = calls.num_output[call]
            # the copy's own-output key differs, so compare only blocks inside the prompt
            prompt_blocks = int(calls.prompt_tokens[call]) // 16
            n = min(len(chain), prompt_blocks)
            assert again.hash_chain(copy, n, 16)[:n] == chain[:n], f"call {call}"
            checked += n
        assert checked > 100
        assert np.isfinite(engine.metrics().jct_mean_s)
