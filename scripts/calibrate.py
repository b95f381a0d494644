"""Fit the simulator's cost model to the torch backend, and measure how faithful the sim then is.

python scripts/calibrate.py --device cpu --model tiny --quick --out /tmp/tiny_cpu_fitted.yaml
python scripts/calibrate.py --device cuda --model llama1b --out llama1b_h100_fitted.yaml

1. Profiling: a grid of batch compositions (decodes over batch sizes and contexts, prefill chunks
   with and without a cached prefix, mixed and ragged batches) runs through the torch backend's
   own ``iteration_time_s`` (paged forward over a real KV cache; CUDA events and CUDA-graph
   decode on a GPU, perf_counter on CPU); each point is repeated, its median kept, its spread
   (IQR / median) recorded.
2. Engine points: the fidelity workload on other seeds (``--engine-runs``) runs on the torch
   backend, which records every iteration it executes; isolated batches miss what a running
   engine meets (ragged contexts, the graph ladder's padding, the host work of real batches).
3. Fit: ``servegym.envs.engine.calibration.fit`` on 75% of the grid points plus the engine points;
   the fitted profile's ``CostModel`` is scored on the other 25% of the grid (MAPE, p90 and max
   absolute percentage error) and written as a profile YAML whose header records machine, date,
   model and errors. A grid-only fit is kept for comparison.
4. Fidelity: one map-reduce workload under FCFS with a tight KV cache (preemptions happen), run
   twice on the torch backend (measured clock; the repeat is the noise floor) and on the sim
   backend with each fitted profile and the base profile: mean and p99 tree completion time and
   preemptions. The torch run's own iterations, held out from every fit, are then scored per kind
   (decode graphed or eager, prefill, mixed: summed time and MAPE), with the iterations the
   profile underestimates most (a one-off stall such as a kernel compile shows there).

Steps 1, 2 and the torch runs of 4 need the torch backend (a GPU for llama1b); the rest runs
anywhere, so ``--refit REPORT.json`` fits again from a report's recorded measurements (e.g. after
changing the fit) and reruns only the sim side. On a GPU the fitted rates stay at or below the
base profile's datasheet peaks. Tables print last. With $OUT set (the GPU machine returns files from there), the points and
results go to $OUT/calibration_<device>_<model>.json and the profile to $OUT as well.
Needs torch, numpy and pyyaml only (no gymnasium, hydra or SB3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from servegym.envs.engine import calibration as cal
from servegym.envs.engine.config import EngineConfig
from servegym.envs.engine.cost_model import ModelProfile, load_profile
from servegym.envs.engine.torch_backend import TimedIteration

BASE_PROFILES = {"tiny": "tiny_cpu", "llama1b": "llama1b_h100"}
ITERATION_COLUMNS = tuple(f.name for f in fields(TimedIteration))
"""A report stores each recorded iteration as one row of these."""
FIDELITY_GOAL_PCT = 5.0  # tree time; vidur reports under 9%


def log(msg: str) -> None:
    print(f"[calibrate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores (torch {torch.__version__})"


# ------------------------------------------------------------------------------ fidelity
def fidelity_setup(model: str, quick: bool):
    """(workload, engine settings): map-reduce trees arriving together on a KV cache too small to
    hold them all, so FCFS admits, runs and preempts; no tool latency, so tree time is serving time."""
    from servegym.envs.workloads.generators import MapReduce
    from servegym.envs.workloads.workload import Workload

    if model == "tiny":
        generator = MapReduce(
            fan_out=3,
            system_tokens=64,
            input_tokens_mean=96.0,
            tool_tokens_mean=8.0,
            output_tokens_mean=24.0,
            max_tokens=32,
            max_context_tokens=1024,
        )
        workload = Workload(generator=generator, arrival_rate=200.0, num_jobs=6 if quick else 10)
        settings = dict(block_size=16, num_gpu_blocks=48, max_num_batched_tokens=256, max_num_seqs=32)
    else:
        generator = MapReduce(
            fan_out=4,
            system_tokens=512,
            input_tokens_mean=512.0,
            tool_tokens_mean=64.0,
            output_tokens_mean=96.0,
            max_tokens=192,
            max_context_tokens=8192,
        )
        workload = Workload(generator=generator, arrival_rate=40.0, num_jobs=16 if quick else 32)
        settings = dict(block_size=16, num_gpu_blocks=640, max_num_batched_tokens=2048, max_num_seqs=64)
    return workload, settings


def run_engine(
    model: str, profile: str, backend: str, device: torch.device, quick: bool, seed: int
) -> tuple[dict, list[TimedIteration] | None]:
    """One run of the fidelity workload under FCFS: (metrics row, the torch backend's recorded
    iterations or None on the sim)."""
    from servegym.agents.policies.heuristics import FCFS
    from servegym.envs.engine.engine import Engine
    from servegym.envs.engine.torch_backend import TorchBackendFactory

    workload, settings = fidelity_setup(model, quick)
    cfg = EngineConfig(profile=profile, backend=backend, model=model, **settings)
    factory = (
        TorchBackendFactory(cfg, device=str(device), record_iterations=True) if backend == "torch" else None
    )
    engine = Engine(workload.build(seed), engine=cfg, backend_factory=factory)
    t0 = time.perf_counter()
    m = engine.run(FCFS())
    wall_s = time.perf_counter() - t0
    if m.stalled or m.jobs_failed:
        raise RuntimeError(f"{backend} run of seed {seed} did not drain: {m.stall_reason or m.jobs_failed}")
    log(
        f"{backend} run ({profile}, seed {seed}): {m.jobs_completed} trees, {m.iterations} iterations in {wall_s:.1f} s"
    )
    row = {
        "jct_mean_s": m.jct_mean_s,
        "jct_p99_s": m.jct_p99_s,
        "makespan_s": m.makespan_s,
        "preemptions": m.preemptions,
        "iterations": m.iterations,
        "jobs": m.jobs_completed,
        "wall_s": wall_s,
    }
    iterations = [it for b in factory.backends for it in b.iterations] if factory else None
    return row, iterations


def err_pct(row: dict, ref: dict, key: str) -> float:
    """``row``'s ``key`` relative to the reference run's, in %."""
    return 100 * (row[key] - ref[key]) / ref[key]


def fidelity_table(rows: dict) -> str:
    ref = rows["torch (measured)"]
    head = (
        "| run | tree mean (s) | err | tree p99 (s) | err | makespan (s) | err | preemptions | iterations |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        err = lambda key, r=r: "" if r is ref else f"{err_pct(r, ref, key):+.1f}%"  # noqa: E731
        lines.append(
            f"| {label} | {r['jct_mean_s']:.4f} | {err('jct_mean_s')} | {r['jct_p99_s']:.4f} | {err('jct_p99_s')} "
            f"| {r['makespan_s']:.4f} | {err('makespan_s')} | {r['preemptions']} | {r['iterations']} |"
        )
    return "\n".join(lines)


def fidelity_header(fidelity: dict, held_out_run: dict, seed: int) -> list[str]:
    """Profile header lines on the held-out engine run: how well the profile does where it is used."""
    ref, repeat, fitted = fidelity["torch (measured)"], fidelity["torch (repeat)"], fidelity["sim (fitted)"]

    def err(row: dict, key: str) -> str:
        return f"{err_pct(row, ref, key):+.1f}%"

    return [
        f"held-out engine run (seed {seed}): iteration MAPE {held_out_run['mape_pct']:.2f}%, "
        f"p90 {held_out_run['p90_ape_pct']:.2f}%, summed time {held_out_run['sum_err_pct']:+.1f}%",
        f"tree time, sim with this profile vs the torch backend: mean {err(fitted, 'jct_mean_s')}, "
        f"p99 {err(fitted, 'jct_p99_s')} (torch vs itself: {err(repeat, 'jct_mean_s')}, {err(repeat, 'jct_p99_s')})",
    ]


def breakdown_table(rows: list[dict]) -> str:
    lines = [
        "| iterations | n | measured (s) | predicted (s) | sum err | MAPE | p90 APE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['n']} | {r['measured_s']:.4f} | {r['predicted_s']:.4f} | {r['sum_err_pct']:+.1f}% "
            f"| {r['mape_pct']:.1f}% | {r['p90_ape_pct']:.1f}% |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def points_table(points: list[cal.Point], pred: np.ndarray) -> str:
    lines = ["| point | split | median (ms) | spread | fitted (ms) | err |", "|---|---|---|---|---|---|"]
    for p, t in zip(points, pred, strict=True):
        lines.append(
            f"| {p.label} | {'test' if p.held_out else 'train'} | {p.median_s * 1e3:.3f} | {100 * p.spread:.1f}% "
            f"| {t * 1e3:.3f} | {100 * (t - p.median_s) / p.median_s:+.1f}% |"
        )
    return "\n".join(lines)


@dataclass
class Measurements:
    """Everything the torch backend measured. The fit and the sim runs after it need no GPU, so a
    saved report refits anywhere (``--refit``)."""

    machine: str
    device: str
    date: str
    model: str
    seed: int
    quick: bool
    repeats: int
    points: list[cal.Point]  # the grid of isolated batches, some held out
    engine_iterations: list[TimedIteration]  # the engine runs on other seeds (fit)
    torch_rows: dict[str, dict]  # the fidelity seed on the torch backend, run twice
    fidelity_iterations: list[TimedIteration]  # the first of those runs (held out from the fit)


def measure(args: argparse.Namespace, device: torch.device, model: str) -> Measurements:
    """The grid, the engine runs on other seeds and the fidelity seed twice, all on the torch backend."""
    from servegym.envs.engine.torch_backend import TorchBackendFactory

    base_name = BASE_PROFILES[model]
    repeats = args.repeats or (5 if args.quick else 9)
    cfg = EngineConfig(profile=base_name, model=model, backend="torch")
    backend = TorchBackendFactory(cfg, device=str(device))(load_profile(base_name))  # the engine's own
    specs = cal.default_grid(model, args.quick)
    log(f"{machine(device)}; model {model}; {len(specs)} points x {repeats} repeats")
    points = cal.profile_points(backend, specs, repeats, block_size=16, budget_s=args.budget_s, log=log)
    cal.split_held_out(points, seed=args.seed)
    # Batches inside a running engine (other seeds than the fidelity run's): what isolated batches miss.
    engine_iterations = []
    for run in range(args.engine_runs):
        engine_iterations += run_engine(
            model, base_name, "torch", device, args.quick, args.seed + 1000 + run
        )[1]
    torch_rows, fidelity_iterations = {}, []
    if not args.no_fidelity:
        torch_rows["torch (measured)"], fidelity_iterations = run_engine(
            model, base_name, "torch", device, args.quick, args.seed
        )
        # the same run again: the torch backend's own run-to-run spread, the floor of any fidelity
        torch_rows["torch (repeat)"] = run_engine(model, base_name, "torch", device, args.quick, args.seed)[0]
    return Measurements(
        machine=machine(device),
        device=device.type,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        model=model,
        seed=args.seed,
        quick=args.quick,
        repeats=repeats,
        points=points,
        engine_iterations=engine_iterations,
        torch_rows=torch_rows,
        fidelity_iterations=fidelity_iterations,
    )


def measurements_json(m: Measurements) -> dict:
    """The report's measurement fields (``load_measurements`` reads them back; the grid points and
    the torch rows are written with the fit's results beside them)."""
    return {
        "machine": m.machine,
        "device": m.device,
        "measured": m.date,
        "model": m.model,
        "seed": m.seed,
        "quick": m.quick,
        "repeats": m.repeats,
        "iteration_columns": list(ITERATION_COLUMNS),
        "engine_fit_iterations": [[getattr(it, c) for c in ITERATION_COLUMNS] for it in m.engine_iterations],
        "fidelity_iterations": [[getattr(it, c) for c in ITERATION_COLUMNS] for it in m.fidelity_iterations],
    }


