"""Inference engines behind ``--device``: the registry, fingerprints that keep engines' tables apart,
the message for a missing optional engine, and real OpenVINO measurements (skipped where the
optional ``openvino`` package is not installed)."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import pytest

from spaceevo.cli import build_parser, main
from spaceevo.errors import ArtifactError, DeviceMismatchError, UsageError
from spaceevo.latency.engines import ENGINES, get_engine, timer
from spaceevo.latency.fingerprint import DeviceFingerprint, device_fingerprint
from spaceevo.latency.reference import REFERENCE_SEGMENT
from spaceevo.latency.segments import segment_model
from spaceevo.latency.table import FORMAT, TABLE_FILE, LatencyTable, TableEntry

MISSING = "--device openvino needs the openvino package: pip install 'spaceevo[openvino]'"


def fingerprint(engine: str = "cpu", version: str = "1.32.0") -> DeviceFingerprint:
    return DeviceFingerprint(
        cpu_model="Test CPU 9000", isa=("avx2", "avx512", "avx512_vnni"), machine="x86_64", engine=engine,
        engine_version=version, threads=1,
    )


@pytest.fixture
def no_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import openvino`` fails as where the package is not installed."""
    monkeypatch.setitem(sys.modules, "openvino", None)


# ---- registry ------------------------------------------------------------------------------------


def test_registry_names_every_engine_and_refuses_others() -> None:
    assert list(ENGINES) == ["cpu", "openvino", "litert"]
    for name, engine in ENGINES.items():
        assert engine.name == name and get_engine(name) is engine
        assert engine.tag and engine.label and engine.target and engine.package
    with pytest.raises(UsageError, match=r"unknown device 'tpu'; allowed: cpu, openvino, litert"):
        get_engine("tpu")


def test_every_device_option_offers_the_registry() -> None:
    parser = build_parser()
    commands = {
        "latency build": ["--space", "tiny"], "latency predict": ["--space", "tiny", "--subnet", "min"],
        "latency measure": ["--space", "tiny", "--subnet", "min"], "latency validate": ["--space", "tiny"],
        "evaluate": ["--model", "m.onnx"], "export": ["--run", "r", "-o", "m"], "extract": ["--run", "r"],
        "run": [], "search": [],
    }
    for command, rest in commands.items():
        for name in ENGINES:
            args = parser.parse_args([*command.split(), *rest, "--device", name])
            assert args.device == name, command
        with pytest.raises(SystemExit):
            parser.parse_args([*command.split(), *rest, "--device", "tpu"])


# ---- fingerprints --------------------------------------------------------------------------------


def test_engines_have_their_own_slugs_and_descriptions() -> None:
    cpu, ov = fingerprint(), fingerprint("openvino", "2026.4.1")
    assert cpu != ov and cpu.slug != ov.slug
    assert "_ort1.32.0_t1_" in cpu.slug and "_ov2026.4.1_t1_" in ov.slug
    assert "ONNX Runtime 1.32.0" in cpu.describe() and "OpenVINO Runtime 2026.4.1" in ov.describe()
    assert cpu.reduce_range == ov.reduce_range  # a property of the CPU, not of the engine
    for fp in (cpu, ov):
        assert DeviceFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


def test_a_table_made_before_engines_existed_stays_the_onnx_runtime_table() -> None:
    legacy = {
        "cpu_model": "AMD EPYC", "isa": ["avx2"], "machine": "x86_64", "ort_version": "1.32.0",
        "provider": "CPUExecutionProvider", "threads": 1, "slug": "amd-epyc_avx2_ort1.32.0_t1_21f0c31b",
    }
    fp = DeviceFingerprint.from_dict(legacy)
    assert fp.engine == "cpu" and fp.engine_version == "1.32.0"
    assert fp.slug == legacy["slug"]  # the committed table's folder name


def test_an_openvino_table_is_never_used_for_cpu(tmp_path) -> None:
    cpu, ov = fingerprint(), fingerprint("openvino", "2026.4.1")
    table = LatencyTable.create(tmp_path, ov)
    table.append([TableEntry("x", 1.0, 0.0)])
    with pytest.raises(ArtifactError, match=r"no latency table for this device.*tables exist for other devices"):
        LatencyTable.open(tmp_path, cpu)
    with pytest.raises(DeviceMismatchError, match="another device"):
        LatencyTable.load(table.path, expected=cpu)
    # the same file under the cpu table's folder name is refused too: the header decides
    moved = tmp_path / cpu.slug / TABLE_FILE
    moved.parent.mkdir()
    moved.write_text(table.path.read_text())
    with pytest.raises(DeviceMismatchError, match="OpenVINO Runtime 2026.4.1"):
        LatencyTable.open(tmp_path, cpu)
    assert LatencyTable.open(tmp_path, ov).ms("x") == 1.0
    assert json.loads(table.path.read_text().splitlines()[0])["format"] == FORMAT


