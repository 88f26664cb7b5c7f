"""``--device openvino``: OpenVINO Runtime's CPU plugin.

OpenVINO reads the exported ONNX files directly. Its ONNX frontend turns QuantizeLinear /
DequantizeLinear pairs into FakeQuantize operations, and its low precision transformations (LPT,
"OpenVINO Low Precision Transformations" in the OpenVINO docs) run the quantized convolutions in
INT8 (checked here: the compiled runtime model of a QDQ block runs its convolutions in u8), so the
INT8 model is the same QDQ network every engine gets. Models are compiled for one synchronous request: ``PERFORMANCE_HINT`` LATENCY, one stream,
``INFERENCE_NUM_THREADS`` threads, without CPU pinning (spaceevo's process also runs PyTorch and other
engines) and with ``INFERENCE_PRECISION_HINT`` f32: on CPUs with AMX or AVX512-BF16 OpenVINO would
otherwise run the float parts of every model, FP32 ones included, in bfloat16.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import onnx

from spaceevo.latency.engines import Classifier, Engine
from spaceevo.latency.measure import Timer, random_input

DEVICE = "CPU"


@lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def compile_model(model: onnx.ModelProto | bytes, threads: int) -> Any:
    """``model`` compiled on OpenVINO's CPU plugin as spaceevo times and evaluates it."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    core = _core()
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }
    return core.compile_model(core.read_model(model=model, weights=None), DEVICE, config)


class OpenVinoTimer(Timer):
    """A compiled model with one synchronous infer request whose input tensor shares (pins) a random
    array, so a timed run is the inference alone, without copying the input."""

    def __init__(self, model: onnx.ModelProto | bytes, threads: int):
        import openvino as ov

        self.compiled = compile_model(model, threads)
        self.request = self.compiled.create_infer_request()
        port = self.compiled.input(0)
        dtype = np.uint8 if port.get_element_type() == ov.Type.u8 else np.float32
        self.input = random_input(list(port.get_shape()), dtype)
        self.request.set_input_tensor(0, ov.Tensor(self.input, shared_memory=True))

    def infer(self) -> None:
        self.request.infer()


class OpenVinoCpu(Engine):
    name = "openvino"
    tag = "ov"
    label = "OpenVINO Runtime"
    target = "CPU plugin"
    package = "openvino"
    extra = "openvino"

    def _version(self) -> str:
        import openvino as ov

        return ov.get_version().split("-")[0]

    def timer(self, model: onnx.ModelProto | bytes, threads: int) -> Timer:
        return OpenVinoTimer(model, threads)

    def classifier(self, model: onnx.ModelProto, threads: int) -> Classifier:
        request = compile_model(model, threads).create_infer_request()

        def run(images: np.ndarray) -> np.ndarray:
            request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
            return request.get_output_tensor(0).data.copy()

        return run
