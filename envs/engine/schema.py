"""The feature schema, declared once: every column a policy sees, its scale, what it means, how
the vLLM adapter reads it, and the value a source that cannot read it writes.

A source (the simulated engine in ``features.py``, vLLM's scheduler state in
``servegym.agents.deploy.vllm_adapter``) measures *raw* quantities in natural units (tokens, seconds,
blocks, counts) and hands them to ``encode`` by column name; ``encode`` applies each column's
``Scale`` and lays the columns out in schema order. So the order, the scaling and the meaning of
a column live here and nowhere else, and a column added to the schema that a source neither reads
nor declares unknown (``Feature.neutral``) is an error at the first decision, not a silent zero in
an exported policy's input (the train/serve skew this module exists to prevent).

Scale by construction: token counts enter as ``log1p``, block counts as fractions of the
replica's capacity, times over ``time_scale_s`` (a config value), so a network needs no running
normalisation. Privileged columns (the true remaining output, the true tool latency) are a table
of their own that RL observations and exported policies never see; oracle baselines may read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

FEATURE_SCHEMA_VERSION = 6
"""v2 added predicted_output_log and pinned_prefix_frac; v3 the tree-state columns (tree_ready_log
to tree_depth_left) and the global free_slots_frac; v4 the RETAIN decision kind (its one-hot in
the global observation) and its option table ``RETAIN``; v5 the CONFIG decision kind and its
option table ``CONFIG``; v6 the BUDGET decision kind and its option table ``BUDGET``. Bump it whenever a column's name, order,
scale or meaning changes: the runtime refuses a sidecar of another version."""


class Scale(Enum):
    """How a raw quantity becomes a feature value."""

    AS_IS = "as is"  # flags, ids, small counts, ratios the source forms (documented per column)
    LOG1P = "log1p"  # token and call counts
    TIME = "/ time_scale_s"  # seconds
    BLOCKS = "/ KV blocks"  # block counts, over the (deciding or row's) replica's capacity
    TOKEN_BUDGET = "/ max_num_batched_tokens"  # tokens of one iteration's budget


class VllmReading(Enum):
    """How faithfully the vLLM adapter reads a column (``Feature.vllm_reading``)."""

    EXACT = "exact"  # the same quantity the engine measures, from vLLM's state
    APPROXIMATE = "approximate"  # what vLLM can see of it (a lower bound, a coarser level)
    NEUTRAL = "neutral"  # vLLM cannot know it: the adapter writes ``Feature.neutral``
    NOT_READ = "not read"  # a table the adapter never builds (ROUTE, RETAIN, privileged)


@dataclass(frozen=True)
class Feature:
    """One column. ``doc`` says what the engine measures; ``vllm`` how the vLLM adapter reads it
    (or why it cannot), per ``vllm_reading``; ``neutral`` is what a source that cannot read the
    column writes (only allowed where the reading is NEUTRAL)."""

    name: str
    scale: Scale
    doc: str
    vllm: str = ""
    vllm_reading: VllmReading = VllmReading.EXACT
    neutral: float | None = None


@dataclass(frozen=True)
class ScaleContext:
    """The denominators of the scales, from the deciding replica (or, for per-row replicas, one
    value per row)."""

    time_scale_s: float
    num_blocks: float | np.ndarray = 1.0
    max_num_batched_tokens: float = 1.0


class Table:
    """An ordered tuple of ``Feature``s with ``encode``: the one place raw values become a table."""

    def __init__(self, name: str, features: tuple[Feature, ...]) -> None:
        self.name = name
        self.features = features
        self.names: tuple[str, ...] = tuple(f.name for f in features)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: duplicate column names in {self.names}")
        for f in features:
            if (f.neutral is not None) != (f.vllm_reading is VllmReading.NEUTRAL):
                raise ValueError(f"{name}.{f.name}: a neutral value goes with vllm_reading NEUTRAL only")
        self._index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.features)

    def index(self, name: str) -> int:
        """Column index, failing loudly on a name the table lacks."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.name} feature {name!r}; the schema has {list(self.names)}"
            ) from None

    def encode(
        self,
        raw: Mapping[str, np.ndarray | float | int | bool],
        context: ScaleContext,
        rows: int,
        neutral_for_missing: bool = False,
    ) -> np.ndarray:
        """(rows, len(self)) float32: each column's raw values (an array of ``rows``, or one value
        for every row) scaled per the schema. A column missing from ``raw`` is an error, unless
        ``neutral_for_missing`` and the column declares a neutral value (a source that cannot read
        it); a name the schema lacks is an error too."""
        unknown = raw.keys() - self._index.keys()
        if unknown:
            raise KeyError(f"{self.name}: {sorted(unknown)} are not columns of the schema {list(self.names)}")
        table = np.empty((rows, len(self.features)), dtype=np.float32)
        for i, feature in enumerate(self.features):
            value = raw.get(feature.name)
            if value is None:
                if not (neutral_for_missing and feature.neutral is not None):
                    raise KeyError(
                        f"{self.name}: the source gave no value for {feature.name!r} "
                        f"(read it, or declare a neutral value in servegym.envs.engine.schema)"
                    )
                table[:, i] = feature.neutral
                continue
            table[:, i] = _scaled(feature.scale, value, context)
        return table


