"""``--device litert``: LiteRT (TensorFlow Lite) with its XNNPACK delegate, on this CPU.

LiteRT runs ``.tflite`` models, so this engine converts: :meth:`LiteRt.convert` makes FP32 and INT8
``.tflite`` from the PyTorch network (:mod:`spaceevo.quant.tflite_export`: int8 activations and
per-channel int8 weights, PT2E post-training quantization, as LiteRT runs INT8 on phones). Models
run in ``ai_edge_litert``'s interpreter with ``num_threads`` threads and its default delegate,
XNNPACK, which takes every operation it has a kernel for (float and quantized); timing is one
``invoke()`` on an input set once. A classifier runs a batch one image at a time (the model's
batch is 1), quantizing float images and dequantizing logits with the model's own parameters when
its input or output is int8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from spaceevo.errors import ArtifactError
from spaceevo.latency.engines import Classifier, Engine
from spaceevo.latency.measure import Timer, random_input

if TYPE_CHECKING:
    import onnx
    from torch import nn


def interpreter(model: onnx.ModelProto | bytes, threads: int) -> Any:
    """A LiteRT interpreter of a ``.tflite`` flatbuffer with ``threads`` threads and XNNPACK
    (the default delegate), tensors allocated; an ONNX model is an :class:`ArtifactError`."""
    from ai_edge_litert.interpreter import Interpreter

    if not isinstance(model, (bytes, bytearray)):
        raise ArtifactError(f"LiteRT runs .tflite models, got a {type(model).__name__}")
    runner = Interpreter(model_content=bytes(model), num_threads=threads)
    runner.allocate_tensors()
    return runner


def quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """Float ``values`` as the input tensor ``detail`` takes them: unchanged for a float tensor, else
    ``round(x / scale) + zero_point`` clipped to its integer type."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor ``detail`` describes as float32."""
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return values.astype(np.float32, copy=False)
    scale, zero_point = detail["quantization"]
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


class LiteRtTimer(Timer):
    """An interpreter whose input tensor holds a random array, set once: a timed run is ``invoke()``."""

    def __init__(self, model: onnx.ModelProto | bytes, threads: int):
        self.interpreter = interpreter(model, threads)
        detail = self.interpreter.get_input_details()[0]
        self.interpreter.set_tensor(detail["index"], random_input(list(detail["shape"]), detail["dtype"]))

    def infer(self) -> None:
        self.interpreter.invoke()


class LiteRt(Engine):
    name = "litert"
    tag = "litert"
    label = "LiteRT"
    target = "XNNPACK delegate (CPU)"
    package = "litert-torch"
    extra = "litert"
    suffix = ".tflite"

    def _version(self) -> str:
        import ai_edge_litert
        import litert_torch  # noqa: F401  (the converter: without it no model can be made)

        return ai_edge_litert.__version__

    def convert(self, network: nn.Module, input_shape: Sequence[int], calibration: Sequence[np.ndarray] | None) -> bytes:
        from spaceevo.quant.tflite_export import export_tflite

        return export_tflite(network, input_shape, calibration)

    def timer(self, model: onnx.ModelProto | bytes, threads: int) -> Timer:
        return LiteRtTimer(model, threads)

    def classifier(self, model: onnx.ModelProto | bytes, threads: int) -> Classifier:
        runner = interpreter(model, threads)
        source, target = runner.get_input_details()[0], runner.get_output_details()[0]

        def run(images: np.ndarray) -> np.ndarray:
            logits = []
            for image in images:
                runner.set_tensor(source["index"], quantize(image[None], source))
                runner.invoke()
                logits.append(dequantize(runner.get_tensor(target["index"]), target))
            return np.concatenate(logits).reshape(len(images), -1)

        return run
