"""servegym environments: workloads, the engine, and the Gymnasium envs over them.

Importing this package does not import gymnasium (the engine and the workloads need numpy
alone); the env ids are registered when gymnasium is imported, before or after this package
(``registration.py``).
"""

from servegym.envs.registration import ENV_IDS, register_when_gymnasium_loads

register_when_gymnasium_loads()

__all__ = ["ENV_IDS"]
