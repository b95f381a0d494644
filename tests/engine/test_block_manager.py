"""The paged KV pool: every block owned, cached or empty exactly once, LRU eviction order,
prefix-cache bookkeeping and the host swap tier, checked against an independent model."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from servegym.envs.engine.block_manager import BlockManager, OutOfBlocks


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable about the pool, to assert an operation changed nothing."""
    return (
        list(bm.ref_count),
        list(bm.block_hash),
        dict(bm.cached),
        list(bm.free_queue._order),
        bm.num_cached_free_blocks,
        bm.num_evictions,
        bm.num_allocated_total,
        bm.num_freed_total,
        bm.num_host_used_blocks,
    )


def cached_free(bm: BlockManager) -> int:
    return sum(1 for block in bm.cached.values() if bm.ref_count[block] == 0)


# ---------------------------------------------------------------- construction and queries
@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (-1, 16), (4, 0)])
def test_rejects_empty_pools(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockManager(num_blocks, block_size)


def test_fresh_pool_is_all_free() -> None:
    bm = BlockManager(6, 4)
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    assert bm.ref_count == [0] * 6 and bm.cached == {}
    bm.check_invariants()


def test_allocate_and_free_account_for_every_block() -> None:
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    b = bm.allocate(2)
    assert len(set(a + b)) == 5
    assert bm.num_used_blocks == 5 and bm.num_free_blocks == 3
    assert all(bm.ref_count[x] == 1 for x in a + b)
    bm.free(a)
    assert bm.num_used_blocks == 2 and all(bm.ref_count[x] == 0 for x in a)
    assert bm.num_allocated_total == 5 and bm.num_freed_total == 3
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_freed_total == bm.num_allocated_total
    bm.check_invariants()


def test_out_of_blocks_changes_nothing() -> None:
    bm = BlockManager(4, 4)
    bm.allocate(3)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 1 free"):
        bm.allocate(2)
    assert snapshot(bm) == before


# ---------------------------------------------------------------- LRU order
def test_allocation_pops_the_head() -> None:
    bm = BlockManager(8, 4)
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.allocate(2) == [3, 4]


def test_free_pushes_a_sequence_tail_first() -> None:
    """A call's last blocks are evicted before its prefix (vLLM's rule)."""
    bm = BlockManager(8, 4)
    seq = bm.allocate(4)  # [0, 1, 2, 3]
    rest = bm.allocate(4)
    bm.free(seq)
    assert list(bm.free_queue._order) == [3, 2, 1, 0]
    assert bm.allocate(1) == [3]
    bm.free(rest)  # freed later: behind what is left of seq
    assert bm.allocate(3) == [2, 1, 0]
    assert bm.allocate(4) == list(reversed(rest))


def test_least_recently_freed_is_evicted_first() -> None:
    bm = BlockManager(4, 4)
    x, y = bm.allocate(2), bm.allocate(2)
    bm.register(x, [101, 102])
    bm.register(y, [201, 202])
    bm.free(x)
    bm.free(y)
    evicted = bm.allocate(2)
    assert evicted == list(reversed(x))
    assert 101 not in bm.cached and 102 not in bm.cached
    assert bm.match_prefix([201, 202], 2) == y  # the later-freed prefix survived
    bm.check_invariants()


def test_eviction_drops_the_hash() -> None:
    bm = BlockManager(2, 4)
    [block] = bm.allocate(1)
    bm.register([block], [7])
    bm.free([block])
    assert bm.match_prefix([7], 1) == [block]
    assert bm.num_cached_free_blocks == 1
    bm.allocate(2)  # takes the empty block, then evicts the cached one
    assert bm.cached == {} and bm.block_hash[block] is None
    assert bm.num_evictions == 1 and bm.num_cached_free_blocks == 0
    assert bm.match_prefix([7], 1) == []
    bm.check_invariants()


# ---------------------------------------------------------------- prefix cache
def test_cached_prefix_is_reused_by_take() -> None:
    bm = BlockManager(8, 4)
    seq = bm.allocate(3)
    bm.register(seq, [11, 12, 13])
    bm.free(seq)
    assert bm.num_free_blocks == 8 and bm.num_cached_free_blocks == 3
    hits = bm.match_prefix([11, 12, 13, 14], 4)
    assert hits == seq
    assert bm.num_reclaimed_by_taking(hits) == 3
    bm.take(hits)
    assert bm.num_free_blocks == 5 and all(bm.ref_count[b] == 1 for b in seq)
    assert bm.num_cached_free_blocks == 0
    bm.check_invariants()


def test_shared_block_is_freed_only_by_its_last_owner() -> None:
    bm = BlockManager(4, 4)
    seq = bm.allocate(2)
    bm.register(seq, [1, 2])
    bm.take(bm.match_prefix([1, 2], 2))  # a second call shares the prefix
    assert bm.num_reclaimed_by_taking(seq) == 0
    assert [bm.ref_count[b] for b in seq] == [2, 2]
    assert bm.num_free_blocks == 2  # taking owned blocks costs nothing
    bm.free(seq)
    assert bm.num_free_blocks == 2 and [bm.ref_count[b] for b in seq] == [1, 1]
    bm.free(seq)
    assert bm.num_free_blocks == 4
    assert bm.num_freed_total == bm.num_allocated_total + 2  # two references were taken
    bm.check_invariants()


def test_match_prefix_stops_at_the_first_miss_and_at_max_blocks() -> None:
    bm = BlockManager(8, 4)
    seq = bm.allocate(4)
    bm.register(seq, [1, 2, 3, 4])
    assert bm.match_prefix([1, 2, 99, 4], 4) == seq[:2]
    assert bm.match_prefix([1, 2, 3, 4], 3) == seq[:3]
    assert bm.match_prefix([1, 2, 3, 4], 0) == []
    assert bm.match_prefix([99, 1], 2) == []


def test_first_copy_of_a_content_keeps_the_hash() -> None:
    bm = BlockManager(4, 4)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a, [5])
    bm.register(b, [5])
    assert bm.cached == {5: a[0]} and bm.block_hash[b[0]] is None
    bm.register(a, [6])  # a block keeps its first hash
    assert bm.block_hash[a[0]] == 5 and 6 not in bm.cached
    bm.free(a + b)
    assert bm.num_cached_free_blocks == 1
    bm.check_invariants()


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    seq = bm.allocate(2)
    bm.register(seq, [1, 2])
    assert bm.cached == {} and bm.block_hash == [None] * 4
    bm.free(seq)
    assert bm.match_prefix([1, 2], 2) == [] and bm.num_cached_free_blocks == 0


