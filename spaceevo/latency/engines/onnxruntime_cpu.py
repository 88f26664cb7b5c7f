"""``--device cpu``: ONNX Runtime's CPU execution provider (sessions and timer:
:mod:`~spaceevo.latency.engines.ort_session`)."""

from __future__ import annotations

import onnx

from spaceevo.errors import UsageError
from spaceevo.latency.engines import ORT_DEVICE, Classifier, Engine
from spaceevo.latency.engines.ort_session import PROVIDER, OrtTimer, make_session
from spaceevo.latency.measure import Timer


class OnnxRuntimeCpu(Engine):
    name = ORT_DEVICE
    tag = "ort"
    label = "ONNX Runtime"
    target = "CPU execution provider"
    package = "onnxruntime"

    def _version(self) -> str:
        import onnxruntime as ort

        if PROVIDER not in ort.get_available_providers():
            raise UsageError(f"ONNX Runtime here has no {PROVIDER}; available: {ort.get_available_providers()}")
        return ort.__version__

    def timer(self, model: onnx.ModelProto | bytes, threads: int) -> Timer:
        return OrtTimer(model, threads)

    def classifier(self, model: onnx.ModelProto, threads: int) -> Classifier:
        session = make_session(model, threads)
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0]
