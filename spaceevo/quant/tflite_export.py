"""LiteRT (TFLite) export of static networks: FP32 and INT8 ``.tflite`` through ``litert_torch``.

The route is PyTorch → ``litert_torch`` → ``.tflite``, not ONNX → TFLite: it needs no TensorFlow,
and INT8 is quantized the way LiteRT deploys it on phones, with PT2E post-training quantization and
LiteRT's XNNPACK quantizer configuration: int8 activations (per tensor, asymmetric) and int8
weights (per output channel, symmetric), static ranges calibrated on input batches. ``litert_torch``
then lowers the quantized graph to TFLite's quantized kernels (``CONV_2D``, ``DEPTHWISE_CONV_2D``,
``FULLY_CONNECTED``, ``ADD``, ``MUL`` … on int8 tensors), which the XNNPACK delegate runs; float-only
operations (HardSwish, HardSigmoid, Sigmoid) run between a DEQUANTIZE and a QUANTIZE. The converter
folds a QUANTIZE right after the input or a DEQUANTIZE right before the output into an int8 input or
output; :class:`~spaceevo.latency.engines.litert.LiteRt` reads the tensors' quantization parameters.

Conversion is slow next to ONNX export: about 1.5 s per table segment on a 2-core VM, most of it
``torch.export`` decompositions (measured in docs/RESULTS.md).

Needs the optional ``litert`` extra (``pip install 'spaceevo[litert]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without litert_torch's progress display, PyTorch's export warnings and the root-logger
    warning the converter gives every PT2E graph ("converted in training mode": a quantized graph
    module keeps ``training=True`` although it was exported from an eval-mode network)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's C++ logs each model's op count
    import litert_torch

    litert_torch.config.show_progress = False
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_tflite(
    model: torch.nn.Module, input_shape: Sequence[int], calibration: Sequence[np.ndarray] | None = None
) -> bytes:
    """``model`` (put in eval mode) for a fixed ``input_shape`` as a ``.tflite`` flatbuffer: FP32
    when ``calibration`` is None, else INT8 (see the module docstring) with activation ranges
    calibrated on the ``calibration`` batches (each of ``input_shape``)."""
    model = model.eval()
    sample = (torch.zeros(*input_shape),)
    with _quiet():
        import litert_torch

        if calibration is None:
            return bytes(litert_torch.convert(model, sample).model_content())
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        )
        graph = prepare_pt2e(torch.export.export(model, sample).module(), quantizer)
        for batch in calibration:
            graph(torch.as_tensor(np.asarray(batch, dtype=np.float32)))
        graph = convert_pt2e(graph, fold_quantize=False)
        converted = litert_torch.convert(graph, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(converted.model_content())
