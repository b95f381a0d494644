"""Per-call engine state as preallocated numpy columns (structure of arrays).

The hot path touches dozens of live calls every iteration; Python objects per call would cost
more than the simulation itself, so each field is a column indexed by an engine call id and
the scheduler works on slices. Block tables and hash chains stay Python lists (their lengths
differ per call and they change only at block boundaries).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class CallState(IntEnum):
    PENDING = 0  # parents or their tools not done yet
    WAITING = 1  # ready, queued on a replica, holds no KV (or only its computed prefix after recompute)
    RUNNING = 2  # scheduled in the replica's running set, holds KV
    SWAPPED = 3  # preempted to the host tier, queued for swap-in
    FINISHED = 4
    REJECTED = 5  # cannot ever run (e.g. larger than the KV cache), or its tree was cut


TERMINAL = (CallState.FINISHED, CallState.REJECTED)

_INT_COLUMNS = (
    "job",  # engine job index
    "call_in_job",
    "replica",
    "state",
    "prompt_tokens",  # resolved when the call becomes ready
    "target_tokens",  # min(true output, role budget): where the call stops
    "max_tokens",
    "true_output_tokens",
    "num_computed",  # tokens whose KV exists
    "num_output",  # tokens generated
    "num_held_blocks",
    "num_registered_blocks",  # leading blocks whose hash is published to the prefix cache
    "num_preemptions",
    "recomputed_tokens",
    "lost_tokens",  # KV tokens dropped by the last recompute preemption, not yet recomputed
    "host_blocks",  # blocks parked in the host tier while swapped
    "cached_prompt_tokens",  # prompt tokens served by the prefix cache at first admission
    "role",
    "depth",
    "pending_parents",
    "prefix_hits",  # while waiting: leading blocks the prefix cache holds (prefix_watch.py)
    "prefix_free_hits",  # while waiting: how many of those sit unreferenced in the free queue
)
_FLOAT_COLUMNS = (
    "ready_s",
    "enqueue_s",  # last time it joined a waiting queue
    "first_token_s",
    "finish_s",
    "release_s",  # earliest time its children may start (max over parents of finish + tool)
    "tool_latency_s",
    "path_service",  # critical-path service (tokens) through this call, for ATLAS
)


class CallTable:
    """Columns for every call the engine has seen, grown by doubling."""

    def __init__(self, capacity: int = 1024) -> None:
        self.size = 0
        self._capacity = capacity
        for name in _INT_COLUMNS:
            setattr(self, name, np.zeros(capacity, dtype=np.int64))
        for name in _FLOAT_COLUMNS:
            setattr(self, name, np.full(capacity, np.nan))
        self.blocks: list[list[int]] = []  # block table per call
        self.segments: list[list[tuple[int, int]]] = []  # prompt as (content key id, tokens)
        self.hashes: list[list[int]] = []  # chained hashes of full blocks computed so far

    def add(self, count: int) -> range:
        """Reserve ``count`` new call ids."""
        while self.size + count > self._capacity:
            self._grow()
        ids = range(self.size, self.size + count)
        self.size += count
        for _ in ids:
            self.blocks.append([])
            self.segments.append([])
            self.hashes.append([])
        return ids

    def _grow(self) -> None:
        new = self._capacity * 2
        for name in _INT_COLUMNS + _FLOAT_COLUMNS:
            old = getattr(self, name)
            fresh = np.zeros(new, dtype=old.dtype) if old.dtype.kind == "i" else np.full(new, np.nan)
            fresh[: self._capacity] = old
            setattr(self, name, fresh)
        self._capacity = new

    def hash_chain(self, call: int, num_blocks: int, block_size: int) -> list[int]:
        """Hashes of the call's first ``num_blocks`` full blocks (prompt then its own output),
        extending a memo. Equal hashes mean equal token prefixes, so they key the prefix cache
        like vLLM's hash(parent hash, block tokens).

        A block's hash identifies the prefix it ends: the segments before the one it ends in
        (chained over their keys and lengths, a few per call), that segment's key and the offset
        of the block's end inside it. Equal prefixes give equal triples and nothing else does
        (up to 64-bit collisions), and the per-block part is one vectorised mix, not a Python
        hash per block."""
        chain = self.hashes[call]
        if len(chain) >= num_blocks:
            return chain
        segments = [seg for seg in self.segments[call] if seg[1] > 0]
        if self.num_output[call] > 0:
            segments.append((-1 - call, int(self.num_output[call])))
        if not segments:
            return chain
        keys = np.array([key for key, _ in segments], dtype=np.int64)
        lengths = np.array([length for _, length in segments], dtype=np.int64)
        ends = np.cumsum(lengths)
        stop = min(num_blocks, int(ends[-1]) // block_size)
        if stop <= len(chain):
            return chain
        bases = np.empty(len(segments), dtype=np.int64)
        base = 0
        for j, segment in enumerate(segments):  # chained over whole segments
            bases[j] = base
            base = hash((base, *segment))
        if stop - len(chain) <= _SCALAR_BLOCKS:  # a few blocks (a decode's): numpy costs more
            ends_list, bases_list = ends.tolist(), bases.tolist()
            j = 0
            for block in range(len(chain) + 1, stop + 1):
                end = block * block_size
                while ends_list[j] < end:
                    j += 1
                key, length = segments[j]
                chain.append(_block_hash(bases_list[j], key, end - (ends_list[j] - length)))
            return chain
        block_ends = np.arange(len(chain) + 1, stop + 1, dtype=np.int64) * block_size
        j = np.searchsorted(ends, block_ends, side="left")  # the segment each block ends in
        offsets = block_ends - (ends[j] - lengths[j])
        chain.extend(_block_hashes(bases[j], keys[j], offsets).tolist())
        return chain


_SCALAR_BLOCKS = 8
"""Extensions of at most this many blocks hash in Python (the same values as numpy's)."""
_MASK = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _block_hash(base: int, key: int, offset: int) -> int:
    """``_block_hashes`` for one block, on Python ints."""
    mixed = _splitmix64_int((base & _MASK) ^ _splitmix64_int(key & _MASK))
    out = _splitmix64_int((mixed + offset) & _MASK)
    return out - (1 << 64) if out >= 1 << 63 else out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic): a bijective 64-bit mix."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _block_hashes(bases: np.ndarray, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n,) int64 hashes of (segment base, segment key, end offset) triples."""
    mixed = _splitmix64(bases.view(np.uint64) ^ _splitmix64(keys.view(np.uint64)))
    return _splitmix64(mixed + offsets.view(np.uint64)).view(np.int64)