# ---------------------------------------------------------------- reference counts
def test_freeing_twice_raises() -> None:
    bm = BlockManager(4, 4)
    seq = bm.allocate(2)
    bm.free(seq)
    with pytest.raises(AssertionError, match="freed more often than taken"):
        bm.free(seq[:1])


@pytest.mark.parametrize(
    "case",
    [
        "freed_block_last",  # free() walks the list backwards: it meets the freed block first
        "freed_block_first",  # ... or after releasing the live one
        "live_block_twice",  # one call frees a block more often than it is referenced
    ],
)
def test_refused_free_leaves_the_pool_consistent(case: str) -> None:
    """A free that would drive a ref count negative raises and changes nothing (regression:
    free() used to decrement first, leaving -1 and blocks missing from the free queue)."""
    bm = BlockManager(4, 4)
    live = bm.allocate(1)
    gone = bm.allocate(1)
    bm.free(gone)
    before = snapshot(bm)
    blocks = {
        "freed_block_last": live + gone,
        "freed_block_first": gone + live,
        "live_block_twice": live + live,
    }[case]
    with pytest.raises(AssertionError, match="freed more often than taken"):
        bm.free(blocks)
    assert min(bm.ref_count) >= 0
    bm.check_invariants()
    assert snapshot(bm) == before


