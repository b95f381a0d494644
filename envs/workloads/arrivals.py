"""Open-loop arrival processes: when jobs reach the system, independent of how fast it serves them.

Poisson is the textbook baseline; real LLM traffic is burstier (BurstGPT fits Gamma inter-arrivals;
the Mooncake conversation trace has an inter-arrival CV of 3.0, ANCHORS.md), and bursts are what
make admission and eviction choices matter, so Gamma and a two-state MMPP are here too.
Each process returns absolute, sorted arrival times in seconds, the first one after t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be a finite number > 0, got {value!r}")


def _check_num_jobs(num_jobs: int) -> None:
    if not isinstance(num_jobs, int | np.integer) or num_jobs < 0:
        raise ValueError(f"num_jobs must be an int >= 0, got {num_jobs!r}")


@dataclass
class Poisson:
    """Memoryless arrivals: exponential gaps with mean 1 / rate (inter-arrival CV 1)."""

    rate_per_s: float = 1.0
    """Mean arrivals per second."""

    def __post_init__(self) -> None:
        _positive("Poisson", rate_per_s=self.rate_per_s)

    def times(self, rng: np.random.Generator, num_jobs: int) -> np.ndarray:
        _check_num_jobs(num_jobs)
        return np.cumsum(rng.exponential(1.0 / self.rate_per_s, num_jobs))


@dataclass
class Gamma:
    """Bursty renewal arrivals (BurstGPT-style): Gamma gaps with mean 1 / rate and CV ``cv``.

    Shape 1 / cv^2 and scale cv^2 / rate give exactly that mean and CV; cv = 1 is Poisson,
    cv > 1 clusters arrivals into bursts separated by long gaps.
    """

    rate_per_s: float = 1.0
    """Mean arrivals per second."""
    cv: float = 3.0
    """Coefficient of variation of the gaps; 3.0 is the Mooncake conversation trace's (ANCHORS.md)."""

    def __post_init__(self) -> None:
        _positive("Gamma", rate_per_s=self.rate_per_s, cv=self.cv)

    def times(self, rng: np.random.Generator, num_jobs: int) -> np.ndarray:
        _check_num_jobs(num_jobs)
        shape = 1.0 / self.cv**2
        return np.cumsum(rng.gamma(shape, 1.0 / (shape * self.rate_per_s), num_jobs))


@dataclass
class MMPP:
    """Two-state Markov-modulated Poisson process: the rate switches between ``rate_low`` and
    ``rate_high``, staying in each state an exponential time with mean ``mean_dwell_s``.

    Unlike Gamma renewals, bursts here last (load stays high for a while), the pattern that
    fills a KV cache and forces evictions. The long-run mean rate is (rate_low + rate_high) / 2.
    """

    rate_low: float = 0.25
    """Arrivals per second in the quiet state (may be 0: on/off traffic)."""
    rate_high: float = 1.75
    """Arrivals per second in the busy state."""
    mean_dwell_s: float = 60.0
    """Mean time spent in a state before switching."""

    def __post_init__(self) -> None:
        _positive("MMPP", rate_high=self.rate_high, mean_dwell_s=self.mean_dwell_s)
        if not (np.isfinite(self.rate_low) and 0 <= self.rate_low <= self.rate_high):
            raise ValueError(
                f"MMPP.rate_low must be in [0, rate_high={self.rate_high!r}], got {self.rate_low!r}"
            )

    def times(self, rng: np.random.Generator, num_jobs: int) -> np.ndarray:
        _check_num_jobs(num_jobs)
        rates = (self.rate_low, self.rate_high)
        state = int(rng.integers(2))  # both states are equally likely in the long run
        start_s, chunks, count = 0.0, [], 0
        while count < num_jobs:
            dwell_s = rng.exponential(self.mean_dwell_s)
            # A Poisson process on an interval: a Poisson count of uniform points.
            n = rng.poisson(rates[state] * dwell_s)
            chunks.append(np.sort(start_s + rng.uniform(0.0, dwell_s, n)))
            count += n
            start_s += dwell_s
            state = 1 - state
        return np.concatenate(chunks)[:num_jobs] if chunks else np.zeros(0)


ARRIVALS: dict[str, type] = {"poisson": Poisson, "gamma": Gamma, "mmpp": MMPP}
"""Arrival process classes by name."""
