"""The evaluation suite's public API: one import for scripts and callers. Every name lives in one
module of ``servegym.agents.evaluation``, whose docstring defines load, SLO, confidence intervals,
seeds, traces, the outputs and resuming.

Python (what a train -> evaluate -> export job calls with a policy it just trained)::

    from servegym.agents.evaluation.api import SuiteConfig, evaluate, run_suite, summarise, to_markdown
    df = run_suite(SuiteConfig(policies=["fcfs", "plas"], workloads=["mapreduce"]),
                   extra_policies={"ppo": lambda: SB3Policy(...)})     # a factory per run
    print(to_markdown(summarise(df)))
    evaluate(SuiteConfig(...), out_dir="eval/")   # runs.csv, jobs.csv, summary.md, plots/*.png

To replace a function for a test, patch the module that looks it up (e.g.
``servegym.agents.evaluation.suite.run_one``), not this one.
"""

from __future__ import annotations

from servegym.agents.evaluation.collect import collect, collect_identity
from servegym.agents.evaluation.config import (
    DEFAULT_CONF_DIR,
    SuiteConfig,
    SuiteConfigError,
    compose_config,
    load_option,
    register_resolvers,
    register_suite_schema,
    suite_from_cfg,
)
from servegym.agents.evaluation.load import apply_load, build_source, unloaded_completion_s
from servegym.agents.evaluation.plan import SuitePlan, plan_suite
from servegym.agents.evaluation.report import REPORT_FILES, plot_suite, report, write_tables
from servegym.agents.evaluation.results import (
    INCOMPLETE_COLUMNS,
    KEYS,
    SuiteResult,
    assemble,
    incomplete_runs,
    latest_records,
    rejected_work_line,
    run_key,
)
from servegym.agents.evaluation.runs import HydraPolicyFactory, RunTask, RunTimeout
from servegym.agents.evaluation.stats import (
    FRACTION_METRICS,
    bounded_interval,
    metric_range,
    ratio_interval,
    t_interval,
    t_quantile,
)
from servegym.agents.evaluation.suite import SuiteInterrupted, evaluate, execute, run_suite, run_suite_full
from servegym.agents.evaluation.suite_io import OutputFolderError
from servegym.agents.evaluation.summary import (
    HEADLINE_METRICS,
    metric_columns,
    seedless_workloads,
    summarise,
    to_markdown,
)

__all__ = [
    "DEFAULT_CONF_DIR",
    "FRACTION_METRICS",
    "HEADLINE_METRICS",
    "INCOMPLETE_COLUMNS",
    "KEYS",
    "REPORT_FILES",
    "HydraPolicyFactory",
    "OutputFolderError",
    "RunTask",
    "RunTimeout",
    "SuiteConfig",
    "SuiteConfigError",
    "SuiteInterrupted",
    "SuitePlan",
    "SuiteResult",
    "apply_load",
    "assemble",
    "bounded_interval",
    "build_source",
    "collect",
    "collect_identity",
    "compose_config",
    "evaluate",
    "execute",
    "incomplete_runs",
    "latest_records",
    "load_option",
    "metric_columns",
    "metric_range",
    "plan_suite",
    "plot_suite",
    "ratio_interval",
    "register_resolvers",
    "register_suite_schema",
    "rejected_work_line",
    "report",
    "run_key",
    "run_suite",
    "run_suite_full",
    "seedless_workloads",
    "suite_from_cfg",
    "summarise",
    "t_interval",
    "t_quantile",
    "to_markdown",
    "unloaded_completion_s",
    "write_tables",
]