def load_measurements(path: str) -> Measurements:
    """The measurements of a report this script wrote (``--json``)."""
    report = json.loads(Path(path).read_text())
    point_fields = {f.name for f in fields(cal.Point)}
    columns = report["iteration_columns"]

    def iterations(key: str) -> list[TimedIteration]:
        return [TimedIteration(**dict(zip(columns, row, strict=True))) for row in report[key]]

    return Measurements(
        machine=report["machine"],
        device=report["device"],
        date=report["measured"],
        model=report["model"],
        seed=report["seed"],
        quick=report["quick"],
        repeats=report["repeats"],
        points=[cal.Point(**{k: v for k, v in p.items() if k in point_fields}) for p in report["points"]],
        engine_iterations=iterations("engine_fit_iterations"),
        torch_rows={k: v for k, v in (report["fidelity"] or {}).items() if k.startswith("torch")},
        fidelity_iterations=iterations("fidelity_iterations"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--model", choices=sorted(BASE_PROFILES), default=None, help="default: tiny on cpu, llama1b on cuda"
    )
    parser.add_argument(
        "--out", default=None, help="fitted profile YAML (default: $OUT or . / <base>_fitted.yaml)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller grid, fewer repeats, smaller fidelity workload"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per point (default 5 quick, 9 full)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop adding repeat rounds after this long"
    )
    parser.add_argument(
        "--no-fidelity", action="store_true", help="skip the sim-vs-torch workload comparison"
    )
    parser.add_argument(
        "--json", default=None, help="results JSON (default: $OUT/calibration_<device>_<model>.json)"
    )
    parser.add_argument(
        "--engine-runs",
        type=int,
        default=2,
        help="torch-backend runs of the fidelity workload (other seeds) whose iterations join the fit (0: grid only)",
    )
    parser.add_argument(
        "--max-engine-points",
        type=int,
        default=800,
        help="engine iterations kept for the fit (a seeded sample)",
    )
    parser.add_argument(
        "--refit",
        default=None,
        metavar="REPORT_JSON",
        help="fit again from a report's measurements instead of measuring (no GPU needed; sim runs only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.engine_runs < 0 or args.max_engine_points < 1:
        parser.error("--engine-runs must be >= 0 and --max-engine-points >= 1")

    t_start = time.perf_counter()
    if args.refit:
        m = load_measurements(args.refit)
        log(f"refitting from {args.refit}: measured on {m.machine}, {m.date}")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no GPU; use --device cpu")
        m = measure(args, device, args.model or ("llama1b" if device.type == "cuda" else "tiny"))
    base_name = BASE_PROFILES[m.model]
    base = load_profile(base_name)
    out_dir = os.environ.get("OUT")
    out = Path(args.out or Path(out_dir or ".") / f"{base_name}_fitted.yaml")
    measured_s = time.perf_counter() - t_start

    engine_pts = cal.engine_points(m.engine_iterations)
    if len(engine_pts) > args.max_engine_points:
        keep = np.random.default_rng(m.seed).choice(len(engine_pts), args.max_engine_points, replace=False)
        engine_pts = [engine_pts[i] for i in sorted(keep.tolist())]
    # A GPU's datasheet peaks bound its fitted rates; a CPU profile's "peak" is a placeholder.
    cap = m.device == "cuda"
    result = cal.fit(base, m.points + engine_pts, name=out.stem, source="", cap_at_peak=cap)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    errs = (
        f"held-out MAPE {result.held_out['mape_pct']:.2f}%, p90 {result.held_out['p90_ape_pct']:.2f}%, "
        f"max {result.held_out['max_ape_pct']:.2f}% over {result.held_out['n']} grid points; "
        f"train MAPE {result.train['mape_pct']:.2f}% over {result.train['n']}"
    )
    how = f"fit on {date} from measurements of {m.date}" if args.refit else f"{m.date}"
    source = f"scripts/calibrate.py fit to the torch backend ({m.model}) on {m.machine}, {how}; {errs}"
    profile = replace(result.profile, source=source)
    header = [
        f"Fitted by scripts/calibrate.py{' --quick' if m.quick else ''}{' --refit' if args.refit else ''} "
        f"from {base_name}.yaml: do not edit by hand.",
        f"machine: {m.machine}",
        f"date: {how}; model preset: {m.model}; {len(m.points)} batch compositions x {m.repeats} repeats (median)"
        f" + {len(engine_pts)} iterations of engine runs on other seeds",
        f"fit error: {errs}",
        *(f"note: {n}" for n in result.notes),
    ]
    cal.write_profile(profile, out, header)
    load_profile(str(out))  # the sim must load what we wrote
    log(f"profile written to {out} ({measured_s:.1f} s of measuring)")
    profiles = {"fitted": (str(out), profile)}
    if engine_pts:  # the grid-only fit, for comparison: what the engine's own iterations add
        grid_only = cal.fit(base, m.points, name=f"{out.stem}_grid_only", cap_at_peak=cap).profile
        grid_path = Path(tempfile.mkdtemp()) / f"{out.stem}_grid_only.yaml"
        cal.write_profile(grid_only, grid_path, ["grid-only fit (comparison)"])
        profiles["grid-only fit"] = (str(grid_path), grid_only)

    fidelity, diagnosis = None, {}
    if m.torch_rows:
        cpu = torch.device("cpu")  # the sim never touches a device
        fidelity = dict(m.torch_rows)
        for label, (path, _) in profiles.items():
            fidelity[f"sim ({label})"] = run_engine(m.model, path, "sim", cpu, m.quick, m.seed)[0]
        fidelity[f"sim ({base_name})"] = run_engine(m.model, base_name, "sim", cpu, m.quick, m.seed)[0]
        diagnosis = {
            label: {
                "breakdown": cal.breakdown(p, m.fidelity_iterations),
                "outliers": cal.outliers(p, m.fidelity_iterations),
                "engine_fit_outliers": cal.outliers(p, m.engine_iterations) if m.engine_iterations else [],
            }
            for label, (_, p) in profiles.items()
        }
        held_out_run = next(r for r in diagnosis["fitted"]["breakdown"] if r["kind"] == "all")
        cal.write_profile(profile, out, header + fidelity_header(fidelity, held_out_run, m.seed))

    pred = cal.profile_times_s(profile, cal.feature_arrays(m.points))
    report = {
        **measurements_json(m),
        "date": date,
        "base_profile": base_name,
        "profile_path": str(out),
        "profile": asdict(profile),
        "theta": result.theta,
        "train": result.train,
        "held_out": result.held_out,
        "base_held_out": result.base_held_out,
        "notes": result.notes,
        "points": [
            {**asdict(p), "median_s": p.median_s, "spread": p.spread, "fitted_s": float(t)}
            for p, t in zip(m.points, pred, strict=True)
        ],
        "fidelity": fidelity,
        "diagnosis": diagnosis,
        "engine_points": len(engine_pts),
        "wall_s": time.perf_counter() - t_start,
    }
    json_path = args.json or (Path(out_dir) / f"calibration_{m.device}_{m.model}.json" if out_dir else None)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        log(f"results written to {json_path}")
    print_report(m, result, profile, out.stem, base_name, pred, fidelity, diagnosis)
    print(f"calibration done in {time.perf_counter() - t_start:.1f} s")
    return 0


def print_report(
    m: Measurements,
    result: cal.FitResult,
    profile: ModelProfile,
    name: str,
    base_name: str,
    pred: np.ndarray,
    fidelity: dict | None,
    diagnosis: dict,
) -> None:
    """The grid's points, the fit's errors and constants, then fidelity and the per-kind diagnosis."""
    print()
    print(points_table(m.points, pred))
    print()
    print("| profile | held-out MAPE | p90 APE | max APE | train MAPE |")
    print("|---|---|---|---|---|")
    for label, e_test, e_train in (
        (f"{name} (fitted)", result.held_out, result.train),
        (f"{base_name} (base)", result.base_held_out, None),
    ):
        train = f"{e_train['mape_pct']:.2f}%" if e_train else ""
        print(
            f"| {label} | {e_test['mape_pct']:.2f}% | {e_test['p90_ape_pct']:.2f}% | {e_test['max_ape_pct']:.2f}% | {train} |"
        )
    print()
    print(
        "fitted: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result.theta.items())
        + f" -> flops_efficiency={profile.flops_efficiency:.4g}, bandwidth_efficiency={profile.bandwidth_efficiency:.4g}"
    )
    for note in result.notes:
        print(f"note: {note}")
    if not fidelity:
        return
    print()
    print(fidelity_table(fidelity))
    ref, fit_row = fidelity["torch (measured)"], fidelity["sim (fitted)"]
    worst = max(abs(err_pct(fit_row, ref, k)) for k in ("jct_mean_s", "jct_p99_s"))
    print(f"tree-time error (fitted sim vs torch): {worst:.1f}% (goal <= {FIDELITY_GOAL_PCT:.0f}%)")
    for label, d in diagnosis.items():
        print()
        print(f"The torch run's own iterations against the {label} profile (held out: another seed):")
        print(breakdown_table(d["breakdown"]))
        for which, rows in (("this run", d["outliers"]), ("engine-fit run", d["engine_fit_outliers"])):
            if rows:
                print(
                    f"largest excess over the {label} profile, {which}: "
                    + "; ".join(
                        f"{r['label']} {1e3 * r['measured_s']:.1f} vs {1e3 * r['predicted_s']:.1f} ms"
                        for r in rows[:5]
                    )
                )


if __name__ == "__main__":
    sys.exit(main())
