"""Tests of the LSQ+ fake-quantization primitives (spaceevo.quant.lsq): the forward is ONNX Runtime's
QDQ arithmetic, gradients follow LSQ/LSQ+, and the export path writes QDQ that ONNX Runtime runs."""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from spaceevo.quant.lsq import (
    LsqActivationQuantizer,
    LsqWeightQuantizer,
    export_mode,
    export_params,
    fold_bn_scales,
    set_quant_mode,
)

torch.set_num_threads(1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Reference STE rounding written independently of the module (detach trick)."""
    return (torch.round(x) - x).detach() + x


def initialised_activation(x: torch.Tensor, bits: int = 8) -> LsqActivationQuantizer:
    quantizer = LsqActivationQuantizer(bits).train()
    quantizer(x)
    return quantizer


def set_act_params(quantizer: LsqActivationQuantizer, scale: float, beta: float) -> None:
    with torch.no_grad():
        quantizer.scale.fill_(scale)
        quantizer.beta.fill_(beta)


class QConv(nn.Conv2d):
    """A conv whose weight goes through an LSQ weight quantizer."""

    def __init__(self, *args, reduce_range: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = LsqWeightQuantizer(self.out_channels, reduce_range=reduce_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_quant(self.weight), self.bias, self.stride, self.padding)


class QLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = LsqWeightQuantizer(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quant(self.weight), self.bias)


# --------------------------------------------------------------------------------------------
# Activations


def test_activation_forward_equals_formula_and_lies_on_grid():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * 2 + 0.5
    quantizer = initialised_activation(x)
    set_act_params(quantizer, 0.021, -1.3)  # a range that clips both ends of x
    out = quantizer(x)
    s, beta = 0.021, torch.tensor(-1.3)
    zp = torch.clamp(torch.round(-beta / s), 0, 255)
    expected = (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s
    assert torch.equal(out, expected)
    codes = out / s + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= 255
    assert out.unique().numel() <= 256
    assert (codes.round() == 0).any() and (codes.round() == 255).any()


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("beta", [0.0, -0.13, -9.0])  # zero point 0, inside the range, saturated at Qp
def test_activation_without_autograd_is_bit_identical_to_the_training_forward(bits, beta):
    """Evaluation and BN recalibration run under ``no_grad`` on the vectorised path; it must give
    exactly the codes of the autograd path (and of PyTorch's fake-quant kernel), ties and clipping included."""
    torch.manual_seed(1)
    s = 0.02
    ties = (torch.arange(-40, 300, dtype=torch.float32) + 0.5) * s  # exact halves between two codes
    x = torch.cat([ties, torch.randn(20_000) * 3]).reshape(4, -1)
    quantizer = initialised_activation(x, bits)
    set_act_params(quantizer, s, beta)
    with torch.enable_grad():
        trained = quantizer(x)
    with torch.no_grad():
        inferred = quantizer(x)
    zp = int(min(max(round(-beta / s), 0), quantizer.qmax))
    assert torch.equal(inferred, trained)
    assert torch.equal(inferred, torch.fake_quantize_per_tensor_affine(x, s, zp, 0, quantizer.qmax))


def test_activation_initialised_from_first_training_batch_only():
    x = torch.tensor([[-0.5, 0.25, 2.0], [1.0, 0.0, -0.25]])
    quantizer = initialised_activation(x)
    assert bool(quantizer.initialized)
    assert quantizer.scale.item() == pytest.approx(2.5 / 255)
    assert quantizer.beta.item() == pytest.approx(-0.5)
    quantizer(10 * x)
    assert quantizer.scale.item() == pytest.approx(2.5 / 255)

    positive = initialised_activation(torch.tensor([[0.5, 1.0, 2.0]]))  # range widened to contain 0
    assert positive.beta.item() == 0.0
    assert positive.scale.item() == pytest.approx(2.0 / 255)
    assert export_params(positive)[1].item() == 0

    restored = LsqActivationQuantizer()
    restored.load_state_dict(quantizer.state_dict())
    restored.train()(10 * x)
    assert restored.scale.item() == quantizer.scale.item()
    assert restored.beta.item() == quantizer.beta.item()


def test_uninitialised_activation_refuses_eval_mode():
    with pytest.raises(RuntimeError, match="not initialised"):
        LsqActivationQuantizer().eval()(torch.randn(2, 3))


def test_activation_ste_gradients():
    quantizer = initialised_activation(torch.randn(2, 64))
    set_act_params(quantizer, 0.01, -0.5)  # zero point 50, range [-0.5, 2.05]
    low, high = -0.5, 2.05
    inside = torch.linspace(low + 0.02, high - 0.02, 40)
    outside = torch.cat([torch.linspace(low - 1, low - 0.02, 12), torch.linspace(high + 0.02, high + 1, 12)])
    x = torch.cat([inside, outside]).view(2, 32).requires_grad_(True)
    upstream = torch.randn(2, 32)
    (quantizer(x) * upstream).sum().backward()
    grad = (x.grad / upstream).flatten()  # d x_hat / d x
    assert torch.allclose(grad[:40], torch.ones(40))
    assert torch.all(grad[40:] == 0)

    scale = torch.tensor(0.01, requires_grad=True)
    beta = torch.tensor(-0.5, requires_grad=True)
    zp = torch.clamp(round_ste(-beta / scale), 0, 255)
    reference = (torch.clamp(round_ste(x.detach() / scale) + zp, 0, 255) - zp) * scale
    (reference * upstream).sum().backward()
    g = 1 / math.sqrt(32 * 255)  # 32 elements per sample share the scale
    assert quantizer.scale.grad.abs() > 0 and quantizer.beta.grad.abs() > 0
    assert quantizer.scale.grad.item() == pytest.approx(g * scale.grad.item(), rel=1e-4)
    assert quantizer.beta.grad.item() == pytest.approx(g * beta.grad.item(), rel=1e-4)


@pytest.mark.parametrize("qmax, zero_point", [(255, 0.0), (255, 37.0), (255, 255.0), (15, 6.0)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("on_host", [True, False], ids=["host-qparams", "tensor-qparams"])
def test_activation_autograd_matches_pytorchs_learnable_fake_quant(qmax, zero_point, channels_last, on_host):
    """The vectorised LSQ+ op gives PyTorch's ``_fake_quantize_learnable_per_tensor_affine`` results:
    the same output and input gradient bit for bit, the same scale and zero-point gradients up to
    float summation order, with elements clamped on both sides; with the scale and zero point read
    as Python numbers (the CPU path) and kept as tensors (the GPU path, run here on CPU)."""
    from spaceevo.quant.lsq import _LsqPerTensorFakeQuant

    generator = torch.Generator().manual_seed(int(zero_point) + qmax)
    scale_value = 0.05
    x = torch.randn(4, 6, 5, 5, generator=generator) * scale_value * qmax / 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, generator=generator)
    results = []
    for op in ("pytorch", "ours"):
        xi = x.clone().requires_grad_(True)
        scale = torch.tensor([scale_value], requires_grad=True)
        zp = torch.tensor([zero_point], requires_grad=True)
        if op == "pytorch":
            y = torch._fake_quantize_learnable_per_tensor_affine(xi, scale, zp, 0, qmax, 1.0)
        else:
            y = _LsqPerTensorFakeQuant.apply(xi, scale, zp, qmax, on_host)
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, scale.grad, zp.grad))
    (y_ref, dx_ref, ds_ref, dz_ref), (y, dx, ds, dz) = results
    clamped = dx_ref == 0
    assert 0 < int(clamped.sum()) < x.numel()  # both regimes are exercised
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)
    assert ds.shape == ds_ref.shape and dz.shape == dz_ref.shape
    assert torch.allclose(ds, ds_ref, rtol=1e-4, atol=1e-3)
    assert torch.allclose(dz, dz_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("on_host", [True, False], ids=["host-qparams", "tensor-qparams"])
def test_activation_scale_gradient_at_rounding_ties_follows_the_forward(on_host):
    """At an exact tie ``x / s = k + 0.5`` the forward rounds ``x / s`` half to even before adding the
    zero point (ONNX QuantizeLinear's order), and the scale gradient ``c - x / s`` uses that same code
    ``c``. (PyTorch's learnable op rounds ``x / s + zp`` in its backward, so with an odd zero point
    its scale gradient at a tie belongs to the other code.)"""
    from spaceevo.quant.lsq import _LsqPerTensorFakeQuant

    scale_value = 0.05
    ratios = torch.tensor([0.5, 1.5, -2.5, 2.5])
    for ratio in ratios:
        x = (ratio * scale_value).reshape(1, 1).requires_grad_(True)
        scale = torch.tensor([scale_value], requires_grad=True)
        zp = torch.tensor([37.0], requires_grad=True)
        u = float(x.detach() * torch.reciprocal(scale.detach()))
        assert u == float(ratio)  # an exact tie
        y = _LsqPerTensorFakeQuant.apply(x, scale, zp, 255, on_host)
        y.sum().backward()
        code = round(float(ratio))  # Python rounds half to even
        assert float(y.detach()) == pytest.approx(code * scale_value, abs=1e-6)
        assert float(scale.grad) == pytest.approx(code - u, abs=1e-6)


def test_disabled_quantizers_are_identity():
    model = nn.Sequential(LsqActivationQuantizer(), QLinear(4, 3), LsqActivationQuantizer())
    x = torch.randn(5, 4)
    model.train()(x)
    assert set_quant_mode(model, False) == 3
    assert torch.equal(model(x), F.linear(x, model[1].weight, model[1].bias))
    assert model[0](x) is x
    set_quant_mode(model, True)
    assert not torch.equal(model(x), F.linear(x, model[1].weight, model[1].bias))


# --------------------------------------------------------------------------------------------
# Weights


def test_weight_init_and_forward():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    quantizer = LsqWeightQuantizer(8)
    out = quantizer(weight)
    scale = weight.flatten(1).abs().amax(1) / 127
    assert torch.allclose(export_params(quantizer)[0], scale)
    assert bool(quantizer.initialized.all())
    codes = out / scale.view(8, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().abs().amax(dim=(1, 2, 3)).eq(127).all()
    assert torch.equal(out, torch.round(weight * (1 / scale.view(8, 1, 1, 1))) * scale.view(8, 1, 1, 1))


def test_weight_max_init_beats_lsq_init_on_kaiming_conv():
    torch.manual_seed(0)
    weight = nn.Conv2d(32, 64, 3).weight.detach()  # PyTorch's default Kaiming-uniform init
    quantizer = LsqWeightQuantizer(64)
    max_rule_error = (quantizer(weight) - weight).pow(2).mean()
    flat = weight.flatten(1)
    lsq_scale = (2 * flat.abs().mean(1) / math.sqrt(127)).view(64, 1, 1, 1)
    lsq_rule = torch.clamp(torch.round(weight / lsq_scale), -127, 127) * lsq_scale
    assert max_rule_error < (lsq_rule - weight).pow(2).mean() / 10


def test_weight_slicing_uses_leading_scales():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 5, 5)
    quantizer = LsqWeightQuantizer(16)
    full = quantizer(weight)
    with torch.no_grad():
        quantizer.scale.mul_(torch.linspace(0.5, 1.0, 16))  # distinct learned scales
    full = quantizer(weight)
    assert torch.equal(quantizer(weight[:6]), full[:6])
    assert torch.equal(quantizer(weight[:6, :4]), full[:6, :4])
    assert torch.equal(quantizer(weight[:6, :, 1:4, 1:4]), full[:6, :, 1:4, 1:4])
    assert export_params(quantizer, 6)[0].shape == (6,)
    with pytest.raises(ValueError):
        quantizer(torch.randn(17, 8, 1, 1))


def test_weight_channels_initialise_on_first_use():
    torch.manual_seed(0)
    weight = torch.randn(8, 3)
    quantizer = LsqWeightQuantizer(8)
    quantizer(weight[:4] * 2)
    assert quantizer.initialized.tolist() == [True] * 4 + [False] * 4
    quantizer(weight)
    expected = torch.cat([(weight[:4] * 2).abs().amax(1), weight[4:].abs().amax(1)]) / 127
    assert torch.allclose(export_params(quantizer)[0], expected)
    restored = LsqWeightQuantizer(8)
    restored.load_state_dict(quantizer.state_dict())
    restored(weight * 5)
    assert torch.equal(restored.scale, quantizer.scale)


def test_weight_ste_gradients():
    torch.manual_seed(0)
    quantizer = LsqWeightQuantizer(4)
    quantizer(torch.randn(4, 3, 3, 3))
    with torch.no_grad():
        quantizer.scale.fill_(0.01)  # range +-1.27
    weight = torch.cat([torch.rand(4, 3, 3, 2) * 2.4 - 1.2, torch.rand(4, 3, 3, 1) + 1.4], dim=3)
    weight.requires_grad_(True)
    upstream = torch.randn(4, 3, 3, 3)
    (quantizer(weight) * upstream).sum().backward()
    grad = weight.grad / upstream  # d w_hat / d w
    assert torch.allclose(grad[..., :2], torch.ones(4, 3, 3, 2))
    assert torch.all(grad[..., 2] == 0)

    scale = torch.full((4, 1, 1, 1), 0.01, requires_grad=True)
    reference = torch.clamp(round_ste(weight.detach() / scale), -127, 127) * scale
    (reference * upstream).sum().backward()
    g = 1 / math.sqrt(27 * 127)  # 27 weights per output channel share a scale
    assert torch.all(quantizer.scale.grad != 0)
    assert torch.allclose(quantizer.scale.grad, g * scale.grad.flatten(), rtol=1e-4)


def test_reduce_range_limits_codes():
    torch.manual_seed(0)
    weight = torch.randn(8, 16, 3, 3)
    quantizer = LsqWeightQuantizer(8, reduce_range=True)
    quantizer(weight)
    with torch.no_grad():
        quantizer.scale.mul_(0.5)  # clip: codes would reach +-126 without the 7-bit range
    codes = (quantizer(weight) / export_params(quantizer)[0].view(8, 1, 1, 1)).round()
    assert codes.min() >= -64 and codes.max() <= 63
    assert codes.abs().max() == 63


# --------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("bits", [8, 4])
def test_export_mode_equals_training_mode(bits):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6) * 3
    activation = initialised_activation(x, bits)
    set_act_params(activation, 0.0137, -0.6)
    weight = torch.randn(6, 3, 3, 3)
    weights = LsqWeightQuantizer(6, bits=bits)
    weights(weight)
    with torch.no_grad():
        weights.scale.mul_(0.6)  # some weights clip
    expected = activation(x), weights(weight)
    with export_mode(activation), export_mode(weights):
        assert torch.equal(activation(x), expected[0])
        assert torch.equal(weights(weight), expected[1])
    activation(x).sum().backward()  # the training forward is back: gradients reach the scale again
    assert activation.scale.grad is not None


