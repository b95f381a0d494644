"""Confidence intervals of the suite's per-cell means: Student-t intervals over seeds, cut to
the metric's range, and log-scale intervals of paired ratios (definitions in
``servegym.agents.evaluation``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

FRACTION_METRICS = frozenset(
    {
        "slo_attainment",
        "prefix_hit_rate",
        "kv_utilization_mean",
        "jain_tenant_jct",
        "jain_job_speed",
        "large_model_call_share",
    }
)
"""Metrics in [0, 1]; every other metric is >= 0 (a time, count or rate): intervals are cut there."""


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile; NaN without a degree of freedom."""
    return float(stats.t.ppf(p, df)) if df >= 1 else float("nan")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval; half-width NaN for fewer than 2 values.
    NaN values (a metric a run could not measure) are left out."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not len(x):
        return float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan")
    half = t_quantile(0.5 + confidence / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, half


def metric_range(metric: str) -> tuple[float, float]:
    """(low, high) a metric can take: [0, 1] for fractions, [0, inf) for every other suite metric."""
    return (0.0, 1.0) if metric in FRACTION_METRICS else (0.0, math.inf)


def bounded_interval(mean: float, half: float, metric: str) -> tuple[float, float]:
    """``mean -+ half`` cut to ``metric_range(metric)`` (NaN, NaN when there is no interval)."""
    if not (np.isfinite(mean) and np.isfinite(half)):
        return float("nan"), float("nan")
    low, high = metric_range(metric)
    return max(mean - half, low), min(mean + half, high)


def paired_ratio(values: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray) -> str:
    """ "r [lo, hi]": the geometric mean of per-seed ratios values / base and its log-scale t
    interval (``ratio_interval``), as the tables print it."""
    ratios = np.asarray(values, dtype=np.float64) / np.asarray(base, dtype=np.float64)
    low, high = ratio_interval(ratios)
    return f"{float(np.exp(np.mean(np.log(ratios)))):.3f} [{low:.3f}, {high:.3f}]"


def ratio_interval(ratios: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of a t-interval on the log scale of positive ratios, exponentiated back: always
    > 0. Ratios that are not finite and > 0 are left out; NaN, NaN for fewer than 2."""
    x = np.asarray(ratios, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    mean, half = t_interval(np.log(x), confidence)
    if not np.isfinite(half):
        return float("nan"), float("nan")
    return float(np.exp(mean - half)), float(np.exp(mean + half))