def _scaled(
    scale: Scale, value: np.ndarray | float | int | bool, context: ScaleContext
) -> np.ndarray | float | int | bool:
    """``value`` scaled (numpy casts bools and ints to float32 on assignment into the table)."""
    if scale is Scale.AS_IS:
        return value
    if scale is Scale.LOG1P:
        return np.log1p(value)
    if scale is Scale.TIME:
        return np.divide(value, context.time_scale_s)
    if scale is Scale.BLOCKS:
        return np.divide(value, context.num_blocks)
    return np.divide(value, context.max_num_batched_tokens)


# The tables are laid out one Feature per entry, argument order (name, scale, doc, vllm, reading,
# neutral), rather than one argument per line: a column reads as one unit.
# fmt: off
_A, _N, _X = VllmReading.APPROXIMATE, VllmReading.NEUTRAL, VllmReading.NOT_READ

CANDIDATE = Table(
    "candidate",
    (
        Feature("is_running", Scale.AS_IS, "1 for a running call (EVICT), 0 for a waiting one",
                "1 for a running request (EVICT), else 0"),
        Feature("is_swapped", Scale.AS_IS, "1 when its KV sits in the host tier",
                "vLLM V1 recomputes preempted requests, it has no swap tier", _N, 0.0),
        Feature("prompt_tokens_log", Scale.LOG1P, "prompt tokens, incl. ancestors' outputs",
                "num_prompt_tokens"),
        Feature("cached_prefix_frac", Scale.AS_IS,
                "prefix-cache hit tokens on this replica (the hit its admission reuses; past 1 for a preempted "
                "call whose hit covers some of its output) / prompt tokens; a running call: min(computed, "
                "prompt) / prompt",
                "a waiting request with no computed tokens asks the KV cache manager "
                "(get_computed_blocks, vLLM's own lookup, so a hit counts only what vLLM would reuse); "
                "a running or resumed one uses min(num_computed_tokens, prompt)"),
        Feature("computed_tokens_log", Scale.LOG1P, "tokens already in KV", "num_computed_tokens"),
        Feature("output_tokens_log", Scale.LOG1P, "tokens generated so far", "num_output_tokens"),
        Feature("budget_left_log", Scale.LOG1P, "role budget max_tokens - tokens generated",
                "max(max_tokens - num_output_tokens, 0)"),
        Feature("blocks_held_frac", Scale.BLOCKS, "blocks it holds",
                "blocks the request holds (waiting requests hold none)"),
        Feature("blocks_needed_frac", Scale.BLOCKS,
                "blocks admitting it takes from the free queue: new blocks of its next chunk (capped by the "
                "iteration's token budget left and long_prefill_token_threshold) plus prefix hits that sit in "
                "the free queue (vLLM's allocation check counts those too); 1 for a running call",
                "the same, from the budget the running requests leave this step (estimated before vLLM "
                "schedules them), long_prefill_token_threshold, and the ref counts of the hit blocks"),
        Feature("wait_s", Scale.TIME, "time since it became ready (or was preempted)",
                "now - arrival or last preemption, on the adapter's clock"),
        Feature("tree_age_s", Scale.TIME, "time since its job arrived",
                "now - first arrival seen for its tree", _A),
        Feature("role_id", Scale.AS_IS, "index into servegym.envs.workloads.job.KNOWN_ROLES",
                "from the tree tag (unknown roles map to 'other')"),
        Feature("depth", Scale.AS_IS, "depth in its tree (root = 0)", "from the tree tag"),
        Feature("tree_service_log", Scale.LOG1P,
                "tokens processed for its whole tree so far (Autellix PLAS)",
                "the adapter sums vLLM's scheduled tokens per step; prefix-cache hits are not service and "
                "recomputation after a preemption counts again, as in the simulator"),
        Feature("critical_path_service_log", Scale.LOG1P,
                "tokens on the heaviest path of finished ancestors (Autellix ATLAS)",
                "the tag carries no parent links, so 'no finished ancestor'", _N, 0.0),
        Feature("tree_calls_done", Scale.AS_IS, "finished calls in its tree",
                "calls of its tree that finished (any finish, aborts included)"),
        Feature("tree_calls_total_log", Scale.LOG1P, "calls in its tree",
                "calls of its tree seen so far: a lower bound, vLLM never learns a tree's final size", _A),
        Feature("tenant_vtc_log", Scale.LOG1P,
                "tenant's virtual token counter - min over backlogged tenants (VTC)",
                "no tenants in vLLM: every request's tenant is the least-served one", _N, 0.0),
        Feature("preemptions", Scale.AS_IS, "times this call was preempted", "request.num_preemptions"),
        Feature("replica", Scale.AS_IS, "replica index the call sits on",
                "one engine is one replica", _N, 0.0),
        Feature("predicted_output_log", Scale.LOG1P,
                "mean output of finished calls of its role and tenant, learned online by the engine; else "
                "of its role; else its budget max_tokens (LTR-SJF's predictor)",
                "mean output tokens of this role's finished requests, else max_tokens: the engine's "
                "predictor without the tenant level", _A),
        Feature("pinned_prefix_frac", Scale.AS_IS,
                "its prompt held by a finished parent's TTL pin for it / prompt tokens, at most 1 "
                "(Continuum: KV retained across the tool pause; admitting it releases the pin)",
                "vLLM pins no finished request's KV", _N, 0.0),
        # the state of its whole tree, so a policy can rank trees rather than calls (tree-SRPT
        # needs work left, Autellix/Parrot need what is ready and what is blocked):
        Feature("tree_ready_log", Scale.LOG1P, "calls of its tree queued (waiting or swapped), itself included",
                "its tree's requests among the decision's rows when they are the waiting queue (ORDER), "
                "else its tree's live requests - those rows", _A),
        Feature("tree_running_log", Scale.LOG1P, "calls of its tree running",
                "the mirror image: rows of its tree for EVICT (the running set), else live requests of its "
                "tree minus its waiting rows", _A),
        Feature("tree_blocked_log", Scale.LOG1P, "calls of its tree waiting on an unfinished parent",
                "vLLM sees a call only once the framework submits it: nothing is blocked inside it", _N, 0.0),
        Feature("tree_tool_paused_log", Scale.LOG1P,
                "calls of its tree whose parents finished, waiting on a tool",
                "nothing waits on a tool inside vLLM", _N, 0.0),
        Feature("tree_predicted_left_log", Scale.LOG1P,
                "sum over its tree's unfinished calls of the predicted output (as predicted_output_log) "
                "minus what each has generated: work left, predicted",
                "the same sum over its tree's rows: a lower bound, calls not yet submitted are unknown", _A),
        Feature("tree_depth_left", Scale.AS_IS,
                "levels of its tree still to run: deepest minus shallowest unfinished + 1",
                "deepest minus shallowest depth among its tree's rows, plus 1", _A),
    ),
)
"""One row per candidate call of an ORDER or EVICT decision."""

