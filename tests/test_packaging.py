"""The wheel ships exactly the packages pyproject lists: an unlisted subpackage would import
in an editable install and silently vanish from a wheel."""

from __future__ import annotations

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
