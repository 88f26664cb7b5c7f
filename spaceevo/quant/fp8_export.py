"""FP8 QDQ ONNX export (E4M3FN, E5M2) of a network simulated in an FP8 format.

The exported graph computes what :func:`spaceevo.quant.network.quantize_network` simulates,
node for node: weights are stored as FP8 initializers (``FLOAT8E4M3FN`` / ``FLOAT8E5M2``) with
one float32 scale per output channel and a DequantizeLinear (``axis=0``); every quantized
activation is a QuantizeLinear (``saturate=1``) / DequantizeLinear pair with a per-tensor scale and
a zero point of the FP8 type (ONNX's way of naming the target type; its value is 0); biases stay
float32 (the layers compute in float between the DequantizeLinear and the next QuantizeLinear).
Float8 QuantizeLinear needs opset 19. The weight codes are :meth:`FloatFormat.round` of the weight
over its scale, and ONNX Runtime's QuantizeLinear rounds ``x / scale`` to nearest even with the same
saturation, so the simulation and the model share one format definition; what remains between
them is float summation order in the layers.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from spaceevo.errors import UsageError
from spaceevo.quant.export import export_fp32
from spaceevo.quant.formats import FloatFormat
from spaceevo.quant.network import format_quantizers
from spaceevo.quant.quantizers import ScaledQuantizer

__all__ = ["FP8_OPSET", "export_fp8", "FP8_FORMATS"]

#: The first opset with float8 QuantizeLinear / DequantizeLinear.
FP8_OPSET = 19

#: The formats this export writes: ONNX's float8 types (the registry's names).
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


class _QuantizeDequantize(torch.autograd.Function):
    """``s * fmt.round(x / s)``; exported as QuantizeLinear(saturate=1) + DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
        return fmt.round(x / scale) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, fmt: FloatFormat) -> Any:
        quantized = g.op("QuantizeLinear", x, scale, zero_point, saturate_i=1)
        return g.op("DequantizeLinear", quantized, scale, zero_point)


