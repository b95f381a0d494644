"""What an engine iteration costs. The engine decides *what* runs; a backend says *how long*
it took. The simulated backend predicts it from a cost model; the torch backend
(``torch_backend.py``) runs the batch for real and measures it. Both see the same ``Batch``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from servegym.envs.engine.cost_model import CostModel, ModelProfile

if TYPE_CHECKING:
    from servegym.envs.engine.calls import CallTable
    from servegym.envs.engine.config import EngineConfig


@dataclass
class Batch:
    """One iteration's work on one replica, or a run of ``num_iterations`` identical
    decode-only iterations when the engine fast-forwards."""

    calls: np.ndarray  # (B,) call ids, decodes first then prefill chunks
    num_new_tokens: np.ndarray  # (B,) tokens computed per call in the first iteration
    remaining_tokens: np.ndarray  # (B,) known tokens not yet computed before the batch
    num_decodes: int
    prefill_tokens: int
    prefill_attn_tokens: float
    kv_read_tokens: int
    swap_bytes: float = 0.0
    fast_forwardable: bool = False  # the iterations after this one may be folded into it
    # Set by Replica.time_batch. A folded run of ``num_iterations`` iterations: iteration 0 is
    # the scheduled batch, later ones are decodes of every call, in ``calls`` order.
    num_iterations: int = 1
    starts: np.ndarray = field(default_factory=lambda: np.zeros(2))  # (n + 1,) iteration boundaries
    decode_times_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n - 1,) iterations 1..
    applied: int = 0  # iterations whose tokens are applied to the call table
    block_when: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # iteration of each
    block_owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # deferred block
    blocks_taken: int = 0  # deferred blocks allocated so far
    used_blocks_0: int = 0  # owned blocks during iteration 0

    @classmethod
    def from_calls(cls, calls: CallTable, order: list[int], grants: list[int], swap_bytes: float) -> Batch:
        """The batch that computes ``grants[i]`` tokens of call ``order[i]`` (the cost model's
        inputs derived from the call table, before the tokens are applied)."""
        ids = np.array(order, dtype=np.int64)
        new = np.array(grants, dtype=np.int64)
        computed = calls.num_computed[ids]
        remaining = calls.prompt_tokens[ids] + calls.num_output[ids] - computed
        is_decode = remaining == 1
        prefill_new = new[~is_decode]
        prefill_ctx = computed[~is_decode]
        return cls(
            calls=ids,
            num_new_tokens=new,
            remaining_tokens=remaining,
            num_decodes=int(np.count_nonzero(is_decode)),
            prefill_tokens=int(prefill_new.sum()),
            prefill_attn_tokens=float((prefill_new * (prefill_ctx + (prefill_new + 1) / 2)).sum()),
            kv_read_tokens=int((computed[is_decode] + 1).sum() + prefill_ctx.sum()),
            swap_bytes=swap_bytes,
        )

    @property
    def start_s(self) -> float:
        return float(self.starts[0])

    @property
    def end_s(self) -> float:
        return float(self.starts[self.num_iterations])


class Backend(Protocol):
    supports_fast_forward: bool

    def iteration_time_s(self, batch: Batch) -> float: ...

    def decode_run_times_s(self, num_decodes: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        """Durations of consecutive decode-only iterations (vectorised fast-forward)."""
        ...


class SwapListener(Protocol):
    """Told by the scheduler when a call's KV moves between tiers (the torch backend copies it):
    ``swap_out`` before the call's blocks are freed, ``swap_in`` once its new blocks are set
    (its first ``num_hit_blocks`` blocks came from the prefix cache and need no copy)."""

    def swap_out(self, call: int) -> None: ...
    def swap_in(self, call: int, num_hit_blocks: int) -> None: ...
    def drop(self, call: int) -> None: ...  # a replica outage: its KV and host copy are lost, and

    # so are the tokens of the iteration in flight (the engine never applied them)


def make_backend_factory(config: EngineConfig) -> Callable[[ModelProfile], Backend]:
    """The backend of each replica, by ``engine.backend``: sim, or torch (imported only then)."""
    if config.backend == "torch":
        from servegym.envs.engine.torch_backend import TorchBackendFactory

        return TorchBackendFactory(config)
    return SimBackend


class SimBackend:
    """Iteration time from the roofline cost model of a profile; never reads a clock."""

    supports_fast_forward = True

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        self.cost = CostModel(profile)

    def iteration_time_s(self, batch: Batch) -> float:
        return float(
            self.cost.iteration_time_s(
                batch.prefill_tokens,
                batch.prefill_attn_tokens,
                batch.num_decodes,
                batch.kv_read_tokens,
                batch.swap_bytes,
            )
        )

    def decode_run_times_s(self, num_decodes: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        return self.cost.decode_run_times_s(num_decodes, kv_read_tokens)
