"""The Python API behind ``spaceevo latency …``: same arguments as the CLI (space and subnet as
strings or objects), dataclasses back (``to_dict()`` gives what ``--json`` prints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx

from spaceevo.latency.build import BuildReport, build_latency_table
from spaceevo.latency.endtoend import WHOLE_MEASURE, measure_models, subnet_models
from spaceevo.latency.fingerprint import device_fingerprint
from spaceevo.latency.measure import LatencyStats
from spaceevo.latency.predictor import LatencyPredictor
from spaceevo.latency.reference import stable_meter
from spaceevo.latency.table import LatencyTable, default_tables
from spaceevo.latency.validate import VALIDATION_SEED, ValidationReport, validate_predictor
from spaceevo.space import Architecture, CandidateSpace, Hyperspace, Subnet, load_space, require_candidate_space


def _space(space: str | Hyperspace | CandidateSpace) -> Hyperspace | CandidateSpace:
    return load_space(space) if isinstance(space, str) else space


def _hyperspace(space: Hyperspace | CandidateSpace) -> Hyperspace:
    return space.hyperspace if isinstance(space, CandidateSpace) else space


def _architecture(
    space: str | CandidateSpace, subnet: str | Subnet, command: str
) -> tuple[CandidateSpace, Architecture]:
    """The candidate space and resolved subnet a per-subnet command works on."""
    candidate = require_candidate_space(_space(space), command)
    if not isinstance(subnet, Subnet):
        subnet = candidate.subnet(subnet)
    return candidate, candidate.resolve(subnet)


def build_table(
    space: str | Hyperspace | CandidateSpace,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    *,
    workers: int = 2,
    calibration_samples: int = 30,
    max_segments: int = 4000,
    show_progress: bool = True,
) -> BuildReport:
    """Measure (or complete) this device's latency table for a hyperspace and calibrate it."""
    fingerprint = device_fingerprint(device, threads)
    _, report = build_latency_table(
        _hyperspace(_space(space)),
        fingerprint,
        Path(tables) if tables else default_tables(),
        workers=workers,
        calibration_samples=calibration_samples,
        max_segments=max_segments,
        show_progress=show_progress,
    )
    return report


def load_predictor(
    space: str | Hyperspace | CandidateSpace, device: str = "cpu", threads: int = 1, tables: str | Path | None = None
) -> LatencyPredictor:
    """The calibrated predictor for a hyperspace on this device (refuses other devices' tables)."""
    fingerprint = device_fingerprint(device, threads)
    table = LatencyTable.open(Path(tables) if tables else default_tables(), fingerprint)
    return LatencyPredictor.load(table, _hyperspace(_space(space)))


@dataclass(frozen=True)
class LatencyPrediction:
    """A subnet's INT8 latency predicted from this device's table (ms): ``int8_ms`` is the sum of
    its segments' table entries (``segments_ms``) corrected for the ``cuts`` between segments."""

    space: str
    subnet: str
    int8_ms: float
    segments_ms: float
    cuts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyMeasurement:
    """A subnet's exported FP32 and INT8 models timed interleaved on the device (ms).

    ``fp32_ms``/``int8_ms`` are on ``scale``: the reference scale of this device's latency table
    when one exists (so they compare with predictions), else the reference's speed measured now;
    ``*_raw_ms`` are the plain wall-clock medians and ``int8_spread`` the INT8 figure's robust CV.
    """

    space: str
    subnet: str
    device: str
    fp32_ms: float
    int8_ms: float
    int8_speedup: float
    fp32_raw_ms: float | None
    int8_raw_ms: float | None
    int8_spread: float
    scale: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_latency(
    space: str | CandidateSpace,
    subnet: str | Subnet,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
) -> LatencyPrediction:
    """A subnet's INT8 latency predicted from this device's table, with the parts of the prediction."""
    candidate, arch = _architecture(space, subnet, "latency predict")
    prediction = load_predictor(candidate, device, threads, tables).predict(arch)
    return LatencyPrediction(
        space=candidate.encoding,
        subnet=arch.subnet.encode(),
        int8_ms=round(prediction.int8_ms, 4),
        segments_ms=round(prediction.segments_ms, 4),
        cuts=prediction.cuts,
    )


def measure_latency(
    space: str | CandidateSpace,
    subnet: str | Subnet,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
) -> LatencyMeasurement:
    """Build the subnet, export FP32 and INT8 ONNX, and time both interleaved on the device."""
    candidate, arch = _architecture(space, subnet, "latency measure")
    fingerprint = device_fingerprint(device, threads)
    models = subnet_models(arch, fingerprint)
    (fp32, int8), scale = measure_onnx([models.fp32, models.int8], device, threads, tables)
    return LatencyMeasurement(
        space=candidate.encoding,
        subnet=arch.subnet.encode(),
        device=fingerprint.describe(),
        fp32_ms=round(fp32.ms, 4),
        int8_ms=round(int8.ms, 4),
        int8_speedup=round(fp32.ms / int8.ms, 3),
        fp32_raw_ms=_round(fp32.raw_median_ms),
        int8_raw_ms=_round(int8.raw_median_ms),
        int8_spread=round(int8.spread, 3),
        scale=scale,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def measure_onnx(
    models: Sequence[onnx.ModelProto | bytes],
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
) -> tuple[list[LatencyStats], str]:
    """Time ONNX models end to end on the device, interleaved, guarded by the reference model.

    The figures (``ms``) are on the reference scale of this device's latency table when one
    exists, so they compare with predictions; otherwise on the reference's speed measured now
    (``raw_median_ms``: plain wall clock). The second value names the scale used.
    """
    fingerprint = device_fingerprint(device, threads)
    table_path = (Path(tables) if tables else default_tables()) / fingerprint.slug / "segments.jsonl"
    canonical = LatencyTable.load(table_path, fingerprint).reference_ms if table_path.exists() else None
    meter = stable_meter(fingerprint, canonical)
    stats = measure_models(list(models), fingerprint, WHOLE_MEASURE, meter)
    return stats, "latency table" if canonical else "reference measured now"


def validate_latency(
    space: str | Hyperspace | CandidateSpace,
    samples: int = 100,
    seed: int = VALIDATION_SEED,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    show_progress: bool = True,
) -> ValidationReport:
    """Compare predictions with end-to-end INT8 measurements of ``samples`` random subnets."""
    resolved = _space(space)
    predictor = load_predictor(resolved, device, threads, tables)
    return validate_predictor(
        resolved, predictor, device_fingerprint(device, threads), samples, seed, show_progress=show_progress
    )
