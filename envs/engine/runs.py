"""Folded decode runs: many decode-only iterations of one replica as one ``Batch``, in closed form.

When nothing else can happen on a replica until some event (nothing was preempted, every
running call is in the batch with all its known tokens computed, and no waiting call could be
admitted), stepping iteration by iteration only repeats the same decodes. The scheduler marks
such a batch ``fast_forwardable``; ``fold`` extends it into a run that lasts until a call
completes or the blocks run out. An event that touches the replica meanwhile splits the run
where stepping would have been (``iterations_done``, ``truncate``), and tokens are applied
lazily (``apply_tokens``). Every result equals stepping one iteration at a time, bit for bit
(the golden runs pin it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from servegym.envs.engine.backend import Batch
from servegym.envs.engine.calls import CallTable

if TYPE_CHECKING:
    from servegym.envs.engine.scheduler import Replica

MAX_FAST_FORWARD_ITERATIONS = 4096
"""Longest decode run folded at once (bounds the size of the vectorised arrays)."""


def fold(batch: Batch, replica: Replica, now_s: float, dt0: float) -> None:
    """Extend a timed, fast-forwardable batch (iteration 0, lasting ``dt0``) into a run of the
    decode iterations after it, ``MAX_FAST_FORWARD_ITERATIONS`` at most.

    In iteration k >= 1 every call decodes, writing KV slot ``c1 + k - 1`` and reading
    ``c1 + k`` tokens, where ``c1`` is its computed count after iteration 0. Times are summed
    sequentially (``cumsum``), exactly as stepping adds them, so both paths give bit-identical
    clocks. Blocks of later iterations are taken lazily (``Replica.take_run_blocks``), in
    stepping's order (iteration, then running order)."""
    calls, bs = replica.calls, replica.config.block_size
    ids = np.array(replica.running, dtype=np.int64)  # stepping schedules decodes in running order
    n = min(int((calls.target_tokens[ids] - calls.num_output[ids]).min()), MAX_FAST_FORWARD_ITERATIONS)
    if n <= 1:
        return
    if np.array_equal(batch.calls, ids):
        grant = batch.num_new_tokens
    else:
        sort = np.argsort(batch.calls)
        grant = batch.num_new_tokens[sort[np.searchsorted(batch.calls[sort], ids)]]
    c1 = calls.num_computed[ids] + grant
    num = len(ids)
    # iteration k >= 1 takes a new block for each call whose KV slot c1 + k - 1 opens one
    first = (1 - c1) % bs
    first[first == 0] = bs
    free = replica.blocks.num_free_blocks
    if num * (1 + (n - 1) // bs) > free:  # a shortage is possible: stop before it
        k = np.arange(1, n, dtype=np.int64)
        per_k = np.zeros(n, dtype=np.int64)
        per_k[1:] = np.bincount(first % bs, minlength=bs)[k % bs]
        n = int(np.searchsorted(np.cumsum(per_k), free, side="right"))
        if n <= 1:
            return
    k = np.arange(1, n, dtype=np.int64)
    batch.decode_times_s = replica.backend.decode_run_times_s(num, int(c1.sum()) + k * num)
    if replica.slowdown != 1.0:
        batch.decode_times_s = batch.decode_times_s * replica.slowdown
    batch.starts = np.cumsum(np.concatenate(([now_s, dt0], batch.decode_times_s)))
    counts = np.where(first <= n - 1, (n - 1 - first) // bs + 1, 0)
    total = int(counts.sum())
    if total:
        owner = np.repeat(np.arange(num), counts)
        offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        when = np.repeat(first, counts) + offset * bs
        order = np.lexsort((owner, when))
        batch.block_when, batch.block_owner = when[order], ids[owner[order]]
    batch.calls = ids
    batch.num_new_tokens = batch.remaining_tokens = grant  # a run's first iteration completes them
    batch.num_iterations = n


def iterations_done(batch: Batch, time_s: float, before_ties: bool) -> int:
    """Iterations of the run that stepping would have completed before an event at
    ``time_s`` (``before_ties``: an iteration ending exactly then completes first)."""
    side: Literal["left", "right"] = "right" if before_ties else "left"
    return int(np.searchsorted(batch.starts[1 : batch.num_iterations + 1], time_s, side=side))


def truncate(batch: Batch, iterations: int) -> None:
    """Cut the run to its first ``iterations`` iterations (the last one is in flight)."""
    if iterations >= batch.num_iterations:
        return
    batch.num_iterations = iterations
    keep = int(np.searchsorted(batch.block_when, iterations, side="left"))
    batch.block_when, batch.block_owner = batch.block_when[:keep], batch.block_owner[:keep]


def apply_tokens(calls: CallTable, batch: Batch, upto: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Apply the tokens of iterations ``batch.applied`` .. ``upto - 1`` to the call table;
    returns (tokens computed, tokens generated) per batch call, or None if none was due."""
    steps = upto - batch.applied
    if steps <= 0:
        return None
    ids = batch.calls
    if batch.applied == 0:
        # iteration 0: a token is sampled where all known tokens are now computed (a
        # finished prefill or a decode); every later iteration of a run is all decodes
        tokens = batch.num_new_tokens + (steps - 1)
        sampled = batch.num_new_tokens == batch.remaining_tokens
        calls.first_token_s[ids[sampled & (calls.num_output[ids] == 0)]] = batch.starts[1]
        outputs = sampled + (steps - 1)
    else:
        tokens = outputs = np.full(len(ids), steps, dtype=np.int64)
    calls.num_computed[ids] += tokens
    calls.num_output[ids] += outputs
    batch.applied = upto
    return tokens, outputs
