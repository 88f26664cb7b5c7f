"""Latency measurement protocol, the same for every engine (:mod:`spaceevo.latency.engines`).

A :class:`Timer` is one model prepared by an engine and timed one inference at a time. A measurement
is several rounds of timed runs after a warm-up; :func:`measure_interleaved`'s figure is the median
over rounds of each round's median, robust to the spikes of a shared machine. Variants that are compared are measured interleaved (round-robin), never
one after another.

Shared (virtual) machines also have *phases*: for tens of milliseconds to seconds a core runs
markedly faster or slower (measured here: the same model at 0.35 and 0.57 ms a few seconds apart,
with no steal time), long enough to shift every model of an interleaved group together.
:class:`StableMeter` therefore times a fixed reference model before and after every single run of a
subject and expresses each run in reference units, ``run / reference · canonical_ms``, with the
faster of the two bracketing reference samples. ``canonical_ms`` is the reference's undisturbed
latency (stored with a latency table, so the table, its calibration and its validation share one
scale). The raw median is kept alongside (``raw_median_ms``).

Besides phases, which slow subject and reference alike, a loaded machine *disturbs* single runs:
preemption, caches another process evicted, a neighbour's bursts of memory traffic. They hit the
subject and the reference independently and more often the busier the machine is, so a median moves
with the load (measured here: 4-6 % for the same sessions within a minute, under other processes'
load, while the reference stayed within 1 %; two builds of one table 3.5 % apart). Disturbances
only ever add time, so both the scale and the figures are the fast tail, :data:`FAST_QUANTILE`, of
all runs: the reference's runs while settling, and the subject's reference-unit runs pooled over all
rounds of a measurement (interleaved, so they span the group's whole timing window). That is stable
as long as one run in twenty is undisturbed.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

FAST_QUANTILE = 0.05
"""Quantile of a guarded measurement's runs that is its figure (see the module docstring)."""


@dataclass(frozen=True)
class MeasureConfig:
    """How hard to measure: warm-up runs, rounds, runs per round, and a time floor per round."""

    warmup: int = 10
    rounds: int = 5
    runs_per_round: int = 10
    min_round_s: float = 0.01


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds: the figure (``ms``: the median of round medians for
    :func:`measure_interleaved`, the fast tail of all reference-unit runs for a :class:`StableMeter`),
    the round medians and their spread (robust CV), and the plain wall-clock median (``raw_median_ms``)."""

    ms: float
    min_ms: float
    round_medians_ms: tuple[float, ...]
    raw_median_ms: float | None = None

    @property
    def spread(self) -> float:
        """Interquartile range of the round medians over their median: how much the figure moved."""
        if self.ms <= 0 or len(self.round_medians_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.round_medians_ms, n=4, method="inclusive")
        return (q3 - q1) / self.ms


class Timer(ABC):
    """A model prepared by an engine with its input, timed with :meth:`run_once`; the unit every
    protocol builds on. Engines implement :meth:`infer` (one synchronous inference)."""

    @abstractmethod
    def infer(self) -> None:
        """One synchronous inference on the prepared input."""

    def run_once(self) -> float:
        start = time.perf_counter()
        self.infer()
        return (time.perf_counter() - start) * 1e3

    def round(self, runs: int, min_round_s: float) -> list[float]:
        times, spent = [], 0.0
        while len(times) < runs or spent * 1e-3 < min_round_s:
            times.append(self.run_once())
            spent += times[-1]
        return times


def measure_interleaved(timers: Sequence[Timer], config: MeasureConfig = MeasureConfig()) -> list[LatencyStats]:
    """Measure several prepared models round-robin, so drift of the machine hits all alike."""
    for timer in timers:
        for _ in range(config.warmup):
            timer.run_once()
    medians: list[list[float]] = [[] for _ in timers]
    for _ in range(config.rounds):
        for i, timer in enumerate(timers):
            medians[i].append(statistics.median(timer.round(config.runs_per_round, config.min_round_s)))
    return [
        LatencyStats(ms=statistics.median(m), min_ms=min(m), round_medians_ms=tuple(m)) for m in medians
    ]


def fast_tail(values: Sequence[float]) -> float:
    """The :data:`FAST_QUANTILE` of ``values`` (linear interpolation)."""
    return float(np.quantile(np.asarray(values, dtype=float), FAST_QUANTILE))


def random_input(shape: list[int], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """A timed model's pinned input: integer codes over the whole range for a quantized input
    (uint8, int8), else standard normal floats."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(np.float32)


