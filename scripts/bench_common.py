"""What the side-by-side benchmarks share (``bench_env.py``, ``bench_trace.py``): a temporary git
worktree of another revision, importing ``servegym`` from a given checkout in a worker process,
and the process's memory. Imported by the scripts as a sibling module (``scripts/`` is on
``sys.path`` when they run), never by ``servegym`` itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def map_servegym(root: str) -> None:
    """Import ``servegym`` from the checkout at ``root`` (envs/, agents/, kernels/ under one
    root), so a worker measures that revision and not the installed one."""
    module = types.ModuleType("servegym")
    module.__path__ = [root]
    sys.modules["servegym"] = module


def rss_mb() -> float:
    """Resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A temporary git worktree of ``ref``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="servegym-bench-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), ref], check=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