def test_export_mode_rounds_ties_like_training_half_to_even():
    activation = initialised_activation(torch.randn(4, 4))
    set_act_params(activation, 0.125, -2.0)  # zero point 16; x * 8 is exact, so these are exact ties
    ties = (torch.arange(-20, 260, dtype=torch.float32) + 0.5) * 0.125
    weights = LsqWeightQuantizer(1)
    weights.initialize(torch.ones(1, 1))
    with torch.no_grad():
        weights.scale.fill_(2.0**-6)
    weight_ties = ((torch.arange(-130, 130, dtype=torch.float32) + 0.5) * 2.0**-6).view(1, -1)
    trained = activation(ties), weights(weight_ties)
    with export_mode(activation), export_mode(weights):
        assert torch.equal(activation(ties), trained[0])
        assert torch.equal(weights(weight_ties), trained[1])
    assert trained[0][20].item() == 0.0  # 0.5 -> 0
    assert trained[0][21].item() == 0.25  # 1.5 -> 2
    assert trained[1][0, 130].item() == 0.0 and trained[1][0, 131].item() == 2 * 2.0**-6


def test_export_params():
    activation = initialised_activation(torch.tensor([[-1.0, 3.0]]))
    scale, zero_point = export_params(activation)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert scale.item() == pytest.approx(4 / 255) and zero_point.item() == 64
    weights = LsqWeightQuantizer(5)
    weights(torch.randn(5, 2))
    scale, zero_point = export_params(weights, 3)
    assert scale.shape == (3,) and zero_point.dtype == torch.int32 and not zero_point.any()
    with pytest.raises(ValueError):
        export_params(activation, 3)


