"""Run an exported policy with onnxruntime and numpy alone (no SB3, no Hydra, no torch).

A serving engine needs "features in, priorities out": ``ScoreRuntime`` loads ``policy.onnx``
and its sidecar ``policy.json``, refuses a sidecar whose feature schema differs from the one
this servegym speaks, and turns feature tables into scores. ``LearnedPolicy`` wraps any
scorer as a servegym ``Policy`` with exactly the env's action semantics (the same code path
as training, ``servegym.envs.observation``), so an exported policy run through the engine
reproduces the trained one. ``OnnxPolicy`` is that wrapper over a ``ScoreRuntime``.

Sidecar (JSON, written by ``servegym.agents.deploy.export``): ``format`` (this module's
``SIDECAR_FORMAT``), ``feature_schema_version``, ``layout`` (the slot tables of the env it was
trained on: ``["candidates"]`` for Scheduling/Eviction, ``["replicas"]`` for Routing, both for
Serving, ``["options"]`` for Retention, ``["configs"]`` for Config, ``["budgets"]`` for Budget), ``slot_features`` (the columns of the ONNX input ``candidates``: the layout's tables
side by side, replica columns prefixed ``replica.``), ``candidate_features`` and
``global_features`` (names, in column order), ``normalisation``, ``action`` (``type``: ``scores`` — Box scores,
clipped to [-1, 1], admission in descending order and eviction of the lowest — or ``logits``
— Discrete(K) over slots, the argmax is the victim or the replica), ``kinds`` (decision kinds
it answers; others go to the fallback), ``max_candidates`` (K it was trained with), ``stop``
(optional, pick-next: the network emits K + 1 logits, the last STOP's, over the presorted
candidate table of PickNext-v0)),
``role_vocabulary`` (the role names in ``role_id`` order: a role added to servegym would
otherwise shift what the policy's ``role_id`` input means, silently), ``fallback`` (optional:
the policy that answered the decisions it does not own in training, as ``{"_target_":
"servegym....", **arguments}``; ``OnnxPolicy`` rebuilds it, so a RETAIN policy trained under
tree-SRPT admission runs under it), ``inputs``/``outputs`` (tensor names), ``env_id``,
``config_sha256``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from servegym.envs.engine.policy import (
    CANDIDATE_FEATURES,
    GLOBAL_FEATURES,
    Decision,
    DecisionKind,
    DefaultPolicy,
    Policy,
)
from servegym.envs.engine.schema import FEATURE_SCHEMA_VERSION
from servegym.envs.observation import (
    LAYOUTS,
    TABLE_FEATURES,
    pick_scores,
    pick_valid,
    presort_rows,
    score_action,
    slot_scores,
    subset,
)
from servegym.envs.workloads.job import KNOWN_ROLES

SIDECAR_FORMAT = 3
"""v3 added ``role_vocabulary``; v2 the layout and its slot columns."""
ACTION_TYPES = ("scores", "logits")
INPUT_NAMES = ("global", "candidates", "mask")
GLOBAL_COLUMNS = (*GLOBAL_FEATURES, *(f"kind_{kind.name.lower()}" for kind in DecisionKind))


def slot_columns(layout: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The per-slot columns a policy of this layout reads, in order (replica and option columns
    prefixed)."""
    prefix = {
        "candidates": "",
        "replicas": "replica.",
        "options": "option.",
        "configs": "config.",
        "budgets": "budget.",
    }
    return tuple(prefix[table] + name for table in layout for name in TABLE_FEATURES[table])


class SidecarError(ValueError):
    """The exported policy does not speak this servegym's feature schema or action semantics."""


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar's JSON object; a file that is not one (truncated, a list, not UTF-8) raises
    ``SidecarError`` naming the file."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SidecarError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); a truncated "
            "or hand-edited sidecar: re-export the policy (servegym.agents.deploy.export.export_policy)"
        ) from err
    except UnicodeDecodeError as err:
        raise SidecarError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-export the policy"
        ) from err
    if not isinstance(meta, dict):
        raise SidecarError(
            f"{path}: a sidecar is a JSON object (format, feature_schema_version, layout, ...), got a "
            f"{type(meta).__name__}; re-export the policy"
        )
    return meta


