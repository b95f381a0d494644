"""The wheel ships exactly the packages pyproject lists (an unlisted subpackage would import
in an editable install and silently vanish from a wheel), and the base install's dependencies
are enough for the modules serving uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for top in ("envs", "agents", "kernels"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix()
            parts = rel.split("/")
            prefix = {"envs": "servegym.envs", "agents": "servegym.agents", "kernels": "servegym.kernels"}[
                parts[0]
            ]
            found.add(".".join([prefix, *parts[1:]]))
    assert found == listed, f"pyproject packages {sorted(listed)} != folders {sorted(found)}"
    for package in listed:
        assert (ROOT / mapping[package] / "__init__.py").exists(), (
            f"{package} maps to a folder without __init__.py"
        )


BASE_MODULES = (
    "servegym.envs",
    "servegym.envs.observation",
    "servegym.agents.policies.heuristics",
    "servegym.agents.policies.retention",
    "servegym.agents.deploy.runtime",
    "servegym.agents.deploy.vllm_adapter",
)
"""What a serving install uses besides every module of envs/engine and envs/workloads."""
TORCH_MODULES = {"model", "torch_backend"}
"""envs/engine modules of the torch backend: built only with engine.backend=torch (train extra)."""


def base_modules() -> list[str]:
    found = list(BASE_MODULES)
    for package in ("engine", "workloads"):
        for path in sorted((ROOT / "envs" / package).glob("*.py")):
            if path.stem != "__init__" and not (package == "engine" and path.stem in TORCH_MODULES):
                found.append(f"servegym.envs.{package}.{path.stem}")
    return found


def test_base_install_modules_import_with_the_base_dependencies_alone() -> None:
    """Every installed distribution outside the base dependencies (and what they require) is made
    unimportable, then the engine, the workloads, the runtime and the vLLM adapter are imported:
    a module-level import of a train-extra package there fails here with its name."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    code = f"""
import importlib, importlib.metadata as md, re, sys

def name(requirement):
    return re.split(r"[ ;<>=!~\\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")

allowed, todo = set(), [name(r) for r in {base!r}]
while todo:  # the base dependencies and everything they require (no extras)
    dist = todo.pop()
    if dist not in allowed:
        allowed.add(dist)
        todo += [name(r) for r in md.requires(dist) or () if "extra ==" not in r]
allowed.add("servegym")
for module, dists in md.packages_distributions().items():
    if not any(name(d) in allowed for d in dists) and module not in sys.modules:
        sys.modules[module] = None  # installed, but not by the base install
for module in {base_modules()!r}:
    importlib.import_module(module)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        "a base-install module imports a package outside pyproject's base dependencies: import it "
        "inside the function that needs it, or add it to [project] dependencies if serving needs "
        f"it\n{done.stderr}"
    )