# ---------------------------------------------------------------- host tier
def test_host_tier_reserve_and_release() -> None:
    bm = BlockManager(4, 4, num_host_blocks=5)
    assert bm.reserve_host(3) and bm.num_host_used_blocks == 3
    assert not bm.reserve_host(3) and bm.num_host_used_blocks == 3  # full: nothing claimed
    assert bm.reserve_host(2) and bm.num_host_used_blocks == 5
    bm.release_host(5)
    assert bm.num_host_used_blocks == 0
    assert not BlockManager(4, 4).reserve_host(1)  # no tier at all
    assert BlockManager(4, 4).reserve_host(0)


def test_releasing_more_host_blocks_than_reserved_raises() -> None:
    bm = BlockManager(4, 4, num_host_blocks=5)
    bm.reserve_host(2)
    with pytest.raises(AssertionError):
        bm.release_host(3)


# ---------------------------------------------------------------- the checker itself
def _push_owned_block(bm: BlockManager) -> None:
    bm.free_queue.push_many([bm.allocate(1)[0]])


def _drop_free_block(bm: BlockManager) -> None:
    bm.free_queue.remove(3)


def _negative_ref(bm: BlockManager) -> None:
    bm.ref_count[2] = -1


def _hash_out_of_sync(bm: BlockManager) -> None:
    [block] = bm.allocate(1)
    bm.register([block], [9])
    bm.block_hash[block] = 10


def _counter_off(bm: BlockManager) -> None:
    [block] = bm.allocate(1)
    bm.register([block], [9])
    bm.free([block])
    bm.num_cached_free_blocks += 1


@pytest.mark.parametrize(
    "corrupt", [_push_owned_block, _drop_free_block, _negative_ref, _hash_out_of_sync, _counter_off]
)
def test_check_invariants_catches_corruption(corrupt) -> None:
    bm = BlockManager(4, 4)
    bm.check_invariants()
    corrupt(bm)
    with pytest.raises(AssertionError):
        bm.check_invariants()


