"""Mixed INT8/FP32 subnets: float stages switch off exactly their quantizers (the boundary to an INT8
consumer stays quantized), export as one ONNX model that ONNX Runtime runs as PyTorch computes it,
with INT8 kernels outside the float stages and float convs inside them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from test_qat import QatCase, _optimized_ops, _ort_logits, build_case, measure

from spaceevo.errors import UsageError
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqQuantizer, LsqWeightQuantizer
from spaceevo.quant.mixed import keep_stages_float, stage_output_quantizers
from spaceevo.quant.qat import export_int8, fold_for_int8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def case() -> QatCase:
    """A QAT subnet of MobileNetV3-style stages (hard-swish, squeeze-excite)."""
    return build_case("tiny-2222-0000")


def _enabled(model: torch.nn.Module) -> dict[str, bool]:
    return {name: m.enabled for name, m in model.named_modules() if isinstance(m, LsqQuantizer)}


def test_float_stage_switches_off_its_quantizers_but_its_output_to_an_int8_consumer(case: QatCase):
    outputs = stage_output_quantizers(case.static)
    assert len(outputs) == len(case.static.stages) >= 3
    for index, name in enumerate(outputs):
        assert name.startswith(f"stages.{index}.")
        assert isinstance(dict(case.static.named_modules())[name], LsqActivationQuantizer)

    before = _enabled(case.static)
    assert all(before.values())
    single = _enabled(keep_stages_float(case.static, [1]))
    switched_off = {name for name, on in single.items() if not on}
    in_stage_1 = {name for name in before if name.startswith("stages.1.")}
    assert switched_off == in_stage_1 - {outputs[1]}
    assert any(isinstance(dict(case.static.named_modules())[n], LsqWeightQuantizer) for n in switched_off)
    assert _enabled(case.static) == before, "the model itself is left unchanged"

    pair = _enabled(keep_stages_float(case.static, [1, 2]))
    assert not pair[outputs[1]], "a float stage feeding a float stage is not quantized in between"
    assert pair[outputs[2]]
    assert not keep_stages_float(case.static, [0]).input_quant.enabled


def test_mixed_export_runs_in_onnxruntime_as_pytorch_computes_it(case: QatCase, tmp_path: Path):
    shape = (1, 1, case.subnet.resolution, case.subnet.resolution)
    all_int8 = export_int8(case.static, None, shape)
    mixed = export_int8(case.static, None, shape, float_stages=[1])
    with torch.no_grad():
        ours = fold_for_int8(case.static, [1])(case.x).numpy()
        int8_twin = fold_for_int8(case.static)(case.x).numpy()
    theirs = _ort_logits(mixed, case.x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    agreement = measure(ours, theirs, case.logit_step)
    assert agreement["argmax"] >= 0.99 and agreement["mean_steps"] <= 0.25, agreement
    assert abs(ours - int8_twin).max() > case.logit_step, "the float stage changes the arithmetic"

    def quantize_nodes(proto) -> int:
        return Counter(node.op_type for node in proto.graph.node)["QuantizeLinear"]

    assert quantize_nodes(mixed) < quantize_nodes(all_int8)
    mixed_ops = _optimized_ops(mixed, tmp_path / "mixed.onnx")
    int8_ops = _optimized_ops(all_int8, tmp_path / "int8.onnx")
    float_convs = mixed_ops["Conv"] + mixed_ops["FusedConv"]
    assert float_convs > 0 and int8_ops["Conv"] + int8_ops["FusedConv"] == 0
    assert 0 < mixed_ops["QLinearConv"] < int8_ops["QLinearConv"]


def test_float_stages_must_exist(case: QatCase):
    with pytest.raises(UsageError, match=r"float stages \[7\] do not exist: the subnet has stages 0\.\.\d"):
        keep_stages_float(case.static, [1, 7])
