"""End-to-end latency of whole subnets: build, export FP32 and INT8 ONNX, time on the device.

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
from spaceevo.latency.engines import timer
from spaceevo.latency.measure import LatencyStats, MeasureConfig, Meter
from spaceevo.nn.static import build_static
from spaceevo.quant.export import export_fp32, quantize_ptq
from spaceevo.space import Architecture

WHOLE_MEASURE = MeasureConfig(warmup=10, rounds=15, runs_per_round=5, min_round_s=0.01)


@dataclass(frozen=True)
class SubnetModels:
    fp32: onnx.ModelProto
    int8: onnx.ModelProto


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
    """FP32 and post-training-quantized INT8 (QDQ, U8S8) ONNX models of a subnet with random weights."""
    torch.manual_seed(seed)
    model = build_static(arch).eval()
    randomize_batchnorm(model, seed)
    shape = (1, arch.in_channels, arch.resolution, arch.resolution)
    fp32 = export_fp32(model, shape)
    rng = np.random.default_rng(seed)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as work_dir:
        int8 = quantize_ptq(fp32, calibration, reduce_range=fingerprint.reduce_range, work_dir=work_dir)
    return SubnetModels(fp32=fp32, int8=int8)


def measure_models(
    models: Sequence[onnx.ModelProto | bytes],
    fingerprint: DeviceFingerprint,
    config: MeasureConfig = WHOLE_MEASURE,
    meter: Meter | None = None,
) -> list[LatencyStats]:
    """Time several models interleaved (round-robin), guarded by the reference model."""
    from spaceevo.latency.reference import stable_meter

    meter = meter or stable_meter(fingerprint)
    return meter.measure([timer(m, fingerprint) for m in models], config)
