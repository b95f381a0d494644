"""render_mode as Gymnasium defines it, on every env id: None, "ansi" (text) and "rgb_array"
(an image of KV blocks by state and trees by colour)."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest

import servegym.envs  # noqa: F401  (registers the ids)
from servegym.envs.registration import ENV_IDS
from servegym.envs.render import CACHED_RGB, FREE_RGB, block_states, render_image, tree_colours


def stepped(env_id: str, mode: str | None, steps: int = 60) -> gym.Env:
    env = gym.make(env_id, render_mode=mode)
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(steps):
        *_, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    return env


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_every_id_accepts_every_render_mode(env_id: str) -> None:
    assert gym.make(env_id).render_mode is None
    assert stepped(env_id, None, steps=1).render() is None
    text = stepped(env_id, "ansi").render()
    assert isinstance(text, str)
    assert text.startswith("t=") and "replica 0 (" in text and "blocks; running" in text
    image = stepped(env_id, "rgb_array").render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[1:] == (640, 3)
    assert image.shape[0] >= 64 and len(np.unique(image.reshape(-1, 3), axis=0)) > 4


def test_an_unknown_render_mode_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"render_mode must be None or one of \['ansi', 'rgb_array'\], got 'bogus'"
    ):
        gym.make("servegym/Scheduling-v0", render_mode="bogus")
    # "human" is Gymnasium's: gym.make wraps rgb_array in HumanRendering (pygame); the class itself refuses
    from servegym.envs.serving_env import SchedulingEnv

    with pytest.raises(ValueError, match="got 'human'"):
        SchedulingEnv(render_mode="human")


def test_render_before_reset_is_a_placeholder_not_an_error() -> None:
    assert "call reset()" in gym.make("servegym/Eviction-v0", render_mode="ansi").unwrapped.render()
    assert gym.make("servegym/Eviction-v0", render_mode="rgb_array").unwrapped.render().dtype == np.uint8


def test_ansi_names_queue_running_calls_kv_use_and_trees_in_flight() -> None:
    env = stepped("servegym/Eviction-v0", "ansi", steps=40)
    engine = env.unwrapped.engine
    text = env.render()
    replica = engine.replicas[0]
    owners, cached = block_states(engine, 0)
    assert f"running {len(replica.running)}, waiting {len(replica.waiting)}" in text
    assert f"{int(cached.sum())} cached-free" in text and f"of {replica.blocks.num_blocks} blocks" in text
    assert "trees in flight" in text and "calls done, age" in text
    first = next(iter(replica.running))
    job = engine.jobs[int(engine.calls.job[first])]
    assert f"running {job.job_id}/c{int(engine.calls.call_in_job[first])}" in text


def test_image_cells_show_each_block_in_its_trees_colour() -> None:
    """Eviction-v0 has 400 blocks per replica: one 16 px cell per block, 40 per row, the grid
    at the bottom. Every cell's colour is its block's state: owner tree, cached, or free."""
    env = stepped("servegym/Eviction-v0", "rgb_array", steps=40)
    engine = env.unwrapped.engine
    image = env.render()
    owners, cached = block_states(engine, 0)
    assert len(owners) == 400 and (owners >= 0).any()  # a tight cache: mostly owned
    grid = image[-10 * 16 :]
    cells = grid[8::16, 8::16].reshape(-1, 3)[:400]  # centre pixel of each cell, block order
    owned = owners >= 0
    assert (cells[owned] == tree_colours(owners[owned])).all()
    assert (cells[cached] == CACHED_RGB).all()
    assert (cells[(owners == -1) & ~cached] == FREE_RGB).all()


def test_a_large_cache_shares_cells_and_stays_bounded() -> None:
    env = stepped("servegym/Scheduling-v0", "rgb_array", steps=200)
    assert env.unwrapped.engine.replicas[0].blocks.num_blocks > 20000
    image = env.render()
    assert image.shape[0] <= 8 * 6 + 4 + 8 + 160 + 8  # tree strip, gap, usage bar, grid
    assert np.array_equal(image, render_image(env.unwrapped.engine, env.unwrapped._decision))


def test_gymnasium_env_checker_accepts_the_render_modes() -> None:
    from gymnasium.utils.env_checker import check_env

    for mode in ("ansi", "rgb_array"):
        check_env(gym.make("servegym/Routing-v0", render_mode=mode).unwrapped, skip_render_check=False)


# ---------------------------------------------------------------- action shapes (Box(K) envs)
@pytest.mark.parametrize("env_id", ["servegym/Scheduling-v0", "servegym/Serving-v0"])
@pytest.mark.parametrize("shape", [(4, 8), (32, 1), (1, 32), (31,), ()])
def test_a_wrongly_shaped_score_action_raises(env_id: str, shape: tuple[int, ...]) -> None:
    env = gym.make(env_id).unwrapped  # no wrapper reshapes it first
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"action must have shape \(32,\), got {re.escape(str(shape))}"):
        env.step(np.zeros(shape, dtype=np.float32))
    env.step(np.zeros(32, dtype=np.float32))  # the right shape still works
