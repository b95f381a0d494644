"""Warm-start a policy by behaviour cloning a heuristic, before PPO refines it.

Why: with Gaussian score actions, a randomly initialised policy orders candidates at random,
and the effect of one admission order on the total tree time shows up many decisions later,
drowned in the noise of everything else. On our 2-core budget (tens of thousands of env
steps) PPO from scratch barely moves (README, "Training"). Cloning a heuristic first puts the
policy where ordering already means something; PPO then explores by small reorderings
(a small standard deviation) around it.

The teacher drives the engine; at each decision of a kind the env hands the agent, its scores
become per-slot targets by rank (best 0.9, worst -0.9, evenly spaced) inside the [-1, 1]
range the env clips actions to, and the policy mean is regressed on them over real slots.

Slot policies (PickNext-v0, a masked Discrete(K + 1) with STOP) clone by cross-entropy instead:
the teacher drives the env itself (``PickNextEnv.policy_slot``: the slot of the call it picks),
so the observations are exactly the presorted tables the agent sees, and the policy's masked
probability of the slots the teacher rates best (its pick and the calls tied with it) is
maximised. A heuristic never stops, so a cloned policy starts where the teacher is and STOP is
left for PPO to find.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from omegaconf import DictConfig

from servegym.agents.rl.networks import ScoreNetwork
from servegym.envs.build import build_engine, build_env
from servegym.envs.engine.policy import DecisionKind, Policy
from servegym.envs.observation import observe

TARGET_RANGE = 0.9
"""Targets span [-0.9, 0.9]: inside the tanh-bounded score means, away from saturation."""


def rank_targets(scores: np.ndarray, kind: DecisionKind) -> np.ndarray:
    """Teacher scores -> evenly spaced targets in [-0.9, 0.9] preserving the teacher's order. Tied
    scores share their mean target: tied candidates (siblings of one fan-out often have equal
    features) then tie in the policy too and keep slot order under the engine's stable sort,
    as the teacher's did. EVICT preempts the lowest and ORDER admits the highest first, so
    both keep the teacher's sign."""
    n = len(scores)
    if n == 1:
        return np.ones(1)
    order = np.argsort(-scores, kind="stable")
    spaced = np.linspace(TARGET_RANGE, -TARGET_RANGE, n)
    _, group, counts = np.unique(-scores[order], return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=spaced)
    targets = np.empty(n)
    targets[order] = sums[group] / counts[group]
    return targets


def collect(
    cfg: DictConfig, make_teacher: Callable[[], Policy], num_decisions: int, first_seed: int = 0
) -> dict[str, np.ndarray]:
    """Observations and rank targets from teacher-driven engines on training seeds."""
    k = int(cfg.env.config.max_candidates)
    kinds = {DecisionKind[name.upper()] for name in cfg.env.config.decisions}
    rows: dict[str, list[np.ndarray]] = {"global": [], "candidates": [], "mask": [], "target": []}
    seed = first_seed
    while len(rows["mask"]) < num_decisions:
        engine, teacher = build_engine(cfg, seed), make_teacher()
        while (decision := engine.next_decision()) is not None and len(rows["mask"]) < num_decisions:
            scores = np.asarray(teacher.scores(decision), dtype=np.float64)
            if decision.kind in kinds and len(decision) > 1:
                obs = observe(decision, k)
                n = min(len(decision), k)
                target = np.zeros(k, dtype=np.float32)
                target[:n] = rank_targets(scores[:n], decision.kind)
                for key in ("global", "candidates", "mask"):
                    rows[key].append(obs[key])
                rows["target"].append(target)
            engine.decide(scores)
        seed += 1
    return {key: np.stack(value) for key, value in rows.items()}


def behaviour_clone(
    policy, data: dict[str, np.ndarray], epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0
) -> list[float]:
    """Regress the policy mean on the targets (masked MSE); returns the loss per epoch."""
    network = ScoreNetwork(policy).train()
    optimizer = th.optim.Adam(network.parameters(), lr=lr)
    tensors = {key: th.as_tensor(value) for key, value in data.items()}
    generator = th.Generator().manual_seed(seed)
    n = len(tensors["mask"])
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch in th.randperm(n, generator=generator).split(batch_size):
            mask = tensors["mask"][batch]
            pred = network(tensors["global"][batch], tensors["candidates"][batch], mask)
            loss = (((pred - tensors["target"][batch]) ** 2) * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / n)
    network.eval()
    return losses


def collect_choices(
    cfg: DictConfig, make_teacher: Callable[[], Policy], num_decisions: int, first_seed: int = 0
) -> dict[str, Any]:
    """Observations, valid-action masks and the teacher's slot, from the teacher driving the
    config's slot env (``policy_slot``) on workloads ``first_seed``, ``first_seed + 1``, ..."""
    env: Any = build_env(cfg).unwrapped  # a slot env (PickNextEnv, RowChoiceEnv): policy_slot
    if not hasattr(env, "policy_slot"):
        raise ValueError(f"{cfg.env.id} has no policy_slot: clone a score policy with collect()")
    rows: dict[str, list[Any]] = {"obs": [], "valid": [], "target": [], "best": []}
    seed = first_seed
    while len(rows["target"]) < num_decisions:
        obs, _ = env.reset(options={"workload_seed": seed})
        teacher, ended = make_teacher(), False
        while not ended and len(rows["target"]) < num_decisions:
            valid = env.action_masks()
            slot, best = env.policy_slot(teacher)
            if valid.sum() > 1:  # a forced step teaches nothing
                rows["obs"].append(obs)
                rows["valid"].append(valid)
                rows["target"].append(np.int64(slot))
                rows["best"].append(best)
            obs, _, terminated, truncated, _ = env.step(slot)
            ended = terminated or truncated
        seed += 1
    observations = {key: np.stack([o[key] for o in rows["obs"]]) for key in rows["obs"][0]}
    return {"obs": observations, **{key: np.stack(rows[key]) for key in ("valid", "target", "best")}}


def clone_choices(
    policy, data: dict, epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0
) -> list[float]:
    """Maximise a MaskablePPO policy's masked probability of the slots the teacher rates best
    (its choice and the calls tied with it: which of equal siblings goes first is not the
    teacher's to teach); returns the mean cross-entropy per epoch."""
    optimizer = th.optim.Adam(policy.parameters(), lr=lr)
    obs = {key: th.as_tensor(value) for key, value in data["obs"].items()}
    valid, best = data["valid"], th.as_tensor(data["best"])
    generator = th.Generator().manual_seed(seed)
    n = len(best)
    losses = []
    policy.set_training_mode(True)
    for _ in range(epochs):
        total = 0.0
        for batch in th.randperm(n, generator=generator).split(batch_size):
            dist = policy.get_distribution(
                {key: value[batch] for key, value in obs.items()}, valid[batch.numpy()]
            )
            log_p = th.log_softmax(dist.distribution.logits, dim=-1)
            loss = -th.logsumexp(log_p.masked_fill(~best[batch], -th.inf), dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / n)
    policy.set_training_mode(False)
    return losses