def test_extraction_fronts_of_engines_are_separate_studies() -> None:
    from types import SimpleNamespace

    from spaceevo.extraction.api import study_name

    fitness = SimpleNamespace(key=lambda: {"space": "tiny-1111-0000", "run": "/runs/tiny", "epoch": 3})
    cpu, ov = fingerprint(), fingerprint("openvino", "2026.4.1")
    cpu_name, cpu_key = study_name(fitness, 0, cpu.engine, cpu.slug)
    ov_name, ov_key = study_name(fitness, 0, ov.engine, ov.slug)
    assert cpu_name != ov_name and ov_key["device"] == ov.slug
    assert "device" not in cpu_key  # ONNX Runtime fronts keep the study names they had before engines
    assert study_name(fitness, 0, ov.engine, fingerprint("openvino", "2027.0.0").slug)[0] != ov_name


# ---- a missing optional engine -------------------------------------------------------------------


def test_a_missing_engine_package_is_a_usage_error(no_openvino) -> None:
    with pytest.raises(UsageError) as error:
        device_fingerprint("openvino", 1)
    assert str(error.value) == MISSING
    assert device_fingerprint("cpu", 1).engine == "cpu"  # the other engines are unaffected


@pytest.mark.parametrize(
    "argv",
    [
        ["latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min"],
        ["latency", "measure", "--space", "tiny-1111-0000", "--subnet", "min"],
        ["evaluate", "--model", "missing.onnx"],
    ],
)
def test_the_cli_names_the_missing_engine_package(no_openvino, capsys, argv) -> None:
    assert main([*argv, "--device", "openvino"]) == 2
    err = capsys.readouterr().err
    assert MISSING in err and "Traceback" not in err


# ---- OpenVINO, measured --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openvino_here() -> DeviceFingerprint:
    pytest.importorskip("openvino")
    return device_fingerprint("openvino", 1)


def test_openvino_runs_a_qdq_segment_in_int8(openvino_here) -> None:
    from spaceevo.latency.engines.openvino_cpu import OpenVinoTimer

    model = segment_model(REFERENCE_SEGMENT, reduce_range=openvino_here.reduce_range)
    segment = timer(model, openvino_here)
    assert isinstance(segment, OpenVinoTimer)
    times = [segment.run_once() for _ in range(20)]
    assert all(t > 0 for t in times)
    output = segment.request.get_output_tensor(0).data
    block = REFERENCE_SEGMENT.block
    assert output.dtype == np.uint8 and output.shape == (1, block.out_channels, block.output_size, block.output_size)
    runtime = segment.compiled.get_runtime_model()
    convolutions = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    assert convolutions and set(convolutions) <= {"u8", "i8"}  # LPT kept the quantized convolutions INT8


def test_openvino_measures_a_tiny_subnet_end_to_end(openvino_here, tmp_path) -> None:
    from spaceevo.latency import measure_latency

    result = measure_latency("tiny-1111-0000", "min", device="openvino", tables=tmp_path)
    assert "OpenVINO Runtime" in result.device and openvino_here.engine_version in result.device
    assert result.fp32_ms > 0 and result.int8_ms > 0 and result.int8_raw_ms > 0
    assert result.int8_speedup == pytest.approx(result.fp32_ms / result.int8_ms, rel=1e-2)
    assert result.scale == "reference measured now"  # no openvino table in tmp_path


def test_openvino_classifies_as_onnx_runtime_does(openvino_here, tmp_path) -> None:
    import torch

    from spaceevo.deploy.evaluate import engine_predictions
    from spaceevo.quant.export import export_fp32, quantize_ptq
    from spaceevo.train.data import load_data

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 13 * 13, 10)
    ).eval()
    test = load_data("embedded", 28).test
    fp32 = export_fp32(net, (1, 1, 28, 28))
    calibration = [test.with_resolution(28)[i][0][None].numpy() for i in range(16)]
    int8 = quantize_ptq(fp32, calibration, reduce_range=openvino_here.reduce_range, work_dir=str(tmp_path))
    for model, agreement in ((fp32, 0.99), (int8, 0.95)):
        ort = engine_predictions(model, test, 28, threads=1)
        ov = engine_predictions(model, test, 28, threads=1, device="openvino")
        assert ov.shape == ort.shape == (len(test),)
        assert len(set(ort.tolist())) > 3  # the classes vary with the image: agreement means something
        assert (ov == ort).mean() >= agreement


def test_openvino_reports_an_unloadable_model(openvino_here) -> None:
    from spaceevo.deploy.evaluate import engine_predictions
    from spaceevo.train.data import load_data

    broken = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
        )
    )
    with pytest.raises(ArtifactError, match="OpenVINO Runtime cannot load the broken model"):
        engine_predictions(broken, load_data("embedded", 8).test, 8, threads=1, name="the broken model", device="openvino")


def test_openvino_fingerprint_follows_the_override(openvino_here, monkeypatch) -> None:
    monkeypatch.setenv("SPACEEVO_FINGERPRINT_OVERRIDE", "cpu_model=CI Test CPU;isa=avx2")
    fp = device_fingerprint("openvino", 1)
    assert fp == dataclasses.replace(openvino_here, cpu_model="CI Test CPU", isa=("avx2",)) and fp.reduce_range
