"""Simulated quantizers of the number formats (spaceevo.quant.quantizers): forward, straight-through
and scale gradients, the INT8 path being LSQ's own, and networks calibrated in a format."""

from __future__ import annotations

import pytest
import torch

from spaceevo.nn import Supernet
from spaceevo.quant.formats import get_format
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqWeightQuantizer
from spaceevo.quant.network import FormatConfig, calibrate_network, format_quantizers, quantize_network
from spaceevo.quant.qat import ReluQuantizer
from spaceevo.quant.quantizers import MxQuantizer, ScaledQuantizer, make_quantizer
from spaceevo.space import load_space


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp4_e2m1", "int4"])
def test_scaled_forward_is_the_format_rounding_of_x_over_s(name: str) -> None:
    fmt = get_format(name)
    quantizer = ScaledQuantizer(fmt, 3, weight=True)
    w = torch.randn(3, 4, 3, 3)
    quantizer.calibrate(torch.tensor([1.0, 2.0, 0.5]))
    y = quantizer(w)
    s = torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1) / fmt.max_value
    assert torch.equal(y, fmt.round(w / s) * s)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp6_e3m2", "int6"])
def test_gradients_are_straight_through_inside_and_lsq_for_the_scale(name: str) -> None:
    fmt = get_format(name)
    quantizer = ScaledQuantizer(fmt)
    quantizer.calibrate(torch.tensor(1.0))  # range [-1, 1]
    s = 1.0 / fmt.max_value
    x = torch.tensor([[0.3, -0.7, 0.05, 1.5, -2.0, 0.999]], requires_grad=True)
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y = quantizer(x)
    y.backward(grad)
    inside = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(x.grad, grad * inside)
    u = x.detach() / s
    q = fmt.round(u)
    expected = (grad * torch.where(inside.bool(), q - u, q)).sum() / (6 * fmt.max_value) ** 0.5
    assert torch.allclose(quantizer.scale.grad, expected, rtol=1e-5)


def test_scale_gradient_matches_a_finite_difference_of_the_clipped_part() -> None:
    """Beyond the range the output is exactly +-max * s, so d/ds is exactly +-max there."""
    fmt = get_format("fp8_e4m3")
    quantizer = ScaledQuantizer(fmt)
    quantizer.calibrate(torch.tensor(1.0))
    x = torch.tensor([[3.0, -5.0]])
    quantizer(x).sum().backward()
    assert torch.allclose(quantizer.scale.grad, torch.tensor(0.0) / (2 * fmt.max_value) ** 0.5)
    quantizer.scale.grad = None
    quantizer(torch.tensor([[3.0, 5.0]])).sum().backward()
    assert torch.allclose(quantizer.scale.grad, torch.tensor(2 * fmt.max_value) / (2 * fmt.max_value) ** 0.5)


def test_learning_the_scale_is_learning_the_exponent_bias() -> None:
    fmt = get_format("fp8_e4m3")
    quantizer = ScaledQuantizer(fmt, integer_bias=True)
    quantizer.calibrate(torch.tensor(3.0))  # s = 3 / 448, rounded to 2**-7
    assert quantizer.step().item() == 2.0**-7
    assert quantizer.exponent_bias.item() == fmt.bias + 7
    x = torch.randn(1, 100)
    # an integer-bias quantizer is the same format with that bias, unscaled
    shifted = get_format("fp8_e4m3_b14")
    assert torch.equal(quantizer(x), shifted.round(x).clamp(-fmt.max_value / 128, fmt.max_value / 128))
    quantizer(x.requires_grad_()).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.shape == ()


def test_mx_quantizer_blocks_weights_over_inputs_and_passes_gradients() -> None:
    fmt = get_format("mxfp4")
    weight = MxQuantizer(fmt, weight=True)
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    y = weight(w)
    assert torch.equal(y, fmt.quantize(w.detach().flatten(1), axis=1).view_as(w))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    act = MxQuantizer(fmt, weight=False)
    x = torch.randn(2, 64, 5, 5)
    assert torch.equal(act(x), fmt.quantize(x, axis=1))


def test_integer_formats_are_the_lsq_quantizers() -> None:
    int8 = get_format("int8")
    weight = make_quantizer(int8, "weight", 16)
    assert isinstance(weight, LsqWeightQuantizer) and weight.qmax == 127
    assert isinstance(make_quantizer(int8, "relu6"), ReluQuantizer)
    assert type(make_quantizer(int8, "activation")) is LsqActivationQuantizer
    assert make_quantizer(get_format("int4"), "weight", 16).qmax == 7
    per_tensor = make_quantizer(int8, "weight", 16, per_channel=False)
    assert isinstance(per_tensor, ScaledQuantizer) and per_tensor.channels is None
    # the same scales give the same values: int8 per channel through LSQ and through the format
    w = torch.randn(16, 8, 3, 3)
    scaled = ScaledQuantizer(int8, 16, weight=True)
    scaled.calibrate(w.flatten(1).abs().amax(1))
    weight.initialize(w)
    with torch.no_grad():
        assert torch.allclose(weight(w), scaled(w), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def static_net():
    torch.manual_seed(0)
    space = load_space("tiny-1111-0000")
    return Supernet(space).extract(space.min_subnet()).eval(), space.min_subnet().resolution


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "mxfp6_e2m3"])
def test_calibrated_networks_put_a_quantizer_at_every_point_and_stay_close_to_fp32(static_net, name: str) -> None:
    static, resolution = static_net
    net = quantize_network(static, FormatConfig.named(name))
    quantizers = format_quantizers(net)
    points = [m for m in static.modules() if type(m).__name__ == "QuantPoint"]
    assert len(quantizers) == len(points)
    batches = [torch.randn(8, 1, resolution, resolution) for _ in range(2)]
    assert calibrate_network(net, batches) == 16
    x = torch.randn(4, 1, resolution, resolution)
    with torch.no_grad():
        reference, quantized = static(x), net(x)
    assert not torch.equal(reference, quantized)
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(), quantized.flatten(), dim=0)
    assert cosine > 0.9
