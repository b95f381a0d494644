"""The paged KV cache of one replica: fixed-size blocks, reference counts, prefix caching by
chained block hashes, and a host swap tier.

Bookkeeping follows vLLM V1's block pool. A block is exactly one of: *owned* (ref count > 0),
*cached* (ref count 0 but still holding a hashed prefix that a later call may reuse), or
*empty*. Cached and empty blocks together form the free queue, kept in eviction order:
allocation pops the head and, if that block was cached, drops its hash (that is the eviction).
Every operation is O(1) per block; nothing scans the whole pool.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Protocol


class FreeQueue(Protocol):
    """Eviction order of unreferenced blocks (head = next to reuse). Pluggable: LRU is vLLM's."""

    def push_many(self, blocks: Sequence[int]) -> None: ...
    def pop_many(self, num: int) -> list[int]: ...
    def remove(self, block: int) -> None: ...
    def __len__(self) -> int: ...


class LRUFreeQueue:
    """Least recently freed first. Callers free a call's blocks tail first, so a sequence's
    last blocks are evicted before its shared prefix (vLLM's rule, RFC #2614)."""

    def __init__(self, blocks: Sequence[int]) -> None:
        self._order: OrderedDict[int, None] = OrderedDict.fromkeys(blocks)

    def push_many(self, blocks: Sequence[int]) -> None:
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


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than the free queue holds."""


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        enable_prefix_caching: bool = True,
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
        self.free_queue: FreeQueue = LRUFreeQueue(range(num_blocks))
        self.num_cached_free_blocks = 0  # unreferenced blocks that still hold a reusable prefix
        self.num_evictions = 0
        self.num_allocated_total = 0
        self.num_freed_total = 0

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
        for block in blocks:
            if ref[block] == 0:
                self.free_queue.remove(block)
                self.num_cached_free_blocks -= 1  # prefix hits are always hashed blocks
            ref[block] += 1

    def allocate(self, num: int) -> list[int]:
        """Pop ``num`` blocks from the head of the free queue, evicting cached prefixes."""
        if num > len(self.free_queue):
            raise OutOfBlocks(f"asked for {num} blocks, {len(self.free_queue)} free")
        blocks = self.free_queue.pop_many(num)
        block_hash, ref, cached = self.block_hash, self.ref_count, self.cached
        for block in blocks:
            ref[block] = 1
            old = block_hash[block]
            if old is not None:
                del cached[old]
                block_hash[block] = None
                self.num_evictions += 1
                self.num_cached_free_blocks -= 1
        self.num_allocated_total += num
        return blocks

    def register(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Publish full blocks' hashes so later calls with the same prefix reuse them. A block
        whose content is already cached in another block keeps no hash (the first copy wins)."""
        if not self.enable_prefix_caching:
            return
        block_hash, cached = self.block_hash, self.cached
        for block, h in zip(blocks, hashes, strict=True):
            if block_hash[block] is None and h not in cached:
                cached[h] = block
                block_hash[block] = h

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue tail first.
        A block freed more often than taken is refused before anything changes."""
        ref, block_hash = self.ref_count, self.block_hash
        counts = Counter(blocks) if len(set(blocks)) != len(blocks) else dict.fromkeys(blocks, 1)
        for block, times in counts.items():
            if ref[block] < times:
                raise AssertionError(f"block {block} freed more often than taken")
        released = []
        for block in reversed(blocks):
            ref[block] -= 1
            if ref[block] == 0:
                released.append(block)
                if block_hash[block] is not None:
                    self.num_cached_free_blocks += 1
        self.free_queue.push_many(released)
        self.num_freed_total += len(blocks)

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
        order = getattr(self.free_queue, "_order", None)
        if order is not None:
            in_queue = set(order)
            if len(in_queue) != len(self.free_queue):
                raise AssertionError("free queue holds a block twice")
        for block in range(self.num_blocks):
            free = self.ref_count[block] == 0
            if order is not None and free != (block in in_queue):
                raise AssertionError(
                    f"block {block}: ref {self.ref_count[block]} but queued={block in in_queue}"
                )
        for block_hash, block in self.cached.items():
            if self.block_hash[block] != block_hash:
                raise AssertionError(f"cached hash of block {block} out of sync")
        cached_free = sum(1 for block in self.cached.values() if self.ref_count[block] == 0)
        if cached_free != self.num_cached_free_blocks:
            raise AssertionError(f"cached-free counter {self.num_cached_free_blocks} != {cached_free}")
