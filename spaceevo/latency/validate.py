"""Validation of the latency predictor against end-to-end measurements of random subnets.

Every subnet is exported as INT8 ONNX and timed twice (two sessions, interleaved in one group) so
the report shows the noise floor of the measurement itself next to the predictor's error. Errors
are given against measurements on the table's reference scale (the protocol the table was built
with, see :mod:`spaceevo.latency.measure`) and against the raw wall-clock medians.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from tqdm import tqdm

from spaceevo.latency.build import sample_architectures
from spaceevo.latency.endtoend import WHOLE_MEASURE, measure_models, subnet_int8_model
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.predictor import LatencyPredictor
from spaceevo.latency.reference import stable_meter
from spaceevo.space import CandidateSpace, Hyperspace

VALIDATION_SEED = 2023
GROUP = 5


@dataclass(frozen=True)
class ValidationRow:
    space: str
    subnet: str
    predicted_ms: float
    measured_ms: float
    remeasured_ms: float
    measured_raw_ms: float
    remeasured_raw_ms: float

    @property
    def error(self) -> float:
        """Relative error against the mean of the two measurements on the reference scale."""
        truth = (self.measured_ms + self.remeasured_ms) / 2
        return (self.predicted_ms - truth) / truth

    @property
    def raw_error(self) -> float:
        """Relative error against the mean of the two raw wall-clock medians."""
        truth = (self.measured_raw_ms + self.remeasured_raw_ms) / 2
        return (self.predicted_ms - truth) / truth

    @property
    def noise(self) -> float:
        return (self.remeasured_ms - self.measured_ms) / self.measured_ms

    @property
    def raw_noise(self) -> float:
        return (self.remeasured_raw_ms - self.measured_raw_ms) / self.measured_raw_ms


@dataclass(frozen=True)
class ValidationReport:
    samples: int
    within_5pct: float
    within_10pct: float
    rmspe: float
    mean_error: float
    noise_within_10pct: float
    noise_rms: float
    raw_within_10pct: float
    raw_rmspe: float
    raw_noise_within_10pct: float
    machine_speed_vs_table: float
    median_int8_ms: float
    rows: tuple[ValidationRow, ...]

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("rows")
        return data


def _within(values: list[float], bound: float) -> float:
    return sum(abs(v) <= bound for v in values) / len(values)


def _rms(values: list[float]) -> float:
    return math.sqrt(statistics.fmean(v * v for v in values))


def validate_predictor(
    space: Hyperspace | CandidateSpace,
    predictor: LatencyPredictor,
    fingerprint: DeviceFingerprint,
    samples: int,
    seed: int = VALIDATION_SEED,
    show_progress: bool = True,
) -> ValidationReport:
    """Measure ``samples`` random subnets twice as INT8 ONNX and compare with the predictor."""
    archs = sample_architectures(space, samples, seed)
    predicted = [predictor.predict_ms(a) for a in archs]
    meter = stable_meter(fingerprint, predictor.table.reference_ms)
    first, second = [], []
    with tqdm(total=samples, desc="validate", unit="subnet", disable=not show_progress, dynamic_ncols=True) as bar:
        for i in range(0, samples, GROUP):
            group = archs[i : i + GROUP]
            models = [subnet_int8_model(a, fingerprint) for a in group]
            stats = measure_models(models + models, fingerprint, WHOLE_MEASURE, meter)
            first += stats[: len(group)]
            second += stats[len(group) :]
            bar.update(len(group))
    rows = tuple(
        ValidationRow(
            a.space.encoding, a.subnet.encode(), p, m1.ms, m2.ms, m1.raw_median_ms, m2.raw_median_ms
        )
        for a, p, m1, m2 in zip(archs, predicted, first, second)
    )
    errors = [r.error for r in rows]
    raw_errors = [r.raw_error for r in rows]
    return ValidationReport(
        samples=len(rows),
        within_5pct=_within(errors, 0.05),
        within_10pct=_within(errors, 0.10),
        rmspe=_rms(errors),
        mean_error=statistics.fmean(errors),
        noise_within_10pct=_within([r.noise for r in rows], 0.10),
        noise_rms=_rms([r.noise for r in rows]),
        raw_within_10pct=_within(raw_errors, 0.10),
        raw_rmspe=_rms(raw_errors),
        raw_noise_within_10pct=_within([r.raw_noise for r in rows], 0.10),
        machine_speed_vs_table=meter.baseline_ms / meter.canonical_ms,
        median_int8_ms=statistics.median((r.measured_ms + r.remeasured_ms) / 2 for r in rows),
        rows=rows,
    )
