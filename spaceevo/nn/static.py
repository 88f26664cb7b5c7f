"""Static (plain PyTorch) networks built from a resolved :class:`~spaceevo.space.Architecture`.

These are what gets exported and deployed. Every conv with BatchNorm is a :class:`ConvBN`
(conv, BN, activation), so BatchNorm folds into the conv at export and ONNX Runtime's QDQ fusion
sees the usual Conv→(Relu|Clip) patterns. The :class:`~spaceevo.nn.layers.QuantPoint` s mark the
tensors ONNX Runtime keeps in INT8 and sit under the same names as in the elastic supernet
(:mod:`spaceevo.quant.qat` documents the placement). Module names (``stages.<stage>.<block>``) are
the name scopes the latency engine uses to attribute ONNX nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from spaceevo.nn.layers import Activation, QuantizableConv2d, QuantizableLinear, QuantPoint, conv_batchnorm
from spaceevo.space import Architecture, BlockSpec, HeadSpec, make_divisible


class ConvBN(nn.Module):
    """Conv (same padding, no bias) + BatchNorm + :class:`~spaceevo.nn.layers.Activation`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str = "none",
    ):
        super().__init__()
        self.conv = QuantizableConv2d(
            in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = Activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(conv_batchnorm(self.bn, self.conv(x), x, self.conv.weight_quant))


class SqueezeExcite(nn.Module):
    """SE gate as in MobileNetV3: global pool, 1x1 reduce + ReLU, 1x1 expand + hardsigmoid, multiply."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_quant = QuantPoint()
        self.reduce = QuantizableConv2d(channels, squeeze, 1)
        self.act = Activation("relu")
        self.expand = QuantizableConv2d(squeeze, channels, 1)
        self.gate = Activation("hardsigmoid")
        self.out_quant = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool_quant(self.pool(x))))))
        return self.out_quant(x * scale)


def se_channels(channels: int) -> int:
    """Squeeze width of an SE gate on ``channels`` (a quarter, rounded to a multiple of 8)."""
    return make_divisible(channels / 4)


def post_add_activation(block_type: str, activation: str) -> Activation:
    """What follows a residual add: the ResNet blocks' activation, nothing for inverted residuals;
    either way with the quantization point of the sum."""
    return Activation(activation if block_type.startswith("resnet") else "none")


class Block(nn.Module):
    """One static block: a ``body`` of layers, an optional shortcut, and after the residual add its
    activation (ResNet) and quantization point, ``post_act``."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.body = nn.Sequential(*_body_layers(spec))
        if spec.shortcut == "projection":
            self.shortcut = ConvBN(spec.in_channels, spec.out_channels, 1, spec.stride)
        else:
            self.shortcut = None
        self.has_residual = spec.shortcut != "none"
        self.post_act = post_add_activation(spec.block_type, spec.activation) if self.has_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.has_residual:
            out = self.post_act(out + (self.shortcut(x) if self.shortcut is not None else x))
        return out


def _body_layers(spec: BlockSpec) -> list[nn.Module]:
    """The main path of each block type; the layer order is the elastic blocks' order too."""
    cin, cout, k, s, act, mid = (
        spec.in_channels,
        spec.out_channels,
        spec.kernel,
        spec.stride,
        spec.activation,
        spec.mid_channels,
    )
    kind = spec.block_type
    if kind == "conv":
        return [ConvBN(cin, cout, k, s, act=act)]
    if kind == "mbv1_dual":
        return [
            ConvBN(cin, cin, k, s, groups=cin, act=act),
            ConvBN(cin, cout, 1, act=act),
            ConvBN(cout, cout, k, 1, groups=cout, act=act),
            ConvBN(cout, cout, 1, act=act),
        ]
    if kind in ("mbv2", "mbv3_se"):
        layers: list[nn.Module] = [
            ConvBN(cin, mid, 1, act=act),
            ConvBN(mid, mid, k, s, groups=mid, act=act),
        ]
        if spec.se:
            layers.append(SqueezeExcite(mid, se_channels(mid)))
        layers.append(ConvBN(mid, cout, 1))
        return layers
    if kind in ("resnet", "resnet_se"):
        layers = [
            ConvBN(cin, mid, 1, act=act),
            ConvBN(mid, mid, k, s, act=act),
            ConvBN(mid, cout, 1),
        ]
        if spec.se:
            layers.append(SqueezeExcite(cout, se_channels(cout)))
        return layers
    if kind == "fused_mbconv":
        return [ConvBN(cin, mid, k, s, act=act), ConvBN(mid, cout, 1)]
    raise ValueError(f"unknown block type {kind!r}")


class Head(nn.Module):
    """1x1 conv + BN + act, global average pool, 1x1 conv + act, linear classifier.

    The feature-mix activation's output is quantized after the flatten, where ONNX Runtime puts it
    (as the classifier's input); the logits are quantized too, so the classifier runs as QGemm.
    """

    def __init__(self, in_channels: int, head: HeadSpec, num_classes: int):
        super().__init__()
        self.final_expand = ConvBN(in_channels, head.widths[0], 1, act=head.activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_quant = QuantPoint()
        self.feature_mix = QuantizableConv2d(head.widths[0], head.widths[1], 1)
        self.mix_act = mix_activation(head.activation)
        self.features_quant = QuantPoint()
        self.classifier = QuantizableLinear(head.widths[1], num_classes)
        self.logits_quant = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix_act(self.feature_mix(self.pool_quant(self.pool(self.final_expand(x)))))
        return self.logits_quant(self.classifier(self.features_quant(torch.flatten(x, 1))))


def mix_activation(name: str) -> Activation:
    """The head's feature-mix activation. HardSwish has no INT8 kernel and feeds the (unquantized)
    Flatten, so ONNX Runtime quantizes its output only after the flatten; the others' outputs are
    quantized where they are computed (fused Relu/Clip, the swish product)."""
    return Activation(name, quantize_output=name != "hswish")


class StaticNet(nn.Module):
    """A deployable network: ``stages[i][j]`` are the blocks of a subnet, then the head."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.input_quant = QuantPoint()
        self.stages = nn.ModuleList(nn.Sequential(*(Block(b) for b in stage)) for stage in arch.stages)
        self.head = Head(arch.final_channels, arch.head, arch.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_static(arch: Architecture) -> StaticNet:
    """Build the static network of a resolved subnet with freshly initialised weights."""
    return StaticNet(arch)
