"""Deployment of trained subnets (spaceevo.deploy): ``spaceevo export`` and ``spaceevo evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from spaceevo.cli import main
from spaceevo.deploy import ModelEvaluation, SubnetEvaluation, evaluate_model, evaluate_subnet, export_subnet, open_run
from spaceevo.deploy.evaluate import output_paths, torch_top1
from spaceevo.deploy.models import read_metadata
from spaceevo.errors import ArtifactError
from spaceevo.quant.lsq import set_quant_mode

SPACE = "tiny-1111-0000"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(smoke_run) -> Path:
    return smoke_run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny_min.onnx"
    return export_subnet(run_dir, "min", out, show_progress=False)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_output_paths_take_a_stem_with_or_without_suffix(tmp_path) -> None:
    assert output_paths(tmp_path / "a.onnx") == (tmp_path / "a_fp32.onnx", tmp_path / "a_int8.onnx")
    assert output_paths(tmp_path / "m" / "b") == (tmp_path / "m" / "b_fp32.onnx", tmp_path / "m" / "b_int8.onnx")


def test_a_smoke_run_keeps_its_fp32_phase_weights(run_dir) -> None:
    run = open_run(run_dir)
    assert run.quantization_aware and run.run.fp32_checkpoint.exists()
    assert run.fp32_supernet()[1] == "fp32 phase"


def test_export_writes_checked_fp32_and_qat_int8_models_with_metadata(exported) -> None:
    assert exported.quantization == "qat" and exported.fp32_source == "fp32 phase"
    fp32, int8 = onnx.load(exported.onnx_fp32), onnx.load(exported.onnx_int8)
    onnx.checker.check_model(fp32)
    onnx.checker.check_model(int8)
    meta = read_metadata(int8)
    assert meta["space"] == SPACE and meta["subnet"] == exported.subnet and meta["precision"] == "int8"
    assert meta["quantization"] == "qat" and meta["data"] == "embedded" and meta["resolution"] == "24"
    assert {"version", "device", "device_slug", "hyperspace_digest", "heldout_top1", "reduce_range"} <= set(meta)
    assert float(meta["heldout_top1"]) == exported.heldout_int8_top1
    assert read_metadata(fp32)["precision"] == "fp32"
    # the INT8 model is fully quantized: every conv / gemm weight and bias comes from a DequantizeLinear
    producers = {out: node.op_type for node in int8.graph.node for out in node.output}
    layers = [n for n in int8.graph.node if n.op_type in ("Conv", "Gemm")]
    assert layers and all(producers.get(name) == "DequantizeLinear" for n in layers for name in n.input[1:])
    assert not {n.op_type for n in fp32.graph.node} & {"QuantizeLinear", "DequantizeLinear"}


def test_evaluate_reports_every_figure_and_onnx_runtime_matches_pytorch(run_dir, exported) -> None:
    report = evaluate_subnet(run_dir, "min", measure=False, show_progress=False)
    keys = ("fp32_top1", "int8_fakequant_top1", "qat_float_top1", "ort_fp32_top1", "ort_int8_top1", "ptq_int8_top1")
    assert isinstance(report, SubnetEvaluation) and set(keys) | {"fp32_ms", "int8_ms"} <= set(report.to_dict())
    assert report.subnet == exported.subnet and report.test_images == 2000 and report.int8_model == "qat"
    assert all(0.0 <= getattr(report, k) <= 100.0 for k in keys) and report.fp32_ms is None and report.latency_scale is None
    assert abs(report.ort_fp32_top1 - report.fp32_top1) <= 0.1, "the FP32 export computes the PyTorch model"
    assert abs(report.ort_int8_top1 - report.int8_fakequant_top1) <= 1.0
    assert report.device == "cpu" and report.device_int8_top1 == report.ort_int8_top1  # cpu is ONNX Runtime
    run = open_run(run_dir)
    datasets = run.load_data()
    float_supernet = run.calibrated(run.float_supernet(), run.subnet("min"), datasets)
    assert report.qat_float_top1 == round(torch_top1(float_supernet, run.subnet("min"), datasets.test), 2)
    # the exported file is the model evaluate_subnet built: same test top-1 in ONNX Runtime
    model_report = evaluate_model(exported.onnx_int8, measure=False)
    assert isinstance(model_report, ModelEvaluation) and model_report.ms is None
    assert model_report.ort_top1 == report.ort_int8_top1 and model_report.precision == "int8"
    assert model_report.device == "cpu" and model_report.device_top1 == model_report.ort_top1


def test_evaluate_a_model_on_openvino_reports_its_top1_and_latency(exported, tmp_path) -> None:
    pytest.importorskip("openvino")
    report = evaluate_model(exported.onnx_int8, device="openvino", tables=tmp_path)
    assert report.device == "openvino" and 0.0 <= report.device_top1 <= 100.0
    assert abs(report.device_top1 - report.ort_top1) <= 1.0, "OpenVINO runs the INT8 model ONNX Runtime runs"
    assert report.ms > 0 and report.latency_scale == "reference measured now"


@pytest.mark.slow
def test_evaluate_a_subnet_on_openvino_next_to_fake_quant(run_dir, exported, tmp_path, capsys) -> None:
    pytest.importorskip("openvino")
    report = evaluate_subnet(run_dir, "min", device="openvino", tables=tmp_path, show_progress=False)
    assert report.device == "openvino" and abs(report.device_int8_top1 - report.int8_fakequant_top1) <= 1.0
    assert report.int8_ms > 0 and report.fp32_ms > 0
    code, out, err = run_cli(capsys, "export", "--run", str(run_dir), "--subnet", "min", "-o", str(tmp_path / "m"),
                             "--device", "openvino", "--json")
    assert code == 0, err
    assert "OpenVINO Runtime" in read_metadata(onnx.load(json.loads(out)["onnx_int8"]))["device"]


def test_float_supernet_is_the_qat_weights_with_quantizers_off(run_dir) -> None:
    run = open_run(run_dir)
    assert run.quantization_aware
    quantized, floating = run.supernet(), run.float_supernet()
    assert all(torch.equal(a, b) for a, b in zip(quantized.state_dict().values(), floating.state_dict().values()))
    reference = run.supernet()
    assert set_quant_mode(reference, False) > 0
    subnet = run.subnet("max")
    images = torch.rand(4, 1, subnet.resolution, subnet.resolution, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (quantized, floating, reference):
        model.set_active(subnet)
        with torch.no_grad():
            outputs.append(model(images))
    assert torch.equal(outputs[1], outputs[2]), "every quantizer is off"
    assert not torch.equal(outputs[0], outputs[1]), "the quantizers change the output"


def test_ptq_export_quantizes_the_fp32_model(run_dir, tmp_path) -> None:
    report = export_subnet(run_dir, "min", tmp_path / "ptq", ptq=True, show_progress=False)
    assert report.quantization == "ptq"
    assert read_metadata(onnx.load(report.onnx_int8))["quantization"] == "ptq"


def test_cli_export_and_evaluate_a_model_file(run_dir, tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, "export", "--run", str(run_dir), "--subnet", "min", "-o", str(tmp_path / "m"), "--json")
    assert code == 0, err
    written = json.loads(out)
    assert Path(written["onnx_int8"]).exists() and Path(written["onnx_fp32"]).exists()
    code, out, err = run_cli(capsys, "evaluate", "--model", written["onnx_fp32"], "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(out)["precision"] == "fp32"


def test_cli_export_of_a_mixed_int8_fp32_model(run_dir, exported, tmp_path, capsys) -> None:
    """``--float-stages`` writes one INT8 model with those stages in float, recorded in its metadata;
    it needs the QAT model and existing stages, checked before any work."""
    code, out, err = run_cli(capsys, "export", "--run", str(run_dir), "--subnet", "min", "--float-stages", "1",
                             "-o", str(tmp_path / "mixed"), "--json")
    assert code == 0, err
    written = json.loads(out)
    assert written["float_stages"] == [1]
    mixed = onnx.load(written["onnx_int8"])
    assert read_metadata(mixed)["float_stages"] == "1"
    assert "float_stages" not in read_metadata(onnx.load(exported.onnx_int8))
    count = lambda proto: sum(node.op_type == "QuantizeLinear" for node in proto.graph.node)  # noqa: E731
    assert 0 < count(mixed) < count(onnx.load(exported.onnx_int8))
    assert abs(written["heldout_int8_top1"] - exported.heldout_int8_top1) <= 5.0

    code, _, err = run_cli(capsys, "export", "--run", str(run_dir), "--float-stages", "9", "-o", str(tmp_path / "x"))
    assert code == 2 and "float stages [9] do not exist" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "export", "--run", str(run_dir), "--float-stages", "1", "--ptq", "-o", str(tmp_path / "x"))
    assert code == 2 and "float stages need the run's QAT model" in err
    assert not list(tmp_path.glob("x*"))


def test_no_trained_supernet_names_the_command_that_makes_one(tmp_path, capsys) -> None:
    with pytest.raises(ArtifactError, match="spaceevo train"):
        open_run(tmp_path)
    code, _, err = run_cli(capsys, "export", "--run", str(tmp_path), "-o", str(tmp_path / "x"))
    assert code == 3 and "spaceevo train --space" in err and "Traceback" not in err


def test_evaluate_needs_exactly_one_target(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "evaluate", "--no-latency")
    assert code == 2 and "--run" in err and "--model" in err
    code, _, err = run_cli(capsys, "evaluate", "--run", str(tmp_path), "--model", str(tmp_path / "m.onnx"))
    assert code == 2


def test_evaluate_model_rejects_missing_and_corrupt_files(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "evaluate", "--model", str(tmp_path / "none.onnx"), "--no-latency")
    assert code == 2 and "no such file" in err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf \x00\xff")
    code, _, err = run_cli(capsys, "evaluate", "--model", str(corrupt), "--no-latency")
    assert code == 3 and "not a readable ONNX model" in err


def test_evaluate_with_a_subnet_of_another_space_names_the_field(run_dir, capsys) -> None:
    code, _, err = run_cli(capsys, "evaluate", "--run", str(run_dir), "--subnet", "d1#1#1#1#1_k3_w16_e0_r24", "--no-latency")
    assert code == 2 and "Traceback" not in err


def test_engine_predictions_are_per_image_and_agree_with_torch_and_top1() -> None:
    from spaceevo.deploy.evaluate import engine_predictions, engine_top1
    from spaceevo.quant.export import export_fp32
    from spaceevo.train.data import load_data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)).eval()
    test = load_data("embedded", 28).test
    proto = export_fp32(model, (1, 1, 28, 28))
    predicted = engine_predictions(proto, test, 28, threads=1)
    assert predicted.shape == (len(test),) and predicted.dtype.kind == "i"
    first = torch.stack([test[i][0] for i in range(8)])
    assert predicted[:8].tolist() == model(first).argmax(1).tolist()
    assert engine_top1(proto, test, 28, threads=1) == pytest.approx(100 * (predicted == test.targets).mean())
