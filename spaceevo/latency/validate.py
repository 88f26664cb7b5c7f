"""Validation of the latency predictor against end-to-end measurements of random subnets."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from tqdm import tqdm

from spaceevo.latency.build import sample_architectures
from spaceevo.latency.endtoend import WHOLE_MEASURE, measure_models, subnet_models
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.predictor import LatencyPredictor
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

    @property
    def error(self) -> float:
        """Relative error of the prediction against the mean of the two measurements."""
        truth = (self.measured_ms + self.remeasured_ms) / 2
        return (self.predicted_ms - truth) / truth

    @property
    def noise(self) -> float:
        return (self.remeasured_ms - self.measured_ms) / self.measured_ms


@dataclass(frozen=True)
class ValidationReport:
    samples: int
    within_5pct: float
    within_10pct: float
    rmspe: float
    mean_error: float
    noise_within_10pct: float
    noise_rms: float
    median_int8_ms: float
    rows: tuple[ValidationRow, ...]

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("rows")
        return data


def validate_predictor(
    space: Hyperspace | CandidateSpace,
    predictor: LatencyPredictor,
    fingerprint: DeviceFingerprint,
    samples: int,
    seed: int = VALIDATION_SEED,
    show_progress: bool = True,
) -> ValidationReport:
    """Measure ``samples`` random subnets twice as INT8 ONNX and compare with the predictor.

    Subnets are timed in interleaved groups; the second pass re-times every subnet to show the
    noise floor of the measurement itself.
    """
    archs = sample_architectures(space, samples, seed)
    predicted = [predictor.predict_ms(a) for a in archs]
    first: list[float] = []
    second: list[float] = []
    with tqdm(total=samples, desc="validate", unit="subnet", disable=not show_progress, dynamic_ncols=True) as bar:
        for i in range(0, samples, GROUP):
            group = archs[i : i + GROUP]
            models = [subnet_models(a, fingerprint).int8 for a in group]
            stats = measure_models(models + models, fingerprint, WHOLE_MEASURE)
            first += [s.median_ms for s in stats[: len(group)]]
            second += [s.median_ms for s in stats[len(group) :]]
            bar.update(len(group))
    rows = tuple(
        ValidationRow(a.space.encoding, a.subnet.encode(), p, m1, m2)
        for a, p, m1, m2 in zip(archs, predicted, first, second)
    )
    errors = [r.error for r in rows]
    noises = [r.noise for r in rows]
    return ValidationReport(
        samples=len(rows),
        within_5pct=sum(abs(e) <= 0.05 for e in errors) / len(rows),
        within_10pct=sum(abs(e) <= 0.10 for e in errors) / len(rows),
        rmspe=math.sqrt(statistics.fmean(e * e for e in errors)),
        mean_error=statistics.fmean(errors),
        noise_within_10pct=sum(abs(n) <= 0.10 for n in noises) / len(rows),
        noise_rms=math.sqrt(statistics.fmean(n * n for n in noises)),
        median_int8_ms=statistics.median((r.measured_ms + r.remeasured_ms) / 2 for r in rows),
        rows=rows,
    )
