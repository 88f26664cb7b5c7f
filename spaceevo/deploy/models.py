"""The ONNX models of one trained subnet: FP32, INT8 from QAT, INT8 from post-training quantization.

* FP32: the FP32 supernet's subnet (BatchNorm recalibrated, then folded by the exporter).
* INT8 (QAT): the LSQ+ quantization-aware subnet as QDQ with its learned scales
  (:func:`spaceevo.quant.qat.export_int8`); already quantized, never re-quantized.
* INT8 (PTQ): ONNX Runtime's ``quantize_static`` of the FP32 model (QDQ, U8S8, per-channel,
  ``reduce_range`` as the device needs), calibrated on held-out images; the baseline QAT is
  compared against.
* For an engine with a format of its own (LiteRT), its FP32 and INT8 models of the same static
  network (:func:`engine_models`): INT8 is the engine's post-training quantization, calibrated on
  the same held-out images (QAT's learned scales are not carried over).

Models have a fixed input shape ``1 x C x R x R`` (what is deployed and timed).
:func:`with_dynamic_batch` gives a copy that takes any batch size, for fast evaluation.
Every exported file carries ``spaceevo.*`` metadata (:func:`set_metadata`).
"""

from __future__ import annotations

import tempfile
from typing import Collection, Mapping

import numpy as np
import onnx

from spaceevo.latency.engines import Engine
from spaceevo.nn import Supernet
from spaceevo.quant.export import export_fp32, quantize_ptq
from spaceevo.space import Subnet
from spaceevo.train.data import ImageSplit, make_loader
from spaceevo.train.loop import EVAL_SEED

METADATA_PREFIX = "spaceevo."
PTQ_CALIBRATION_IMAGES = 256
"""Held-out images ONNX Runtime's static quantizer calibrates on (one per call: fixed batch 1)."""


def input_shape(supernet: Supernet, subnet: Subnet) -> tuple[int, int, int, int]:
    return (1, supernet.space.hyperspace.in_channels, subnet.resolution, subnet.resolution)


def fp32_model(supernet: Supernet, subnet: Subnet) -> onnx.ModelProto:
    """FP32 ONNX of ``subnet`` of an FP32 (or quantizers-off) supernet whose BN is calibrated for it."""
    static = supernet.extract(subnet).eval()
    return export_fp32(static, input_shape(supernet, subnet))


def qat_int8_model(supernet: Supernet, subnet: Subnet, float_stages: Collection[int] = ()) -> onnx.ModelProto:
    """INT8 QDQ ONNX of ``subnet`` of a QAT supernet whose BN is calibrated for it; ``float_stages``
    (stage indices, 0 the stem) stay in float (:mod:`spaceevo.quant.mixed`)."""
    from spaceevo.quant.qat import export_int8, extract_qat

    return export_int8(extract_qat(supernet, subnet).eval(), None, input_shape(supernet, subnet), float_stages)


def calibration_images(split: ImageSplit, resolution: int, images: int = PTQ_CALIBRATION_IMAGES) -> list[np.ndarray]:
    """The first ``images`` of ``split`` (seeded order) at ``resolution``, one ``1 x C x R x R`` batch each."""
    loader = make_loader(split.with_resolution(resolution), 1, True, seed=EVAL_SEED, workers=0, distributed=False)
    batches = []
    for x, _ in loader:
        batches.append(x.numpy().astype(np.float32))
        if len(batches) >= images:
            break
    return batches


def ptq_int8_model(
    fp32: onnx.ModelProto, calibration: ImageSplit, resolution: int, *, reduce_range: bool,
    images: int = PTQ_CALIBRATION_IMAGES,
) -> onnx.ModelProto:
    """``quantize_static`` of ``fp32`` calibrated on the first ``images`` of ``calibration`` (seeded order)."""
    with tempfile.TemporaryDirectory() as work_dir:
        return quantize_ptq(fp32, calibration_images(calibration, resolution, images), reduce_range=reduce_range, work_dir=work_dir)


def engine_models(engine: Engine, supernet: Supernet, subnet: Subnet, calibration: ImageSplit) -> tuple[bytes, bytes]:
    """FP32 and INT8 models of ``subnet`` in the own format of an ``engine`` that converts, from an
    FP32 supernet whose BN is calibrated for it; INT8 is the engine's post-training quantization
    calibrated on the images :func:`ptq_int8_model` calibrates on."""
    static = supernet.extract(subnet).eval()
    shape = input_shape(supernet, subnet)
    return engine.convert(static, shape, None), engine.convert(static, shape, calibration_images(calibration, subnet.resolution))


def with_dynamic_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose input and output take any batch size (intermediate shapes dropped)."""
    copy = onnx.ModelProto.FromString(proto.SerializeToString())
    for value in (*copy.graph.input, *copy.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del copy.graph.value_info[:]
    return copy


def set_metadata(proto: onnx.ModelProto, values: Mapping[str, object]) -> onnx.ModelProto:
    """Store ``values`` as ``spaceevo.<key>`` metadata properties (strings; None values skipped)."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        if value is None:
            continue
        name = METADATA_PREFIX + key
        prop = existing.get(name) or proto.metadata_props.add()
        prop.key, prop.value = name, str(value)
    proto.producer_name = "spaceevo"
    return proto


def read_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    """The ``spaceevo.*`` metadata of a model, prefix removed."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}