PRIVILEGED = Table(
    "privileged",
    (
        Feature("true_remaining_output_tokens", Scale.AS_IS, "oracle SJF only", "", _X),
        Feature("true_tool_latency_s", Scale.AS_IS,
                "seconds; oracle TTL pinning only (a RETAIN row: the call's true tool latency plus the "
                "network delay, when its children become ready)", "", _X),
    ),
)
"""Truth that RL observations and exported policies never see, row for row with a decision."""

GLOBAL = Table(
    "global",
    (
        Feature("time_s", Scale.TIME, "virtual time",
                "clock time since the scheduler started (training episodes start at 0; a long-running "
                "server drifts past them, which a policy sees as a late, busy episode)"),
        Feature("kv_used_frac", Scale.BLOCKS, "owned blocks, on the deciding replica",
                "used blocks of the pool (the null block excluded)"),
        Feature("kv_cached_frac", Scale.BLOCKS, "unreferenced but cached blocks",
                "a lower bound: cached hashes - used blocks (vLLM keeps no counter, and a scan of the free "
                "queue per step would cost O(blocks))", _A),
        Feature("kv_free_frac", Scale.BLOCKS, "allocatable blocks", "free blocks of the pool"),
        Feature("host_used_frac", Scale.AS_IS, "swap tier use: host blocks used / host blocks",
                "no swap tier", _N, 0.0),
        Feature("waiting_log", Scale.LOG1P, "waiting calls on the replica", "len(waiting)"),
        Feature("running_log", Scale.LOG1P, "running calls on the replica", "len(running)"),
        Feature("live_trees_log", Scale.LOG1P, "unfinished jobs in the cluster",
                "trees with a request in the engine", _A),
        Feature("token_budget_left_frac", Scale.TOKEN_BUDGET, "token budget left this iteration",
                "the budget the running requests leave this step, estimated before vLLM schedules them", _A),
        Feature("free_slots_frac", Scale.AS_IS, "(max_num_seqs - running calls) / max_num_seqs on the replica",
                "(max_num_seqs - running) / max_num_seqs; 1 when the view has no cap"),
    ),
)
"""One vector per decision; ROUTE decisions fill only ``time_s`` and ``live_trees_log``."""

