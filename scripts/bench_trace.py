"""Replay a large JSONL trace through the simulator: load time, simulation time, trees/s and
peak memory, optionally side by side with another git revision.

The trace is written first with ``traces.save_jobs`` from a generator (map-reduce trees,
Poisson arrivals at 1 tree/s, seed 0): 32,000 trees, about 50 MB, or 2,000 with ``--quick``.
Each revision then replays it in a fresh worker process, the way ``scripts/simulate.py
workload=trace workload.path=...`` does (``build_engine`` on the composed config, the default
FCFS agent, ``next_decision``/``decide`` until the workload drains), so its peak RSS
(``getrusage``) is its own. With ``--against REF`` the same trace runs under REF checked out in a
temporary git worktree (as ``bench_env.py`` does). A run past ``--timeout`` is stopped and
reported with the trees it had finished.

    python scripts/bench_trace.py                       # 32k trees, the current tree
    python scripts/bench_trace.py --against HEAD~3      # and REF, one after the other
    python scripts/bench_trace.py --quick               # 2k trees (CI-sized)
    python scripts/bench_trace.py --trace my.jsonl      # replay an existing trace instead

Columns: ``load s`` is ``build_engine`` (a whole-file reader parses every line here, a streaming
one opens the file), ``sim s`` the decision loop (a streaming reader parses as it goes),
``trees/s`` trees finished over both, ``peak MB`` the worker's maximum resident set,
``MB/1k trees`` the resident set's growth over the run per thousand trees finished.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench_common import REPO, checkout, map_servegym, peak_rss_mb, rss_mb

FULL_TREES, QUICK_TREES = 32_000, 2_000


# ---------------------------------------------------------------- worker side (one replay)


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def worker(root: str, trace: str, every_s: float) -> None:
    """Replay ``trace`` as simulate.py does; one JSON line of progress every ``every_s`` seconds
    and a last one with ``"done": true``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from servegym.agents.rl.configs import register_configs
    from servegym.envs.build import build_engine

    register_configs()
    with initialize_config_dir(str(Path(root) / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["workload=trace", f"workload.path={trace}", "progress=false"])
    rss0 = rss_mb()
    start = time.perf_counter()
    engine = build_engine(cfg)
    policy = instantiate(cfg.agent)
    engine.apply_retention(policy)
    load_s = time.perf_counter() - start
    rss_loaded = rss_mb()
    decisions, next_report = 0, time.perf_counter() + every_s
    while (decision := engine.next_decision()) is not None:
        engine.decide(policy.scores(decision))
        decisions += 1
        if decisions % 512 == 0 and time.perf_counter() >= next_report:
            next_report += every_s
            _report(
                trees=engine.num_jobs_done,
                load_s=load_s,
                sim_s=time.perf_counter() - start - load_s,
                peak_mb=peak_rss_mb(),
                rss_mb=rss_mb(),
                rss0_mb=rss0,
                rss_loaded_mb=rss_loaded,
            )
    sim_s = time.perf_counter() - start - load_s
    metrics = engine.metrics()
    _report(
        trees=metrics.jobs_completed + metrics.jobs_failed,
        load_s=load_s,
        sim_s=sim_s,
        peak_mb=peak_rss_mb(),
        rss_mb=rss_mb(),
        rss0_mb=rss0,
        rss_loaded_mb=rss_loaded,
        jct_mean_s=metrics.jct_mean_s,
        complete=metrics.complete,
        done=True,
    )


# ---------------------------------------------------------------- parent side
def write_trace(path: Path, num_trees: int) -> Path:
    """``num_trees`` map-reduce trees, Poisson arrivals at 1 tree/s (seed 0), as schema-1 JSONL."""
    from servegym.envs.workloads.generators import MapReduce
    from servegym.envs.workloads.traces import save_jobs
    from servegym.envs.workloads.workload import Workload

    source = Workload(generator=MapReduce(), arrival="poisson", arrival_rate=1.0, num_jobs=num_trees).build(0)
    return save_jobs(source.jobs, path)


def measure(root: Path, trace: Path, timeout_s: float) -> dict[str, Any]:
    """Replay in a worker process; the last report it gave (``"status"``: done, timeout or failed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", str(root), str(trace)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    status = "failed"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            status = "timeout"
            break
        if selector.select(timeout=min(left, 5.0)):
            line = proc.stdout.readline()
            if not line:  # the worker ended
                break
            if line.startswith("{"):
                last = json.loads(line)
                if last.get("done"):
                    status = "done"
    proc.wait()
    if status == "failed" and not last.get("done"):
        raise RuntimeError(f"replay in {root} failed:\n{proc.stderr.read()[-3000:]}")
    return {**last, "status": status if status != "failed" else "done"}


def table_rows(results: dict[str, dict[str, Any]], timeout_s: float) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        trees = r.get("trees", 0)
        total_s = r.get("load_s", 0.0) + r.get("sim_s", 0.0)
        growth = (r.get("rss_mb", 0.0) - r.get("rss_loaded_mb", 0.0)) / max(trees, 1) * 1000
        status = r["status"] if r["status"] != "timeout" else f"stopped at {timeout_s:.0f} s"
        rows.append(
            [
                name,
                f"{trees:,}",
                f"{r.get('load_s', float('nan')):.1f}",
                f"{r.get('sim_s', float('nan')):.1f}",
                f"{trees / total_s:.1f}" if total_s else "n/a",
                f"{r.get('peak_mb', float('nan')):,.0f}",
                f"{growth:.1f}",
                status,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", metavar="REF", help="git revision to replay side by side")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_TREES:,} trees instead of {FULL_TREES:,}"
    )
    parser.add_argument("--trees", type=int, help="trees in the written trace (overrides --quick)")
    parser.add_argument("--trace", type=Path, help="replay this JSONL trace instead of writing one")
    parser.add_argument("--out", type=Path, help="write the trace here (kept) instead of a temp dir")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per replay before it is stopped"
    )
    parser.add_argument("--json", type=Path, help="write every replay's last report as JSON here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        map_servegym(args.worker[0])
        worker(args.worker[0], args.worker[1], every_s=5.0)
        return

    from rich.console import Console
    from rich.table import Table

    trees = args.trees or (QUICK_TREES if args.quick else FULL_TREES)
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="servegym-trace-") as tmp:
        trace = args.trace
        if trace is None:
            trace = args.out or Path(tmp) / f"mapreduce_{trees}.jsonl"
            start = time.perf_counter()
            write_trace(trace, trees)
            console.print(
                f"trace: {trace} ({trace.stat().st_size / 2**20:.1f} MiB, {trees:,} map-reduce trees, "
                f"written in {time.perf_counter() - start:.1f} s)"
            )
        results: dict[str, dict[str, Any]] = {}
        with checkout(args.against) if args.against else nullcontext() as other:
            roots = {"current": REPO, **({args.against: other} if other is not None else {})}
            for name, root in roots.items():
                console.print(f"replaying under {name} ...")
                results[name] = measure(root, trace, args.timeout)
        table = Table(
            title=f"trace replay: {trace.name} ({trace.stat().st_size / 2**20:.1f} MiB), FCFS, llama8b_h100"
        )
        for column in ("revision", "trees", "load s", "sim s", "trees/s", "peak MB", "MB/1k trees", "status"):
            table.add_column(column, justify="right")
        for row in table_rows(results, args.timeout):
            table.add_row(*row)
        console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
