"""PickNext-v0 (pick-next with STOP): masks, STOP, the presorted table, and the learned
policy path (SB3 wrapper and the ONNX runtime) making the env's choices."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.envs.engine.policy import CANDIDATE_FEATURES, DecisionKind
from servegym.envs.observation import presort_rows
from tests.envs.small import small_kwargs

ID = "servegym/PickNext-v0"


def make(**overrides):
    kwargs = {**small_kwargs(ID), **overrides}
    return gym.make(ID, **kwargs).unwrapped


def test_action_space_has_stop_and_masks_what_fits() -> None:
    env = make()
    k = env.config.max_candidates
    assert env.action_space.n == k + 1 and env.engine_config.admission == "pick"
    env.reset(seed=0)
    seen_stop = 0
    for _ in range(200):
        mask = env.action_masks()
        d = env._decision
        if d is None:
            break
        assert mask.shape == (k + 1,) and mask.any()
        if d.kind == DecisionKind.ORDER:
            shown = env._rows[:k]
            assert (mask[: len(shown)] == d.mask[shown]).all() and not mask[len(shown) : k].any()
            assert mask[k] == d.stop
            seen_stop += d.stop
            if not d.stop:  # only an idle replica is denied STOP
                assert not env.engine.replicas[d.replica].running
        _, _, terminated, truncated, info = env.step(int(np.flatnonzero(mask)[0]))
        assert not info["invalid_action"]
        if terminated or truncated:
            break
    assert seen_stop


def test_stopping_often_still_drains_the_workload() -> None:
    env = make()
    env.reset(seed=1)
    k = env.config.max_candidates
    rng = np.random.default_rng(0)
    for _ in range(20000):
        mask = env.action_masks()
        action = k if mask[k] and rng.random() < 0.7 else int(np.flatnonzero(mask)[0])
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert terminated and info["metrics"]["jobs_completed"] == 8
    assert 0.0 <= info["cut_binding_frac"] <= 1.0


def test_observation_is_presorted_oldest_tree_first() -> None:
    env = make()
    obs, _ = env.reset(seed=2)
    age, wait = CANDIDATE_FEATURES.index("tree_age_s"), CANDIDATE_FEATURES.index("wait_s")
    for _ in range(100):
        n = int(obs["mask"].sum())
        rows = obs["candidates"][:n]
        keys = list(zip(-rows[:, age], -rows[:, wait], strict=True))
        assert keys == sorted(keys)
        mask = env.action_masks()
        obs, _, terminated, truncated, _ = env.step(int(np.flatnonzero(mask)[-1]))
        if terminated or truncated:
            break


def test_a_slot_admits_the_presorted_row() -> None:
    env = make()
    env.reset(seed=3)
    for _ in range(300):
        d = env._decision
        mask = env.action_masks()
        slots = np.flatnonzero(mask[:-1])
        if d is not None and d.kind == DecisionKind.ORDER and len(slots) >= 2:
            slot = int(slots[-1])
            call = int(d.candidates[presort_rows(d)[slot]])
            env.step(slot)
            assert env.engine.calls.state[call] != 1  # no longer WAITING: it was admitted
            return
        _, _, terminated, truncated, _ = env.step(int(np.flatnonzero(mask)[0]))
        if terminated or truncated:
            env.reset()
    pytest.fail("no ORDER decision with two fitting calls")


def test_learned_policy_reproduces_the_env_and_exports(tmp_path) -> None:
    """A MaskablePPO set policy with a STOP logit: driving the engine through the SB3 wrapper
    and through the exported ONNX file makes the choices the env makes with its argmax."""
    torch = pytest.importorskip("torch")
    from sb3_contrib import MaskablePPO

    from servegym.agents.deploy.export import export_policy
    from servegym.agents.deploy.runtime import OnnxPolicy
    from servegym.agents.rl.learned import SB3Policy
    from servegym.agents.rl.networks import MaskableSetActorCriticPolicy, StopSlotHead

    torch.manual_seed(0)
    env = make()
    model = MaskablePPO(MaskableSetActorCriticPolicy, env, n_steps=64, batch_size=64, seed=0, device="cpu")
    assert isinstance(model.policy.action_net, StopSlotHead)
    with torch.no_grad():  # make STOP sometimes win so both branches are exercised
        model.policy.action_net.stop.bias.fill_(0.5)
    policy = SB3Policy(model=model, kinds=("order",))
    assert policy.stop
    obs, _ = env.reset(seed=4)
    for _ in range(150):
        d = env._decision
        if d is None:
            break
        action, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=True)
        want = env._choice_scores(int(action))
        got = policy.scores(d)
        assert np.array_equal(np.argmax(want), np.argmax(got)) and len(want) == len(got)
        obs, _, terminated, truncated, _ = env.step(int(action))
        if terminated or truncated:
            break
    paths = export_policy(model, tmp_path / "policy.onnx", kinds=("order",), env_id=ID, torchscript=False)
    onnx = OnnxPolicy(str(paths["onnx"]))
    assert onnx.stop
    obs, _ = env.reset(seed=5)
    for _ in range(100):
        d = env._decision
        if d is None:
            break
        a, b = policy.scores(d), onnx.scores(d)
        assert len(a) == len(b) and np.argmax(a) == np.argmax(b)
        obs, _, terminated, truncated, _ = env.step(int(np.flatnonzero(env.action_masks())[0]))
        if terminated or truncated:
            break


def test_reset_with_a_workload_seed_replays_that_workload() -> None:
    a, b = make(), make()
    a.reset(seed=10, options={"workload_seed": 77})
    b.reset(seed=99, options={"workload_seed": 77})
    assert [j.arrival_s for j in a.engine.jobs] == [j.arrival_s for j in b.engine.jobs]
    b.reset(seed=99)
    assert [j.arrival_s for j in a.engine.jobs] != [j.arrival_s for j in b.engine.jobs]
    with pytest.raises(ValueError, match="workload_seed"):
        a.reset(options={"seed_of_workload": 1})