def _export(model: nn.Module, x: torch.Tensor) -> tuple[onnx.ModelProto, torch.Tensor]:
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model(x)
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, opset_version=17, input_names=["input"], output_names=["output"]
        )
    return onnx.load_from_string(buffer.getvalue()), reference


def _constant(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of an initializer or Constant node output; StopIteration if ``name`` is computed."""
    for initializer in proto.graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    node = next(n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(node.attribute[0].t)


def _run(proto: onnx.ModelProto, x: torch.Tensor, level: ort.GraphOptimizationLevel, path=None) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if path is not None:
        options.optimized_model_filepath = str(path)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_onnx_export_writes_qdq_that_onnxruntime_runs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8) * 2 + 0.5
    # 7-bit weights: this reference host is AVX2 without VNNI, where ORT's fused U8S8 conv saturates
    model = nn.Sequential(
        LsqActivationQuantizer(), QConv(3, 8, 3, padding=1, reduce_range=True), nn.ReLU(), LsqActivationQuantizer()
    )
    model.train()(x)
    model.eval()
    proto, reference = _export(model, x)

    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 3
    assert proto.graph.node[-1].op_type == "DequantizeLinear"
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":  # static scale and zero point, as ORT's QDQ fusion needs
            assert _constant(proto, node.input[1]).dtype == np.float32
            assert _constant(proto, node.input[2]).dtype in (np.uint8, np.int8)
    weight_q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and "weight_quant" in n.name)
    assert [a.i for a in weight_q.attribute if a.name == "axis"] == [0]
    zero_point = _constant(proto, weight_q.input[2])
    assert zero_point.dtype == np.int8 and zero_point.shape == (8,) and not zero_point.any()

    exact = _run(proto, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(exact, reference.numpy(), rtol=0, atol=1e-5)

    fused = _run(proto, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "optimized.onnx")
    assert "QLinearConv" in {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    step = export_params(model[3])[0].item()
    difference = np.abs(fused - reference.numpy())
    assert difference.max() <= step * 1.001  # integer requantization may move a value by one step
    assert (difference > 1e-5).mean() < 0.01


def test_bn_folding_commutes_with_per_channel_quantization():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(8))  # about half negative: codes flip sign
        bn.bias.copy_(torch.randn(8))
        bn.running_mean.copy_(torch.randn(8) * 0.1)
        bn.running_var.copy_(torch.rand(8) + 0.5)
    quantizer = LsqWeightQuantizer(8)
    quantizer(conv.weight)
    with torch.no_grad():
        quantizer.scale.mul_(0.7)  # clip some weights, so the -127/+127 ends are exercised
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        unfolded = bn(F.conv2d(x, quantizer(conv.weight), padding=1))

        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded_weight = conv.weight * factor.view(8, 1, 1, 1)
        folded_bias = bn.bias - bn.running_mean * factor
        folded_scale = fold_bn_scales(export_params(quantizer)[0], bn)
        folded_quantizer = LsqWeightQuantizer.from_scales(folded_scale)
        quantized = folded_quantizer(folded_weight)
        folded = F.conv2d(x, quantized, folded_bias, padding=1)

    codes = quantized / folded_scale.view(8, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max().round() == 127
    original_codes = (quantizer(conv.weight) / export_params(quantizer)[0].view(8, 1, 1, 1)).round()
    assert torch.equal(codes.round(), original_codes * factor.sign().view(8, 1, 1, 1))
    assert torch.allclose(folded, unfolded, atol=1e-5)


def test_qat_reduces_loss_on_toy_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    with torch.no_grad():
        target = nn.Linear(16, 4)(x)
    model = nn.Sequential(LsqActivationQuantizer(), QLinear(16, 4), LsqActivationQuantizer()).train()
    loss = F.mse_loss(model(x), target)  # initialises the quantizers
    start = {name: p.detach().clone() for name, p in model.named_parameters() if "scale" in name or "beta" in name}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    assert set(start) == {"0.scale", "0.beta", "1.weight_quant.scale", "2.scale", "2.beta"}
    for name, parameter in model.named_parameters():
        if name in start:
            assert not torch.equal(parameter, start[name]), name


def test_bench_lsq_reports_both_ops_and_their_ratio():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_lsq.py"
    done = subprocess.run(
        [sys.executable, str(script), "--threads", "1", "--rounds", "1", "--repeats", "1"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [row["shape"][1] for row in report["results"]] == [96, 192, 384, 128]
    for row in report["results"]:
        assert row["pytorch_ms"] > 0 and row["ours_ms"] > 0
        assert row["speedup_range"][0] <= row["speedup_median"] <= row["speedup_range"][1]
