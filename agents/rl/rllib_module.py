"""The project's set network as an RLlib RLModule (new API stack), and its export.

``SetRLModule`` holds exactly the modules of ``MaskableSetActorCriticPolicy`` (the shared
``SetTrunk``, a per-slot ``SlotHead``, a value head on the pooled context), so a policy trained
by RLlib is the same function as one trained by SB3 and leaves through the same exporter:
``exportable(module)`` presents it as ``export_policy`` and ``max_abs_difference`` expect an SB3
model (spaces, ``policy.mlp_extractor``, ``policy.action_net``); the ONNX file and its sidecar
cannot tell which trainer made them.

Action masking: the observation's ``mask`` (real slots) sets the logits of padded or
ineligible slots to ``MASKED_LOGIT`` before RLlib builds its categorical distribution, so they
are never sampled and carry no probability in the loss. Slot actions only (``Discrete(K)``:
Routing-v0, Eviction-v0); the pick-next STOP action is not wired here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch as th
from gymnasium import spaces
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

from servegym.agents.rl.networks import SetTrunk, SlotHead, _table_shape, _tables

MASKED_LOGIT = -1e9
"""Logit of a slot the mask rules out: exp() of it is 0 in float32, so it is never sampled."""


class SetRLModule(TorchRLModule, ValueFunctionAPI):
    """Permutation-equivariant actor-critic over a Dict observation (global, slot tables, mask)
    with ``Discrete(K)`` slot actions. ``model_config``: ``hidden`` (width of every layer, 64)."""

    def setup(self) -> None:
        if not isinstance(self.action_space, spaces.Discrete):
            raise ValueError(
                f"SetRLModule needs Discrete(K) slot actions (Routing-v0, Eviction-v0), got {self.action_space}"
            )
        num_global, num_slots, num_features = _table_shape(self.observation_space)
        if int(self.action_space.n) != num_slots:
            raise ValueError(
                f"SetRLModule: {self.action_space.n} actions for {num_slots} slots; a STOP action "
                "(PickNext-v0) is not supported by the RLlib trainer yet"
            )
        hidden = int((self.model_config or {}).get("hidden", 64))
        self.tables = _tables(self.observation_space)
        self.mlp_extractor = SetTrunk(num_global, num_slots, num_features, hidden=hidden)
        self.action_net = SlotHead(hidden)
        self.value_net = nn.Linear(hidden, 1)

    def _encode(self, obs: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor]:
        candidates = th.cat([obs[key] for key in self.tables], dim=2)  # (B, K, F)
        return self.mlp_extractor.encode_set(obs["global"], candidates, obs["mask"])

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        slots, context = self._encode(obs)  # (B, K, H), (B, H)
        logits = self.action_net.score(slots)  # (B, K)
        logits = th.where(obs["mask"] > 0.5, logits, th.full_like(logits, MASKED_LOGIT))
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: context}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> th.Tensor:
        if embeddings is None:
            embeddings = self._encode(batch[Columns.OBS])[1]
        return self.value_net(embeddings).squeeze(-1)  # (B,)


def exportable(module: SetRLModule) -> SimpleNamespace:
    """The module as ``export_policy(model, ...)`` and ``max_abs_difference`` read an SB3 model."""
    return SimpleNamespace(
        observation_space=module.observation_space,
        action_space=module.action_space,
        policy=SimpleNamespace(mlp_extractor=module.mlp_extractor, action_net=module.action_net),
    )
