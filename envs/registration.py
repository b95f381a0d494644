"""servegym's Gymnasium ids, registered without importing gymnasium.

``import servegym.envs`` must stay cheap and numpy-only, because it runs first on every import of
``servegym.envs.engine`` and ``servegym.envs.workloads`` (a serving image or the GPU machine has
no gymnasium). So registration waits for gymnasium: if it is already imported, the ids are
registered at once; otherwise a one-shot import hook registers them the moment gymnasium finishes
importing. Either way, after ``import servegym.envs`` (before or after ``import gymnasium``),
``gymnasium.make("servegym/Scheduling-v0")`` works, and so does the module-prefixed form
``gymnasium.make("servegym.envs:servegym/Scheduling-v0")``. Gymnasium >= 1.0 has no plugin entry
points, so ``import gymnasium`` alone does not load servegym.

To add an env id: one line in ``ENTRY_POINTS`` (see ``envs/README.md``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

ENTRY_POINTS: dict[str, str] = {
    "servegym/Scheduling-v0": "servegym.envs.serving_env:SchedulingEnv",
    "servegym/Eviction-v0": "servegym.envs.eviction_env:EvictionEnv",
    "servegym/Routing-v0": "servegym.envs.routing_env:RoutingEnv",
    "servegym/Serving-v0": "servegym.envs.serving_env:ServingEnv",
    "servegym/PickNext-v0": "servegym.envs.pick_env:PickNextEnv",
    "servegym/Retention-v0": "servegym.envs.retention_env:RetentionEnv",
    "servegym/PickRetain-v0": "servegym.envs.pick_env:PickRetainEnv",
    "servegym/Config-v0": "servegym.envs.config_env:ConfigEnv",
    "servegym/Budget-v0": "servegym.envs.budget_env:BudgetEnv",
}
"""Each env id and the ``module:Class`` gymnasium imports when the id is first made."""
ENV_IDS = tuple(ENTRY_POINTS)


def register_envs() -> None:
    """Register every id in ``ENTRY_POINTS`` with gymnasium (imports it); ids already there are kept.

    Episodes end when the workload drains or at ``env.horizon_s``: no step limit.
    """
    from gymnasium.envs.registration import register, registry

    for env_id, entry_point in ENTRY_POINTS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry_point)


def register_when_gymnasium_loads() -> None:
    """Register now if gymnasium is imported, else as soon as it is; never imports it."""
    gymnasium = sys.modules.get("gymnasium", False)
    if gymnasium is None:  # blocked on purpose (sys.modules["gymnasium"] = None): nothing to do
        return
    if gymnasium is not False:
        register_envs()
        return
    if not any(isinstance(finder, _RegisterAfterGymnasium) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterGymnasium())


class _RegisterAfterGymnasium(importlib.abc.MetaPathFinder):
    """Finds gymnasium through the other finders and registers servegym's ids once it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "gymnasium":
            return None
        sys.meta_path.remove(self)  # one shot: gymnasium is imported once per process
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None  # not installed: the import fails as it would without servegym


class _ThenRegister(importlib.abc.Loader):
    """Runs gymnasium's own loader, hands the module back to it, then registers the ids."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # gymnasium sees its real loader (resources, inspect), never this wrapper
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        register_envs()
