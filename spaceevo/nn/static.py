"""Static (plain PyTorch) networks built from a resolved :class:`~spaceevo.space.Architecture`.

These are what gets exported and deployed. Every conv with BatchNorm is a :class:`ConvBN`
(conv, BN, activation), so BatchNorm folds into the conv at export and ONNX Runtime's QDQ fusion
sees the usual Conv→(Relu|Clip) patterns. The :class:`~spaceevo.nn.layers.QuantPoint` s mark the
tensors ONNX Runtime keeps in INT8 and sit under the same names as in the elastic supernet
(:mod:`spaceevo.quant.qat` documents the placement). Module names (``stages.<stage>.<block>``) are
the name scopes the latency engine uses to attribute ONNX nodes. A block's layers follow its
variant's declaration (:meth:`spaceevo.blocks.BlockVariant.layers`), in order.
"""

from __future__ import annotations

import torch
from torch import nn

from spaceevo.blocks import BlockSpec, Layer, se_channels, stacked_convs
from spaceevo.nn.layers import Activation, QuantizableConv2d, QuantizableLinear, QuantPoint, conv_batchnorm
from spaceevo.space import Architecture, HeadSpec


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


class DepthwiseStack(nn.Module):
    """A k x k depthwise conv realised as ``stacked_convs(k)`` 3x3 depthwise convs (K3 variants,
    faster than large kernels on some engines): conv + BN each, the first strided, the activation
    after the last only, so the stack stays one linear k x k filter before it."""

    def __init__(self, channels: int, kernel: int, stride: int, act: str):
        super().__init__()
        self.convs = nn.Sequential(
            *(ConvBN(channels, channels, 3, stride if i == 0 else 1, groups=channels) for i in range(stacked_convs(kernel)))
        )
        self.act = Activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x))


def build_layer(layer: Layer, spec: BlockSpec) -> nn.Module:
    """The static module of one declared layer of ``spec``'s block."""
    widths = spec.widths()
    cin, cout = widths[layer.cin], widths[layer.cout]
    if layer.se:
        return SqueezeExcite(cin, se_channels(cin))
    kernel = spec.kernel if layer.spatial else 1
    stride = spec.stride if layer.strided else 1
    act = spec.variant.activation if layer.act else "none"
    if layer.stacked:
        return DepthwiseStack(cin, kernel, stride, act)
    return ConvBN(cin, cout, kernel, stride, groups=cin if layer.depthwise else 1, act=act)


class Block(nn.Module):
    """One static block: a ``body`` of layers, an optional shortcut, and after the residual add its
    activation (ResNet) and quantization point, ``post_act``."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.body = nn.Sequential(*(build_layer(layer, spec) for layer in spec.variant.layers()))
        if spec.shortcut == "projection":
            self.shortcut = ConvBN(spec.in_channels, spec.out_channels, 1, spec.stride)
        else:
            self.shortcut = None
        self.has_residual = spec.shortcut != "none"
        self.post_act = Activation(spec.variant.post_add_activation) if self.has_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.has_residual:
            out = self.post_act(out + (self.shortcut(x) if self.shortcut is not None else x))
        return out


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