# ---------------------------------------------------------------- random op sequences
class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / register / take / free / host sequences against a plain model:
    ref counts as a Counter over live block tables, the free queue as an OrderedDict in LRU
    order, the prefix cache as a dict."""

    @initialize(
        num_blocks=st.integers(1, 8),
        num_host_blocks=st.integers(0, 6),
        caching=st.booleans(),
    )
    def setup(self, num_blocks: int, num_host_blocks: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, 4, num_host_blocks, enable_prefix_caching=caching)
        self.tables: list[list[int]] = []  # block table of each live "call"
        self.free_order: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cache: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.taken = 0
        self.evictions = 0
        self.host_used = 0

    def _model_refs(self) -> Counter:
        return Counter(block for table in self.tables for block in table)

    @rule(num=st.integers(0, 14))
    def allocate(self, num: int) -> None:
        if num > len(self.free_order):
            before = snapshot(self.bm)
            with pytest.raises(OutOfBlocks):
                self.bm.allocate(num)
            assert snapshot(self.bm) == before
            return
        expected = list(self.free_order)[:num]  # evicted from the head
        blocks = self.bm.allocate(num)
        assert blocks == expected
        for block in blocks:
            del self.free_order[block]
            if block in self.hash_of:
                del self.cache[self.hash_of.pop(block)]
                self.evictions += 1
            assert self.bm.block_hash[block] is None
        self.tables.append(blocks)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), hashes=st.lists(st.integers(0, 20), max_size=6))
    def register(self, data: st.DataObject, hashes: list[int]) -> None:
        table = data.draw(st.sampled_from(self.tables))
        blocks = table[: len(hashes)]
        hashes = hashes[: len(blocks)]
        self.bm.register(blocks, hashes)
        if self.bm.enable_prefix_caching:
            for block, h in zip(blocks, hashes, strict=True):
                if block not in self.hash_of and h not in self.cache:
                    self.cache[h] = block
                    self.hash_of[block] = h

    @rule(hashes=st.lists(st.integers(0, 20), max_size=6), extra=st.integers(0, 3))
    def take_prefix(self, hashes: list[int], extra: int) -> None:
        """A call admitted with a prefix hit: take the hits, allocate the rest (as _admit)."""
        max_blocks = len(hashes)
        hits = self.bm.match_prefix(hashes, max_blocks)
        expected: list[int] = []
        if self.bm.enable_prefix_caching:
            for h in hashes:
                if h not in self.cache:
                    break
                expected.append(self.cache[h])
        assert hits == expected
        reclaimed = sum(1 for block in hits if block in self.free_order)
        assert self.bm.num_reclaimed_by_taking(hits) == reclaimed
        if not hits or len(self.free_order) - reclaimed < extra:
            return
        self.bm.take(hits)
        self.taken += len(hits)
        for block in hits:
            self.free_order.pop(block, None)
        self.tables.append(hits)
        self.allocate(extra)
        self.tables[-2:] = [self.tables[-2] + self.tables[-1]]

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.tables) - 1))
        table = self.tables.pop(index)
        self.bm.free(table)
        refs = self._model_refs()
        for block in reversed(table):  # tail first
            if refs[block] == 0 and block not in self.free_order:
                self.free_order[block] = None

    @rule(num=st.integers(0, 4))
    def reserve_host(self, num: int) -> None:
        ok = self.host_used + num <= self.bm.num_host_blocks
        assert self.bm.reserve_host(num) == ok
        self.host_used += num if ok else 0

    @precondition(lambda self: self.host_used > 0)
    @rule(data=st.data())
    def release_host(self, data: st.DataObject) -> None:
        num = data.draw(st.integers(1, self.host_used))
        self.bm.release_host(num)
        self.host_used -= num

    @invariant()
    def pool_matches_model(self) -> None:
        bm = self.bm
        bm.check_invariants()
        refs = self._model_refs()
        assert bm.ref_count == [refs[block] for block in range(bm.num_blocks)]
        assert min(bm.ref_count) >= 0
        assert list(bm.free_queue._order) == list(self.free_order)
        assert bm.num_free_blocks == len(self.free_order) == bm.ref_count.count(0)
        assert bm.num_used_blocks == bm.num_blocks - bm.num_free_blocks
        assert bm.cached == self.cache
        assert bm.num_cached_free_blocks == cached_free(bm)
        assert bm.num_evictions == self.evictions
        assert bm.num_allocated_total + self.taken - bm.num_freed_total == sum(bm.ref_count)
        assert bm.num_host_used_blocks == self.host_used

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for table in self.tables:
            self.bm.free(table)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_freed_total == self.bm.num_allocated_total + self.taken


TestBlockManagerMachine = BlockManagerMachine.TestCase
# cheap (about 10 ms an example) and the bugs it hunts need long op sequences: run it longer
TestBlockManagerMachine.settings = settings(
    max_examples=4 * settings.default.max_examples, stateful_step_count=60
)


@pytest.mark.parametrize("order", ["lru", "workflow"])
def test_drop_cache_forgets_every_prefix(order: str) -> None:
    """A replica outage: the device's memory is gone, so no prefix hits are left."""
    bm = BlockManager(8, 4, prefix_eviction=order)
    blocks = bm.allocate(3)
    bm.register(blocks, [11, 12, 13])
    with pytest.raises(AssertionError, match="referenced"):
        bm.drop_cache()
    bm.free(blocks)
    assert bm.match_prefix([11, 12, 13], 3) == blocks and bm.num_cached_free_blocks == 3
    bm.drop_cache()
    bm.check_invariants()
    assert bm.match_prefix([11, 12, 13], 3) == [] and bm.num_cached_free_blocks == 0
    assert bm.num_free_blocks == 8 and not bm.cached
