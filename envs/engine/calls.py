"""Per-call engine state as preallocated numpy columns (structure of arrays).

The hot path touches dozens of live calls every iteration; Python objects per call would cost
more than the simulation itself, so each field is a column indexed by an engine call id and
the scheduler works on slices. Block tables and hash chains stay Python lists (their lengths
differ per call and they change only at block boundaries).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import numpy.typing as npt


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
    "tool_failures",  # failed attempts of its tool (ClusterConfig.tool_failure_prob)
    "continues",  # the call whose truncated output it continues (EngineConfig.continue_truncated), else -1
)
_FLOAT_COLUMNS = (
    "ready_s",
    "enqueue_s",  # last time it joined a waiting queue
    "first_token_s",
    "finish_s",
    "release_s",  # earliest time its children may start (max over parents of finish + tool)
    "tool_latency_s",  # from its finish to its children's readiness, less network_delay_s:
    # the tool's latency, plus failed attempts' timeouts and network jitter when faults are on
    "path_service",  # critical-path service (tokens) through this call, for ATLAS
)


class CallTable:
    """Columns for every call the engine has seen, grown by doubling."""

    # the columns (set in __init__ from _INT_COLUMNS and _FLOAT_COLUMNS), declared for type checkers
    job: npt.NDArray[np.int64]
    call_in_job: npt.NDArray[np.int64]
    replica: npt.NDArray[np.int64]
    state: npt.NDArray[np.int64]
    prompt_tokens: npt.NDArray[np.int64]
    target_tokens: npt.NDArray[np.int64]
    max_tokens: npt.NDArray[np.int64]
    true_output_tokens: npt.NDArray[np.int64]
    num_computed: npt.NDArray[np.int64]
    num_output: npt.NDArray[np.int64]
    num_held_blocks: npt.NDArray[np.int64]
    num_registered_blocks: npt.NDArray[np.int64]
    num_preemptions: npt.NDArray[np.int64]
    recomputed_tokens: npt.NDArray[np.int64]
    lost_tokens: npt.NDArray[np.int64]
    host_blocks: npt.NDArray[np.int64]
    cached_prompt_tokens: npt.NDArray[np.int64]
    role: npt.NDArray[np.int64]
    depth: npt.NDArray[np.int64]
    pending_parents: npt.NDArray[np.int64]
    prefix_hits: npt.NDArray[np.int64]
    prefix_free_hits: npt.NDArray[np.int64]
    tool_failures: npt.NDArray[np.int64]
    continues: npt.NDArray[np.int64]
    ready_s: npt.NDArray[np.float64]
    enqueue_s: npt.NDArray[np.float64]
    first_token_s: npt.NDArray[np.float64]
    finish_s: npt.NDArray[np.float64]
    release_s: npt.NDArray[np.float64]
    tool_latency_s: npt.NDArray[np.float64]
    path_service: npt.NDArray[np.float64]

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
        (up to 64-bit hash collisions); a block costs one hash of a 3-tuple, with no chain
        through the previous block. Keys enter doubled: CPython hashes -1 like -2, which once
        made calls 0 and 1 (output keys -1 and -2) share their output blocks."""
        chain = self.hashes[call]
        if len(chain) >= num_blocks:
            return chain
        bs = block_size
        segments = [seg for seg in self.segments[call] if seg[1] > 0]
        if self.num_output[call] > 0:
            segments.append((-1 - call, int(self.num_output[call])))
        stop = num_blocks * bs  # the last block end wanted
        base, start = 0, 0
        for key, length in segments:
            end = start + length
            first = max(len(chain) * bs + bs, (start // bs + 1) * bs)  # first block end past start
            last = min(end, stop)
            if first <= last:
                key2 = 2 * key
                chain.extend([hash((base, key2, e - start)) for e in range(first, last + 1, bs)])
            if end >= stop:
                break
            base = hash((base, 2 * key, length))
            start = end
        return chain