def check_sidecar(meta: dict[str, Any], source: str = "sidecar") -> dict[str, Any]:
    """Validate a sidecar; every mismatch names what was expected."""
    if not isinstance(meta, dict):
        raise SidecarError(f"{source}: a sidecar is a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != SIDECAR_FORMAT:
        raise SidecarError(f"{source}: format {meta.get('format')!r}, this runtime reads {SIDECAR_FORMAT}")
    version = meta.get("feature_schema_version")
    if version != FEATURE_SCHEMA_VERSION:
        raise SidecarError(
            f"{source}: policy was trained on feature schema v{version}, this servegym builds "
            f"v{FEATURE_SCHEMA_VERSION}; re-export it from a matching servegym"
        )
    if tuple(meta.get("candidate_features", ())) != CANDIDATE_FEATURES:
        raise SidecarError(f"{source}: candidate_features differ from {list(CANDIDATE_FEATURES)}")
    layout = tuple(meta.get("layout", ()))
    if layout not in LAYOUTS:
        raise SidecarError(f"{source}: layout {list(layout)} is not one of {[list(k) for k in LAYOUTS]}")
    if tuple(meta.get("slot_features", ())) != slot_columns(layout):
        raise SidecarError(f"{source}: slot_features differ from {list(slot_columns(layout))}")
    roles = meta.get("role_vocabulary")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise SidecarError(f"{source}: role_vocabulary must be a list of role names, got {roles!r}")
    roles = tuple(roles)
    if roles != KNOWN_ROLES:
        changed = next(
            (i for i, (a, b) in enumerate(zip(roles, KNOWN_ROLES, strict=False)) if a != b),
            min(len(roles), len(KNOWN_ROLES)),
        )
        raise SidecarError(
            f"{source}: role_vocabulary {list(roles)} differs from this servegym's {list(KNOWN_ROLES)} "
            f"(from role_id {changed}): the policy's role_id input would mean other roles; retrain "
            "or re-export it from a matching servegym"
        )
    if tuple(meta.get("global_features", ())) != GLOBAL_COLUMNS:
        raise SidecarError(f"{source}: global_features differ from {list(GLOBAL_COLUMNS)}")
    action = meta.get("action", {})
    if not isinstance(action, dict):
        raise SidecarError(f"{source}: action must be an object, got {action!r}")
    if action.get("type") not in ACTION_TYPES:
        raise SidecarError(f"{source}: action.type {action.get('type')!r} is not one of {ACTION_TYPES}")
    kinds = action.get("kinds", [])
    if not kinds or any(k not in DecisionKind.__members__ for k in kinds):
        raise SidecarError(
            f"{source}: action.kinds {kinds!r} must name some of {list(DecisionKind.__members__)}"
        )
    if not isinstance(action.get("max_candidates"), int) or action["max_candidates"] < 1:
        raise SidecarError(f"{source}: action.max_candidates must be a positive int")
    if not isinstance(action.get("stop", False), bool) or (action.get("stop") and action["type"] != "logits"):
        raise SidecarError(f"{source}: action.stop must be a bool, and true only for logits")
    fallback = meta.get("fallback")
    if fallback is not None and not _is_target(fallback):
        raise SidecarError(
            f"{source}: fallback must be null or an object whose _target_ names a servegym class, got {fallback!r}"
        )
    return meta


def _is_target(node: Any) -> bool:
    return isinstance(node, dict) and str(node.get("_target_", "")).startswith("servegym.")


def build_target(node: Any) -> Any:
    """Hydra's ``instantiate`` for the small nodes a sidecar holds (a servegym class and its
    arguments, which may be such nodes themselves), without Hydra: the runtime stays lean."""
    if isinstance(node, list):
        return [build_target(item) for item in node]
    if not isinstance(node, dict):
        return node
    if not _is_target(node):
        return {key: build_target(value) for key, value in node.items()}
    target = node["_target_"]
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise  # the module exists but a package it imports is missing: that message names it
        raise SidecarError(_unknown_target(target, f"there is no module {error.name}")) from error
    if not hasattr(module, name):
        raise SidecarError(_unknown_target(target, f"{module_name} has no {name}"))
    kwargs = {key: build_target(value) for key, value in node.items() if key != "_target_"}
    return getattr(module, name)(**kwargs)


def _unknown_target(target: str, why: str) -> str:
    return (
        f"sidecar fallback _target_ {target!r} names no class ({why}). A policy exported before "
        "servegym.agents was split into subpackages names the old path: re-export it, or write the "
        "class's current path into the sidecar's fallback (agents/README.md, Layout), e.g. "
        "servegym.agents.heuristics.FCFS -> servegym.agents.policies.heuristics.FCFS"
    )


class ScoreRuntime:
    """An exported policy: ``scores(global, candidates, mask)`` -> one score per candidate."""

    def __init__(self, onnx_path: str | Path, num_threads: int = 1) -> None:
        import onnxruntime as ort  # imported here so the schema helpers work without it

        self.path = Path(onnx_path)
        meta_path = sidecar_path(self.path)
        if not meta_path.exists():
            raise FileNotFoundError(f"no sidecar {meta_path} next to {self.path}; export writes both")
        self.meta = check_sidecar(read_sidecar(meta_path), str(meta_path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._check_graph(meta_path)

    def _check_graph(self, meta_path: Path) -> None:
        """The ONNX inputs must have the widths the sidecar's layout describes: a sidecar copied
        from another env's export would otherwise fail inside onnxruntime at the first decision."""
        widths = {"global": len(GLOBAL_COLUMNS), "candidates": len(self.meta["slot_features"])}
        inputs = {node.name: node.shape for node in self.session.get_inputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise SidecarError(f"{self.path}: ONNX inputs {sorted(inputs)}, expected {list(INPUT_NAMES)}")
        for name, width in widths.items():
            last = inputs[name][-1]
            if isinstance(last, int) and last != width:
                raise SidecarError(
                    f"{self.path}: ONNX input {name!r} has {last} columns, but {meta_path} describes "
                    f"{width} (layout {self.meta['layout']}, env {self.meta.get('env_id') or '?'}); the "
                    "model and its sidecar come from different exports: keep policy.onnx and the "
                    "policy.json written with it together"
                )

    @property
    def action(self) -> dict[str, Any]:
        return self.meta["action"]

    def scores(self, global_: np.ndarray, candidates: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Unbatched (G,), (N, F), (N,) -> (N,), or batched with a leading axis; any N >= 1."""
        single = candidates.ndim == 2
        inputs = [np.asarray(x, dtype=np.float32) for x in (global_, candidates, mask)]
        if single:
            inputs = [x[None] for x in inputs]
        width = len(self.meta["slot_features"])
        if inputs[1].shape[-1] != width or inputs[0].shape[-1] != len(GLOBAL_COLUMNS):
            raise ValueError(
                f"expected global (.., {len(GLOBAL_COLUMNS)}) and candidates (.., N, {width}), "
                f"got {inputs[0].shape} and {inputs[1].shape}"
            )
        (out,) = self.session.run(None, dict(zip(INPUT_NAMES, inputs, strict=True)))
        return out[0] if single else out


class LearnedPolicy:
    """A slot scorer as a servegym ``Policy``: the env's observation and action semantics, the
    fallback for decision kinds it was not trained on and for candidates beyond its K."""

    def __init__(
        self,
        action: dict[str, Any],
        fallback: Policy | None = None,
        layout: tuple[str, ...] = ("candidates",),
    ) -> None:
        self.action_type = action["type"]
        self.kinds = {DecisionKind[name] for name in action["kinds"]}
        self.max_candidates = int(action["max_candidates"])
        self.stop = bool(action.get("stop", False))  # pick-next: K + 1 logits, STOP last
        self.fallback = fallback or DefaultPolicy()
        self.layout = layout  # the slot tables of the env it was trained on (envs/observation.py)
        self._observe = LAYOUTS[layout]
        # the engine must ask the RETAIN decisions it answers; the fallback's own hints (e.g.
        # KVFlow's eviction order) hold for the rest
        hints = dict(getattr(self.fallback, "retention", None) or {})
        if DecisionKind.RETAIN in self.kinds:
            hints["pin_ttl_rule"] = "policy"
        self.retention = hints or None

    @property
    def routing_only(self) -> bool:
        """A policy trained on ROUTE alone; the engine refuses it in a one-replica cluster."""
        return self.kinds == {DecisionKind.ROUTE}

    def slot_outputs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """(K,) raw outputs for one observation; subclasses run their network here."""
        raise NotImplementedError

    def slot_table(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The layout's tables side by side: the rows the network scores (as ``SlotFlatten``)."""
        return np.concatenate([obs[key] for key in self.layout], axis=1)

    def scores(self, decision: Decision) -> np.ndarray:
        if decision.kind not in self.kinds:
            return self.fallback.scores(decision)
        k = self.max_candidates
        if self.stop:  # PickNext-v0: the env's presorted table and pick-next semantics
            rows = presort_rows(decision)
            raw = np.asarray(self.slot_outputs(self._observe(subset(decision, rows), k)), dtype=np.float64)
            valid = pick_valid(decision, rows, k)
            if not valid.any():  # every call that fits sits past slot K: not this policy's to pick
                return self.fallback.scores(decision)
            slot = int(np.argmax(np.where(valid, raw[: k + 1], -np.inf)))
            return pick_scores(decision, rows, slot, k)
        raw = np.asarray(self.slot_outputs(self._observe(decision, k)), dtype=np.float64)
        if self.action_type == "logits":
            return logit_scores(decision, raw, k)
        if decision.kind == DecisionKind.ROUTE:  # Serving-v0: replicas in the first slots
            return score_action(raw, k)[: len(decision)].copy()
        return slot_scores(decision, raw, k, self.fallback)


def logit_scores(decision: Decision, logits: np.ndarray, max_candidates: int) -> np.ndarray:
    """Discrete(K) semantics as scores: the valid argmax slot is chosen; for EVICT the chosen
    victim must score lowest, for ORDER and ROUTE highest. Slots beyond K are never chosen."""
    n = len(decision)
    k = min(n, max_candidates)
    valid = decision.mask[:k]
    if not valid.any():
        raise ValueError(f"{decision.kind.name} decision with no valid candidate among the first {k}")
    chosen = int(np.argmax(np.where(valid, logits[:k], -np.inf)))
    scores = np.zeros(n)
    scores[chosen] = -1.0 if decision.kind == DecisionKind.EVICT else 1.0
    return scores


class OnnxPolicy(LearnedPolicy):
    """An exported policy file as a Policy (``agent=onnx agent.path=...``)."""

    def __init__(self, path: str, fallback: Policy | None = None, num_threads: int = 1) -> None:
        """``fallback`` None: the sidecar's (the policy it was trained with), else FCFS."""
        self.runtime = ScoreRuntime(path, num_threads=num_threads)
        if fallback is None and self.runtime.meta.get("fallback") is not None:
            fallback = build_target(self.runtime.meta["fallback"])
        super().__init__(self.runtime.action, fallback, tuple(self.runtime.meta["layout"]))

    def slot_outputs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.runtime.scores(obs["global"], self.slot_table(obs), obs["mask"])


__all__ = [
    "GLOBAL_COLUMNS",
    "SIDECAR_FORMAT",
    "LearnedPolicy",
    "OnnxPolicy",
    "ScoreRuntime",
    "SidecarError",
    "build_target",
    "check_sidecar",
    "read_sidecar",
    "slot_columns",
    "logit_scores",
    "sidecar_path",
]