ROUTE = Table(
    "route",
    (
        Feature("kv_used_frac", Scale.BLOCKS, "the replica's owned blocks", "", _X),
        Feature("kv_free_frac", Scale.BLOCKS, "the replica's allocatable blocks", "", _X),
        Feature("waiting_log", Scale.LOG1P, "waiting calls on the replica", "", _X),
        Feature("running_log", Scale.LOG1P, "running calls on the replica", "", _X),
        Feature("queued_prefill_tokens_log", Scale.LOG1P, "prompt tokens waiting to be computed", "", _X),
        Feature("cached_prefix_frac", Scale.AS_IS, "how much of this call's prompt the replica has cached",
                "", _X),
        Feature("model_params_log10", Scale.AS_IS, "log10 of the replica model's parameter count", "", _X),
        Feature("is_tree_replica", Scale.AS_IS, "1 if an earlier call of the same tree ran there (locality)",
                "", _X),
        Feature("call_prompt_tokens_log", Scale.LOG1P, "the call being routed: its prompt tokens", "", _X),
        Feature("call_role_id", Scale.AS_IS, "the call being routed: its role id", "", _X),
    ),
)
"""One row per replica of a ROUTE decision; scaled by each row's own replica."""

RETAIN = Table(
    "retain",
    (
        # the option
        Feature("ttl_s", Scale.TIME, "the option's TTL (0: release now)", "", _X),
        Feature("is_release", Scale.AS_IS, "1 for a TTL of 0", "", _X),
        Feature("ttl_over_tool_mean", Scale.AS_IS,
                "TTL / (predicted tool pause + network delay), at most 8; 8 when none is predicted yet "
                "and the TTL is positive", "", _X),
        # the finished call and what its children would reuse
        Feature("tool_mean_s", Scale.TIME,
                "expected wait until its children are ready: the mean tool pause observed after calls of "
                "its role (0 until one is) + the cluster's network delay", "", _X),
        Feature("tools_seen_log", Scale.LOG1P, "tool pauses observed for its role: how much the mean is worth",
                "", _X),
        Feature("pin_blocks_frac", Scale.BLOCKS, "blocks the pin would hold", "", _X),
        Feature("context_tokens_log", Scale.LOG1P, "its prompt + output tokens", "", _X),
        Feature("children_log", Scale.LOG1P, "children that will reuse the prefix", "", _X),
        Feature("role_id", Scale.AS_IS, "its role id", "", _X),
        Feature("depth", Scale.AS_IS, "its depth", "", _X),
        Feature("tree_age_s", Scale.TIME, "time since its job arrived", "", _X),
        Feature("tree_predicted_left_log", Scale.LOG1P,
                "as the candidate column: predicted output left in its tree", "", _X),
        # the replica's retention state
        Feature("pinned_frac", Scale.BLOCKS, "blocks held by pins now", "", _X),
        Feature("pins_log", Scale.LOG1P, "pins held now", "", _X),
    ),
)
"""One row per option of ``EngineConfig.retain_ttls_s`` of a RETAIN decision; non-privileged (the
oracle's truth is the privileged ``true_tool_latency_s`` of every row)."""