class _Dequantize(torch.autograd.Function):
    """FP8 weight codes times per-output-channel scales; exported as DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return codes.to(scale.dtype) * scale.view((-1,) + (1,) * (codes.dim() - 1))

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero_point: Any) -> Any:
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class _ActivationExport(nn.Module):
    def __init__(self, quantizer: ScaledQuantizer):
        super().__init__()
        self.fmt = quantizer.fmt
        self.register_buffer("scale", quantizer.step().float())
        self.register_buffer("zero_point", torch.zeros((), dtype=quantizer.fmt.torch_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.fmt)


class _WeightExport(nn.Module):
    def __init__(self, quantizer: ScaledQuantizer, weight: torch.Tensor):
        super().__init__()
        scale = quantizer.step().float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(weight.shape[0]).clone()
        grid = scale.view((-1,) + (1,) * (weight.dim() - 1))
        codes = quantizer.fmt.round(weight.detach().float() / grid)
        self.register_buffer("codes", codes.to(quantizer.fmt.torch_dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=quantizer.fmt.torch_dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(self.codes, self.scale, self.zero_point)

    def deployed_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias

    def folded_batchnorm(self, x: torch.Tensor, bn: nn.BatchNorm2d, channels: int) -> None:
        return None


def _check_fp8(model: nn.Module) -> None:
    """:class:`UsageError` unless every quantizer of ``model`` is a calibrated, enabled FP8 one."""
    quantizers = format_quantizers(model)
    if not quantizers:
        raise UsageError("the model has no quantizers: build it with quantize_network and an FP8 format")
    wrong = [
        f"{name} ({q.fmt.name if isinstance(q, ScaledQuantizer) else type(q).__name__})"
        for name, q in quantizers
        if not (isinstance(q, ScaledQuantizer) and isinstance(q.fmt, FloatFormat) and q.fmt.torch_dtype is not None)
    ]
    if wrong:
        raise UsageError(
            f"FP8 export needs every quantizer in an ONNX float8 format ({', '.join(FP8_FORMATS)}); "
            f"these are not: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}"
        )
    disabled = [name for name, q in quantizers if not q.enabled or not bool(q.initialized)]
    if disabled:
        raise UsageError(f"quantizers are off or not calibrated (calibrate_network first): {', '.join(disabled[:5])}")


def _relu_and_clip_as_min_max(proto: onnx.ModelProto) -> int:
    """Write every ``Relu(x)`` as ``Max(x, 0)`` and ``Clip(x, low, high)`` as ``Max(Min(x, high), low)``
    (the same values); returns how many nodes were rewritten.

    ONNX Runtime 1.32's QDQ optimisers (from the basic level on) get a Relu or Clip in front of a
    float8 QuantizeLinear wrong: ReluQuantFusion drops the Relu because the zero point is 0, right
    for uint8 (QuantizeLinear clamps at 0) but not for float8, which keeps negative values (measured:
    half of a ReLU conv's outputs changed); ClipQuantFusion fails the session's initialisation
    ("Unexpected data type for QuantizeLinear input y_zero_point of 17"). Min and Max are not fused.
    """
    zero = "spaceevo_fp8_relu_zero"
    nodes = []
    rewritten = 0
    for node in proto.graph.node:
        if node.op_type == "Relu":
            nodes.append(helper.make_node("Max", [node.input[0], zero], list(node.output), name=f"{node.name}_max"))
        elif node.op_type == "Clip" and len(node.input) == 3 and node.input[1] and node.input[2]:
            upper = f"{node.output[0]}_clip_upper"
            nodes.append(helper.make_node("Min", [node.input[0], node.input[2]], [upper], name=f"{node.name}_min"))
            nodes.append(helper.make_node("Max", [upper, node.input[1]], list(node.output), name=f"{node.name}_max"))
        else:
            nodes.append(node)
            continue
        rewritten += 1
    if rewritten:
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype=np.float32), zero))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return rewritten


def _exact_bias_codes(bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes and power-of-two scales (per element) whose product is exactly the float32 ``bias``:
    a float32 has a 24-bit significand, so ``b / 2**(floor(log2|b|) - 23)`` is an integer below 2**24."""
    _, exponent = np.frexp(bias.astype(np.float32))
    scale = np.ldexp(np.float32(1.0), (exponent - 24).astype(np.int32)).astype(np.float32)
    scale[bias == 0] = 1.0
    codes = (bias.astype(np.float64) / scale.astype(np.float64)).astype(np.int32)
    return codes, scale


def _biases_as_exact_dequantize(proto: onnx.ModelProto) -> int:
    """Store every float bias of a Conv / Gemm as int32 codes + DequantizeLinear that give back the
    exact float32 values; returns how many.

    ONNX Runtime 1.32's WeightBiasQuantization (basic level) otherwise quantizes a float bias of a
    layer with dequantized input and weight to int32 on the grid ``s_input * s_weight``, which
    overflows int32 for FP8's small scales (E5M2: ``max|x| / 57344`` each) and rounds the bias in
    any case; a bias that already comes from a DequantizeLinear is left alone.
    """
    initializers = {i.name: i for i in proto.graph.initializer}
    nodes = []
    rewritten = 0
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in initializers:
            name = node.input[2]
            bias = numpy_helper.to_array(initializers[name])
            codes, scale = _exact_bias_codes(bias)
            proto.graph.initializer.extend(
                [numpy_helper.from_array(codes, f"{name}_codes"), numpy_helper.from_array(scale, f"{name}_scale")]
            )
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_codes", f"{name}_scale"], [f"{name}_exact"],
                    name=f"{node.name}_bias_DequantizeLinear", axis=0,
                )
            )
            node.input[2] = f"{name}_exact"
            rewritten += 1
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    for initializer in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(initializer)
    return rewritten


def export_fp8(model: nn.Module, input_shape: Sequence[int]) -> onnx.ModelProto:
    """The FP8 QDQ ONNX model (opset 19) of a calibrated FP8 network from
    :func:`~spaceevo.quant.network.quantize_network`, for a fixed input shape."""
    _check_fp8(model)
    exported = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    weights = {
        id(module.weight_quant): (module, module.weight)
        for module in exported.modules()
        if isinstance(getattr(module, "weight_quant", None), ScaledQuantizer)
    }
    for name, quantizer in format_quantizers(exported):
        parent, _, child = name.rpartition(".")
        owner = weights.get(id(quantizer))
        replacement = _ActivationExport(quantizer) if owner is None else _WeightExport(quantizer, owner[1])
        setattr(exported.get_submodule(parent), child, replacement)
    proto = export_fp32(exported, input_shape, opset=FP8_OPSET)
    _relu_and_clip_as_min_max(proto)
    _biases_as_exact_dequantize(proto)
    onnx.checker.check_model(proto)
    return proto
