"""INT8 latency on the device: engines, fingerprint, measurement, tables, predictor, validation.

The names below are the Python API behind ``spaceevo latency …`` (:mod:`spaceevo.latency.api`).
They are imported on first use, so importing a light submodule such as
:mod:`spaceevo.latency.fingerprint` does not load PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spaceevo.latency.api import (
        LatencyMeasurement,
        LatencyPrediction,
        build_table,
        load_predictor,
        measure_latency,
        measure_onnx,
        predict_latency,
        validate_latency,
    )
    from spaceevo.latency.build import BuildReport
    from spaceevo.latency.fingerprint import DeviceFingerprint, device_fingerprint
    from spaceevo.latency.predictor import LatencyPredictor, Prediction
    from spaceevo.latency.table import LatencyTable
    from spaceevo.latency.validate import ValidationReport


_EXPORTS = {
    "BuildReport": "spaceevo.latency.build",
    "DeviceFingerprint": "spaceevo.latency.fingerprint",
    "device_fingerprint": "spaceevo.latency.fingerprint",
    "LatencyPredictor": "spaceevo.latency.predictor",
    "Prediction": "spaceevo.latency.predictor",
    "LatencyTable": "spaceevo.latency.table",
    "ValidationReport": "spaceevo.latency.validate",
    "LatencyMeasurement": "spaceevo.latency.api",
    "LatencyPrediction": "spaceevo.latency.api",
    "build_table": "spaceevo.latency.api",
    "load_predictor": "spaceevo.latency.api",
    "measure_latency": "spaceevo.latency.api",
    "measure_onnx": "spaceevo.latency.api",
    "predict_latency": "spaceevo.latency.api",
    "validate_latency": "spaceevo.latency.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spaceevo.latency' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