class Meter(ABC):
    """Reference-guarded measurement: :class:`StableMeter` here, or an engine's stand-in that runs
    the same protocol on another machine (:mod:`spaceevo.latency.engines.ssh`)."""

    #: The reference's undisturbed latency that figures are expressed in (a table's scale, or
    #: :attr:`baseline_ms`), and the reference's latency measured by :meth:`settle`.
    canonical_ms: float | None
    baseline_ms: float | None

    @abstractmethod
    def settle(self, seconds: float = 2.0, runs: int = 200) -> float:
        """Measure the reference now; sets and returns :attr:`baseline_ms`."""

    @abstractmethod
    def measure(self, timers: Sequence[Timer], config: MeasureConfig) -> list[LatencyStats]:
        """Time ``timers`` interleaved, in reference units, one :class:`LatencyStats` each."""


class StableMeter(Meter):
    """Interleaved measurement expressed in units of a reference model (see the module docstring)."""

    def __init__(self, reference: Timer, canonical_ms: float | None = None):
        self.reference = reference
        self.canonical_ms = canonical_ms
        self.baseline_ms: float | None = None

    def settle(self, seconds: float = 2.0, runs: int = 200) -> float:
        """The reference's undisturbed latency now: the fast tail of its runs over ``seconds`` of
        wall time (at least ``runs`` runs); the canonical scale unless one was given (e.g. by a
        latency table)."""
        for _ in range(20):
            self.reference.run_once()
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < runs:
            times.append(self.reference.run_once())
        self.baseline_ms = fast_tail(times)
        if self.canonical_ms is None:
            self.canonical_ms = self.baseline_ms
        return self.baseline_ms

    def measure(self, timers: Sequence[Timer], config: MeasureConfig) -> list[LatencyStats]:
        if self.canonical_ms is None:
            self.settle()
        assert self.canonical_ms is not None
        for timer in timers:
            for _ in range(config.warmup):
                timer.run_once()
        raw: list[list[float]] = [[] for _ in timers]
        rounds: list[list[list[float]]] = [[] for _ in timers]
        for _ in range(config.rounds):
            for i, timer in enumerate(timers):
                subject, reference = self._paired_round(timer, config)
                raw[i].append(statistics.median(subject))
                rounds[i].append(
                    [
                        run * self.canonical_ms / min(before, after)
                        for run, before, after in zip(subject, reference, reference[1:])
                    ]
                )
        stats = []
        for runs, raw_medians in zip(rounds, raw):
            medians = tuple(statistics.median(r) for r in runs)
            stats.append(
                LatencyStats(
                    ms=fast_tail([run for r in runs for run in r]),
                    min_ms=min(medians),
                    round_medians_ms=medians,
                    raw_median_ms=statistics.median(raw_medians),
                )
            )
        return stats

    def _paired_round(self, timer: Timer, config: MeasureConfig) -> tuple[list[float], list[float]]:
        """One round that alternates reference and subject runs: ``reference[i]`` and
        ``reference[i + 1]`` bracket ``subject[i]``.

        Every run of the subject is normalised by the reference samples right before and after it,
        so the reference samples the same machine phase however long the subject runs (a round of
        five 25 ms runs spans longer than many phases; a reference timed only before and after a
        whole round misses them).
        """
        reference = [self._reference_sample()]
        subject: list[float] = []
        spent = 0.0
        while len(subject) < config.runs_per_round or spent * 1e-3 < config.min_round_s:
            subject.append(timer.run_once())
            reference.append(self._reference_sample())
            spent += subject[-1]
        return subject, reference

    def _reference_sample(self) -> float:
        """The second of two back-to-back reference runs: the first pays for the caches the
        subject evicted (2.7x the warm figure after a 25 ms onnxw model, 1.1x after a 0.3 ms tiny
        one, measured here), which would make the scale depend on the subject's size."""
        self.reference.run_once()
        return self.reference.run_once()
