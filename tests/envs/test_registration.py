"""The engine stands alone: ``servegym.envs``, its engine and its workloads import with numpy
alone, and the env ids still reach gymnasium's registry whichever of the two is imported first.

Each case runs in a fresh interpreter, since this process has imported gymnasium long ago."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from servegym.envs.registration import ENTRY_POINTS, ENV_IDS

HEAVY = (
    "gymnasium",
    "torch",
    "hydra",
    "omegaconf",
    "stable_baselines3",
    "wandb",
    "pandas",
    "scipy",
    "matplotlib",
)
"""Packages of the train extra that the base install's modules must not import."""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_engine_and_workloads_import_with_gymnasium_unimportable() -> None:
    done = run_python(
        """
        import sys
        sys.modules["gymnasium"] = None  # as on a machine without it: any import of it fails
        import servegym.envs.engine, servegym.envs.workloads
        import servegym.envs.engine.engine, servegym.envs.engine.scheduler, servegym.envs.engine.features
        import servegym.envs.workloads.generators, servegym.envs.workloads.workload
        from servegym.envs import ENV_IDS
        print(len(ENV_IDS))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(ENV_IDS))]


def test_base_install_modules_import_nothing_heavy() -> None:
    """What the base install serves (engine, workloads, ONNX runtime, vLLM adapter) loads none
    of the train extra's packages, even where they are installed."""
    done = run_python(
        """
        import sys
        import servegym.envs, servegym.envs.engine.engine, servegym.envs.workloads.generators
        import servegym.envs.workloads.workload, servegym.envs.observation
        import servegym.agents.policies.heuristics, servegym.agents.deploy.runtime, servegym.agents.deploy.vllm_adapter
        print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
        """
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert loaded.isdisjoint(HEAVY), f"imported {sorted(loaded & set(HEAVY))}"


@pytest.mark.parametrize(
    "imports",
    [
        "import servegym.envs\nimport gymnasium as gym",
        "import gymnasium as gym\nimport servegym.envs",
        "import gymnasium as gym\nfrom servegym.envs.engine.config import EngineConfig",
    ],
    ids=["servegym-first", "gymnasium-first", "submodule-only"],
)
def test_every_id_is_made_whichever_is_imported_first(imports: str) -> None:
    done = run_python(
        imports
        + """
import importlib.machinery, sys
from servegym.envs import ENV_IDS
for env_id in ENV_IDS:
    print(env_id, type(gym.make(env_id).unwrapped).__name__)
# gymnasium keeps its own loader, not the hook's wrapper
assert isinstance(gym.__loader__, importlib.machinery.SourceFileLoader), gym.__loader__
assert gym.__spec__.loader is gym.__loader__
assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterGymnasium"]
"""
    )
    assert done.returncode == 0, done.stderr
    made = dict(line.split() for line in done.stdout.splitlines())
    assert made == {env_id: ENTRY_POINTS[env_id].rsplit(":", 1)[1] for env_id in ENV_IDS}
    assert "Overriding environment" not in done.stderr


def test_module_prefixed_id_imports_servegym() -> None:
    done = run_python(
        """
        import gymnasium as gym
        env = gym.make("servegym.envs:servegym/Routing-v0")
        print(type(env.unwrapped).__name__, gym.spec("servegym/Scheduling-v0").entry_point)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RoutingEnv", ENTRY_POINTS["servegym/Scheduling-v0"]]


def test_gymnasium_alone_does_not_know_the_ids() -> None:
    """Gymnasium >= 1.0 loads no plugins (no ``gymnasium.envs`` entry points): without importing
    servegym.envs the namespace is unknown. If this fails, gymnasium loads plugins again and
    an entry point could replace the README's ``import servegym.envs``."""
    done = run_python(
        """
        import gymnasium as gym
        try:
            gym.make("servegym/Scheduling-v0")
        except gym.error.NamespaceNotFound:
            print("unknown")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unknown"]


def test_registering_twice_keeps_the_ids_without_warnings() -> None:
    done = run_python(
        """
        import warnings
        warnings.simplefilter("error")
        import gymnasium as gym
        import servegym.envs
        from servegym.envs.registration import register_envs, register_when_gymnasium_loads
        register_envs()
        register_when_gymnasium_loads()
        print(sum(env_id.startswith("servegym/") for env_id in gym.registry))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(ENV_IDS))]
