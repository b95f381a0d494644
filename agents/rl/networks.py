"""Permutation-equivariant actor-critic for candidate tables, as SB3 policies.

A scheduling observation is a *set* of candidates padded to K slots. A network that reads the
flattened table would learn that slot 3 means something, and would not export to a serving
engine whose queue has 200 entries. Here every candidate goes through the same encoder, the
set is summarised by masked mean and max pooling (Deep Sets), the summary is joined back to
each candidate, and one shared head scores each slot. Permuting the slots permutes the scores
and leaves the value alone, and the same weights run for any K (the ONNX export has a dynamic
candidate axis).

SB3 wiring: ``SlotFlatten`` flattens the Dict observation in a fixed order, ``SetTrunk``
replaces SB3's ``MlpExtractor`` (its policy latent is one row per slot plus the slot's mask,
its value latent the pooled context), and a per-slot linear head replaces ``action_net``.
``SetActorCriticPolicy`` (PPO, Box scores) keeps one shared log-std and sums log-probabilities
over real slots only; ``MaskableSetActorCriticPolicy`` (MaskablePPO, Discrete(K)) emits one
logit per slot and lets sb3-contrib apply the action mask.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, cast

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from servegym.envs.observation import observation_layout

if TYPE_CHECKING:
    from stable_baselines3.common.policies import BasePolicy

    _PolicyBase = BasePolicy  # what _SetPolicy is mixed into, for type checkers
else:
    _PolicyBase = object

OBS_KEYS = ("global", "candidates", "mask")
"""The Dict observation of Scheduling-v0 and Eviction-v0; ``SlotFlatten`` concatenates it in
this order. Routing-v0 has ``replicas`` for ``candidates``; Serving-v0 both, one row per slot."""


def _tables(observation_space: spaces.Dict) -> list[str]:
    missing = [key for key in ("global", "mask") if key not in observation_space.spaces]
    if missing:
        raise ValueError(f"the set policy needs observation keys global and mask; missing {missing}")
    return list(observation_layout(observation_space.spaces))


def _box(observation_space: spaces.Dict, key: str) -> spaces.Box:
    return cast(spaces.Box, observation_space[key])  # every part is a Box (envs/observation.py)


def _table_shape(observation_space: spaces.Dict) -> tuple[int, int, int]:
    """(G, K, F): per-slot features are the slot's rows of every table, side by side."""
    tables = _tables(observation_space)
    num_global = int(_box(observation_space, "global").shape[0])
    num_slots = int(_box(observation_space, tables[0]).shape[0])
    num_features = sum(int(_box(observation_space, key).shape[1]) for key in tables)
    return num_global, num_slots, num_features


class SlotFlatten(BaseFeaturesExtractor):
    """Concatenates global, the slot tables and mask in a fixed order (SB3's CombinedExtractor
    sorts keys; the trunk must know exactly where each part sits)."""

    def __init__(self, observation_space: spaces.Dict) -> None:
        num_global, num_slots, num_features = _table_shape(observation_space)
        self.tables = _tables(observation_space)
        super().__init__(observation_space, num_global + num_slots * num_features + num_slots)

    def forward(self, obs: dict[str, th.Tensor]) -> th.Tensor:
        table = th.cat([obs[key] for key in self.tables], dim=2)
        return th.cat([obs["global"], table.flatten(1), obs["mask"]], dim=1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.SiLU()]
    return nn.Sequential(*layers)


