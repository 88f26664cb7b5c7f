"""End-to-end latency of whole subnets: build, export FP32 and INT8 models, time on the device.

This is the ground truth the predictor is fitted and validated against, and what ``spaceevo latency
measure`` reports. Weights are random: latency does not depend on their values.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.engines import get_engine, timer
from spaceevo.latency.measure import LatencyStats, MeasureConfig, Meter
from spaceevo.nn.static import build_static
from spaceevo.quant.export import export_fp32, quantize_ptq
from spaceevo.space import Architecture

WHOLE_MEASURE = MeasureConfig(warmup=10, rounds=15, runs_per_round=5, min_round_s=0.01)
Model = onnx.ModelProto | bytes
"""An ONNX model, or a serialized one (ONNX, or the format of an engine that converts)."""


@dataclass(frozen=True)
class SubnetModels:
    """A subnet's FP32 and INT8 models: ONNX, or serialized in the format of the engine that converts."""

    fp32: Model
    int8: Model


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorms non-trivial statistics so BN folding yields realistic weights and scales."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def subnet_models(arch: Architecture, fingerprint: DeviceFingerprint, seed: int = 0) -> SubnetModels:
    """FP32 and post-training-quantized INT8 models of a subnet with random weights: QDQ (U8S8) ONNX,
    or the engine's own models when it converts (:meth:`~spaceevo.latency.engines.Engine.convert`)."""
    fp32, int8 = _subnet_models(arch, fingerprint, seed, fp32=True)
    assert fp32 is not None
    return SubnetModels(fp32=fp32, int8=int8)


def subnet_int8_model(arch: Architecture, fingerprint: DeviceFingerprint, seed: int = 0) -> Model:
    """The INT8 model of :func:`subnet_models` alone (an engine that converts makes no FP32 model for it)."""
    return _subnet_models(arch, fingerprint, seed, fp32=False)[1]


def _subnet_models(arch: Architecture, fingerprint: DeviceFingerprint, seed: int, *, fp32: bool) -> tuple[Model | None, Model]:
    """(FP32 model, or None unless ``fp32``; INT8 model) of :func:`subnet_models`."""
    torch.manual_seed(seed)
    model = build_static(arch).eval()
    randomize_batchnorm(model, seed)
    shape = (1, arch.in_channels, arch.resolution, arch.resolution)
    rng = np.random.default_rng(seed)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    engine = get_engine(fingerprint.engine)
    if engine.converts:
        return (engine.convert(model, shape, None) if fp32 else None), engine.convert(model, shape, calibration)
    onnx_fp32 = export_fp32(model, shape)
    with tempfile.TemporaryDirectory() as work_dir:
        int8 = quantize_ptq(onnx_fp32, calibration, reduce_range=fingerprint.reduce_range, work_dir=work_dir)
    return onnx_fp32, int8


def measure_models(
    models: Sequence[Model],
    fingerprint: DeviceFingerprint,
    config: MeasureConfig = WHOLE_MEASURE,
    meter: Meter | None = None,
) -> list[LatencyStats]:
    """Time several models interleaved (round-robin), guarded by the reference model."""
    from spaceevo.latency.reference import stable_meter

    meter = meter or stable_meter(fingerprint)
    return meter.measure([timer(m, fingerprint) for m in models], config)
