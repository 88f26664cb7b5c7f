"""Building a device's latency table for a hyperspace, and calibrating its predictor."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spaceevo.errors import EncodingError
from spaceevo.latency.endtoend import WHOLE_MEASURE, measure_models, subnet_int8_model
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.predictor import BoundaryModel, Calibration, CalibrationSample, LatencyPredictor, fit_regressor
from spaceevo.latency.reference import stable_meter
from spaceevo.latency.regression import sample_segments
from spaceevo.latency.segments import required_segments
from spaceevo.latency.table import LatencyTable, measure_segments
from spaceevo.space import Architecture, CandidateSpace, Hyperspace

CALIBRATION_SEED = 0
SAMPLE_SEED = 0
CALIBRATION_GROUP = 4


@dataclass(frozen=True)
class BuildReport:
    """What a table build did: segments the hyperspace has and needs, how many were measured in this
    call (the rest were in the table), corrupt rows dropped and re-measured, the median spread of
    the measurements, the calibration subnets timed end to end, and the wall time (s)."""

    table_path: str
    hyperspace: str
    segments_possible: int
    segments_required: int
    sampled: bool
    segments_measured_now: int
    corrupt_rows_dropped: int
    median_spread: float
    calibration_samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_architectures(
    space: Hyperspace | CandidateSpace, count: int, seed: int
) -> list[Architecture]:
    """``count`` random subnets: of a candidate space, or of random candidate spaces of a hyperspace."""
    rng = random.Random(seed)
    archs = []
    for _ in range(count):
        candidate = space if isinstance(space, CandidateSpace) else space.random_candidate_space(rng)
        archs.append(candidate.resolve(candidate.random_subnet(rng)))
    return archs


def _with_features(
    sample: CalibrationSample, hyperspace: Hyperspace, predictor: LatencyPredictor
) -> CalibrationSample | None:
    """A calibration sample with its segment features taken from the table as it is now; None for a
    sample of an earlier version of the hyperspace that no longer fits it."""
    try:
        space = hyperspace.candidate_space(sample.space)
        arch = space.resolve(space.subnet(sample.subnet))
    except EncodingError:
        return None
    total, cuts, elements = predictor.segment_features(arch)
    return replace(sample, segments_ms=total, cuts=cuts, cut_elements=elements)


def _same_model(a: BoundaryModel, b: BoundaryModel) -> bool:
    """Equal up to the rounding of a least-squares refit of the same samples."""
    return bool(np.allclose(astuple(a), astuple(b), rtol=1e-9, atol=1e-12))


def build_latency_table(
    hyperspace: Hyperspace,
    fingerprint: DeviceFingerprint,
    tables: Path,
    *,
    workers: int = 2,
    calibration_samples: int = 30,
    max_segments: int = 4000,
    show_progress: bool = True,
) -> tuple[LatencyPredictor, BuildReport]:
    """Measure the missing segments of ``hyperspace`` and calibrate; resumable at every step.

    Corrupt rows of an existing table are dropped and their segments measured again; a table that
    is complete and calibrated is left untouched (nothing is timed or written).

    A hyperspace with more than ``max_segments`` possible segments is sampled: a seeded subset,
    stratified by segment kind, is measured (the same subset on every re-run) and the predictor
    estimates the rest with a per-kind regression fitted on it.
    """
    start = time.perf_counter()
    table = LatencyTable.open(tables, fingerprint, create=True, repair=True)
    dropped = len(table.dropped)
    if dropped:
        table.compact()  # the corrupt rows' segments are missing now and measured below
    possible = required_segments(hyperspace)
    required = possible
    if len(possible) > max_segments:
        required = sample_segments(possible, max_segments, SAMPLE_SEED)
    missing = table.missing(required)
    path = Calibration.path_for(table, hyperspace)
    calibration = Calibration.load(path) if path.exists() else Calibration(hyperspace=hyperspace.name)
    done = {(s.space, s.subnet) for s in calibration.samples}
    archs = [
        a for a in sample_architectures(hyperspace, calibration_samples, CALIBRATION_SEED)
        if (a.space.encoding, a.subnet.encode()) not in done
    ]
    meter = None
    if missing or archs:  # a complete table is neither timed nor written (it may be read-only)
        table.check_writable()
        meter = stable_meter(fingerprint, table.reference_ms)
        if table.reference_ms is None:
            table.set_reference(meter.baseline_ms)
    with tqdm(total=len(required), initial=len(required) - len(missing), desc="segments", unit="seg",
              disable=not show_progress, dynamic_ncols=True) as bar:
        measure_segments(table, missing, workers=workers, progress=bar.update, meter=meter)
    if missing:
        table.compact()
    spreads = sorted(table.entries[s.key].spread for s in required)

    predictor = LatencyPredictor(table, calibration, fit_regressor(table, hyperspace))
    refreshed = [_with_features(sample, hyperspace, predictor) for sample in calibration.samples]
    stale = refreshed != calibration.samples  # rows measured again, or the YAML changed, since they were taken
    calibration.samples = [sample for sample in refreshed if sample is not None]
    with tqdm(total=calibration_samples, initial=calibration_samples - len(archs), desc="calibration",
              unit="subnet", disable=not show_progress, dynamic_ncols=True) as bar:
        for i in range(0, len(archs), CALIBRATION_GROUP):
            group = archs[i : i + CALIBRATION_GROUP]
            models = [subnet_int8_model(a, fingerprint) for a in group]
            stats = measure_models(models, fingerprint, WHOLE_MEASURE, meter)
            for arch, st in zip(group, stats):
                total, cuts, elements = predictor.segment_features(arch)
                calibration.samples.append(
                    CalibrationSample(arch.space.encoding, arch.subnet.encode(), st.ms, total, cuts, elements)
                )
            calibration.save(path)
            bar.update(len(group))
    stored = calibration.model
    fitted = calibration.fit()  # before the test below: a build that added samples must fit them too
    if archs or stale or not _same_model(fitted, stored):
        calibration.save(path)
    else:
        calibration.model = stored  # nothing changed: the file stays as it is, bit for bit
    report = BuildReport(
        table_path=str(table.path),
        hyperspace=hyperspace.name,
        segments_possible=len(possible),
        segments_required=len(required),
        sampled=len(required) < len(possible),
        segments_measured_now=len(missing),
        corrupt_rows_dropped=dropped,
        median_spread=round(spreads[len(spreads) // 2], 4),
        calibration_samples=len(calibration.samples),
        seconds=round(time.perf_counter() - start, 1),
    )
    return predictor, report
