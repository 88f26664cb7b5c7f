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
:data:`ENGINES`. An engine that measures on another machine returns from :meth:`Engine.timer` a
handle to a model it has shipped there and from :meth:`Engine.meter` a meter that runs the protocol
in a measurement program on that machine: ``--device ssh://[user@]host[:port][/ENGINE]``
(:mod:`spaceevo.latency.engines.ssh`) runs ``ENGINE`` on a device reached over ssh.
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
    from spaceevo.latency.measure import Meter, Timer

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
    #: Number formats (names of :mod:`spaceevo.quant.formats`) the engine runs with kernels of their
    #: own; others it would have to emulate. Every engine runs the QDQ INT8 (U8S8) models.
    native_formats: frozenset[str] = frozenset({"int8"})
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

    def cpu(self) -> tuple[str, tuple[str, ...], str]:
        """Model, ISA names and machine type of the CPU the engine runs on (this host's)."""
        from spaceevo.latency.cpuinfo import cpu_info

        return cpu_info()

    def meter(self, reference: bytes, threads: int, canonical_ms: float | None) -> Meter:
        """A reference-guarded meter around ``reference`` (not settled yet) on the scale of
        ``canonical_ms``, if given."""
        from spaceevo.latency.measure import StableMeter

        return StableMeter(self.timer(reference, threads), canonical_ms)

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


def _registry() -> dict[str, Engine]:
    from spaceevo.latency.engines.onnxruntime_cpu import OnnxRuntimeCpu
    from spaceevo.latency.engines.litert import LiteRt
    from spaceevo.latency.engines.openvino_cpu import OpenVinoCpu

    return {engine.name: engine for engine in (OnnxRuntimeCpu(), OpenVinoCpu(), LiteRt())}


ENGINES: dict[str, Engine] = _registry()
"""Every engine by its ``--device`` name; ``--device`` also takes ``ssh://`` devices (:func:`get_engine`)."""


def check_device(device: str) -> str:
    """``device`` if it is a ``--device`` value; a :class:`UsageError` saying the allowed ones otherwise."""
    from spaceevo.latency.engines.ssh import SSH_FORM, SshDevice

    if SshDevice.claims(device):
        SshDevice.parse(device)
    elif device not in ENGINES:
        raise UsageError(f"unknown device '{device}'; allowed: {', '.join(ENGINES)}, or {SSH_FORM}")
    return device


def get_engine(device: str) -> Engine:
    """The engine ``--device device`` names (one instance per ``ssh://`` device, connected when first
    used); a :class:`UsageError` saying the allowed values otherwise."""
    from spaceevo.latency.engines.ssh import SshDevice, ssh_engine

    check_device(device)
    return ssh_engine(SshDevice.parse(device)) if SshDevice.claims(device) else ENGINES[device]


def timer(model: onnx.ModelProto | bytes, fingerprint: DeviceFingerprint) -> Timer:
    """``model`` prepared for timing on the device and thread count of ``fingerprint``."""
    return get_engine(fingerprint.option).timer(model, fingerprint.threads)


def meter(reference: bytes, fingerprint: DeviceFingerprint, canonical_ms: float | None) -> Meter:
    """A meter guarded by ``reference`` on the device and thread count of ``fingerprint``."""
    return get_engine(fingerprint.option).meter(reference, fingerprint.threads, canonical_ms)
