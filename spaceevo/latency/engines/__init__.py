"""Inference engines: what ``--device`` names, one registry of them.

An engine is the software that runs spaceevo's exported ONNX models on the device and the protocol
facts that go with it. Each engine gives

- its name (the ``--device`` value), a short tag for table folder names and a label for messages;
- its version, or a :class:`~spaceevo.errors.UsageError` naming the package to install when it is
  missing (so a missing optional engine is a message, never a traceback);
- :meth:`Engine.timer`: a model compiled the way the engine deploys it, with a pinned random input,
  timed one synchronous inference at a time. The measurement protocol (warm-up, interleaving, the
  reference-guarded :class:`~spaceevo.latency.measure.StableMeter`) is the same for every engine;
- :meth:`Engine.classifier`: the same model compiled for batches, for test-split top-1.

The ONNX engines take the same exported networks: FP32 ONNX, and INT8 as QDQ ONNX (uint8
activations, int8 per-channel weights, from QAT or ONNX Runtime's post-training quantizer). What
differs is how the engine runs them, so one INT8 network can be fast on one engine and slow on
another on the same CPU; each engine gets its own fingerprint and therefore its own latency tables.
An engine with a format of its own (LiteRT's ``.tflite``) says so with :attr:`Engine.suffix` and
makes its models from the PyTorch network with :meth:`Engine.convert`, quantizing them the way it
deploys INT8; every place that builds a model to time or deploy (table segments, whole subnets,
``export``, ``evaluate``) asks the engine.

To add an engine, subclass :class:`Engine` in a module of this package and add an instance to
:data:`ENGINES`. An engine that measures on another machine (LiteRT on a phone, a board over ssh)
returns from :meth:`Engine.timer` a handle to a model it has shipped there, and runs the protocol in a
measurement program on that machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from spaceevo.errors import UsageError

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from spaceevo.latency.fingerprint import DeviceFingerprint
    from spaceevo.latency.measure import Timer

ORT_DEVICE = "cpu"
"""ONNX Runtime's CPU engine: the default ``--device``, and the engine of every ``ort_*`` figure."""
DEFAULT_DEVICE = ORT_DEVICE
Classifier = Callable[[np.ndarray], np.ndarray]
"""A compiled classifier: float32 images ``N x C x R x R`` in, logits ``N x classes`` out."""


class Engine(ABC):
    """One ``--device``: an inference engine on this host (see the module docstring)."""

    #: The ``--device`` value, also stored in the device fingerprint.
    name: str
    #: Short tag of the engine in table folder names (``…_ort1.32.0_t1_…``).
    tag: str
    #: The engine's name in messages ("ONNX Runtime") and what of it runs the models ("CPU plugin").
    label: str
    target: str
    #: The Python package that provides the engine, and the pip extra of spaceevo that installs it
    #: (None: a dependency of spaceevo itself).
    package: str
    extra: str | None = None
    #: The suffix of the engine's model files: ``.onnx`` (the exported ONNX) or its own format,
    #: made by :meth:`convert`.
    suffix: str = ".onnx"

    @property
    def converts(self) -> bool:
        """True when the engine runs models of its own format rather than the exported ONNX."""
        return self.suffix != ".onnx"

    def convert(self, network: nn.Module, input_shape: Sequence[int], calibration: Sequence[np.ndarray] | None) -> bytes:
        """``network`` (eval mode, fixed ``input_shape``) as a model of the engine's own format:
        FP32 when ``calibration`` is None, else INT8 calibrated on those input batches. Only engines
        that :attr:`converts` implement it."""
        raise NotImplementedError(f"{self.label} runs the exported ONNX models; it converts nothing")

    def version(self) -> str:
        """The engine's version (part of the fingerprint); a :class:`UsageError` saying what to
        install when its package is missing or it cannot run here."""
        try:
            return self._version()
        except ImportError:
            install = f"pip install 'spaceevo[{self.extra}]'" if self.extra else f"pip install {self.package}"
            raise UsageError(f"--device {self.name} needs the {self.package} package: {install}") from None

    def describe(self, version: str) -> str:
        return f"{self.label} {version} {self.target}"

    @abstractmethod
    def _version(self) -> str:
        """The version; ImportError when the package is missing, UsageError when it cannot run here."""

    @abstractmethod
    def timer(self, model: onnx.ModelProto | bytes, threads: int) -> Timer:
        """``model`` (ONNX, or the engine's own format as bytes) compiled for latency (batch 1,
        ``threads`` threads) with a random input."""

    @abstractmethod
    def classifier(self, model: onnx.ModelProto | bytes, threads: int) -> Classifier:
        """``model`` compiled for evaluation with ``threads`` threads: ONNX with a dynamic batch
        dimension, or the engine's own format (which runs a batch one image at a time)."""


def random_input(shape: list[int], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """A random tensor of ``shape``: integer codes over the whole range for a quantized input (uint8,
    int8), else standard normal floats."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(np.float32)


def _registry() -> dict[str, Engine]:
    from spaceevo.latency.engines.onnxruntime_cpu import OnnxRuntimeCpu
    from spaceevo.latency.engines.litert import LiteRt
    from spaceevo.latency.engines.openvino_cpu import OpenVinoCpu

    return {engine.name: engine for engine in (OnnxRuntimeCpu(), OpenVinoCpu(), LiteRt())}


ENGINES: dict[str, Engine] = _registry()
"""Every engine by its ``--device`` name; the CLI's ``--device`` choices."""


def get_engine(device: str) -> Engine:
    """The engine ``--device device`` names; a :class:`UsageError` listing the engines otherwise."""
    if device not in ENGINES:
        raise UsageError(f"unknown device '{device}'; allowed: {', '.join(ENGINES)}")
    return ENGINES[device]


def timer(model: onnx.ModelProto | bytes, fingerprint: DeviceFingerprint) -> Timer:
    """``model`` prepared for timing on the engine and thread count of ``fingerprint``."""
    return get_engine(fingerprint.engine).timer(model, fingerprint.threads)
