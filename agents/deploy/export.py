"""Export a trained policy for serving engines: ONNX with a dynamic candidate axis, a JSON
sidecar (feature schema, action semantics, training config hash), and TorchScript.

Only the scoring part leaves (``ScoreNetwork``: shared encoder, pooling, per-slot head); the
value head and the exploration noise stay behind. ``servegym.agents.deploy.runtime`` runs the
result with onnxruntime and numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from servegym.agents.deploy.runtime import (
    GLOBAL_COLUMNS,
    INPUT_NAMES,
    SIDECAR_FORMAT,
    check_sidecar,
    sidecar_path,
    slot_columns,
)
from servegym.agents.rl.learned import action_semantics
from servegym.agents.rl.networks import ScoreNetwork
from servegym.envs.engine.policy import CANDIDATE_FEATURES
from servegym.envs.engine.schema import FEATURE_SCHEMA_VERSION
from servegym.envs.observation import observation_layout
from servegym.envs.workloads.job import KNOWN_ROLES

OPSET = 17


def config_sha256(config: dict[str, Any] | str | None) -> str | None:
    """Hash of the resolved training config, so a deployed file names what trained it."""
    if config is None:
        return None
    text = config if isinstance(config, str) else json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def env_fallback_node(config: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """The training config's ``env.fallback`` (resolved), which the sidecar carries so the
    runtime answers the other decisions as training did."""
    if not isinstance(config, dict):
        return None
    return (config.get("env") or {}).get("fallback")


def export_policy(
    model,
    onnx_path: str | Path,
    kinds: tuple[str, ...],
    env_id: str = "",
    config: dict[str, Any] | str | None = None,
    torchscript: bool = True,
) -> dict[str, Path]:
    """Write ``policy.onnx``, ``policy.json`` and (optionally) ``policy.pt``; returns the paths."""
    layout = observation_layout(model.observation_space.spaces)
    columns = slot_columns(layout)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    network = ScoreNetwork(model.policy).cpu().eval()
    k = int(model.observation_space[layout[0]].shape[0])
    example = (th.zeros(1, len(GLOBAL_COLUMNS)), th.randn(1, k, len(columns)), th.ones(1, k))
    action = action_semantics(model, kinds)
    outputs = "num_candidates_and_stop" if action.get("stop") else "num_candidates"  # STOP last
    dynamic = {
        "global": {0: "batch"},
        "candidates": {0: "batch", 1: "num_candidates"},
        "mask": {0: "batch", 1: "num_candidates"},
        "scores": {0: "batch", 1: outputs},
    }
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore")
        th.onnx.export(
            network,
            example,
            str(onnx_path),
            input_names=list(INPUT_NAMES),
            output_names=["scores"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    meta = {
        "format": SIDECAR_FORMAT,
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "layout": list(layout),
        "slot_features": list(columns),
        "candidate_features": list(CANDIDATE_FEATURES),
        "global_features": list(GLOBAL_COLUMNS),
        "role_vocabulary": list(KNOWN_ROLES),
        "normalisation": "none: features are scaled by construction (servegym.envs.engine.policy)",
        "action": action,
        "inputs": {
            "global": ["batch", "global_features"],
            "candidates": ["batch", "num_candidates", "slot_features"],
            "mask": ["batch", "num_candidates"],
        },
        "outputs": {"scores": ["batch", outputs]},
        "opset": OPSET,
        "env_id": env_id,
        "config_sha256": config_sha256(config),
        "fallback": env_fallback_node(config),
    }
    check_sidecar(meta, "export")
    paths = {"onnx": onnx_path, "sidecar": sidecar_path(onnx_path)}
    paths["sidecar"].write_text(json.dumps(meta, indent=2) + "\n")
    if torchscript:
        paths["torchscript"] = onnx_path.with_suffix(".pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            th.jit.trace(network, example).save(str(paths["torchscript"]))
    return paths


def max_abs_difference(model, onnx_path: str | Path, observations: dict[str, np.ndarray]) -> float:
    """Largest |runtime score - SB3 network score| over a batch of observations."""
    from servegym.agents.deploy.runtime import ScoreRuntime

    runtime = ScoreRuntime(onnx_path)
    network = ScoreNetwork(model.policy).cpu().eval()
    with th.no_grad():
        expected = network(*(th.as_tensor(observations[key]) for key in INPUT_NAMES)).numpy()
    got = runtime.scores(*(observations[key] for key in INPUT_NAMES))
    mask = observations["mask"] > 0.5
    if got.shape[-1] == mask.shape[-1] + 1:  # pick-next: STOP's logit is always real
        mask = np.concatenate([mask, np.ones_like(mask[..., :1])], axis=-1)
    return float(np.abs(got - expected)[mask].max()) if mask.any() else 0.0
