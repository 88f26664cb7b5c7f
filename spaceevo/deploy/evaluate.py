"""Export and evaluation of trained subnets: what ``spaceevo export`` and ``spaceevo evaluate`` do.

:func:`export_subnet` writes a subnet's FP32 and INT8 ONNX files with their metadata (and, for an
engine with a format of its own such as LiteRT, its ``.tflite`` files too);
:func:`evaluate_subnet` measures, in one call, a subnet's test-split top-1 in PyTorch (FP32 and
fake-quant INT8) and in ONNX Runtime (FP32, INT8 from QAT, INT8 from post-training quantization),
and the FP32 and INT8 latency of the exported models on the device; :func:`evaluate_model` does the
ONNX Runtime half for any exported model file.

The test split is only ever used here, for reporting; choices (BatchNorm recalibration, PTQ
calibration) use the held-out split carved from the training data.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from tqdm import tqdm

from spaceevo.deploy.models import (
    engine_models,
    fp32_model,
    ptq_int8_model,
    qat_int8_model,
    read_metadata,
    set_metadata,
    with_dynamic_batch,
)
from spaceevo.deploy.trained import TrainedRun, open_run
from spaceevo.errors import ArtifactError, UsageError
from spaceevo.io import atomic_write_bytes, writable_folder
from spaceevo.latency.engines import ORT_DEVICE, Engine, get_engine
from spaceevo.nn import Supernet
from spaceevo.quant.mixed import check_float_stages
from spaceevo.space import Subnet
from spaceevo.train.data import DataSpec, ImageSplit, make_loader
from spaceevo.train.evaluate import evaluate

EVAL_BATCH = 256


def engine_top1(model: onnx.ModelProto | bytes, split: ImageSplit, resolution: int, threads: int | None = None,
                name: str = "the model", batch_size: int = EVAL_BATCH, device: str = ORT_DEVICE) -> float:
    """Top-1 (%) of a classifier (ONNX, or the engine's own format) in the engine ``device`` names on
    ``split`` at ``resolution`` (see :func:`engine_predictions`)."""
    predicted = engine_predictions(model, split, resolution, threads, name, batch_size, device)
    return 100.0 * float((predicted == split.targets).mean())


def engine_predictions(model: onnx.ModelProto | bytes, split: ImageSplit, resolution: int, threads: int | None = None,
                       name: str = "the model", batch_size: int = EVAL_BATCH, device: str = ORT_DEVICE) -> np.ndarray:
    """The class the engine ``device`` names (:mod:`spaceevo.latency.engines`; default ONNX Runtime)
    predicts for every image of ``split`` at ``resolution``, in split order (int64): per-image
    results, for paired comparisons of models on the same images.

    Runs a dynamic-batch copy of the model in batches of ``batch_size`` (the engine's latency
    settings, the same kernels as at batch 1); ``batch_size=1`` runs the fixed-shape model itself, for
    graphs that bake the batch into a shape (a Reshape to a constant ``[1, ...]``, as torchvision's
    ShuffleNet channel shuffle exports). A model in the own format of an engine that converts
    (LiteRT's ``.tflite`` bytes) runs as it is, one image at a time. ``threads`` defaults to torch's
    intra-op thread count. A model the engine cannot load or run, or whose output is not one row of
    class scores per image, is an :class:`ArtifactError` naming ``name``; an empty split is an
    :class:`ArtifactError` too.
    """
    engine = get_engine(device)
    engine.version()  # a missing optional engine is a UsageError, not a model that cannot load
    try:
        if isinstance(model, (bytes, bytearray)) and not engine.converts:
            model = onnx.load_from_string(bytes(model))
        runnable = model if batch_size == 1 or not isinstance(model, onnx.ModelProto) else with_dynamic_batch(model)
        classify = engine.classifier(runnable, threads or torch.get_num_threads())
    except Exception as error:  # engines raise their own exception types (InvalidGraph, Fail, RuntimeError, ...)
        raise ArtifactError(f"{engine.label} cannot load {name}: {_first_line(error)}") from None
    predicted = []
    for x, _ in make_loader(split.with_resolution(resolution), batch_size, False, workers=0, distributed=False):
        try:
            logits = classify(x.numpy().astype(np.float32))
        except Exception as error:
            raise ArtifactError(f"{engine.label} cannot run {name} on {tuple(x.shape)} images: {_first_line(error)}") from None
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ArtifactError(
                f"{name} is not an image classifier: for a batch of {x.shape[0]} images it outputs shape "
                f"{list(logits.shape)}, expected [N, classes] = [{x.shape[0]}, classes]"
            )
        predicted.append(logits.argmax(axis=1).astype(np.int64))
    if not predicted:
        raise ArtifactError("the evaluation split is empty")
    return np.concatenate(predicted)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def torch_top1(supernet: Supernet, subnet: Subnet, split: ImageSplit) -> float:
    """Top-1 (%) of ``subnet`` of a BN-calibrated supernet in PyTorch (fake-quant when QAT is on)."""
    loader = make_loader(split.with_resolution(subnet.resolution), EVAL_BATCH, False, workers=0, distributed=False)
    return evaluate(supernet, subnet, loader)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


class _Steps:
    """A progress bar over named steps on stderr."""

    def __init__(self, names: Sequence[str], show: bool, description: str):
        self._bar = tqdm(total=len(names), desc=description, unit="step", file=sys.stderr, disable=not show, leave=False)

    def __call__(self, name: str) -> None:
        self._bar.set_postfix_str(name, refresh=True)

    def done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


# ---- export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_subnet` wrote. Top-1 figures are on the held-out split (%).

    ``model_fp32``/``model_int8`` are the files the ``device`` engine runs: the ONNX files, or for an
    engine with a format of its own (LiteRT) its ``.tflite`` files, whose INT8 is the engine's
    post-training quantization (``heldout_device_int8_top1``, in that engine)."""

    space: str
    subnet: str
    quantization: str
    onnx_fp32: str
    onnx_int8: str
    heldout_fp32_top1: float
    heldout_int8_top1: float
    fp32_source: str
    model_fp32: str
    model_int8: str
    heldout_device_int8_top1: float
    float_stages: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(output: str | Path, suffix: str = ".onnx") -> tuple[Path, Path]:
    """``PATH_fp32.onnx`` and ``PATH_int8.onnx`` (or another model ``suffix``) for ``-o PATH`` (a
    trailing ``.onnx`` or ``suffix`` is dropped)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix in (".onnx", suffix) else output
    if not stem.name:
        raise UsageError(f"-o {output}: give a file path stem, e.g. models/tiny_max")
    return stem.with_name(stem.name + "_fp32" + suffix), stem.with_name(stem.name + "_int8" + suffix)


def metadata_path(model: Path) -> Path:
    """The JSON file next to a model without metadata properties of its own (``.tflite``)."""
    return model.with_name(model.name + ".json")


def _device_metadata(device: str, threads: int) -> dict[str, Any]:
    from spaceevo.latency.fingerprint import device_fingerprint

    fingerprint = device_fingerprint(device, threads)
    return {"device": fingerprint.describe(), "device_slug": fingerprint.slug}


def _base_metadata(run: TrainedRun, subnet: Subnet, data: DataSpec) -> dict[str, Any]:
    from spaceevo import __version__

    return {
        "version": __version__,
        "space": run.space.encoding,
        "hyperspace": run.space.hyperspace.name,
        "hyperspace_digest": run.space.hyperspace.digest,
        "subnet": subnet.encode(),
        "resolution": subnet.resolution,
        "data": str(data),
        "run": str(run.run.path),
        "trained_epochs": run.epoch,
        "reduce_range": run.config.reduce_range,
    }


def export_subnet(
    run_dir: str | Path,
    subnet: str | Subnet,
    output: str | Path,
    *,
    ptq: bool = False,
    float_stages: Sequence[int] = (),
    data: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    show_progress: bool = True,
) -> ExportReport:
    """Write ``subnet`` of the supernet trained in ``run_dir`` as FP32 and INT8 ONNX.

    The INT8 model is the QAT model (learned scales) unless ``ptq`` is set or the run has no QAT
    phase, when it is ONNX Runtime's post-training quantization of the FP32 model (calibrated on
    held-out images). Both files carry metadata: space, subnet, data, quantization, held-out top-1
    (PyTorch FP32; ONNX Runtime INT8), the device fingerprint, reduce_range and the spaceevo version.
    ``device``/``threads`` name the fingerprint recorded (the one the latency figures refer to).
    ``float_stages`` (stage indices, 0 the stem) stay in float in the INT8 model: one mixed INT8/FP32
    network (:mod:`spaceevo.quant.mixed`), QAT only. For an engine with a format of its own
    (``litert``) the engine's FP32 and INT8 models are written too (``PATH_fp32.tflite``,
    ``PATH_int8.tflite``, each with its metadata in ``<file>.json``); its INT8 is the engine's
    post-training quantization of the whole network on the held-out images (:func:`engine_models`),
    so ``float_stages`` cannot be given with such an engine.
    """
    engine = get_engine(device)
    engine.version()  # a missing engine fails now, not after the export
    fp32_path, int8_path = output_paths(output)
    writable_folder(fp32_path.parent, f"-o {output}")  # before the work, not after it
    run = open_run(run_dir)
    chosen = run.subnet(subnet)
    quantization = "qat" if run.quantization_aware and not ptq else "ptq"
    if float_stages and engine.converts:
        raise UsageError(f"--float-stages writes mixed INT8/FP32 ONNX; {engine.label}'s INT8 model is its own "
                         "post-training quantization of the whole network: export with --device cpu (or another "
                         "ONNX engine) for a mixed model")
    if float_stages and quantization != "qat":
        raise UsageError("float stages need the run's QAT model: drop --ptq (or --float-stages), "
                         "or train with a QAT phase")
    check_float_stages(len(run.space.resolve(chosen).stages), float_stages)
    steps = _Steps(["data", "fp32", "int8", "check", "write"] + ["engine"] * engine.converts, show_progress, "export")
    try:
        steps("data")
        datasets = run.load_data(data)
        steps.done()
        steps("fp32")
        fp32_supernet, fp32_source = run.fp32_supernet()
        run.calibrated(fp32_supernet, chosen, datasets)
        heldout_fp32 = torch_top1(fp32_supernet, chosen, datasets.heldout)
        fp32 = fp32_model(fp32_supernet, chosen)
        steps.done()
        steps("int8")
        if quantization == "qat":
            supernet = run.calibrated(run.supernet(), chosen, datasets)
            int8 = qat_int8_model(supernet, chosen, float_stages)
        else:
            int8 = ptq_int8_model(fp32, datasets.heldout, chosen.resolution, reduce_range=bool(run.config.reduce_range))
        steps.done()
        steps("check")
        heldout_int8 = engine_top1(int8, datasets.heldout, chosen.resolution)
        steps.done()
        steps("write")
        common = {**_base_metadata(run, chosen, datasets.spec), **_device_metadata(device, threads)}
        set_metadata(fp32, {**common, "precision": "fp32", "fp32_source": fp32_source, "heldout_top1": round(heldout_fp32, 2)})
        set_metadata(int8, {**common, "precision": "int8", "quantization": quantization, "heldout_top1": round(heldout_int8, 2),
                             "float_stages": ",".join(map(str, sorted(set(float_stages)))) or None})
        onnx.checker.check_model(fp32)
        onnx.checker.check_model(int8)
        atomic_write_bytes(fp32_path, fp32.SerializeToString())
        atomic_write_bytes(int8_path, int8.SerializeToString())
        steps.done()
        model_fp32, model_int8, heldout_device_int8 = fp32_path, int8_path, heldout_int8
        if engine.converts:
            steps("engine")
            device_fp32, device_int8 = engine_models(engine, fp32_supernet, chosen, datasets.heldout)
            heldout_device_int8 = engine_top1(device_int8, datasets.heldout, chosen.resolution, device=device)
            model_fp32, model_int8 = output_paths(output, engine.suffix)
            for path, model, values in (
                (model_fp32, device_fp32, {"precision": "fp32", "fp32_source": fp32_source, "heldout_top1": round(heldout_fp32, 2)}),
                (model_int8, device_int8, {"precision": "int8", "quantization": "ptq", "heldout_top1": round(heldout_device_int8, 2)}),
            ):
                atomic_write_bytes(path, model)
                atomic_write_bytes(metadata_path(path), (json.dumps({**common, **values}, indent=2) + "\n").encode())
            steps.done()
    finally:
        steps.close()
    return ExportReport(
        space=run.space.encoding,
        subnet=chosen.encode(),
        quantization=quantization,
        onnx_fp32=str(fp32_path),
        onnx_int8=str(int8_path),
        heldout_fp32_top1=round(heldout_fp32, 2),
        heldout_int8_top1=round(heldout_int8, 2),
        fp32_source=fp32_source,
        model_fp32=str(model_fp32),
        model_int8=str(model_int8),
        heldout_device_int8_top1=round(heldout_device_int8, 2),
        float_stages=tuple(sorted(set(float_stages))),
    )


# ---- evaluation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubnetEvaluation:
    """What :func:`evaluate_subnet` measured: test-split top-1 (%) and device latency (ms).

    ``fp32_top1``: PyTorch, FP32 supernet. ``int8_fakequant_top1``: PyTorch, LSQ+ fake quantization
    in eval mode, i.e. the deployed arithmetic with int32-rounded biases. ``qat_float_top1``: the QAT
    supernet's weights with every quantizer off; it splits a gap between QAT and FP32 in two:
    ``int8_fakequant_top1 - qat_float_top1`` is what quantization itself costs the QAT weights,
    ``qat_float_top1 - fp32_top1`` how far the QAT phase's updates moved the subnet. These two and
    ``ort_int8_top1`` (the exported QAT INT8 model) are None without a QAT phase. ``ptq_int8_top1``:
    ONNX Runtime post-training quantization of the FP32 export. ``fp32_ms``/``int8_ms``: the exported
    FP32 and INT8 (``int8_model``: QAT, else PTQ) models timed interleaved on the device, on
    ``latency_scale`` (the latency table's when there is one); None when not measured.
    ``device_int8_top1``: that INT8 model in the engine ``device`` names (for ``cpu``, ONNX Runtime's
    figure), to compare with PyTorch's fake-quant figure: engines may round differently. For an
    engine with a format of its own (LiteRT) the device figures (``device_int8_top1``, ``fp32_ms``,
    ``int8_ms``) are of the engine's models instead (:func:`~spaceevo.deploy.models.engine_models`),
    whose INT8 is always the engine's post-training quantization: ``device_int8_model`` says which.
    """

    space: str
    subnet: str
    resolution: int
    data: str
    test_images: int
    fp32_source: str
    int8_model: str
    fp32_top1: float | None
    int8_fakequant_top1: float | None
    qat_float_top1: float | None
    ort_fp32_top1: float | None
    ort_int8_top1: float | None
    ptq_int8_top1: float | None
    device: str
    device_int8_top1: float | None
    device_int8_model: str
    fp32_ms: float | None
    int8_ms: float | None
    latency_scale: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_subnet(
    run_dir: str | Path,
    subnet: str | Subnet,
    *,
    data: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    measure: bool = True,
    show_progress: bool = True,
    on_models: Callable[[onnx.ModelProto, onnx.ModelProto], None] | None = None,
) -> SubnetEvaluation:
    """Test-split top-1 of a trained subnet in PyTorch and ONNX Runtime, and its latency
    (:class:`SubnetEvaluation`). ``on_models(fp32, int8)`` receives the exported models (e.g. to
    save them); ``measure=False`` skips the latency."""
    get_engine(device).version()  # a missing engine fails now, not after minutes of evaluation
    run = open_run(run_dir)
    chosen = run.subnet(subnet)
    steps = _Steps(["data", "fp32", "ptq", "int8", "latency"], show_progress, "evaluate")
    try:
        steps("data")
        datasets = run.load_data(data)
        test = datasets.test
        steps.done()
        steps("fp32")
        fp32_supernet, fp32_source = run.fp32_supernet()
        run.calibrated(fp32_supernet, chosen, datasets)
        fp32_top1 = torch_top1(fp32_supernet, chosen, test)
        fp32 = fp32_model(fp32_supernet, chosen)
        ort_fp32 = engine_top1(fp32, test, chosen.resolution)
        steps.done()
        steps("ptq")
        ptq = ptq_int8_model(fp32, datasets.heldout, chosen.resolution, reduce_range=bool(run.config.reduce_range))
        ptq_top1 = engine_top1(ptq, test, chosen.resolution)
        steps.done()
        steps("int8")
        fakequant_top1 = qat_float_top1 = ort_int8 = None
        int8 = ptq
        if run.quantization_aware:
            qat_float_top1 = torch_top1(run.calibrated(run.float_supernet(), chosen, datasets), chosen, test)
            supernet = run.calibrated(run.supernet(), chosen, datasets)
            fakequant_top1 = torch_top1(supernet, chosen, test)
            int8 = qat_int8_model(supernet, chosen)
            ort_int8 = engine_top1(int8, test, chosen.resolution)
        engine = get_engine(device)
        engine_fp32, engine_int8 = (fp32, int8) if not engine.converts else engine_models(
            engine, fp32_supernet, chosen, datasets.heldout
        )
        device_int8 = (ort_int8 if run.quantization_aware else ptq_top1) if device == ORT_DEVICE else engine_top1(
            engine_int8, test, chosen.resolution, device=device
        )
        steps.done()
        if on_models is not None:
            on_models(fp32, int8)
        steps("latency")
        fp32_ms = int8_ms = scale = None
        if measure:
            from spaceevo.latency.api import measure_onnx

            (fp32_stats, int8_stats), scale = measure_onnx([engine_fp32, engine_int8], device, threads, tables)
            fp32_ms, int8_ms = fp32_stats.ms, int8_stats.ms
        steps.done()
    finally:
        steps.close()
    return SubnetEvaluation(
        space=run.space.encoding,
        subnet=chosen.encode(),
        resolution=chosen.resolution,
        data=str(datasets.spec),
        test_images=len(test),
        fp32_source=fp32_source,
        int8_model="qat" if run.quantization_aware else "ptq",
        fp32_top1=_round(fp32_top1),
        int8_fakequant_top1=_round(fakequant_top1),
        qat_float_top1=_round(qat_float_top1),
        ort_fp32_top1=_round(ort_fp32),
        ort_int8_top1=_round(ort_int8),
        ptq_int8_top1=_round(ptq_top1),
        device=device,
        device_int8_top1=_round(device_int8),
        device_int8_model="ptq" if engine.converts else ("qat" if run.quantization_aware else "ptq"),
        fp32_ms=_round(fp32_ms, 4),
        int8_ms=_round(int8_ms, 4),
        latency_scale=scale,
    )


CLASSIFIER = "an image classifier with one float input 1 x C x R x R and one output [N, classes]"


def load_onnx(path: Path) -> onnx.ModelProto:
    """An ONNX model file; :class:`UsageError` if there is none, :class:`ArtifactError` naming the
    file if it is empty, unreadable, truncated or not a valid ONNX model."""
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise UsageError(f"--model {path}: {what} (expected an ONNX model file, e.g. from spaceevo export)")
    try:
        content = path.read_bytes()
        model = onnx.load_model_from_string(content)  # binary protobuf whatever the file's suffix
    except (OSError, DecodeError, ValueError) as error:
        raise ArtifactError(
            f"{path} is not a readable ONNX model ({_first_line(error)}); it may be truncated or another kind "
            f"of file: expected {CLASSIFIER}, e.g. from spaceevo export"
        ) from None
    if not content:
        raise ArtifactError(f"{path} is empty (0 bytes): expected an ONNX model, {CLASSIFIER}")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx's ValidationError and the C++ checker's errors
        raise ArtifactError(f"{path} is not a valid ONNX model ({_first_line(error)}); expected {CLASSIFIER}") from None
    return model


def classifier_shape(model: onnx.ModelProto, path: Path) -> tuple[int, int, int | None]:
    """(channels C, resolution R, classes or None if the output's size is symbolic) of an image
    classifier with input 1 x C x R x R; :class:`ArtifactError` naming the file otherwise."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ArtifactError(
            f"{path} has {len(inputs)} input(s) and {len(outputs)} output(s): expected {CLASSIFIER}"
        )
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or None in dims[1:] or dims[2] != dims[3]:
        shape = " x ".join("?" if d is None else str(d) for d in dims) or "no shape"
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ArtifactError(f"{path} takes an input of type {kind} and shape {shape}: expected {CLASSIFIER}")
    out = outputs[0].type.tensor_type
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in out.shape.dim]
    if out.HasField("shape") and len(out_dims) != 2:
        shape = " x ".join("?" if d is None else str(d) for d in out_dims)
        raise ArtifactError(f"{path} outputs shape {shape}: expected {CLASSIFIER}")
    return int(dims[1]), int(dims[2]), out_dims[1] if len(out_dims) == 2 else None


