"""Fine-tuning of extracted subnets (spaceevo.extraction.finetune): what it writes, that its INT8
figure is the exported model's, that a finished fine-tuning is reused and an interrupted one resumes
to the same weights, and ``extract --finetune-epochs``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import _fake_latency
import spaceevo.extraction.finetune as finetune_module
from spaceevo.cli import main
from spaceevo.deploy.evaluate import engine_top1
from spaceevo.deploy.models import read_metadata
from spaceevo.deploy.trained import open_run
from spaceevo.errors import UsageError
from spaceevo.extraction.finetune import FinetuneConfig, finetune_subnet
from spaceevo.extraction.front import FrontConfig

QUICK = FinetuneConfig(epochs=1, qat_epochs=1, steps_per_epoch=4, qat_steps_per_epoch=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(smoke_run) -> Path:
    """The shared smoke-trained supernet (tests copy it before writing)."""
    return smoke_run


def _copy(trained: Path, folder: Path) -> Path:
    return Path(shutil.copytree(trained, folder / "run"))


def _weights(path: str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_finetuning_writes_models_whose_onnx_runtime_top1_it_reports(trained, tmp_path) -> None:
    run = open_run(_copy(trained, tmp_path))
    datasets = run.load_data()
    subnet = run.space.min_subnet()
    result = finetune_subnet(run, subnet, QUICK, datasets, show_progress=False)
    assert result.subnet == subnet.encode() and (result.epochs, result.qat_epochs) == (1, 1)
    int8, fp32 = onnx.load(result.onnx_int8), onnx.load(result.onnx_fp32)
    onnx.checker.check_model(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in fp32.graph.node}
    meta = read_metadata(int8)
    assert meta["subnet"] == subnet.encode() and meta["quantization"] == "qat"
    assert json.loads(meta["finetune"])["lr"] == pytest.approx(run.config.lr * finetune_module.LR_FRACTION)
    assert engine_top1(int8, datasets.test, subnet.resolution) == pytest.approx(result.test_ort_int8_top1, abs=0.005)
    assert engine_top1(int8, datasets.heldout, subnet.resolution) == pytest.approx(result.heldout_int8_top1, abs=0.005)
    log = [json.loads(line) for line in (Path(result.onnx_int8).parent / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["fp32", "qat"] and all(r["heldout_top1"] is not None for r in log)


def test_a_finished_finetuning_is_reused_and_another_config_starts_its_own(trained, tmp_path, monkeypatch) -> None:
    run = open_run(_copy(trained, tmp_path))
    datasets = run.load_data()
    subnet = run.space.min_subnet()
    first = finetune_subnet(run, subnet, QUICK, datasets, show_progress=False)

    def no_training(*_, **__):
        raise AssertionError("a finished fine-tuning was trained again")

    monkeypatch.setattr(finetune_module.Engine, "run", no_training)
    assert finetune_subnet(run, subnet, QUICK, datasets, show_progress=False) == first
    other = FinetuneConfig(epochs=1, qat_epochs=1, steps_per_epoch=4, qat_steps_per_epoch=3, lr=0.002)
    with pytest.raises(AssertionError, match="trained again"):
        finetune_subnet(run, subnet, other, datasets, show_progress=False)


def test_an_interrupted_finetuning_resumes_to_the_weights_of_an_uninterrupted_one(trained, tmp_path, monkeypatch) -> None:
    reference_run = open_run(_copy(trained, tmp_path / "a"))
    subnet = reference_run.space.min_subnet()
    reference = finetune_subnet(reference_run, subnet, QUICK, reference_run.load_data(), show_progress=False)

    run = open_run(_copy(trained, tmp_path / "b"))
    datasets = run.load_data()
    evaluations = []
    real_top1 = finetune_module.top1

    def interrupted_after_the_first_epoch(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:  # the QAT epoch's evaluation: the FP32 epoch is checkpointed
            raise KeyboardInterrupt
        return real_top1(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "top1", interrupted_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune_subnet(run, subnet, QUICK, datasets, show_progress=False)
    monkeypatch.setattr(finetune_module, "top1", real_top1)
    resumed = finetune_subnet(run, subnet, QUICK, datasets, show_progress=False)
    expected, got = _weights(reference.onnx_int8), _weights(resumed.onnx_int8)
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    assert (resumed.heldout_int8_top1, resumed.test_ort_int8_top1) == (reference.heldout_int8_top1, reference.test_ort_int8_top1)


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(epochs=0, qat_epochs=0), dict(epochs=1, lr=0.0),
                                 dict(epochs=1, steps_per_epoch=0), dict(epochs=True)])
def test_bad_finetune_configs_are_usage_errors(bad) -> None:
    with pytest.raises(UsageError, match="fine-tun|epochs"):
        FinetuneConfig(**bad)


def test_extract_finetunes_every_answer_once_and_reports_both_figures(trained, tmp_path, monkeypatch, capsys) -> None:
    from spaceevo.extraction.api import extract_subnets

    _fake_latency.install(monkeypatch)
    run_dir = _copy(trained, tmp_path)
    result = extract_subnets(
        run_dir, num_budgets=2, preset=FrontConfig(trials=4, initial=3, heldout_images=64), verify=False,
        finetune=QUICK, show_progress=False,
    )
    tuned = [r.deployed().finetuned for r in result.results]
    assert all(t is not None and t.subnet == r.subnet for t, r in zip(tuned, result.results))
    folders = {Path(t.onnx_int8).parent for t in tuned}
    assert len(folders) == len({r.subnet for r in result.results})  # one fine-tuning per distinct subnet
    rows = list(csv.DictReader((run_dir / "extract" / "pareto.csv").open()))
    assert [float(row["finetuned_test_ort_int8_top1"]) for row in rows] == [t.test_ort_int8_top1 for t in tuned]
    assert all(row["heldout_int8_top1"] and row["finetuned_heldout_int8_top1"] for row in rows)
    assert result.to_dict()["results"][0]["finetuned"]["onnx_int8"] == tuned[0].onnx_int8


def test_cli_rejects_a_negative_finetune_epochs(trained, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--run", str(trained), "--finetune-epochs", "-1"])
    assert exit_info.value.code == 2 and "--finetune-epochs" in capsys.readouterr().err