class SetTrunk(nn.Module):
    """Shared candidate encoder + pooled context; works for any number of slots. With
    ``with_context`` the policy latent ends with the pooled context (a STOP logit reads it)."""

    def __init__(
        self, num_global: int, num_slots: int, num_features: int, hidden: int = 64, with_context: bool = False
    ) -> None:
        super().__init__()
        self.num_global, self.num_slots, self.num_features = num_global, num_slots, num_features
        self.hidden, self.with_context = hidden, with_context
        self.encode = _mlp([num_features + num_global, hidden, hidden])
        self.pool = _mlp([2 * hidden + num_global, hidden])
        self.join = _mlp([2 * hidden, hidden])
        # per slot: latent + its mask bit; then the context when a STOP logit needs it
        self.latent_dim_pi = num_slots * (hidden + 1) + (hidden if with_context else 0)
        self.latent_dim_vf = hidden

    def encode_set(
        self, global_: th.Tensor, candidates: th.Tensor, mask: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor]:
        """(B, G), (B, K, F), (B, K) -> per-slot latents (B, K, H), context (B, H)."""
        k = candidates.shape[1]
        rows = th.cat([candidates, global_.unsqueeze(1).expand(-1, k, -1)], dim=2)
        h = self.encode(rows)
        valid = mask.unsqueeze(2) > 0.5
        count = valid.sum(dim=1).clamp(min=1)
        mean = th.where(valid, h, th.zeros_like(h)).sum(dim=1) / count
        # max over real slots; an all-empty table (a terminal observation) pools to zeros
        top = th.where(valid, h, th.full_like(h, -1e9)).max(dim=1).values
        top = th.where(valid.any(dim=1), top, th.zeros_like(top))
        context = self.pool(th.cat([mean, top, global_], dim=1))
        slots = self.join(th.cat([h, context.unsqueeze(1).expand(-1, k, -1)], dim=2))
        return slots, context

    def split(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        g, k, f = self.num_global, self.num_slots, self.num_features
        global_ = features[:, :g]
        candidates = features[:, g : g + k * f].reshape(-1, k, f)
        mask = features[:, g + k * f :]
        return global_, candidates, mask

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        global_, candidates, mask = self.split(features)
        slots, context = self.encode_set(global_, candidates, mask)
        latent_pi = th.cat([slots, mask.unsqueeze(2)], dim=2).flatten(1)
        if self.with_context:
            latent_pi = th.cat([latent_pi, context], dim=1)
        return latent_pi, context

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.forward(features)[0]

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self.forward(features)[1]


class SlotHead(nn.Module):
    """One score per slot from the per-slot latent (the trailing mask bit is skipped).

    ``squash`` bounds score means with tanh. Score actions are clipped to [-1, 1] by SB3 and
    the env, and only their order matters: an unbounded mean drifts past the bound, every
    candidate then clips to the same value, and the order collapses to slot order (seen: a
    cloned program-FCFS policy turned into plain FCFS within 10k PPO steps). Exploration noise
    still crosses the bound; the deterministic policy never ties by saturation."""

    def __init__(self, hidden: int, squash: bool = False) -> None:
        super().__init__()
        self.hidden, self.squash = hidden, squash
        self.linear = nn.Linear(hidden, 1)

    def score(self, slots: th.Tensor) -> th.Tensor:
        out = self.linear(slots).squeeze(2)
        return th.tanh(out) if self.squash else out

    def forward(self, latent_pi: th.Tensor) -> th.Tensor:
        return self.score(latent_pi.reshape(latent_pi.shape[0], -1, self.hidden + 1)[..., : self.hidden])


class StopSlotHead(SlotHead):
    """Slot logits plus a STOP logit (the last action) read from the pooled context: the
    pick-next action space ``Discrete(K + 1)`` (PickNext-v0)."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        self.stop = nn.Linear(hidden, 1)

    def stop_logit(self, context: th.Tensor) -> th.Tensor:
        return self.stop(context)  # (B, 1)

    def forward(self, latent_pi: th.Tensor) -> th.Tensor:
        h = self.hidden
        slots, context = latent_pi[:, :-h], latent_pi[:, -h:]
        return th.cat([super().forward(slots), self.stop_logit(context)], dim=1)


def slot_mask(latent_pi: th.Tensor, hidden: int) -> th.Tensor:
    return latent_pi.reshape(latent_pi.shape[0], -1, hidden + 1)[..., hidden]


class MaskedDiagGaussian(DiagGaussianDistribution):
    """A Gaussian per slot whose padded slots do not count: their sampled score is ignored by
    the env, so their log-probability and entropy would only add noise to the gradient."""

    def proba_distribution(
        self, mean_actions: th.Tensor, log_std: th.Tensor, mask: th.Tensor | None = None
    ) -> MaskedDiagGaussian:
        super().proba_distribution(mean_actions, log_std)
        self.mask = th.ones_like(mean_actions) if mask is None else mask
        return self

    def log_prob(self, actions: th.Tensor) -> th.Tensor:
        return (self.distribution.log_prob(actions) * self.mask).sum(dim=1)

    def entropy(self) -> th.Tensor:
        return (self.distribution.entropy() * self.mask).sum(dim=1)


def _init_set_modules(policy: BasePolicy, gains: dict[nn.Module, float]) -> None:
    for module, gain in gains.items():
        module.apply(partial(policy.init_weights, gain=gain))


class _SetPolicy(_PolicyBase):
    """What both SB3 policies share: the set trunk, ``hidden`` as a saved constructor argument,
    the value head, orthogonal init and the optimizer; each policy builds its own action head."""

    observation_space: spaces.Dict  # the Dict observation (SlotFlatten)
    ortho_init: bool  # set by the SB3 policy it is mixed into
    action_net: SlotHead  # set by _build_action_head

    def __init__(self, observation_space, action_space, lr_schedule, hidden: int = 64, **kwargs) -> None:
        self.hidden = hidden
        kwargs.setdefault("features_extractor_class", SlotFlatten)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _get_constructor_parameters(self) -> dict:
        return {**super()._get_constructor_parameters(), "hidden": self.hidden}

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = SetTrunk(
            *_table_shape(self.observation_space), hidden=self.hidden, with_context=self._has_stop()
        )

    def _has_stop(self) -> bool:
        """Discrete(K + 1) over K slots: the last action is STOP (pick-next)."""
        num_slots = _table_shape(self.observation_space)[1]
        return isinstance(self.action_space, spaces.Discrete) and int(self.action_space.n) == num_slots + 1

    def _build_action_head(self) -> None:
        raise NotImplementedError

    def _build(self, lr_schedule) -> None:
        self._build_mlp_extractor()
        self._build_action_head()
        self.value_net = nn.Linear(self.hidden, 1)
        if self.ortho_init:
            _init_set_modules(
                self, {self.mlp_extractor: np.sqrt(2), self.action_net: 0.01, self.value_net: 1.0}
            )
        # as in SB3's own _build: type[Optimizer] has no lr, every optimizer class takes one
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )


# SB3 types mlp_extractor as its MlpExtractor; SetTrunk stands in for it (same latent_dim_*,
# forward_actor and forward_critic), hence the ignore[misc] on the two policies.
class SetActorCriticPolicy(_SetPolicy, ActorCriticPolicy):  # type: ignore[misc]
    """PPO policy over a Box of per-slot scores. ``hidden`` sizes every layer; the standard
    deviation is one shared parameter, so no slot is special."""

    action_space: spaces.Box
    action_dist: MaskedDiagGaussian

    def _build_action_head(self) -> None:
        self.action_dist = MaskedDiagGaussian(int(np.prod(self.action_space.shape)))
        self.action_net = SlotHead(self.hidden, squash=True)
        self.log_std = nn.Parameter(th.full((1,), float(self.log_std_init)))

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor) -> MaskedDiagGaussian:
        mean = self.action_net(latent_pi)
        return self.action_dist.proba_distribution(mean, self.log_std, slot_mask(latent_pi, self.hidden))


class MaskableSetActorCriticPolicy(_SetPolicy, MaskableActorCriticPolicy):  # type: ignore[misc]
    """MaskablePPO policy over Discrete(K): one logit per slot from the shared head; over
    Discrete(K + 1) (pick-next) a learned STOP logit from the pooled context follows them.

    ``stop_bias`` initialises the STOP logit's bias. At 0 a fresh policy stops about as often as
    it admits any one call, and since a STOP ends the iteration's admissions, it serialises the
    engine (seen: 15-17x program-FCFS's tree time after 40k PPO steps from scratch). Starting
    well below the slot logits makes a fresh policy work-conserving, like every heuristic, and
    leaves PPO to learn where holding back pays."""

    def __init__(self, *args, stop_bias: float = -4.0, **kwargs) -> None:
        self.stop_bias = stop_bias
        super().__init__(*args, **kwargs)

    def _get_constructor_parameters(self) -> dict:
        return {**super()._get_constructor_parameters(), "stop_bias": self.stop_bias}

    def _build_action_head(self) -> None:
        self.action_net = StopSlotHead(self.hidden) if self._has_stop() else SlotHead(self.hidden)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        if isinstance(self.action_net, StopSlotHead):
            with th.no_grad():
                self.action_net.stop.bias.fill_(self.stop_bias)


class ScoreNetwork(nn.Module):
    """The part of a trained policy a serving engine needs: (global, candidates, mask) ->
    one score per candidate (the Gaussian's mean, or the logits), for any number of candidates."""

    def __init__(self, policy: SetActorCriticPolicy | MaskableSetActorCriticPolicy) -> None:
        super().__init__()
        self.trunk: SetTrunk = policy.mlp_extractor
        self.head: SlotHead = policy.action_net

    def forward(self, global_: th.Tensor, candidates: th.Tensor, mask: th.Tensor) -> th.Tensor:
        slots, context = self.trunk.encode_set(global_, candidates, mask)
        scores = self.head.score(slots)
        if isinstance(self.head, StopSlotHead):  # (B, K + 1): STOP's score last
            scores = th.cat([scores, self.head.stop_logit(context)], dim=1)
        return scores


__all__ = [
    "OBS_KEYS",
    "MaskableSetActorCriticPolicy",
    "ScoreNetwork",
    "SetActorCriticPolicy",
    "SetTrunk",
    "SlotFlatten",
    "StopSlotHead",
]
