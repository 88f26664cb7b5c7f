"""Subnet latency prediction from a segment table plus a fitted boundary-cost model.

Summing stand-alone segment latencies over-predicts a whole INT8 network: every cut adds what a
whole network does not pay (a layout transpose pair on the uint8 tensor at the cut and one session
call). The predictor removes it with a model fitted on whole subnets measured end to end:

    predicted_ms = scale · Σ segment_ms − Σ_cuts (per_cut_ms + per_element_ms · elements_at_cut)
                   + intercept_ms

The fit is least squares on relative error over calibration subnets (a seed disjoint from the one
``spaceevo latency validate`` uses), stored next to the table with the samples it was fitted on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spaceevo.errors import ArtifactError
from spaceevo.io import atomic_write_text, writing
from spaceevo.latency.regression import SegmentRegressor
from spaceevo.latency.segments import Segment, network_segments, required_segments
from spaceevo.latency.table import WRITE_HINT, LatencyTable
from spaceevo.space import Architecture, Hyperspace


@dataclass(frozen=True)
class BoundaryModel:
    """Cost a cut between two segments adds when they are timed stand-alone."""

    scale: float = 1.0
    per_cut_ms: float = 0.0
    per_element_ms: float = 0.0
    intercept_ms: float = 0.0

    def apply(self, segments_ms: float, cuts: int, cut_elements: int) -> float:
        """Whole-network latency from the sum of its segments and its cuts."""
        return (
            self.scale * segments_ms
            + self.intercept_ms
            - self.per_cut_ms * cuts
            - self.per_element_ms * cut_elements
        )


@dataclass
class CalibrationSample:
    space: str
    subnet: str
    measured_ms: float
    segments_ms: float
    cuts: int
    cut_elements: int


@dataclass
class Calibration:
    """Whole-subnet measurements of one hyperspace and the boundary model fitted on them."""

    hyperspace: str
    samples: list[CalibrationSample] = field(default_factory=list)
    model: BoundaryModel = field(default_factory=BoundaryModel)

    @staticmethod
    def path_for(table: LatencyTable, hyperspace: Hyperspace) -> Path:
        return table.folder / f"calibration-{hyperspace.name}.json"

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                hyperspace=data["hyperspace"],
                samples=[CalibrationSample(**s) for s in data["samples"]],
                model=BoundaryModel(**data["model"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArtifactError(f"{path}: unreadable calibration ({error})") from None

    def save(self, path: Path) -> None:
        data = {
            "hyperspace": self.hyperspace,
            "model": asdict(self.model),
            "samples": [asdict(s) for s in self.samples],
        }
        with writing(Path(path).parent, "the latency calibration", WRITE_HINT):
            atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    def fit(self) -> BoundaryModel:
        """Least squares on relative error of ``BoundaryModel.apply`` over the samples.

        With fewer than 8 samples only the per-cut cost and intercept are fitted (scale 1, no
        per-element term), so a small calibration cannot overfit.
        """
        if len(self.samples) < 3:
            self.model = BoundaryModel()
            return self.model
        measured = np.array([s.measured_ms for s in self.samples])
        segments = np.array([s.segments_ms for s in self.samples])
        cuts = -np.array([s.cuts for s in self.samples], dtype=float)
        elements = -np.array([s.cut_elements for s in self.samples], dtype=float)
        weights = 1.0 / measured
        if len(self.samples) < 8:
            design = np.column_stack([np.ones(len(measured)), cuts])
            coef, *_ = np.linalg.lstsq(design * weights[:, None], (measured - segments) * weights, rcond=None)
            self.model = BoundaryModel(intercept_ms=float(coef[0]), per_cut_ms=float(coef[1]))
            return self.model
        design = np.column_stack([segments, np.ones(len(measured)), cuts, elements])
        coef, *_ = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)
        self.model = BoundaryModel(
            scale=float(coef[0]),
            intercept_ms=float(coef[1]),
            per_cut_ms=float(coef[2]),
            per_element_ms=float(coef[3]),
        )
        return self.model


@dataclass(frozen=True)
class Prediction:
    int8_ms: float
    segments_ms: float
    cuts: int
    cut_elements: int


class LatencyPredictor:
    """Predicts INT8 latency of subnets of one hyperspace on the table's device.

    A segment's latency is its table entry; when the table was sampled (large hyperspaces), a
    segment it lacks is estimated by a :class:`SegmentRegressor` fitted on the measured ones.
    """

    def __init__(self, table: LatencyTable, calibration: Calibration, regressor: SegmentRegressor | None = None):
        self.table = table
        self.calibration = calibration
        self.regressor = regressor

    @classmethod
    def load(cls, table: LatencyTable, hyperspace: Hyperspace) -> "LatencyPredictor":
        path = Calibration.path_for(table, hyperspace)
        if not path.exists():
            raise ArtifactError(
                f"the latency table at {table.folder} is not calibrated for '{hyperspace.name}'; "
                f"run 'spaceevo latency build --space {hyperspace.name} --device {table.fingerprint.option}'"
            )
        return cls(table, Calibration.load(path), fit_regressor(table, hyperspace))

    def segment_ms(self, segment: Segment) -> float:
        if segment.key in self.table:
            return self.table.ms(segment.key)
        if self.regressor is not None and self.regressor.covers(segment):
            return self.regressor.predict(segment)
        raise ArtifactError(
            f"the latency table at {self.table.folder} lacks segment {segment.key} and has no model for "
            f"its kind; run 'spaceevo latency build --space SPACE --device {self.table.fingerprint.option}' for this "
            f"subnet's hyperspace"
        )

    def segment_features(self, arch: Architecture) -> tuple[float, int, int]:
        """Sum of segment latencies, number of cuts, and uint8 elements crossing the cuts."""
        segments = network_segments(arch)
        total = sum(self.segment_ms(s) for s in segments)
        cut_elements = sum(s.output_elements for s in segments[:-1])
        return total, len(segments) - 1, cut_elements

    def predict(self, arch: Architecture) -> Prediction:
        total, cuts, elements = self.segment_features(arch)
        corrected = self.calibration.model.apply(total, cuts, elements)
        return Prediction(int8_ms=max(corrected, 1e-6), segments_ms=total, cuts=cuts, cut_elements=elements)

    def predict_ms(self, arch: Architecture) -> float:
        return self.predict(arch).int8_ms


def fit_regressor(table: LatencyTable, hyperspace: Hyperspace) -> SegmentRegressor | None:
    """A regressor for the segments of ``hyperspace`` the table lacks; None when it lacks none."""
    required = required_segments(hyperspace)
    measured = [(s, table.ms(s.key)) for s in required if s.key in table]
    if len(measured) == len(required):
        return None
    return SegmentRegressor.fit(measured)
