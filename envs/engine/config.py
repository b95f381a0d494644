"""Engine and cluster configuration: small dataclasses that check their own values, usable
directly or as Hydra structured-config schemas (so a typo or a bad value fails at start)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """Scheduler and KV-cache settings of every replica (names follow vLLM's engine args)."""

    profile: str = "llama8b_h100"
    """Model/GPU cost profile of the replicas (a name in envs/engine/profiles/ or a YAML path)."""
    block_size: int = 16
    """Tokens per KV block (vLLM's default)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one iteration: decodes plus prefill chunks."""
    max_num_seqs: int = 256
    """Most calls running at once on a replica."""
    long_prefill_token_threshold: int = 0
    """Cap on one call's prefill chunk per iteration (0: only the token budget caps it)."""
    kv_budget_bytes: float | None = None
    """KV memory per replica; None derives it from the profile (GPU memory minus weights)."""
    num_gpu_blocks: int | None = None
    """Override the block count directly (tests use tiny caches to force preemption)."""
    swap_space_bytes: float = 4e9
    """Host-memory swap tier per replica (vLLM's swap_space, default 4 GiB)."""
    preemption_mode: str = "recompute"
    """recompute (vLLM V1) or swap (copy the victim's KV to host, falls back to recompute when full)."""
    enable_prefix_caching: bool = True
    fast_forward: bool = True
    """Advance runs of decode-only iterations in closed form; results equal stepping one by one."""

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_batched_tokens", "max_num_seqs")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"engine.{name} must be an int >= 1, got {value!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("engine.long_prefill_token_threshold must be >= 0 (0 disables it)")
        if self.kv_budget_bytes is not None and not self.kv_budget_bytes > 0:
            raise ValueError(f"engine.kv_budget_bytes must be > 0 or null, got {self.kv_budget_bytes!r}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ValueError(f"engine.num_gpu_blocks must be >= 1 or null, got {self.num_gpu_blocks!r}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"engine.swap_space_bytes must be >= 0, got {self.swap_space_bytes!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"engine.preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )


@dataclass
class ClusterConfig:
    """Replicas (possibly of different model sizes) and the network between them."""

    num_replicas: int = 1
    """Replicas of ``engine.profile`` (ignored when ``replicas`` lists profiles)."""
    replicas: list[str] = field(default_factory=list)
    """Explicit profile per replica for a heterogeneous cluster, e.g. [llama8b_h100, llama70b_h100x4]."""
    network_delay_s: float = 0.0
    """Delay between a call finishing and its children reaching the cluster (after the tool)."""

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"cluster.num_replicas must be >= 1, got {self.num_replicas!r}")
        if self.network_delay_s < 0:
            raise ValueError(f"cluster.network_delay_s must be >= 0, got {self.network_delay_s!r}")

    def profiles(self, default: str) -> list[str]:
        return list(self.replicas) if self.replicas else [default] * self.num_replicas
