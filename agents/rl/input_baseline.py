"""Variance reduction for an input-driven environment: the same workload for groups of copies,
and a reference policy's cost on that workload subtracted from the reward.

Why. In servegym the return of an episode is minus the total tree time of its workload, and
the workload (trees, sizes, arrivals) is an exogenous input that the policy does not choose.
On pick-next admission the return's spread across workload seeds dwarfs the spread due to
the policy (the README's "Learning pick-next admission" has the numbers), so a critic that sees
only the current state cannot tell a bad decision from a heavy workload. Mao et al., "Variance Reduction for Reinforcement
Learning in Input-Driven Environments" (ICLR 2019), and Decima subtract an *input-dependent*
baseline: the return-to-go, from the same virtual time, of other rollouts on the same input.
Such a baseline depends on the input and on the state before the action, never on the action,
so the policy gradient stays unbiased.

``ReferenceBaseline`` is that baseline with a fixed heuristic (say program-FCFS) as the other
rollout: on every reset it runs the heuristic on the episode's workload
(``EngineEnv.build_engine``), and each step's reward becomes the env's own reward
(``EngineEnv._reward``, the one definition) minus the heuristic's tree-seconds over the same
virtual-time interval, with the heuristic's cost after the episode's end subtracted at the last
step. Over an episode the subtractions add up to the heuristic's whole cost on that workload (a
constant of the input), so the undiscounted return becomes "tree time of the policy minus tree
time of the heuristic" and the best policy is unchanged; from a decision at virtual time t the
return-to-go is shifted by the heuristic's cost after t, which is what the critic now has to
predict only the difference of. Folding the baseline into the reward, rather than rewriting
advantages in SB3's rollout buffer from a callback, works for any algorithm, any vector env
and truncated rollouts (the critic bootstraps the shaped return as usual). It assumes
``gamma = 1`` (the pick-next experiment's): with discounting the subtracted terms no longer
telescope, and the wrapper refuses to be built with ``gamma < 1`` by ``agents/rl/train.py``.
The SLO-miss and fairness terms of the reward (0 by default) are left as they are.

``SharedWorkloads`` gives each group of copies one workload stream: every copy of a group
draws the same sequence of workload seeds (``reset(options={"workload_seed": s})``), so copies
explore different decisions on the same input; copies of a group in one process (a dummy
vector env) can hand their ``ReferenceBaseline``s one ``curves`` cache, so each reference run
is computed once per workload and group (``agents/rl/train.py`` does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from servegym.envs.engine.engine import Engine
from servegym.envs.engine.policy import Policy


class TreeSecondsCurve:
    """Tree-seconds accumulated by a finished run up to virtual time t: the integral of the
    number of trees in flight (arrived, not finished), exactly as ``Engine.tree_seconds``
    integrates it, as a piecewise-linear function with a knot at every arrival and finish."""

    def __init__(self, arrival_s: np.ndarray, finish_s: np.ndarray) -> None:
        arrival_s = np.asarray(arrival_s, dtype=np.float64)
        finish_s = np.asarray(finish_s, dtype=np.float64)
        if arrival_s.shape != finish_s.shape or np.any(finish_s < arrival_s) or np.isnan(finish_s).any():
            raise ValueError("a tree-seconds curve needs one finite finish >= arrival per tree")
        knots = np.unique(np.concatenate([arrival_s, finish_s, [0.0]]))
        in_flight = np.searchsorted(np.sort(arrival_s), knots, side="right") - np.searchsorted(
            np.sort(finish_s), knots, side="right"
        )  # trees in flight on [knot_k, knot_k+1)
        self.knots = knots
        self.values = np.concatenate([[0.0], np.cumsum(in_flight[:-1] * np.diff(knots))])
        self.total = float(self.values[-1])

    @classmethod
    def of(cls, engine: Engine) -> TreeSecondsCurve:
        """The curve of a drained engine; a tree that never finished (a stalled run) is
        counted in flight until the engine's last event."""
        n, table = len(engine.jobs), engine.job_table
        finish = np.where(np.isnan(table.finish_s[:n]), engine.now_s, table.finish_s[:n])
        return cls(table.arrival_s[:n], finish)

    def __call__(self, time_s: float) -> float:
        return float(np.interp(time_s, self.knots, self.values, left=0.0, right=self.total))


def _engine_env(env: gym.Env) -> Any:
    inner = env.unwrapped
    if not hasattr(inner, "build_engine") or not hasattr(inner, "workload_seed"):
        raise TypeError(
            f"{type(inner).__name__} is not a servegym engine env (no build_engine/workload_seed)"
        )
    return inner


class ReferenceBaseline(gym.Wrapper):
    """Subtract a reference policy's tree-seconds on the same workload from the reward (see the
    module docstring). ``make_policy`` returns a fresh policy per reference run. ``curves``: an
    LRU cache of reference curves by workload seed (at most ``cache_size``), which copies of one
    env and reference may share; default: this wrapper's own. ``info`` gets ``reference_s``:
    the reference's total tree time on the episode's workload (at the end)."""

    def __init__(
        self,
        env: gym.Env,
        make_policy: Callable[[], Policy],
        cache_size: int = 32,
        curves: OrderedDict[int, TreeSecondsCurve] | None = None,
    ) -> None:
        super().__init__(env)
        self._inner = _engine_env(env)
        self.make_policy = make_policy
        self.cache_size = cache_size
        self._curves: OrderedDict[int, TreeSecondsCurve] = OrderedDict() if curves is None else curves
        self._curve: TreeSecondsCurve | None = None
        self._last_now_s = 0.0

    def reference_curve(self, workload_seed: int) -> TreeSecondsCurve:
        """The reference policy's curve on workload ``workload_seed`` (cached, LRU)."""
        curve = self._curves.get(workload_seed)
        if curve is None:
            engine = self._inner.build_engine(workload_seed)
            engine.run(self.make_policy())
            curve = self._curves[workload_seed] = TreeSecondsCurve.of(engine)
            while len(self._curves) > self.cache_size:
                self._curves.popitem(last=False)
        self._curves.move_to_end(workload_seed)
        return curve

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self._curve = self.reference_curve(int(self._inner.workload_seed))
        self._last_now_s = 0.0  # the env's first reward counts tree-seconds from time 0
        return obs, info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        inner, curve = self._inner, self._curve
        assert curve is not None, "reset() first"
        now_s = inner.engine.now_s
        subtract = curve(now_s) - curve(self._last_now_s)
        if terminated:  # the reference's cost after this episode ended: the sum is its whole cost
            subtract += curve.total - curve(now_s)
            info["reference_s"] = curve.total
        self._last_now_s = now_s
        return obs, float(reward + subtract / inner.config.time_scale_s), terminated, truncated, info


class SharedWorkloads(gym.Wrapper):
    """Every env wrapped with the same ``group_seed`` plays the same sequence of workloads: its
    n-th reset replays the n-th seed of a stream drawn from ``group_seed`` (an explicit
    ``options["workload_seed"]`` still wins)."""

    def __init__(self, env: gym.Env, group_seed: int) -> None:
        super().__init__(env)
        _engine_env(env)
        self.group_seed = group_seed
        self._seeds = np.random.default_rng(group_seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        workload_seed = int(self._seeds.integers(2**31 - 1))
        options = dict(options or {})
        options.setdefault("workload_seed", workload_seed)
        return self.env.reset(seed=seed, options=options)