def load_engine_model(path: Path, engine: Engine) -> tuple[bytes, tuple[int, int, int | None], dict[str, str]]:
    """A model file in the own format of an ``engine`` that converts (``.tflite``): its bytes,
    (channels, resolution, classes) as :func:`classifier_shape` gives them, and its metadata (the
    JSON file :func:`export_subnet` writes next to it; empty without one). :class:`UsageError` if
    there is no such file, :class:`ArtifactError` naming it if the engine cannot load it or it is
    not an image classifier."""
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise UsageError(f"--model {path}: {what} (expected a {engine.suffix} model, e.g. from spaceevo export --device {engine.name})")
    from spaceevo.latency.engines.litert import interpreter

    content = path.read_bytes()
    try:
        shape = [int(d) for d in interpreter(content, 1).get_input_details()[0]["shape"]]
        logits = engine.classifier(content, 1)(np.zeros((1, *shape[1:]), dtype=np.float32))
    except Exception as error:  # the runtime's own exception types
        raise ArtifactError(f"{engine.label} cannot load {path} ({_first_line(error)}): expected {CLASSIFIER}") from None
    if len(shape) != 4 or shape[0] != 1 or shape[2] != shape[3] or logits.ndim != 2:
        raise ArtifactError(f"{path} takes an input of shape {' x '.join(map(str, shape))}: expected {CLASSIFIER}")
    sidecar = metadata_path(path)
    try:
        metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ArtifactError(f"{sidecar}: unreadable metadata of {path.name} ({_first_line(error)})") from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{sidecar}: the metadata of {path.name} is not a JSON object")
    return content, (shape[1], shape[2], int(logits.shape[1])), {k: str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class ModelEvaluation:
    """What :func:`evaluate_model` measured on an exported model file: test-split top-1 (%) in ONNX
    Runtime (None for a model in another engine's format, ``.tflite``) and in the engine ``device``
    names (the same figure for ``cpu``), and latency on that engine (ms, on ``latency_scale``; None
    when not measured). ``space``, ``subnet`` and ``precision`` come from the model's metadata
    (None for a model spaceevo did not export)."""

    model: str
    space: str | None
    subnet: str | None
    precision: str | None
    data: str
    test_images: int
    ort_top1: float | None
    device: str
    device_top1: float
    ms: float | None
    latency_scale: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_model(
    path: str | Path,
    *,
    data: str | None = None,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    measure: bool = True,
) -> ModelEvaluation:
    """Test-split top-1 (ONNX Runtime and the device's engine) and device latency of an exported model file.

    The data set is ``data`` or the one in the model's metadata (``embedded`` if it has none); the
    resolution is the model's input size. An engine with a format of its own (``litert``) evaluates
    files of that format (``.tflite``, with the metadata :func:`export_subnet` writes next to them).
    """
    from spaceevo.train.data import load_data

    engine = get_engine(device)
    engine.version()
    path = Path(path)
    model: onnx.ModelProto | bytes
    if engine.converts:
        if path.suffix != engine.suffix:
            raise UsageError(
                f"--device {device} runs {engine.suffix} models, not {path.name}; export one with "
                f"'spaceevo export --device {device}'"
            )
        model, (channels, resolution, classes), metadata = load_engine_model(path, engine)
    else:
        model = load_onnx(path)
        channels, resolution, classes = classifier_shape(model, path)
        metadata = read_metadata(model)
    spec = DataSpec.parse(data or metadata.get("data", "embedded"))
    spec.check()
    datasets = load_data(spec, resolution, seed=0)
    expected = f"input 1 x {datasets.in_channels} x R x R and output [N, {datasets.num_classes}] for data '{spec}'"
    if datasets.in_channels != channels:
        raise UsageError(f"{path} takes {channels} input channel(s), expected {expected}; give --data of the model")
    if classes is not None and classes != datasets.num_classes:
        raise UsageError(f"{path} outputs {classes} classes, expected {expected}; give --data of the model")
    top1 = None if engine.converts else engine_top1(model, datasets.test, resolution, name=str(path))
    device_top1 = top1 if device == ORT_DEVICE else engine_top1(model, datasets.test, resolution, name=str(path), device=device)
    ms = scale = None
    if measure:
        from spaceevo.latency.api import measure_onnx

        (stats,), scale = measure_onnx([model], device, threads, tables)
        ms = _round(stats.ms, 4)
    return ModelEvaluation(
        model=str(path),
        space=metadata.get("space"),
        subnet=metadata.get("subnet"),
        precision=metadata.get("precision"),
        data=str(spec),
        test_images=len(datasets.test),
        ort_top1=_round(top1),
        device=device,
        device_top1=_round(device_top1),
        ms=ms,
        latency_scale=scale,
    )
