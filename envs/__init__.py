"""servegym environments: workloads, the engine, and the Gymnasium envs over them."""

from gymnasium.envs.registration import register

# Episodes end when the workload drains or at env.horizon_s: no step limit.
register(id="servegym/Scheduling-v0", entry_point="servegym.envs.serving_env:SchedulingEnv")
register(id="servegym/Eviction-v0", entry_point="servegym.envs.eviction_env:EvictionEnv")
register(id="servegym/Routing-v0", entry_point="servegym.envs.routing_env:RoutingEnv")
register(id="servegym/Serving-v0", entry_point="servegym.envs.serving_env:ServingEnv")
ENV_IDS = ("servegym/Scheduling-v0", "servegym/Eviction-v0", "servegym/Routing-v0", "servegym/Serving-v0")
