"""Import servegym's engine from a script on a machine without gymnasium (the lent GPU machine).

``import _bootstrap; _bootstrap.engine_imports()`` before any ``servegym`` import: where gymnasium
is missing, a bare ``servegym.envs`` package stands in (so ``envs/__init__.py``, which registers
the Gymnasium envs, never runs), and ``servegym`` maps to this checkout when it is not installed.
Scripts run as ``python scripts/x.py`` have ``scripts/`` on ``sys.path``, so this imports as
``_bootstrap``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def engine_imports() -> None:
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        pass
    else:
        return
    root = Path(__file__).resolve().parents[1]
    try:
        envs_spec = importlib.util.find_spec("servegym.envs")
        kernels_spec = importlib.util.find_spec("servegym.kernels")
    except ImportError:
        envs_spec = kernels_spec = None
    if envs_spec is None or kernels_spec is None:  # not installed: servegym.<x> lives in <root>/<x>
        servegym = types.ModuleType("servegym")
        servegym.__path__ = [str(root)]
        sys.modules["servegym"] = servegym
        envs_path = [str(root / "envs")]
    else:
        envs_path = list(envs_spec.submodule_search_locations)
    envs = types.ModuleType("servegym.envs")
    envs.__path__ = envs_path
    sys.modules["servegym.envs"] = envs
