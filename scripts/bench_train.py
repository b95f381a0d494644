"""PPO training throughput on this machine: env steps/s and where the time goes.

python scripts/bench_train.py                      # dummy vs subproc vec envs, 2 envs, 4096 steps, 3 repeats
python scripts/bench_train.py --steps 8192 --repeats 5 --n-envs 2 4

For each vec-env kind and env count, trains PPO (the quick experiment's hyperparameters and set
network) from scratch and reports env steps per second of ``learn()`` and the share of that wall
time spent inside ``VecEnv.step`` (the engine and env, including subprocess round trips), the
rest being the network (rollout forward passes and the PPO update). torch runs one thread per
process (``train.torch_threads``), as training does. The last line is ``steps_per_s=...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch as th
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table
from stable_baselines3.common.vec_env import VecEnvWrapper

from servegym.agents.evaluation.api import DEFAULT_CONF_DIR
from servegym.agents.rl.configs import register_configs
from servegym.agents.rl.train import VEC_ENVS, make_model
from servegym.envs.build import build_env

register_configs()


class StepTimer(VecEnvWrapper):
    """Accumulates the wall time spent in step_async + step_wait."""

    def __init__(self, venv) -> None:
        super().__init__(venv)
        self.seconds = 0.0

    def reset(self):
        return self.venv.reset()

    def step_async(self, actions) -> None:
        self._start = time.perf_counter()
        self.venv.step_async(actions)

    def step_wait(self):
        out = self.venv.step_wait()
        self.seconds += time.perf_counter() - self._start
        return out


def measure(cfg, vec_env: str, n_envs: int, steps: int) -> tuple[float, float]:
    from stable_baselines3.common.env_util import make_vec_env

    venv = StepTimer(
        make_vec_env(lambda: build_env(cfg), n_envs=n_envs, seed=cfg.seed, vec_env_cls=VEC_ENVS[vec_env])
    )
    model = make_model(cfg, venv, None)
    start = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - start
    venv.close()
    return model.num_timesteps / wall, venv.seconds / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-envs", type=int, nargs="+", default=[2])
    parser.add_argument("--vec-envs", nargs="+", default=["dummy", "subproc"], choices=list(VEC_ENVS))
    parser.add_argument("--experiment", default="quick")
    args = parser.parse_args()
    th.set_num_threads(1)
    table = Table(
        title=f"PPO training throughput, experiment={args.experiment} (median of {args.repeats}, min-max)"
    )
    for column in ("vec env", "envs", "env steps/s", "share in env.step"):
        table.add_column(column, justify="right")
    best = 0.0
    for vec_env in args.vec_envs:
        for n_envs in args.n_envs:
            with initialize_config_dir(str(DEFAULT_CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"experiment={args.experiment}", f"train.n_envs={n_envs}"])
            runs = [measure(cfg, vec_env, n_envs, args.steps) for _ in range(args.repeats)]
            rates, shares = [r for r, _ in runs], [s for _, s in runs]
            best = max(best, statistics.median(rates))
            table.add_row(
                vec_env,
                str(n_envs),
                f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})",
                f"{statistics.median(shares):.0%} ({min(shares):.0%}-{max(shares):.0%})",
            )
    Console().print(table)
    print(f"steps_per_s={best:.1f}")


if __name__ == "__main__":
    main()
