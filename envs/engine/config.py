"""Engine and cluster configuration: small dataclasses that check their own values, usable
directly or as Hydra structured-config schemas (so a typo or a bad value fails at start)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BACKENDS = ("sim", "torch")
"""Values of ``engine.backend``."""
TORCH_TIMINGS = ("measured", "cost_model")
"""Values of ``engine.torch_timing``."""
PREFIX_EVICTIONS = ("lru", "workflow")
"""Values of ``engine.prefix_eviction`` (see block_manager.py)."""
PIN_TTL_RULES = ("off", "fixed", "tool_mean", "oracle", "policy")
"""Values of ``engine.pin_ttl_rule`` (see ``EngineConfig.pin_ttl_rule``)."""
RETENTION_FIELDS = ("pin_ttl_rule", "pin_ttl_s", "prefix_eviction")
"""The fields a policy may set through its ``retention`` hints (``Engine.apply_retention``)."""
ADMISSIONS = ("rank", "pick")
"""Values of ``engine.admission`` (see ``EngineConfig.admission``)."""
BUDGET_RULES = ("workload", "policy")
"""Values of ``engine.budget_rule`` (see ``EngineConfig.budget_rule``)."""


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
    prefix_eviction: str = "lru"
    """Order in which unreferenced cached blocks are evicted: lru (vLLM) or workflow (KVFlow:
    the block whose next use in its tree is furthest first, LRU among equals)."""
    pin_ttl_rule: str = "off"
    """Continuum's TTL pinning of a finished call's KV across its tool pause, for the children
    that reuse its prefix: off (vLLM), fixed (TTL = pin_ttl_s), tool_mean (TTL = running mean of
    the tool pauses observed after calls of the same role + pin_ttl_s), oracle (TTL = the true
    tool latency + network delay + pin_ttl_s), policy (a RETAIN decision per finished call picks
    the TTL among ``retain_ttls_s``). A pin ends at expiry or once every child of the call was
    admitted; it is dropped early (oldest first) only when a running call would otherwise be
    preempted or nothing could run."""
    pin_ttl_s: float = 0.0
    """The TTL (fixed) or the grace added to the predicted tool pause (tool_mean, oracle)."""
    retain_ttls_s: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    """pin_ttl_rule=policy: the options of a RETAIN decision, TTLs in seconds from the call's
    finish, ascending; 0 releases the KV to the prefix cache at once. The defaults span the
    agentic tool pauses (ANCHORS.md: 86.5% within 1 s, 95.1% within 10 s, up to 60 s) plus the
    queueing that follows them."""
    vtc_lift: bool = True
    """VTC's counter lift: a tenant that becomes backlogged again gets max(its counter, the
    smallest counter among backlogged tenants), so idling banks no credit."""
    admission: str = "rank"
    """How an ORDER decision is answered: rank (the policy's scores order every waiting call;
    admission stops at the first that does not fit, as in vLLM) or pick (pick-next: one call
    among those that fit, or STOP, per decision, asked again after each admission; STOP is
    offered once something is scheduled this iteration, so an idle replica never stops)."""
    config_every_s: float = 0.0
    """CONFIG decisions, the slow batching lever: every this many seconds of virtual time (from 0)
    each replica asks its policy for its running-call cap and token budget, one of
    ``config_max_num_seqs`` x ``config_max_num_batched_tokens`` (or to keep its current pair); the
    pair holds until the next decision. 0 (the default) never asks: ``max_num_seqs`` and
    ``max_num_batched_tokens`` stay as configured. Lowering the cap preempts nothing: the replica
    admits no more until fewer calls run (as vLLM would after a restart with the lower cap)."""
    config_max_num_seqs: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    """CONFIG options: running-call caps, ascending."""
    config_max_num_batched_tokens: list[int] = field(default_factory=lambda: [2048, 8192])
    """CONFIG options: token budgets per iteration, ascending."""
    continue_truncated: bool = False
    """A call stopped by its ``max_tokens`` before its natural end spawns a continuation call that
    generates the missing tokens: same role and tree, its prompt the stopped call's prompt and
    output plus ``continuation_prompt_tokens`` of instruction, its budget the workload's, ready
    one network hop after the stop; the stopped call's tool and children wait for the last
    continuation, and the children read the whole output. False (the default, vLLM's view): the
    output is cut at ``max_tokens`` and the run goes on (``RunMetrics.budget_truncations``)."""
    continuation_prompt_tokens: int = 32
    """Instruction tokens a continuation adds after the stopped call's output ("continue")."""
    budget_rule: str = "workload"
    """A call's ``max_tokens``: workload (as its job says) or policy (a BUDGET decision when the
    call joins a replica's queue picks a multiplier of the workload's value among
    ``budget_multipliers``; needs ``continue_truncated``, so that a tight budget has its cost)."""
    budget_multipliers: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    """budget_rule=policy: the options of a BUDGET decision, multipliers of the workload's
    ``max_tokens``, strictly ascending and including 1 (the workload's own budget)."""
    reserve_output_frac: float = 0.0
    """Admission holds back KV for decodes to come, as SGLang does (its new_token_ratio): each
    running call reserves this fraction of its unspent budget (max_tokens - generated), and a
    waiting call is admitted only if its blocks plus its own reservation fit in what is left.
    0 (vLLM's admission, the default) reserves nothing; in (0, 1]. With it a call's budget costs
    KV now, so BUDGET trades concurrency against continuations."""
    fast_forward: bool = True
    """Advance runs of decode-only iterations in closed form; results equal stepping one by one."""
    backend: str = "sim"
    """How long an iteration takes: sim (the profile's cost model) or torch (run a real model over
    real paged KV and measure it; tokens are the model's greedy choices)."""
    model: str | None = None
    """torch backend: model preset (envs/engine/model.py); None takes the profile's own model."""
    torch_threads: int = 1
    """torch backend on CPU: intra-op threads (one by default, so parallel engines do not contend)."""
    torch_timing: str = "measured"
    """torch backend: the clock advances by the measured time (measured), or by the profile's cost
    model while the model still runs for its tokens (cost_model: reproducible bit for bit, e.g.
    for training on real tokens without timing noise)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            _check_int(f"engine.{name}", getattr(self, name), minimum=1)
        _check_int("engine.long_prefill_token_threshold", self.long_prefill_token_threshold, minimum=0)
        _check_int("engine.torch_threads", self.torch_threads, minimum=1)
        if self.backend not in BACKENDS:
            raise ValueError(f"engine.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.torch_timing not in TORCH_TIMINGS:
            raise ValueError(f"engine.torch_timing must be one of {TORCH_TIMINGS}, got {self.torch_timing!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"engine.model must be a model preset name or null, got {self.model!r}")
        if self.num_gpu_blocks is not None:
            _check_int("engine.num_gpu_blocks", self.num_gpu_blocks, minimum=1)
        if self.kv_budget_bytes is not None:
            _check_number("engine.kv_budget_bytes", self.kv_budget_bytes, positive=True)
        _check_number("engine.swap_space_bytes", self.swap_space_bytes)
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"engine.profile must name a cost profile, got {self.profile!r}")
        if self.prefix_eviction not in PREFIX_EVICTIONS:
            raise ValueError(
                f"engine.prefix_eviction must be one of {PREFIX_EVICTIONS}, got {self.prefix_eviction!r}"
            )
        if self.admission not in ADMISSIONS:
            raise ValueError(f"engine.admission must be one of {ADMISSIONS}, got {self.admission!r}")
        if self.pin_ttl_rule not in PIN_TTL_RULES:
            raise ValueError(f"engine.pin_ttl_rule must be one of {PIN_TTL_RULES}, got {self.pin_ttl_rule!r}")
        _check_number("engine.pin_ttl_s", self.pin_ttl_s)
        if self.pin_ttl_rule == "fixed" and self.pin_ttl_s == 0:
            raise ValueError("engine.pin_ttl_rule=fixed needs engine.pin_ttl_s > 0 (the TTL)")
        ttls = list(self.retain_ttls_s)
        for i, ttl in enumerate(ttls):
            _check_number(f"engine.retain_ttls_s[{i}]", ttl)
        if not ttls or any(b <= a for a, b in zip(ttls, ttls[1:], strict=False)):
            raise ValueError(
                f"engine.retain_ttls_s must be a non-empty, strictly ascending list of TTLs in seconds "
                f"(0 = release now), got {self.retain_ttls_s!r}"
            )
        _check_number("engine.config_every_s", self.config_every_s)
        _check_int("engine.continuation_prompt_tokens", self.continuation_prompt_tokens, minimum=1)
        _check_number("engine.reserve_output_frac", self.reserve_output_frac)
        if self.reserve_output_frac > 1:
            raise ValueError(
                f"engine.reserve_output_frac must be in [0, 1], got {self.reserve_output_frac!r}"
            )
        if self.budget_rule not in BUDGET_RULES:
            raise ValueError(f"engine.budget_rule must be one of {BUDGET_RULES}, got {self.budget_rule!r}")
        if self.budget_rule == "policy" and not self.continue_truncated:
            raise ValueError(
                "engine.budget_rule=policy needs engine.continue_truncated=true: without continuations a "
                "tight budget would only shorten outputs, for free"
            )
        multipliers = list(self.budget_multipliers)
        for i, value in enumerate(multipliers):
            _check_number(f"engine.budget_multipliers[{i}]", value, positive=True)
        if 1.0 not in multipliers or any(b <= a for a, b in zip(multipliers, multipliers[1:], strict=False)):
            raise ValueError(
                "engine.budget_multipliers must be a strictly ascending list of positive multipliers of "
                f"the workload's max_tokens that includes 1, got {self.budget_multipliers!r}"
            )
        for name in ("config_max_num_seqs", "config_max_num_batched_tokens"):
            values = list(getattr(self, name))
            for i, value in enumerate(values):
                _check_int(f"engine.{name}[{i}]", value, minimum=1)
            if not values or any(b <= a for a, b in zip(values, values[1:], strict=False)):
                raise ValueError(
                    f"engine.{name} must be a non-empty, strictly ascending list, got {values!r}"
                )
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"engine.preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, positive: bool = False) -> None:
    """A finite real number, >= 0 (or > 0): NaN or inf would silently poison the clock."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class Window:
    """A replica and a span of virtual time: ``start_s`` to ``start_s + duration_s``."""

    replica: int = 0
    start_s: float = 0.0
    duration_s: float = 1.0

    def __post_init__(self) -> None:
        name = f"cluster.{type(self).__name__.lower()}s[]"
        _check_int(f"{name}.replica", self.replica, minimum=0)
        _check_number(f"{name}.start_s", self.start_s)
        _check_number(f"{name}.duration_s", self.duration_s, positive=True)

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass
class Slowdown(Window):
    """A replica that runs ``factor`` times slower from ``start_s`` for ``duration_s`` (a
    thermal throttle, a noisy neighbour, a stall when the factor is large): every iteration that
    starts in the window takes ``factor`` times its time (the one in flight when it opens or
    closes keeps the speed it started with)."""

    factor: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("cluster.slowdowns[].factor", self.factor, positive=True)
        if not 1.0 <= self.factor <= 1e4:
            raise ValueError(f"cluster.slowdowns[].factor must be in [1, 1e4], got {self.factor!r}")


@dataclass
class Outage(Window):
    """A window in which a replica is down (``ClusterConfig.outages``): at ``start_s`` it loses
    what its GPU held (the running and queued calls' KV, its prefix cache, its swap tier and its
    pins) and takes no call until ``start_s + duration_s``; its calls are requeued to the
    replicas that are up (nothing is lost, only recomputed)."""

    duration_s: float = 30.0


@dataclass
class ClusterConfig:
    """Replicas (possibly of different model sizes) and the network between them."""

    num_replicas: int = 1
    """Replicas of ``engine.profile`` (ignored when ``replicas`` lists profiles)."""
    replicas: list[str] = field(default_factory=list)
    """Explicit profile per replica for a heterogeneous cluster, e.g. [llama8b_h100, llama70b_h100x4]."""
    network_delay_s: float = 0.0
    """Delay between a call finishing and its children reaching the cluster (after the tool)."""
    network_jitter_s: float = 0.0
    """Mean of an exponential extra delay on each call's hop to its children (0: none)."""
    tool_failure_prob: float = 0.0
    """Probability that one attempt of a call's tool fails: it hangs until ``tool_timeout_s``,
    then the agent framework retries it (a fresh attempt, same latency if it succeeds)."""
    tool_timeout_s: float = 30.0
    """How long a failing tool attempt holds its tree before the framework gives up on it."""
    tool_retries: int = 2
    """Retries after a failed attempt; when the last fails too, its error goes back to the
    model after the timeout and the tree goes on (agent frameworks surface tool errors)."""
    slowdowns: list[Slowdown] = field(default_factory=list)
    """Windows in which a replica runs slower (``Slowdown``); windows of one replica may not overlap."""
    outages: list[Outage] = field(default_factory=list)
    """Windows in which a replica is down (``Outage``); windows of one replica may not overlap."""
    role_min_params: dict[str, float] = field(default_factory=dict)
    """Roles that need a model of at least this many parameters, e.g. ``{planner: 7e10}`` (a
    planner or a critic that a small model does badly). See ``below_min_output_factor``."""
    below_min_output_factor: float = 0.0
    """0: a call of a role in ``role_min_params`` runs only on replicas at or above its minimum
    (rejected, with its tree, when no replica is large enough). > 0: it may run below, paying
    ``1 + factor`` times the output tokens there (a weaker model rambles or retries)."""
    fault_seed: int = 0
    """Seed of the fault draws. A call's draws depend only on (fault_seed, its job's index, its
    call index), never on the schedule, so every policy meets the same faults."""

    def __post_init__(self) -> None:
        _check_int("cluster.num_replicas", self.num_replicas, minimum=1)
        _check_number("cluster.network_delay_s", self.network_delay_s)
        _check_number("cluster.network_jitter_s", self.network_jitter_s)
        _check_number("cluster.tool_timeout_s", self.tool_timeout_s)
        _check_int("cluster.tool_retries", self.tool_retries, minimum=0)
        _check_int("cluster.fault_seed", self.fault_seed, minimum=0)
        p = self.tool_failure_prob
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"cluster.tool_failure_prob must be a probability in [0, 1], got {p!r}")
        self.slowdowns = [s if isinstance(s, Slowdown) else Slowdown(**s) for s in self.slowdowns]
        self.outages = [o if isinstance(o, Outage) else Outage(**o) for o in self.outages]
        count = len(self.replicas) or self.num_replicas
        for name, spans in (("slowdowns", self.slowdowns), ("outages", self.outages)):
            windows = sorted((s.replica, s.start_s, s.end_s) for s in spans)
            for (replica, _, end), (other, start, _) in zip(windows, windows[1:], strict=False):
                if replica == other and start < end:
                    raise ValueError(
                        f"cluster.{name}: two windows of replica {replica} overlap at {start!r} s"
                    )
            for replica, _, _ in windows:
                if replica >= count:
                    raise ValueError(
                        f"cluster.{name}: replica {replica} does not exist (the cluster has {count})"
                    )
        for role, params in self.role_min_params.items():
            _check_number(f"cluster.role_min_params[{role!r}]", params, positive=True)
        _check_number("cluster.below_min_output_factor", self.below_min_output_factor)
        if not all(isinstance(name, str) and name for name in self.replicas):
            raise ValueError(f"cluster.replicas must be a list of profile names, got {self.replicas!r}")

    @property
    def faults(self) -> bool:
        """Whether tool failures or network jitter are on."""
        return self.tool_failure_prob > 0 or self.network_jitter_s > 0

    def profiles(self, default: str) -> list[str]:
        return list(self.replicas) if self.replicas else [default] * self.num_replicas
