"""ONNX Runtime sessions as spaceevo times them: the timer of ``--device cpu``.

Needs only numpy, ONNX Runtime and :mod:`spaceevo.latency.measure`, so the measurement program of
``--device ssh://…`` (:mod:`spaceevo.latency.remote_worker`) runs it unchanged on the remote device.
Sessions use graph optimisation level ALL (QDQ fusion needs EXTENDED, the NCHWc/NHWC layouts ALL),
explicit intra-op threads and sequential execution, as ONNX Runtime's performance guidance advises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from spaceevo.latency.measure import Timer, random_input

if TYPE_CHECKING:
    import onnxruntime as ort

PROVIDER = "CPUExecutionProvider"
FEED_TYPES = {"tensor(uint8)": np.uint8}


def make_session(model: Any, threads: int) -> ort.InferenceSession:
    """An inference session configured as every ONNX Runtime latency figure in spaceevo is measured;
    ``model`` is serialized ONNX or an ``onnx.ModelProto``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # quantized graphs keep unused constants; ORT warns about each
    if not isinstance(model, bytes):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=[PROVIDER])


def random_feed(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Random input of the right shape and dtype (float32 or uint8) for a session."""
    return {
        arg.name: random_input([d if isinstance(d, int) else 1 for d in arg.shape], FEED_TYPES.get(arg.type, np.float32), seed)
        for arg in session.get_inputs()
    }


class OrtTimer(Timer):
    def __init__(self, model: Any, threads: int):
        self.session = make_session(model, threads)
        self.feed = random_feed(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self) -> None:
        self.session.run(self.outputs, self.feed)
