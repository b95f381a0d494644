"""What an engine iteration costs. The engine decides *what* runs; a backend says *how long*
it took. The simulated backend predicts it from a cost model; the torch backend (a later
issue) runs the batch for real and measures it. Both see the same ``Batch``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from servegym.envs.engine.cost_model import CostModel, ModelProfile


@dataclass
class Batch:
    """One iteration's work on one replica, or a run of ``num_iterations`` identical
    decode-only iterations when the engine fast-forwards."""

    calls: np.ndarray  # (B,) call ids, decodes first then prefill chunks
    num_new_tokens: np.ndarray  # (B,) tokens computed per call in the first iteration
    remaining_tokens: np.ndarray  # (B,) known tokens not yet computed before the batch
    tokens_total: np.ndarray  # (B,) tokens computed per call over all the batch's iterations
    num_decodes: int
    prefill_tokens: int
    prefill_attn_tokens: float
    kv_read_tokens: int
    swap_bytes: float = 0.0
    num_iterations: int = 1
    duration_s: float = 0.0
    kv_used_block_s: float = 0.0  # integral of owned blocks over the batch's time
    end_s: float = 0.0  # virtual time at which the batch's last iteration ends
    first_end_s: float = 0.0  # ... and its first (first tokens of prefills appear then)
    fast_forwardable: bool = False  # decode-only with nothing else to do: may be folded


class Backend(Protocol):
    supports_fast_forward: bool

    def iteration_time_s(self, batch: Batch) -> float: ...

    def iteration_time_s_decode(self, num_decodes: int, kv_read_tokens: int) -> float:
        """Duration of one decode-only iteration (a lower bound for the ones after it)."""
        ...

    def decode_run_times_s(self, num_decodes: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        """Durations of consecutive decode-only iterations (vectorised fast-forward)."""
        ...


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

    def iteration_time_s_decode(self, num_decodes: int, kv_read_tokens: int) -> float:
        return float(self.cost.iteration_time_s(0, 0.0, num_decodes, kv_read_tokens, 0.0))

    def decode_run_times_s(self, num_decodes: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        return self.cost.decode_run_times_s(num_decodes, kv_read_tokens)
