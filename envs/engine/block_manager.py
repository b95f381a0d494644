"""The paged KV cache of one replica: fixed-size blocks, reference counts, prefix caching by
chained block hashes, and a host swap tier.

Bookkeeping follows vLLM V1's block pool. A block is exactly one of: *owned* (ref count > 0),
*cached* (ref count 0 but still holding a hashed prefix that a later call may reuse), or
*empty*. Cached and empty blocks together form the free queue, kept in eviction order:
allocation pops the head and, if that block was cached, drops its hash (that is the eviction).
Every operation is O(1) per block; nothing scans the whole pool.

Two eviction orders (``EngineConfig.prefix_eviction``): ``lru`` (vLLM's) and ``workflow``
(KVFlow's steps-to-execution order): each freed block carries a next-use level chosen by the
engine from its tree's known structure, and the block whose next use is furthest is evicted
first, LRU among equals. A reference held by a TTL pin (``Replica.pins``) is an ordinary
reference: a pinned block is owned, never in the free queue.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import Protocol


class NextUse(IntEnum):
    """When a freed block is next needed (KVFlow's steps-to-execution, bucketed); the
    workflow queue evicts the highest level first. ``lru`` ignores levels."""

    NEXT = 0  # a queued or about-to-be-ready call of its tree reuses it (one step away)
    SHARED = 1  # a role's system prompt: any later call of that role may reuse it
    NEVER = 2  # nothing known will reuse it (its tree has moved on or finished)
    EMPTY = 3  # holds no hash: reusing it costs nothing


class CacheListener(Protocol):
    """Told of every change that can alter a prefix match: hashes entering the cache, a cached
    block evicted (while still unreferenced), blocks leaving or joining the free queue.
    ``prefix_watch.PrefixWatch`` keeps the waiting calls' hits current from these."""

    def registered(self, hashes: list[int]) -> None: ...
    def evicted(self, blocks: list[int]) -> None: ...
    def owned(self, blocks: list[int]) -> None: ...
    def released(self, blocks: list[int]) -> None: ...


class FreeQueue(Protocol):
    """Eviction order of unreferenced blocks (head = next to reuse). Pluggable: LRU is vLLM's."""

    uses_levels: bool  # whether push_many reads levels (the caller may skip building them)

    def push_many(self, blocks: Sequence[int], levels: Sequence[int] | None = None) -> None: ...
    def pop_many(self, num: int) -> list[int]: ...
    def remove(self, block: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...


class LRUFreeQueue:
    """Least recently freed first. Callers free a call's blocks tail first, so a sequence's
    last blocks are evicted before its shared prefix (vLLM's rule, RFC #2614)."""

    uses_levels = False

    def __init__(self, blocks: Sequence[int]) -> None:
        self._order: OrderedDict[int, None] = OrderedDict.fromkeys(blocks)

    def push_many(self, blocks: Sequence[int], levels: Sequence[int] | None = None) -> None:
        order = self._order
        for block in blocks:
            order[block] = None

    def pop_many(self, num: int) -> list[int]:
        popitem = self._order.popitem
        return [popitem(last=False)[0] for _ in range(num)]

    def remove(self, block: int) -> None:
        del self._order[block]

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)


class WorkflowFreeQueue:
    """KVFlow's eviction order: one LRU bucket per ``NextUse`` level, popped from the furthest
    next use (``EMPTY``, then ``NEVER``, ``SHARED``, ``NEXT``); least recently freed first
    within a bucket. A block pushed without a level counts as ``NEVER``."""

    uses_levels = True

    def __init__(self, blocks: Sequence[int]) -> None:
        self._buckets: list[OrderedDict[int, None]] = [OrderedDict() for _ in NextUse]
        self._level: dict[int, int] = {}
        self.push_many(blocks, [NextUse.EMPTY] * len(blocks))

    def push_many(self, blocks: Sequence[int], levels: Sequence[int] | None = None) -> None:
        buckets, level_of = self._buckets, self._level
        for i, block in enumerate(blocks):
            level = NextUse.NEVER if levels is None else levels[i]
            buckets[level][block] = None
            level_of[block] = level

    def pop_many(self, num: int) -> list[int]:
        out: list[int] = []
        for bucket in reversed(self._buckets):
            while bucket and len(out) < num:
                out.append(bucket.popitem(last=False)[0])
            if len(out) == num:
                break
        for block in out:
            del self._level[block]
        return out

    def remove(self, block: int) -> None:
        del self._buckets[self._level.pop(block)][block]

    def __len__(self) -> int:
        return len(self._level)

    def __iter__(self) -> Iterator[int]:
        return iter(self._level)


PREFIX_EVICTION_ORDERS: dict[str, Callable[[Sequence[int]], FreeQueue]] = {
    "lru": LRUFreeQueue,
    "workflow": WorkflowFreeQueue,
}
_NEVER, _EMPTY = int(NextUse.NEVER), int(NextUse.EMPTY)  # plain ints: enum lookups cost on hot paths
"""Values of ``EngineConfig.prefix_eviction``."""


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than the free queue holds."""


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
        prefix_eviction: str = "lru",
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self.num_host_used_blocks = 0
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_eviction = prefix_eviction
        self.free_queue: FreeQueue = PREFIX_EVICTION_ORDERS[prefix_eviction](range(num_blocks))
        self.num_cached_free_blocks = 0  # unreferenced blocks that still hold a reusable prefix
        self.num_evictions = 0
        self.num_allocated_total = 0
        self.num_freed_total = 0
        self.num_taken_total = 0  # prefix-hit references taken (allocated + taken - freed = held)
        self.listener: CacheListener | None = None

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take right now (empty plus evictable cached)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def match_prefix(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Longest run of leading blocks already cached (owned or not), at most ``max_blocks``."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        cached = self.cached
        for block_hash in hashes[:max_blocks]:
            block = cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_reclaimed_by_taking(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` sit in the free queue (taking them shrinks it)."""
        ref = self.ref_count
        return sum(1 for block in blocks if ref[block] == 0)

    # -- mutations -----------------------------------------------------------------------
    def take(self, blocks: Sequence[int]) -> None:
        """Add a reference to prefix-hit blocks, pulling unreferenced ones out of the free queue."""
        ref = self.ref_count
        owned = []
        for block in blocks:
            if ref[block] == 0:
                self.free_queue.remove(block)
                self.num_cached_free_blocks -= 1  # prefix hits are always hashed blocks
                owned.append(block)
            ref[block] += 1
        self.num_taken_total += len(blocks)
        if owned and self.listener is not None:
            self.listener.owned(owned)

    def allocate(self, num: int) -> list[int]:
        """Pop ``num`` blocks from the head of the free queue, evicting cached prefixes."""
        if num > len(self.free_queue):
            raise OutOfBlocks(f"asked for {num} blocks, {len(self.free_queue)} free")
        blocks = self.free_queue.pop_many(num)
        block_hash, ref, cached = self.block_hash, self.ref_count, self.cached
        evicted = [(block, h) for block in blocks if (h := block_hash[block]) is not None]
        for block, h in evicted:
            del cached[h]
            block_hash[block] = None
        self.num_evictions += len(evicted)
        self.num_cached_free_blocks -= len(evicted)
        if evicted and self.listener is not None:
            self.listener.evicted([block for block, _ in evicted])  # while still unreferenced
        for block in blocks:
            ref[block] = 1
        self.num_allocated_total += num
        return blocks

    def register(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Publish full blocks' hashes so later calls with the same prefix reuse them. A block
        whose content is already cached in another block keeps no hash (the first copy wins)."""
        if not self.enable_prefix_caching:
            return
        block_hash, cached = self.block_hash, self.cached
        added = []
        for block, h in zip(blocks, hashes, strict=True):
            if block_hash[block] is None and h not in cached:
                cached[h] = block
                block_hash[block] = h
                added.append(h)
        if added and self.listener is not None:
            self.listener.registered(added)

    def set_eviction_order(self, prefix_eviction: str) -> None:
        """Switch the free queue's order, keeping its blocks (in their current order)."""
        self.prefix_eviction = prefix_eviction
        queue = PREFIX_EVICTION_ORDERS[prefix_eviction]([])
        hashes = self.block_hash
        blocks = list(self.free_queue)
        queue.push_many(blocks, [NextUse.EMPTY if hashes[b] is None else NextUse.NEVER for b in blocks])
        self.free_queue = queue

    def free(self, blocks: Sequence[int], levels: Sequence[int] | None = None) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue tail first.
        ``levels`` (aligned with ``blocks``) says when each is next needed (``NextUse``; the
        workflow order reads it, LRU ignores it). A block freed more often than taken is
        refused before anything changes."""
        ref, block_hash = self.ref_count, self.block_hash
        if len(set(blocks)) == len(blocks):
            if blocks and min(map(ref.__getitem__, blocks)) < 1:
                bad = next(block for block in blocks if ref[block] < 1)
                raise AssertionError(f"block {bad} freed more often than taken")
        else:
            for block, times in Counter(blocks).items():
                if ref[block] < times:
                    raise AssertionError(f"block {block} freed more often than taken")
        released = []
        released_at = []  # positions in ``blocks`` of the released ones
        for i in range(len(blocks) - 1, -1, -1):
            block = blocks[i]
            left = ref[block] - 1
            ref[block] = left
            if left == 0:
                released.append(block)
                released_at.append(i)
        hashed = [block_hash[block] is not None for block in released]
        self.num_cached_free_blocks += sum(hashed)
        if self.free_queue.uses_levels:
            never, empty = _NEVER, _EMPTY
            released_levels = [
                (never if levels is None else levels[i]) if h else empty
                for i, h in zip(released_at, hashed, strict=True)
            ]
            self.free_queue.push_many(released, released_levels)
        else:
            self.free_queue.push_many(released)
        self.num_freed_total += len(blocks)
        if released and self.listener is not None:
            self.listener.released(released)

    def drop_cache(self) -> None:
        """The device lost its memory (a replica outage): every cached prefix is gone. Needs
        every block unreferenced; the free queue starts over empty-first, as at start."""
        if len(self.free_queue) != self.num_blocks:
            raise AssertionError("drop_cache() with blocks still referenced")
        hashed = [block for block, h in enumerate(self.block_hash) if h is not None]
        if hashed and self.listener is not None:
            self.listener.evicted(hashed)
        self.block_hash = [None] * self.num_blocks
        self.cached.clear()
        self.num_cached_free_blocks = 0
        self.free_queue = PREFIX_EVICTION_ORDERS[self.prefix_eviction](range(self.num_blocks))

    def reserve_host(self, num: int) -> bool:
        """Claim host-tier space for a swap-out; False when the tier is full."""
        if self.num_host_used_blocks + num > self.num_host_blocks:
            return False
        self.num_host_used_blocks += num
        return True

    def release_host(self, num: int) -> None:
        self.num_host_used_blocks -= num
        assert self.num_host_used_blocks >= 0

    def check_invariants(self) -> None:
        """Every block is owned, cached or empty exactly once (used by tests; O(num_blocks))."""
        in_queue = set()
        for block in range(self.num_blocks):
            if self.ref_count[block] < 0:
                raise AssertionError(f"negative ref count on block {block}")
        order = list(self.free_queue)
        in_queue = set(order)
        if len(in_queue) != len(order) or len(order) != len(self.free_queue):
            raise AssertionError("free queue holds a block twice")
        buckets = getattr(self.free_queue, "_buckets", None)
        if buckets is not None and sum(len(b) for b in buckets) != len(order):
            raise AssertionError("workflow free queue: buckets and levels out of sync")
        for block in range(self.num_blocks):
            free = self.ref_count[block] == 0
            if free != (block in in_queue):
                raise AssertionError(
                    f"block {block}: ref {self.ref_count[block]} but queued={block in in_queue}"
                )
        for block_hash, block in self.cached.items():
            if self.block_hash[block] != block_hash:
                raise AssertionError(f"cached hash of block {block} out of sync")
        cached_free = sum(1 for block in self.cached.values() if self.ref_count[block] == 0)
        if cached_free != self.num_cached_free_blocks:
            raise AssertionError(f"cached-free counter {self.num_cached_free_blocks} != {cached_free}")
