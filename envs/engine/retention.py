"""KV retention: what becomes of a finished call's KV, which its children will often reuse.

An agent's next call usually starts with its parent's prompt and output, but arrives only after
the parent's tool returns; by then plain LRU may have evicted the parent's blocks. Two remedies,
both off by default (``EngineConfig.pin_ttl_rule``, ``prefix_eviction``):

- **Next use (KVFlow).** A finished call's blocks are freed with the step of their next use, from
  the tree's known structure: the prefix a child reuses ``NEXT``, the role's shared system prompt
  ``SHARED``, the rest ``NEVER``; ``prefix_eviction=workflow`` evicts in that order.
- **TTL pins (Continuum).** The prefix the children reuse stays referenced by a pin for a TTL:
  until every child was admitted on that replica, the TTL expired (an UNPIN event of the
  engine) or memory ran short (the scheduler drops pins oldest first rather than preempt or
  stall). The TTL comes from ``pin_ttl_rule``, or with ``policy`` from a RETAIN decision.

``Retention`` is the engine's side (what to keep, for how long); ``Pins`` is one replica's
bookkeeping of what is held.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import numpy as np

from servegym.envs.engine.block_manager import BlockManager, NextUse
from servegym.envs.engine.jobs import Trees
from servegym.envs.engine.policy import Decision
from servegym.envs.workloads.job import Output

if TYPE_CHECKING:
    from servegym.envs.engine.scheduler import Replica

RetainAsker = Callable[["Replica", int, int, int], Decision]
"""(replica, finished call, its children, blocks a pin would hold) -> the RETAIN decision, built
once the engine is current (the engine's ``_retain_decision``)."""


class Pins(dict[int, list[int]]):
    """One replica's TTL pins, oldest first: finished call -> the blocks its pin references
    (cached blocks, one reference each), and which children each pin still waits for."""

    def __init__(self, block_manager: BlockManager) -> None:
        super().__init__()
        self.block_manager = block_manager
        self.waiters: dict[int, set[int]] = {}  # pinned call -> children not yet admitted
        self.of_child: dict[int, list[int]] = {}  # child -> pinned parents waiting for it
        self.num_pinned = 0  # pins ever taken
        self.num_dropped = 0  # released early under memory pressure

    def pin(self, call: int, blocks: list[int], children: list[int]) -> None:
        """Hold ``blocks`` (already referenced) for ``children`` of the finished ``call``."""
        self[call] = blocks
        self.waiters[call] = set(children)
        for child in children:
            self.of_child.setdefault(child, []).append(call)
        self.num_pinned += 1

    def unpin(self, call: int) -> bool:
        """Release a pin to the prefix cache (cached-free, next use NEXT); False if none held."""
        blocks = self.pop(call, None)
        if blocks is None:
            return False
        for child in self.waiters.pop(call):
            parents = self.of_child.get(child)
            if parents is not None:
                parents.remove(call)
                if not parents:
                    del self.of_child[child]
        self.block_manager.free(blocks, [NextUse.NEXT] * len(blocks))
        return True

    def admitted(self, child: int) -> None:
        """``child`` was admitted here: a pin whose every child was admitted is released."""
        for parent in self.of_child.pop(child, ()):
            waiters = self.waiters.get(parent)
            if waiters is not None:
                waiters.discard(child)
                if not waiters:
                    self.unpin(parent)

    def drop_oldest(self) -> None:
        """Release the oldest pin early (memory is short): counted in ``num_dropped``."""
        self.unpin(next(iter(self)))
        self.num_dropped += 1

    def drop_until_free(self, need_free_blocks: int) -> None:
        """Drop pins, oldest first, until ``need_free_blocks`` are allocatable or none is left."""
        while self and self.block_manager.num_free_blocks < need_free_blocks:
            self.drop_oldest()


class Retention:
    """The engine's side of KV retention: the next use of a finished call's blocks, and
    whether and for how long its children's prefix is pinned."""

    def __init__(self, trees: Trees, ask: RetainAsker) -> None:
        self.trees = trees  # the tree structure: which children reuse a call's KV, and how much
        self.calls = trees.calls
        self.stats = trees.stats
        self.network_delay_s = trees.cluster.network_delay_s
        self.ask = ask

    def release(self, replica: Replica, call: int) -> Generator[Decision, np.ndarray, float | None]:
        """Free a finished call's blocks with their next use (KVFlow), keeping the prefix its
        children reuse pinned (Continuum) when pinning is on; with ``pin_ttl_rule=policy`` the
        TTL is a RETAIN decision, asked only when there is a prefix to keep for a child.
        Returns the pin's TTL (the engine schedules its expiry), or None when nothing is pinned."""
        cfg, calls, bs = replica.config, self.calls, replica.config.block_size
        if cfg.pin_ttl_rule == "off" and cfg.prefix_eviction == "lru":
            replica.release_blocks(call)
            return None
        children, reuse_tokens, system_tokens = self.reuse(call)
        reuse_blocks, system_blocks = reuse_tokens // bs, system_tokens // bs
        held = int(calls.num_held_blocks[call])
        levels = [
            NextUse.NEXT if i < reuse_blocks else NextUse.SHARED if i < system_blocks else NextUse.NEVER
            for i in range(held)
        ]
        ttl_s = 0.0
        if children and reuse_blocks:
            ttl_s = yield from self._pin_ttl_s(replica, call, len(children), reuse_blocks)
        pinned = replica.release_blocks(call, levels, reuse_blocks if ttl_s > 0 else 0)
        if not pinned:
            return None
        replica.pins.pin(call, pinned, children)
        return ttl_s

    def reuse(self, call: int) -> tuple[list[int], int, int]:
        """The call's children and, from the tree's known structure, how many of its leading
        tokens the children's prompts repeat (the most over children) and how many its first
        segment (a role's system prompt, shared across trees) covers."""
        calls, trees = self.calls, self.trees
        job_index = int(calls.job[call])
        spec = trees.spec(call)
        lengths = [n for _, n in calls.segments[call]] + [int(calls.num_output[call])]
        own = (*spec.prompt, Output(spec.call_id))
        tree_children = trees.table.children[job_index]
        assert tree_children is not None  # released only once every call of the tree is terminal
        children = [trees.call_id(job_index, c) for c in tree_children[spec.call_id]]
        reuse = 0
        for child in children:
            prompt = trees.spec(child).prompt
            shared = 0
            while shared < min(len(own), len(prompt)) and own[shared] == prompt[shared]:
                shared += 1
            reuse = max(reuse, sum(lengths[:shared]))
        return children, reuse, lengths[0] if spec.prompt else 0

    def _pin_ttl_s(
        self, replica: Replica, call: int, children: int, reuse_blocks: int
    ) -> Generator[Decision, np.ndarray, float]:
        """How long to pin the first ``reuse_blocks`` blocks of a finished call for its
        ``children``: by ``pin_ttl_rule``, or with ``policy`` the option a RETAIN decision picks."""
        cfg = replica.config
        if cfg.pin_ttl_rule == "off":
            return 0.0
        if cfg.pin_ttl_rule == "policy":
            pin_blocks = min(reuse_blocks, int(self.calls.num_computed[call]) // cfg.block_size)
            scores = yield self.ask(replica, call, children, pin_blocks)
            return float(cfg.retain_ttls_s[int(np.argmax(scores))])
        if cfg.pin_ttl_rule == "fixed":
            return cfg.pin_ttl_s
        if cfg.pin_ttl_rule == "oracle":
            predicted = float(self.calls.tool_latency_s[call]) + self.network_delay_s
        else:
            mean, count = self.stats.observed_tool_pause_s(int(self.calls.role[call]))
            predicted = mean + self.network_delay_s if count else 0.0
        return predicted + cfg.pin_ttl_s
