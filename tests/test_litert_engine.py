"""``--device litert``: LiteRT with XNNPACK, the engine that converts (PyTorch → ``.tflite``).

The registry entry and the message for missing packages are tested everywhere; conversion, INT8 on
XNNPACK's quantized kernels, timing, classification and export/evaluate need the optional ``litert``
extra (``pip install 'spaceevo[litert]'``) and are skipped without it. Those that convert whole
networks are ``slow`` (``pytest -m slow tests/test_litert_engine.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spaceevo.cli import main
from spaceevo.errors import UsageError
from spaceevo.latency.engines import ENGINES, get_engine
from spaceevo.latency.fingerprint import device_fingerprint
from spaceevo.latency.measure import random_input
from spaceevo.latency.reference import REFERENCE_SEGMENT
from spaceevo.latency.segments import segment_model

MISSING = "--device litert needs the litert-torch package: pip install 'spaceevo[litert]'"
SPACE = "tiny-1111-0000"


def test_litert_is_registered_as_an_engine_that_converts() -> None:
    engine = get_engine("litert")
    assert list(ENGINES) == ["cpu", "openvino", "litert"]
    assert engine.converts and engine.suffix == ".tflite" and engine.extra == "litert"
    assert not get_engine("cpu").converts and not get_engine("openvino").converts
    with pytest.raises(NotImplementedError, match="converts nothing"):
        get_engine("cpu").convert(torch.nn.Identity(), (1, 1, 4, 4), None)


@pytest.mark.parametrize("module", ["litert_torch", "ai_edge_litert"])
def test_a_missing_litert_package_is_a_usage_error(monkeypatch, capsys, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UsageError) as error:
        device_fingerprint("litert", 1)
    assert str(error.value) == MISSING
    assert main(["latency", "measure", "--space", SPACE, "--subnet", "min", "--device", "litert"]) == 2
    err = capsys.readouterr().err
    assert MISSING in err and "Traceback" not in err


def test_random_input_covers_every_quantized_type() -> None:
    for dtype in (np.uint8, np.int8):
        values = random_input([4096], dtype)
        info = np.iinfo(dtype)
        assert values.dtype == dtype and values.min() == info.min and values.max() == info.max
    assert random_input([3], np.float32).dtype == np.float32


# ---- with the litert extra ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litert_here():
    pytest.importorskip("litert_torch", reason="needs the optional litert extra: pip install 'spaceevo[litert]'")
    pytest.importorskip("ai_edge_litert", reason="needs the optional litert extra: pip install 'spaceevo[litert]'")
    return device_fingerprint("litert", 1)


def _ops(interpreter) -> list[tuple[str, tuple[str, ...]]]:
    """(op name, input dtypes) of every op of the model, delegated or not."""
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    return [
        (op["op_name"], tuple(tensors[i] for i in op["inputs"] if i >= 0)) for op in interpreter._get_ops_details()
    ]


def test_an_int8_segment_runs_on_xnnpacks_quantized_kernels(litert_here) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from spaceevo.latency.engines import timer
    from spaceevo.latency.engines.litert import LiteRtTimer

    model = segment_model(REFERENCE_SEGMENT, reduce_range=False, device="litert")
    assert model[4:8] == b"TFL3"  # a TFLite flatbuffer
    segment = timer(model, litert_here)
    assert isinstance(segment, LiteRtTimer)
    assert all(segment.run_once() > 0 for _ in range(20))
    ops = _ops(segment.interpreter)
    convolutions = [dtypes for name, dtypes in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert len(convolutions) == 3 and all(dtypes[:2] == ("int8", "int8") for dtypes in convolutions)
    assert "DELEGATE" in [name for name, _ in ops]  # XNNPACK took the graph
    # XNNPACK's kernels, not the reference ones: the same model without the delegate is slower
    plain = Interpreter(model_content=model, num_threads=1,
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    assert "DELEGATE" not in [name for name, _ in _ops(plain)]


@pytest.mark.slow  # converts several models: tens of seconds each on 2 cores
def test_litert_classifies_as_onnx_runtime_does(litert_here) -> None:
    from spaceevo.deploy.evaluate import engine_predictions
    from spaceevo.deploy.models import calibration_images
    from spaceevo.quant.export import export_fp32
    from spaceevo.train.data import load_data

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 13 * 13, 10)
    ).eval()
    data = load_data("embedded", 28)
    engine = get_engine("litert")
    fp32 = engine.convert(net, (1, 1, 28, 28), None)
    int8 = engine.convert(net, (1, 1, 28, 28), calibration_images(data.heldout, 28, 64))
    ort = engine_predictions(export_fp32(net, (1, 1, 28, 28)), data.test, 28, threads=1)
    assert len(set(ort.tolist())) > 3  # the classes vary with the image: agreement means something
    for model, agreement in ((fp32, 0.99), (int8, 0.95)):
        litert = engine_predictions(model, data.test, 28, threads=1, device="litert")
        assert litert.shape == ort.shape and (litert == ort).mean() >= agreement


@pytest.mark.slow  # converts several models: tens of seconds each on 2 cores
def test_litert_measures_a_subnet_end_to_end(litert_here, tmp_path) -> None:
    from spaceevo.latency import measure_latency

    result = measure_latency(SPACE, "min", device="litert", tables=tmp_path)
    assert "LiteRT" in result.device and litert_here.engine_version in result.device
    assert result.fp32_ms > 0 and result.int8_ms > 0
    assert result.scale == "reference measured now"


@pytest.fixture(scope="module")
def run_dir(litert_here, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("litert") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--json"]) == 0
    return run


@pytest.mark.slow  # converts several models: tens of seconds each on 2 cores
def test_export_writes_tflite_models_that_evaluate_runs(run_dir, tmp_path, capsys) -> None:
    from spaceevo.deploy import evaluate_model, export_subnet

    report = export_subnet(run_dir, "min", tmp_path / "tiny_min", device="litert", show_progress=False)
    assert report.model_int8 == str(tmp_path / "tiny_min_int8.tflite")
    assert report.model_fp32 == str(tmp_path / "tiny_min_fp32.tflite")
    assert Path(report.onnx_int8).is_file()  # the ONNX files are written as for every engine
    metadata = json.loads(Path(report.model_int8 + ".json").read_text())
    assert metadata["precision"] == "int8" and metadata["quantization"] == "ptq" and metadata["subnet"] == report.subnet
    assert "LiteRT" in metadata["device"]
    assert abs(report.heldout_device_int8_top1 - report.heldout_int8_top1) < 15
    evaluation = evaluate_model(report.model_int8, device="litert", measure=False)
    assert evaluation.ort_top1 is None and evaluation.precision == "int8" and evaluation.subnet == report.subnet
    assert 10 < evaluation.device_top1 <= 100
    assert main(["evaluate", "--model", report.onnx_int8, "--device", "litert", "--no-latency"]) == 2
    assert "--device litert runs .tflite models" in capsys.readouterr().err


@pytest.mark.slow  # its run is trained first (the fixture)
def test_float_stages_are_not_written_into_a_tflite(run_dir, tmp_path, capsys) -> None:
    """LiteRT's INT8 is its own post-training quantization of the whole network: a mixed INT8/FP32
    export (``--float-stages``) is a usage error with ``--device litert``, before any work."""
    assert main(["export", "--run", str(run_dir), "--subnet", "min", "--float-stages", "1", "--device", "litert",
                 "-o", str(tmp_path / "mixed")]) == 2
    assert "--float-stages writes mixed INT8/FP32 ONNX" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