CONFIG = Table(
    "config",
    (
        # the option
        Feature("max_num_seqs_log", Scale.LOG1P, "the option's running-call cap", "", _X),
        Feature("max_num_batched_tokens_log", Scale.LOG1P, "the option's token budget per iteration", "", _X),
        Feature("is_current", Scale.AS_IS, "1 for the replica's current pair (keeping it)", "", _X),
        Feature("seqs_over_demand", Scale.AS_IS,
                "cap / (running + waiting calls), at most 4: below 1 the cap leaves calls waiting", "", _X),
        Feature("kv_demand_frac", Scale.AS_IS,
                "cap x mean blocks held per running call / replica blocks, at most 4: past 1 a full "
                "batch of today's calls would not fit the cache (preemptions); 0 when nothing runs", "", _X),
        Feature("budget_over_queued", Scale.AS_IS,
                "token budget / (prompt tokens waiting to be computed + running calls), at most 4", "", _X),
        # the replica since its last CONFIG decision
        Feature("interval_s", Scale.TIME, "time since the replica's last CONFIG decision", "", _X),
        Feature("preemptions_since_log", Scale.LOG1P, "calls preempted on the replica since then", "", _X),
        Feature("finished_since_log", Scale.LOG1P, "calls finished on the replica since then", "", _X),
        Feature("mean_running_frac", Scale.AS_IS,
                "running calls averaged over the iterations since then / the current cap: how much of "
                "the cap was used", "", _X),
    ),
)
"""One row per option of a CONFIG decision: the grid ``config_max_num_seqs`` x
``config_max_num_batched_tokens`` in order, plus the current pair last when it lies off the grid."""

BUDGET = Table(
    "budget",
    (
        # the option
        Feature("multiplier", Scale.AS_IS, "the option's multiple of the call's workload budget", "", _X),
        Feature("is_workload", Scale.AS_IS, "1 for the workload's own budget (multiplier 1)", "", _X),
        Feature("max_tokens_log", Scale.LOG1P, "the option's max_tokens", "", _X),
        Feature("over_predicted", Scale.AS_IS,
                "max_tokens / the predicted output (as predicted_output_log), at most 8: below 1 a "
                "continuation is likely", "", _X),
        Feature("budget_blocks_frac", Scale.BLOCKS, "blocks the call holds at its budget: prompt + max_tokens",
                "", _X),
        # the call
        Feature("predicted_output_log", Scale.LOG1P,
                "as the candidate column: mean whole output (continuations included) of its role and tenant's "
                "finished calls, else of its role, else its workload budget", "", _X),
        Feature("outputs_seen_log", Scale.LOG1P, "finished outputs observed for its role: how much the "
                "prediction is worth", "", _X),
        Feature("prompt_tokens_log", Scale.LOG1P, "its prompt tokens", "", _X),
        Feature("children_log", Scale.LOG1P, "calls of its tree that wait for its output", "", _X),
        Feature("role_id", Scale.AS_IS, "its role id", "", _X),
        Feature("depth", Scale.AS_IS, "its depth", "", _X),
        Feature("tree_age_s", Scale.TIME, "time since its job arrived", "", _X),
        Feature("tree_predicted_left_log", Scale.LOG1P,
                "as the candidate column: predicted output left in its tree", "", _X),
    ),
)
"""One row per option of ``EngineConfig.budget_multipliers`` of a BUDGET decision; the oracle's
truth is the privileged ``true_remaining_output_tokens`` (the call's whole output) of every row."""
# fmt: on

TABLES: tuple[Table, ...] = (CANDIDATE, PRIVILEGED, GLOBAL, ROUTE, RETAIN, CONFIG, BUDGET)


def markdown(table: Table) -> str:
    """The table's columns as Markdown: name, scale, meaning, and how the vLLM adapter reads it."""
    lines = ["| column | scale | what it is | vLLM adapter |", "|---|---|---|---|"]
    for f in table.features:
        vllm = "not read" if f.vllm_reading is VllmReading.NOT_READ else f"{f.vllm_reading.value}: {f.vllm}"
        if f.neutral is not None:
            vllm += f" (writes {f.neutral:g})"
        lines.append(f"| `{f.name}` | {f.scale.value} | {f.doc} | {vllm} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"Feature schema v{FEATURE_SCHEMA_VERSION}")
    for table in TABLES:
        print(f"\n## {table.name}\n\n{markdown(table)}")

__all__ = [
    "BUDGET",
    "CANDIDATE",
    "CONFIG",
    "FEATURE_SCHEMA_VERSION",
    "GLOBAL",
    "PRIVILEGED",
    "RETAIN",
    "ROUTE",
    "TABLES",
    "Feature",
    "Scale",
    "ScaleContext",
    "Table",
    "VllmReading",
    "markdown",
]
