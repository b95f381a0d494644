"""servegym environments: workloads, the engine, and the Gymnasium envs over them."""

from gymnasium.envs.registration import register

register(id="servegym/Scheduling-v0", entry_point="servegym.envs.serving_env:SchedulingEnv")
