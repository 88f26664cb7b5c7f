"""Small building pieces shared by static and elastic blocks: quantization points, activations, and
convs/linears whose weights pass through a quantization point.

A :class:`QuantPoint` marks a tensor that ONNX Runtime's INT8 graph holds quantized. It is the
identity, so FP32 networks compute and export exactly as without it;
:func:`spaceevo.quant.qat.prepare_qat` replaces every point by an LSQ+ quantizer of its ``kind``.
Static and elastic networks put their points under the same module names, which is how a subnet
extracted from a quantization-aware supernet finds its quantizers.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spaceevo.nn.depthwise import conv2d

# ReLU6 and Hardswish run out of place: with autograd their in-place ops clone the input first and
# then compute out of place (``hardtanh_``, ``hardswish_``), one more pass over the activation than
# the out-of-place op; ReLU's in-place op does not.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
    "swish": nn.Sigmoid,  # the gate of x * sigmoid(x), see :class:`Activation`
    "hardsigmoid": nn.Hardsigmoid,  # the SE gate
    "none": nn.Identity,
}

#: Activations that ONNX Runtime fuses into the requantization of the op producing their input
#: (Relu/Clip followed by QuantizeLinear with zero point 0): their input is never quantized.
FUSED_ACTIVATIONS = ("relu", "relu6", "none")

#: Kinds of quantization point: unsigned per-tensor activations with a learned offset, the outputs
#: of ReLU / ReLU6 (zero point 0 so that ONNX Runtime can drop the Relu / Clip), and signed
#: per-output-channel weights.
QUANT_KINDS = ("activation", "relu", "relu6", "weight")


class QuantPoint(nn.Identity):
    """Where deployment quantizes a tensor: the identity until ``prepare_qat`` puts a quantizer here.

    ``channels`` is the number of output channels of a ``weight`` point (its per-channel scales).
    """

    def __init__(self, kind: str = "activation", channels: int = 0):
        super().__init__()
        if kind not in QUANT_KINDS:
            raise ValueError(f"unknown quantization point kind {kind!r}; allowed: {', '.join(QUANT_KINDS)}")
        if (kind == "weight") != (channels > 0):
            raise ValueError("a weight point needs its number of output channels, an activation point none")
        self.kind = kind
        self.channels = channels

    def deployed_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias a layer whose weight passes here adds: ``bias`` itself in FP32. A weight quantizer
        rounds it to its int32 grid in eval mode, as deployment does."""
        return bias

    def folded_batchnorm(
        self, x: torch.Tensor, bn: nn.BatchNorm2d, channels: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None in FP32: the conv is followed by ``bn`` as it is. A weight quantizer returns the
        deployed per-channel factor and int32-rounded bias of the folded BatchNorm in eval mode."""
        return None

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f", channels={self.channels}" if self.channels else "")


class Activation(nn.Module):
    """An activation with the quantization points ONNX Runtime's INT8 (QDQ) graph has around it.

    * ``relu``, ``relu6``, ``none``: one point on the output (Conv/Add→Relu→QuantizeLinear fuses).
    * ``hswish``, ``hardsigmoid``: no INT8 kernel, ORT runs DequantizeLinear→op→QuantizeLinear, so
      the input and the output are quantized.
    * ``swish``: ``x * sigmoid(x)`` with the input, the sigmoid and the product quantized.

    ``quantize_output=False`` leaves the output of a float-only activation unquantized, for a consumer
    that is itself not quantized (the head's Flatten, whose output the classifier quantizes).
    """

    def __init__(self, name: str, quantize_output: bool = True):
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(_ACTIVATIONS)}")
        fused = name in FUSED_ACTIVATIONS
        if fused and not quantize_output:
            raise ValueError(f"{name} is fused into the quantization of its output, which must stay")
        self.name = name
        self.in_quant = None if fused else QuantPoint()
        self.fn = _ACTIVATIONS[name]()
        self.gate_quant = QuantPoint() if name == "swish" else None
        kind = name if name in ("relu", "relu6") else "activation"
        self.out_quant = QuantPoint(kind) if quantize_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        x = x * self.gate_quant(self.fn(x)) if self.gate_quant is not None else self.fn(x)
        return x if self.out_quant is None else self.out_quant(x)

    def extra_repr(self) -> str:
        return self.name


class QuantizableConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` whose weight passes through a per-output-channel quantization point."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = QuantPoint("weight", self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_quant(self.weight), self.weight_quant.deployed_bias(x, self.bias)
        if self.padding_mode != "zeros" or self.dilation != (1, 1) or isinstance(self.padding, str):
            return self._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.groups)


class QuantizableLinear(nn.Linear):
    """:class:`torch.nn.Linear` whose weight passes through a per-output-channel quantization point."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = QuantPoint("weight", self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quant(self.weight), self.weight_quant.deployed_bias(x, self.bias))


def conv_batchnorm(
    bn: nn.Module, conv_out: torch.Tensor, conv_in: torch.Tensor, weight_quant: nn.Module
) -> torch.Tensor:
    """``bn(conv_out)``; in an eval-mode quantization-aware network, the deployed arithmetic instead:
    BN folded into the conv, its bias on the int32 grid (:meth:`QuantPoint.folded_batchnorm`).
    ``conv_in`` is the conv's input, ``weight_quant`` its weight's quantization point; ``bn`` may be
    an Identity where BN is already folded into the conv (the export's network)."""
    folded = None
    if isinstance(bn, nn.BatchNorm2d):
        folded = weight_quant.folded_batchnorm(conv_in, bn, conv_out.shape[1])
    if folded is None:
        return bn(conv_out)
    factor, bias = folded
    return torch.addcmul(bias.view(1, -1, 1, 1), conv_out, factor.view(1, -1, 1, 1))
