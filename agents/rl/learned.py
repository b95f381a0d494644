"""A trained SB3 model as a servegym ``Policy`` (``agent=ppo agent.checkpoint=...``).

It drives the engine through ``LearnedPolicy``, the same observation/action code as the env
and the ONNX runtime, and reads the network's deterministic output: the Gaussian mean for
score actions, the logits for slot actions. So a checkpoint, its ONNX export and the env all
make identical decisions from identical tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from servegym.agents.deploy.runtime import LearnedPolicy
from servegym.agents.rl.networks import ScoreNetwork
from servegym.envs.engine.policy import Policy
from servegym.envs.observation import observation_layout

ALGORITHMS = ("ppo", "maskable_ppo")


def load_model(checkpoint: str | Path, algo: str | None = None):
    """Load an SB3 checkpoint; ``algo`` defaults to the one its policy class implies."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import PPO

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if algo is None:
        try:
            return PPO.load(path, device="cpu")
        except Exception:  # noqa: BLE001 - SB3 raises various types for a policy-class mismatch
            return MaskablePPO.load(path, device="cpu")
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
    return (PPO if algo == "ppo" else MaskablePPO).load(path, device="cpu")


def action_semantics(model, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The sidecar's ``action`` block for a model trained on an env with these decision kinds."""
    from gymnasium import spaces

    space = model.action_space
    action_type = "scores" if isinstance(space, spaces.Box) else "logits"
    table = observation_layout(model.observation_space.spaces)[0]
    num_slots = int(model.observation_space[table].shape[0])
    action = {"type": action_type, "kinds": [k.upper() for k in kinds], "max_candidates": num_slots}
    if isinstance(space, spaces.Discrete) and int(space.n) == num_slots + 1:
        action["stop"] = True  # pick-next (PickNext-v0): the last logit is STOP's
    return action


class SB3Policy(LearnedPolicy):
    """Deterministic scores from an SB3 model; ``kinds`` are the decisions it was trained on."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model=None,
        kinds: tuple[str, ...] = ("order", "evict"),
        fallback: Policy | None = None,
        algo: str | None = None,
        hyperparams: dict | None = None,
        network: dict | None = None,
    ) -> None:
        """``hyperparams`` and ``network`` are the training settings of the same agent config;
        loading a checkpoint ignores them (SB3 stores its own)."""
        if model is None:
            if checkpoint is None:
                raise ValueError("SB3Policy needs a checkpoint (agent.checkpoint=PATH) or a model")
            model = load_model(checkpoint, algo)
        self.model = model
        self.network = ScoreNetwork(model.policy).eval()
        layout = observation_layout(model.observation_space.spaces)
        super().__init__(action_semantics(model, tuple(kinds)), fallback, layout)

    def slot_outputs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        with th.no_grad():
            x = [th.as_tensor(a)[None] for a in (obs["global"], self.slot_table(obs), obs["mask"])]
            return self.network(*x)[0].numpy()
