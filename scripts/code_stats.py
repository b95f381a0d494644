"""Size of the code a newcomer reads: lines and function-size percentiles per package, the largest
classes and functions. Prints Markdown tables; ``--root`` measures another checkout (e.g. a git
worktree of an older revision) so before and after come from the same script.

    python scripts/code_stats.py
    python scripts/code_stats.py --root /tmp/old-checkout --top 8
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGES = ("envs/engine", "envs/workloads", "envs", "agents", "kernels", "scripts", "tests")
"""Measured in this order; a file counts in the first package whose folder holds it (so ``envs``
means the env modules outside ``engine/`` and ``workloads/``)."""


@dataclass
class Unit:
    kind: str  # "class" or "function"
    name: str
    path: str
    lines: int


def _units(path: Path, rel: str) -> list[Unit]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            out.append(Unit("class", node.name, rel, node.end_lineno - node.lineno + 1))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.append(Unit("function", node.name, rel, node.end_lineno - node.lineno + 1))
    return out


def measure(root: Path) -> tuple[dict[str, dict[str, float]], list[Unit]]:
    """Per package: files, lines, functions and their size percentiles; and every unit."""
    files: dict[str, list[Path]] = {p: [] for p in PACKAGES}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith((".", "outputs/", "multirun/")) or "/." in rel:
            continue
        for package in PACKAGES:
            if rel.startswith(package + "/"):
                files[package].append(path)
                break
    stats: dict[str, dict[str, float]] = {}
    units: list[Unit] = []
    for package, paths in files.items():
        lines = sum(len(p.read_text().splitlines()) for p in paths)
        mine = [u for p in paths for u in _units(p, p.relative_to(root).as_posix())]
        units += mine
        sizes = np.array([u.lines for u in mine if u.kind == "function"] or [0])
        stats[package] = {
            "files": len(paths),
            "lines": lines,
            "functions": int((sizes > 0).sum()),
            "p50": float(np.percentile(sizes, 50)),
            "p90": float(np.percentile(sizes, 90)),
            "max": float(sizes.max()),
        }
    return stats, units


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--top", type=int, default=6, help="largest classes and functions to list")
    args = parser.parse_args()
    stats, units = measure(args.root)
    print("| package | files | lines | functions | median lines | p90 | largest |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for package, s in stats.items():
        print(
            f"| {package} | {s['files']:.0f} | {s['lines']:.0f} | {s['functions']:.0f} "
            f"| {s['p50']:.0f} | {s['p90']:.0f} | {s['max']:.0f} |"
        )
    library = [u for u in units if not u.path.startswith(("tests/", "scripts/"))]
    for kind in ("class", "function"):
        print(
            f"\nLargest {kind}es (outside tests/ and scripts/):"
            if kind == "class"
            else "\nLargest functions:"
        )
        for u in sorted((u for u in library if u.kind == kind), key=lambda u: -u.lines)[: args.top]:
            print(f"  {u.lines:5d}  {u.path}:{u.name}")


if __name__ == "__main__":
    main()
