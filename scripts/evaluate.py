"""Evaluate policies on a suite: policies x workloads x loads x seeds -> tables, summary, plots.

python scripts/evaluate.py                                        # suite=default: conf/suite/default.yaml
python scripts/evaluate.py suite=smoke                            # seconds: the pipeline end to end
python scripts/evaluate.py suite.policies=[fcfs,plas] suite.workloads=[mapreduce] suite.loads=[1,4] \
    suite.seeds=[10000,10001,10002] suite.jobs=2 engine.max_num_seqs=32
python scripts/evaluate.py suite.policies=[fcfs,ppo] +suite.agent_overrides.ppo.checkpoint=run/policy.zip
python scripts/evaluate.py -m hydra/launcher=joblib suite.policies=[fcfs],[plas]   # one suite per job
python scripts/evaluate.py collect=multirun/DATE/TIME             # merge a sweep's suites

python scripts/evaluate.py suite.workloads=[] suite.traces=[runs/a.jsonl,runs/b.jsonl]   # two traces
python scripts/evaluate.py output_dir=eval/x suite.resume=true   # continue an interrupted suite

Writes runs.csv, jobs.csv, kv_timeline.csv, summary.csv, summary.md, plots/*.png (and
failures.csv/.log) into output_dir= (which must be empty, or hold this suite with
suite.resume=true), or else a fresh Hydra run dir; nothing is written anywhere else. Each run is
appended to runs.jsonl as it finishes; Ctrl-C prints one line (runs kept, where, how to
continue) and exits 130. Exit status: 0 when every run finished all its work; 1 if a run failed
(raised, stalled, or ran past suite.run_timeout_s), or if a run rejected work (calls too long for
the KV cache, failed trees) and suite.fail_on_rejected is true (the default; false: reported,
exit 0); 2 on a bad config, trace or output folder; 130 on Ctrl-C. Definitions (load, SLO,
confidence intervals, seeds, traces, resuming): servegym/agents/evaluation/__init__.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console

from servegym.agents.evaluation import suite_io
from servegym.agents.evaluation.api import (
    OutputFolderError,
    SuiteConfigError,
    SuiteInterrupted,
    collect,
    collect_identity,
    evaluate,
    register_suite_schema,
    rejected_work_line,
    report,
    suite_from_cfg,
)
from servegym.agents.rl.configs import register_configs

register_configs()
register_suite_schema()

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console, errors = Console(), Console(stderr=True)
    hydra_cfg = HydraConfig.get()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(hydra_cfg.runtime.output_dir)
    start = time.perf_counter()
    try:
        suite = suite_from_cfg(cfg.suite)
        if cfg.collect:
            suite_io.prepare_folder(out_dir, collect_identity(cfg.collect), resume=False, kind="collect")
            result = collect(cfg.collect, exclude=out_dir)
            markdown = report(result, out_dir, baseline=suite.baseline, plots=cfg.plots)
        else:
            result = evaluate(
                cfg, out_dir, conf_dir=CONF_DIR, progress=cfg.progress, console=errors, plots=cfg.plots
            )
            markdown = result.markdown
    except (SuiteConfigError, OutputFolderError, ValueError) as error:  # the message says which key/file
        errors.print(f"[red]bad evaluation config:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SuiteInterrupted as stop:  # one line, no traceback: what was kept and how to go on
        errors.print(str(stop), highlight=False, markup=False, soft_wrap=True)
        sys.exit(130)
    except KeyboardInterrupt:
        errors.print(
            f"interrupted while collecting; the report in {out_dir} is incomplete (no report.json): run "
            "the collect again"
            if cfg.collect
            else f"interrupted before any run was recorded; nothing kept in {out_dir}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(130)
    print(markdown, flush=True)  # plain Markdown: paste it into a README or an issue
    failed = len(result.failures)
    incomplete = len(result.incomplete())
    console.print(
        f"{len(result.runs) - incomplete} runs complete, {incomplete} rejected work, {failed} failed, "
        f"{time.perf_counter() - start:.0f} s; tables and plots in {out_dir}",
        highlight=False,
        soft_wrap=True,
    )
    problems = []
    if failed:
        problems.append(f"{failed} runs failed; see {out_dir / 'failures.log'}")
        errors.print(
            f"[red]{failed} runs failed[/red]: see {out_dir / 'failures.log'}",
            highlight=False,
            soft_wrap=True,
        )
    if incomplete:
        switch = (
            "suite.fail_on_rejected=false to exit 0 anyway"
            if suite.fail_on_rejected
            else "exit 0: suite.fail_on_rejected=false"
        )
        errors.print(
            f"[red]{rejected_work_line(result.runs)}[/red] (per run: runs.csv calls_rejected, jobs_failed, "
            f"first_rejection; {switch})",
            highlight=False,
            soft_wrap=True,
        )
        if suite.fail_on_rejected:
            problems.append(rejected_work_line(result.runs))
    if problems:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # let the launcher report this job, keep the sweep going
            raise RuntimeError("; ".join(problems))
        sys.exit(1)


if __name__ == "__main__":
    main()
