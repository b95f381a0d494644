"""Prefix-cache hits of the calls waiting on one replica, kept current as the cache changes.

Admission asks, every iteration, what each waiting call would take: how many of its leading
blocks the prefix cache holds (hits) and how many of those sit unreferenced in the free queue
(taking them shrinks it). Walking every waiting call's hash chain each iteration costs
O(queue x prompt blocks); in overload that was most of the engine's time. A waiting call's
chain does not change while it waits, and its hits change only when the cache does: a block
registered with the hash the call would hit next extends its run, an evicted block cuts it,
and a hit block entering or leaving the free queue moves the free count. The block manager
reports exactly those events (``CacheListener``), so each costs work only for the calls it
touches and an iteration reads two columns (``CallTable.prefix_hits``,
``CallTable.prefix_free_hits``) instead of walking chains.

``hits(call)`` equals ``BlockManager.match_prefix`` over the same chain and limit at every
moment (a test checks it at every decision of random runs).
"""

from __future__ import annotations

from servegym.envs.engine.block_manager import BlockManager
from servegym.envs.engine.calls import CallTable


class PrefixWatch:
    """Tracks ``match_prefix`` of watched calls incrementally (the block manager's listener)."""

    def __init__(self, blocks: BlockManager, calls: CallTable) -> None:
        self.blocks = blocks
        self.calls = calls
        self._limit: dict[int, int] = {}  # call -> most leading blocks it may hit
        self._hits: dict[int, list[int]] = {}  # call -> its current hits, in chain order
        self._users: list[set[int] | None] = [None] * blocks.num_blocks  # block -> calls hitting it
        self._next: dict[int, set[int]] = {}  # hash -> calls whose run would grow by it
        blocks.listener = self

    # ---------------------------------------------------------------- calls
    def watch(self, call: int, limit_blocks: int) -> None:
        """Start tracking ``call``'s hits over its first ``limit_blocks`` chain hashes."""
        calls = self.calls
        calls.prefix_hits[call] = 0
        calls.prefix_free_hits[call] = 0
        if not self.blocks.enable_prefix_caching:
            limit_blocks = 0
        elif limit_blocks:
            calls.hash_chain(call, limit_blocks, self.blocks.block_size)
        self._limit[call] = limit_blocks
        self._hits[call] = []
        self._extend(call)

    def unwatch(self, call: int) -> None:
        hits = self._hits.pop(call)
        limit = self._limit.pop(call)
        users = self._users
        for block in hits:
            holders = users[block]
            assert holders is not None, "a hit block has its set of users (_extend)"
            holders.discard(call)
        if len(hits) < limit:
            self._discard_next(self.calls.hashes[call][len(hits)], call)

    def hits(self, call: int) -> list[int]:
        """The watched call's current hit blocks (a copy)."""
        return list(self._hits[call])

    def __contains__(self, call: int) -> bool:
        return call in self._hits

    def _extend(self, call: int) -> None:
        """Grow the call's run of hits as far as the cache now allows."""
        chain = self.calls.hashes[call]
        hits, limit = self._hits[call], self._limit[call]
        cached, ref, users = self.blocks.cached, self.blocks.ref_count, self._users
        free = 0
        m = len(hits)
        while m < limit:
            block = cached.get(chain[m])
            if block is None:
                self._next.setdefault(chain[m], set()).add(call)
                break
            hits.append(block)
            holders = users[block]
            if holders is None:
                users[block] = {call}
            else:
                holders.add(call)
            if ref[block] == 0:
                free += 1
            m += 1
        self.calls.prefix_hits[call] = m
        self.calls.prefix_free_hits[call] += free

    def _cut(self, call: int, block: int) -> None:
        """``block`` left the cache: the call's run ends before it."""
        hits, limit = self._hits[call], self._limit[call]
        ref, users = self.blocks.ref_count, self._users
        pos = hits.index(block)
        if len(hits) < limit:
            self._discard_next(self.calls.hashes[call][len(hits)], call)
        free = 0
        for dropped in hits[pos:]:
            holders = users[dropped]
            assert holders is not None, "a hit block has its set of users (_extend)"
            holders.discard(call)
            if ref[dropped] == 0:
                free += 1
        del hits[pos:]
        self.calls.prefix_hits[call] = pos
        self.calls.prefix_free_hits[call] -= free
        self._next.setdefault(self.calls.hashes[call][pos], set()).add(call)

    def _discard_next(self, block_hash: int, call: int) -> None:
        waiting = self._next.get(block_hash)
        if waiting is not None:
            waiting.discard(call)
            if not waiting:
                del self._next[block_hash]

    # ---------------------------------------------------------------- cache events
    def registered(self, hashes: list[int]) -> None:
        """New hashes entered the cache: runs waiting on one of them grow."""
        nxt = self._next
        for block_hash in hashes:
            grow = nxt.pop(block_hash, None)
            if grow:
                for call in grow:
                    self._extend(call)

    def evicted(self, blocks: list[int]) -> None:
        """Cached blocks lost their hashes (called while they are still unreferenced)."""
        users = self._users
        for block in blocks:
            holders = users[block]
            if holders:
                for call in list(holders):
                    self._cut(call, block)

    def owned(self, blocks: list[int]) -> None:
        """Blocks left the free queue by a new reference (prefix hits taken)."""
        self._count_free(blocks, -1)

    def released(self, blocks: list[int]) -> None:
        """Blocks lost their last reference and joined the free queue."""
        self._count_free(blocks, +1)

    def _count_free(self, blocks: list[int], delta: int) -> None:
        """Move the free-hit count of every call hitting one of ``blocks`` by ``delta``."""
        users, free_hits = self._users, self.calls.prefix_free_hits
        for block in blocks:
            holders = users[block]
            if holders:
                for call in holders:
                    free_hits[call] += delta
