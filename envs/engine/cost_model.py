"""Iteration cost model: how long one engine iteration takes on a given model and GPU.

The sim backend asks this module for the duration of each iteration of continuous batching.
It is a roofline: an iteration streams every weight once and the KV it touches (memory time),
and does ``2 * params`` FLOPs per batched token plus the attention score/value FLOPs (compute
time); it takes the longer of the two, plus a fixed host/launch overhead, a tensor-parallel
all-reduce cost per batched token, and any GPU<->host swap traffic (serialised with compute)::

    t = overhead_s + max(compute_s, memory_s) + comm_s_per_token * tokens + swap_bytes / host_link
        + prefill_overhead_s * (prefill_tokens > 0)
    compute_s = (2 * params * tokens + 4 * layers * q_heads * head_dim * prefill_attn_tokens)
                / (tp * peak_flops * flops_efficiency)
    memory_s  = (weight_bytes + kv_bytes_per_token * (kv_read_tokens + tokens)
                 * bandwidth_efficiency / kv_bandwidth_efficiency)
                / (tp * hbm_bytes_per_s * bandwidth_efficiency)   # kv_bandwidth_efficiency 0: the same
    tokens    = prefill_tokens + decode_seqs

Profiles (model shape + GPU datasheet + assumed efficiencies) live in ``profiles/*.yaml``;
``profiles/README.md`` explains each constant and lists the numbers this model gives.
``python -m servegym.envs.engine.cost_model`` prints that table.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import yaml
from numpy.typing import ArrayLike

_T = TypeVar("_T", float, np.ndarray)

_SCALAR_TYPES = (int, float, np.integer, np.floating)

PROFILES_DIR = Path(__file__).parent / "profiles"

ACTIVATION_RESERVE_FRACTION = 0.02
"""Share of each GPU's memory kept out of the KV budget for activations, CUDA graphs and
communication buffers. vLLM measures this with a profiling forward pass; for Llama-3.1-8B on
an H100 at its default 8192 batched tokens it logs about 1.2 GiB of activation peak plus a few
hundred MiB of non-torch memory, i.e. ~2% of the 79 GiB device, which is the fraction used here."""


@dataclass(frozen=True)
class ModelProfile:
    """One model on one GPU type: the constants of the roofline (see ``profiles/README.md``)."""

    name: str
    model: str
    gpu: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    weight_bytes_per_param: float
    kv_bytes_per_elem: float
    tensor_parallel: int
    peak_flops_per_gpu: float
    hbm_bytes_per_s_per_gpu: float
    host_link_bytes_per_s: float
    gpu_mem_bytes_per_gpu: float
    gpu_mem_utilization: float
    overhead_s: float
    flops_efficiency: float
    bandwidth_efficiency: float
    comm_s_per_token: float = 0.0
    prefill_overhead_s: float = 0.0
    kv_bandwidth_efficiency: float = 0.0
    """Achieved bandwidth fraction for KV bytes (attention's reads, new K/V writes); 0: the same as
    ``bandwidth_efficiency``. Paged-attention gathers and weight GEMMs stream memory at different
    rates (on a CPU the weights even sit in cache), which one efficiency cannot fit."""
    source: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "model", "gpu", "source"):
                continue
            if f.name in ("overhead_s", "comm_s_per_token", "prefill_overhead_s", "kv_bandwidth_efficiency"):
                if not value >= 0:
                    raise ValueError(f"profile {self.name!r}: {f.name} must be >= 0, got {value!r}")
            elif not value > 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be > 0, got {value!r}")
        for name in (
            "gpu_mem_utilization",
            "flops_efficiency",
            "bandwidth_efficiency",
            "kv_bandwidth_efficiency",
        ):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"profile {self.name!r}: {name} is a fraction in (0, 1], got {getattr(self, name)!r}"
                )
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"profile {self.name!r}: num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) (grouped-query attention)"
            )

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V for every layer and KV head of one token, summed over all TP shards."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def weight_bytes(self) -> float:
        """All weights of the model (summed over TP shards), read once per iteration."""
        return self.num_params * self.weight_bytes_per_param

    @property
    def activation_reserve_bytes(self) -> float:
        """Memory kept for activations etc. over all TP GPUs (``ACTIVATION_RESERVE_FRACTION``)."""
        return self.tensor_parallel * self.gpu_mem_bytes_per_gpu * ACTIVATION_RESERVE_FRACTION

    @property
    def kv_budget_bytes(self) -> float:
        """Bytes left for the paged KV cache, as vLLM sizes it: the usable share of all TP GPUs'
        memory minus the weights and the activation reserve."""
        usable = self.tensor_parallel * self.gpu_mem_bytes_per_gpu * self.gpu_mem_utilization
        budget = usable - self.weight_bytes - self.activation_reserve_bytes
        if budget <= 0:
            raise ValueError(
                f"profile {self.name!r}: no memory left for the KV cache: {usable / 1e9:.1f} GB usable "
                f"({self.tensor_parallel} GPU(s) x {self.gpu_mem_bytes_per_gpu / 1e9:.1f} GB x "
                f"{self.gpu_mem_utilization}) minus {self.weight_bytes / 1e9:.1f} GB of weights and "
                f"{self.activation_reserve_bytes / 1e9:.1f} GB activation reserve is {budget / 1e9:.1f} GB; "
                "raise tensor_parallel or gpu_mem_utilization"
            )
        return budget


class CostModel:
    """Predicts iteration durations from a ``ModelProfile`` (the roofline in the module docstring).

    ``iteration_time_s`` accepts python numbers or arrays. The engine advances runs of
    decode-only iterations with arrays and must land on exactly the clock it would reach
    stepping one at a time, so scalar and array calls evaluate the same float64 operations in
    the same order and agree bit for bit. Scalars (python or numpy) take a pure-python path:
    ~1.5 us a call here against ~25 us through numpy, on the engine's per-iteration hot path.
    """

    def __init__(self, profile: ModelProfile) -> None:
        p = profile
        self.profile = p
        self._flops_per_token = 2.0 * p.num_params
        self._flops_per_attn_pair = 4.0 * p.num_layers * p.num_q_heads * p.head_dim
        self._flops_per_s = p.tensor_parallel * p.peak_flops_per_gpu * p.flops_efficiency
        self._weight_bytes = float(p.weight_bytes)
        # KV bytes at their own efficiency, folded into the byte count (x 1.0 when they share it)
        kv_efficiency = p.kv_bandwidth_efficiency or p.bandwidth_efficiency
        self._kv_bytes_per_token = float(p.kv_bytes_per_token) * (p.bandwidth_efficiency / kv_efficiency)
        self._bytes_per_s = p.tensor_parallel * p.hbm_bytes_per_s_per_gpu * p.bandwidth_efficiency
        self._overhead_s = float(p.overhead_s)
        self._comm_s_per_token = float(p.comm_s_per_token)
        self._prefill_overhead_s = float(p.prefill_overhead_s)
        self._host_link_bytes_per_s = float(p.host_link_bytes_per_s)

    def _busy_s(
        self, prefill: _T, attn: _T, decode: _T, kv_read: _T, maximum: Callable[[_T, _T], _T]
    ) -> tuple[_T, _T]:
        """Compute part of the roofline, written once for floats and float64 arrays alike."""
        tokens = prefill + decode
        compute_s = (self._flops_per_token * tokens + self._flops_per_attn_pair * attn) / self._flops_per_s
        memory_s = (self._weight_bytes + self._kv_bytes_per_token * (kv_read + tokens)) / self._bytes_per_s
        busy_s = self._overhead_s + maximum(compute_s, memory_s) + self._comm_s_per_token * tokens
        # + 0.0 for decode-only batches, which leaves the sum bit for bit what decode_run_times_s gives
        return tokens, busy_s + self._prefill_overhead_s * (prefill > 0)

    def iteration_time_s(
        self,
        prefill_tokens: ArrayLike,
        prefill_attn_tokens: ArrayLike,
        decode_seqs: ArrayLike,
        kv_read_tokens: ArrayLike,
        swap_bytes: ArrayLike = 0.0,
    ) -> float | np.ndarray:
        """Seconds one iteration takes; 0.0 for an empty batch (no prefill tokens, no decodes).

        Args:
            prefill_tokens: new prompt tokens computed this iteration, over all prefill chunks.
            prefill_attn_tokens: query-key pairs of the prefill chunks, summed:
                ``chunk_len * (cached_context_before_chunk + (chunk_len + 1) / 2)``.
            decode_seqs: sequences decoding one token.
            kv_read_tokens: KV tokens attention reads (decode contexts plus prefill chunks' cached prefix).
            swap_bytes: bytes swapped between GPU and host this iteration (added serially).

        All arguments broadcast like numpy arrays; the result is a float for scalar inputs and a
        float64 array otherwise, each element equal bit for bit to the scalar call.
        """
        args = (prefill_tokens, prefill_attn_tokens, decode_seqs, kv_read_tokens, swap_bytes)
        if (
            isinstance(prefill_tokens, _SCALAR_TYPES)
            and isinstance(prefill_attn_tokens, _SCALAR_TYPES)
            and isinstance(decode_seqs, _SCALAR_TYPES)
            and isinstance(kv_read_tokens, _SCALAR_TYPES)
            and isinstance(swap_bytes, _SCALAR_TYPES)
        ):  # the engine's per-iteration path: plain floats, no numpy overhead
            p, a, d = float(prefill_tokens), float(prefill_attn_tokens), float(decode_seqs)
            k, s = float(kv_read_tokens), float(swap_bytes)
            if not (p >= 0 and a >= 0 and d >= 0 and k >= 0 and s >= 0):
                raise ValueError(f"iteration_time_s: arguments must be >= 0, got {args}")
            tokens, busy_s = self._busy_s(p, a, d, k, max)
            return (busy_s if tokens > 0 else 0.0) + s / self._host_link_bytes_per_s
        arrays = [np.asarray(x, dtype=np.float64) for x in args]
        if not all(np.all(x >= 0) for x in arrays):
            raise ValueError("iteration_time_s: arguments must be >= 0 (and not NaN)")
        p_arr, a_arr, d_arr, k_arr, s_arr = arrays
        tokens_arr, busy_arr = self._busy_s(p_arr, a_arr, d_arr, k_arr, np.maximum)
        out = np.where(tokens_arr > 0, busy_arr, 0.0) + s_arr / self._host_link_bytes_per_s
        return float(out) if out.ndim == 0 else out

    def decode_run_times_s(self, decode_seqs: int, kv_read_tokens: np.ndarray) -> np.ndarray:
        """``iteration_time_s(0, 0.0, decode_seqs, kv_read_tokens, 0.0)`` for an array of KV
        reads, without the general path's conversions: the engine's fast-forward calls it for
        every run of decode-only iterations. Same float64 operations in the same order, so each
        element equals the scalar call bit for bit (tested)."""
        tokens = 0.0 + float(decode_seqs)
        compute_s = (self._flops_per_token * tokens + self._flops_per_attn_pair * 0.0) / self._flops_per_s
        kv = np.asarray(kv_read_tokens, dtype=np.float64)
        memory_s = (self._weight_bytes + self._kv_bytes_per_token * (kv + tokens)) / self._bytes_per_s
        busy_s = self._overhead_s + np.maximum(compute_s, memory_s) + self._comm_s_per_token * tokens
        if tokens <= 0:
            busy_s = np.zeros_like(kv)
        return busy_s + 0.0 / self._host_link_bytes_per_s

    def swap_time_s(self, num_bytes: float) -> float:
        """Seconds to move ``num_bytes`` of KV between GPU and host over the swap link."""
        return float(num_bytes) / self._host_link_bytes_per_s


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``profiles/`` (file stems), sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> ModelProfile:
    """Load a shipped profile by name (``"llama8b_h100"``) or any profile YAML by path.

    Every field of ``ModelProfile`` without a default must be present and no other key may be,
    so a typo fails here instead of silently using a default. Parsed profiles are cached per
    file version (an env resets an engine per episode; re-parsing cost ~10 ms per replica).
    """
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"unknown profile {name_or_path!r}: not a file and not one of {available_profiles()}; "
                f"pass a shipped name or the path to a YAML file like {PROFILES_DIR}/llama8b_h100.yaml"
            )
    path = path.resolve()
    return _parse_profile(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _parse_profile(path: Path, mtime_ns: int) -> ModelProfile:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(
            f"profile {path}: expected a mapping of ModelProfile fields, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(ModelProfile)}
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    missing, extra = sorted(required - data.keys()), sorted(data.keys() - fields.keys())
    if missing or extra:
        raise ValueError(
            f"profile {path}: missing keys {missing}, unknown keys {extra}; "
            f"the keys are the ModelProfile fields: {list(fields)}"
        )
    hints = typing.get_type_hints(ModelProfile)
    values = {}
    for key, value in data.items():
        kind = hints[key]
        # PyYAML reads `989e12` (no dot) as a string, so floats are converted explicitly.
        ok = (kind is int and isinstance(value, int) and not isinstance(value, bool)) or (
            kind is str and isinstance(value, str)
        )
        if kind is float and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"profile {path}: {key} must be {kind.__name__}, got {value!r}")
        values[key] = value
    return ModelProfile(**values)


def summary_table() -> str:
    """Markdown table of KV size, KV capacity and example iteration times for each shipped profile."""
    rows = [
        "| profile | KV bytes/token | KV budget (GB) | KV capacity (tokens) | decode b=1 ctx 2k (ms) "
        "| decode b=64 ctx 2k (ms) | prefill 2048 tokens (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in available_profiles():
        profile = load_profile(name)
        cm = CostModel(profile)
        decode_1 = cm.iteration_time_s(0, 0, 1, 2048)
        decode_64 = cm.iteration_time_s(0, 0, 64, 64 * 2048)
        prefill = cm.iteration_time_s(2048, 2048 * (2048 + 1) / 2, 0, 0)
        rows.append(
            f"| {name} | {profile.kv_bytes_per_token:,.0f} | {profile.kv_budget_bytes / 1e9:.3g} "
            f"| {int(profile.kv_budget_bytes // profile.kv_bytes_per_token):,} | {decode_1 * 1e3:.2f} "
            f"| {decode_64 * 1e3:.2f} | {prefill * 1e3:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(summary_table() + "\n")
