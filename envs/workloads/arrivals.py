"""Open-loop arrival processes: when jobs reach the system, independent of how fast it serves them.

Poisson is the textbook baseline; real LLM traffic is burstier (BurstGPT fits Gamma inter-arrivals;
the Mooncake conversation trace has an inter-arrival CV of 3.0), and bursts are what
make admission and eviction choices matter, so Gamma (cv <= ``GAMMA_MAX_CV``) and a two-state
MMPP are here too.
Each process returns absolute, sorted arrival times in seconds, the first one after t = 0.

Degenerate settings fail at construction rather than producing a run that looks fine: a rate so
low that the arrivals would span more than ``MAX_ARRIVAL_SPAN_S`` (the engine's float64 clock
would round every latency to 0), and an MMPP whose states are too short to hold an arrival (its
sampler would loop about ``1 / (rate x dwell)`` times per arrival).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ARRIVAL_SPAN_S = 1e9
"""The longest arrival span a workload may have (about 31.7 years). The engine keeps time in
float64 seconds, which resolves 0.12 us at 1e9 s and nothing below 0.25 s at 1e15 s; a longer
span is almost always a unit mistake (ns or us where seconds are expected, a rate of 1e-300).
Every trace loader and generator refuses it with the value named."""

GAMMA_MAX_CV = 30.0
"""Gamma gaps with a larger CV (shape below ~1e-3) are almost all 0 in a few thousand draws:
every job would arrive at once and the configured mean rate would not show; refused."""

MMPP_MIN_ARRIVALS_PER_DWELL = 0.01
"""An MMPP state visit must expect at least this many arrivals (mean rate x ``mean_dwell_s``)."""


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
    """Coefficient of variation of the gaps; 3.0 is the Mooncake conversation trace's."""

    def __post_init__(self) -> None:
        _positive("Gamma", rate_per_s=self.rate_per_s, cv=self.cv)
        if self.cv > GAMMA_MAX_CV:
            raise ValueError(
                f"Gamma.cv={self.cv!r} is above {GAMMA_MAX_CV}: gaps of shape 1/cv^2 are almost all 0 in "
                "any practical number of draws, so every job would arrive at once; use cv <= "
                f"{GAMMA_MAX_CV} (Mooncake's conversation trace has 3.0)"
            )

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
        per_dwell = (self.rate_low + self.rate_high) / 2 * self.mean_dwell_s
        if not per_dwell >= MMPP_MIN_ARRIVALS_PER_DWELL:
            raise ValueError(
                f"MMPP.mean_dwell_s={self.mean_dwell_s!r} at mean rate {(self.rate_low + self.rate_high) / 2!r}/s "
                f"gives {per_dwell:.3g} arrivals per state visit (< {MMPP_MIN_ARRIVALS_PER_DWELL}): the "
                "sampler would loop ~1/that times per arrival; raise mean_dwell_s or the rates"
            )

    def times(self, rng: np.random.Generator, num_jobs: int) -> np.ndarray:
        return self.trajectory(rng, num_jobs)[0]

    def trajectory(self, rng: np.random.Generator, num_jobs: int) -> tuple[np.ndarray, np.ndarray]:
        """The arrival times and the state path behind them: ``(times, visits)``, where
        ``visits`` is a (V, 3) array of state visits ``[start_s, end_s, state]`` (state 0 quiet,
        1 busy) covering ``[0, end of the visit holding the last arrival]``. ``times`` is what
        ``times()`` returns for the same rng (the same draws, in the same order); the visits let
        a test or a plot measure each state's rate and dwell."""
        _check_num_jobs(num_jobs)
        rates = (self.rate_low, self.rate_high)
        state = int(rng.integers(2))  # both states are equally likely in the long run
        start_s, chunks, visits, count = 0.0, [], [], 0
        while count < num_jobs:
            dwell_s = rng.exponential(self.mean_dwell_s)
            # A Poisson process on an interval: a Poisson count of uniform points.
            n = rng.poisson(rates[state] * dwell_s)
            chunks.append(np.sort(start_s + rng.uniform(0.0, dwell_s, n)))
            visits.append((start_s, start_s + dwell_s, state))
            count += n
            start_s += dwell_s
            state = 1 - state
        times = np.concatenate(chunks)[:num_jobs] if chunks else np.zeros(0)
        return times, np.array(visits, dtype=float).reshape(-1, 3)

    @property
    def rate_ratio(self) -> float:
        """Busy-state rate over quiet-state rate (inf for on/off traffic)."""
        return self.rate_high / self.rate_low if self.rate_low > 0 else float("inf")

    def gap_cv(self) -> float:
        """The exact coefficient of variation of the stationary inter-arrival gaps.

        A two-state MMPP's gaps are phase-type: with generator Q (switching rate 1 / dwell each
        way) and rate matrix L = diag(rate_low, rate_high), D0 = Q - L, the gap moments under
        the embedded arrival-state distribution pi_a (pi_a proportional to pi L, pi = (1/2, 1/2))
        are E[X^k] = k! pi_a (-D0)^-k 1. Poisson (equal rates) gives 1; Mooncake's conversation
        trace has 3.0 (ANCHORS.md)."""
        switch = 1.0 / self.mean_dwell_s
        rates = np.array([self.rate_low, self.rate_high])
        d0 = np.array([[-switch, switch], [switch, -switch]]) - np.diag(rates)
        inv = np.linalg.inv(-d0)
        pi_a = rates / rates.sum()
        ones = np.ones(2)
        m1 = pi_a @ inv @ ones
        m2 = 2.0 * pi_a @ inv @ inv @ ones
        return float(np.sqrt(m2 - m1**2) / m1)


ARRIVALS: dict[str, type] = {"poisson": Poisson, "gamma": Gamma, "mmpp": MMPP}
"""Arrival process classes by name."""
