"""Block hashes: equal chains mean equal token prefixes, and reused chains equal fresh ones."""

from __future__ import annotations

import numpy as np

from servegym.agents.policies.heuristics import FCFS
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
    tables = [CallTable(capacity=4), CallTable(capacity=4)]
    for table in tables:
        (call,) = table.add(1)
        table.segments[call] = [(1, 100), (2, 77)]
        table.num_output[call] = 60
    whole = list(tables[0].hash_chain(0, 14, 16))
    for n in (1, 5, 11, 14):
        tables[1].hash_chain(0, n, 16)
    assert tables[1].hashes[0] == whole


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


def test_outputs_of_different_calls_never_share_hashes() -> None:
    """Each call's output is its own content, even after identical prompts. (Calls 0 and 1
    once shared them: CPython hashes -1 and -2, their output keys, to the same value.)"""
    table = CallTable(capacity=4)
    ids = table.add(3)
    for call in ids:
        table.segments[call] = [(0, 40)]
        table.num_output[call] = 40
    chains = [table.hash_chain(call, 5, 16) for call in ids]
    assert chains[0][:2] == chains[1][:2] == chains[2][:2]  # the shared prompt's blocks
    for i in ids:
        for j in ids:
            if i != j:
                assert not set(chains[i][2:]) & set(chains[j]), f"calls {i} and {j} share output blocks"


def test_short_extensions_hash_like_long_ones() -> None:
    """A chain grown a block at a time equals one hashed at once."""
    tables = [CallTable(capacity=2), CallTable(capacity=2)]
    for table in tables:
        (call,) = table.add(1)
        table.segments[call] = [(5, 37), (-3, 250), (6, 90)]
        table.num_output[call] = 200
    whole = list(tables[0].hash_chain(0, 36, 16))
    for n in range(1, 37):
        tables[1].hash_chain(0, n, 16)
    assert tables[1].hashes[0] == whole and len(whole) == 36
