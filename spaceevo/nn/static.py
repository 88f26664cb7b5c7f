"""Static (plain PyTorch) networks built from a resolved :class:`~spaceevo.space.Architecture`.

These are what gets exported and deployed. Every block is a composition of
:class:`torchvision.ops.Conv2dNormActivation` layers, so BatchNorm folds into the conv at export and
ONNX Runtime's QDQ fusion sees the usual Conv→(Relu|Clip) patterns. Module names
(``stages.<stage>.<block>``) are the name scopes the latency engine uses to attribute ONNX nodes.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from spaceevo.nn.layers import activation
from spaceevo.space import Architecture, BlockSpec, HeadSpec, make_divisible


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: str = "none",
) -> Conv2dNormActivation:
    """Conv (same padding, no bias) + BatchNorm + optional activation."""
    return Conv2dNormActivation(
        in_channels,
        out_channels,
        kernel_size=kernel,
        stride=stride,
        groups=groups,
        norm_layer=nn.BatchNorm2d,
        activation_layer=None if act == "none" else (lambda inplace=True: activation(act)),
        inplace=None,
    )


class SqueezeExcite(nn.Module):
    """SE gate as in MobileNetV3: global pool, 1x1 reduce + ReLU, 1x1 expand + hardsigmoid, multiply."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * scale


def se_channels(channels: int) -> int:
    """Squeeze width of an SE gate on ``channels`` (a quarter, rounded to a multiple of 8)."""
    return make_divisible(channels / 4)


class Block(nn.Module):
    """One static block: a ``body`` of layers, an optional shortcut, an optional post-add activation."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        self.body = nn.Sequential(*_body_layers(spec))
        if spec.shortcut == "projection":
            self.shortcut = conv_bn(spec.in_channels, spec.out_channels, 1, spec.stride)
        else:
            self.shortcut = None
        self.has_residual = spec.shortcut != "none"
        resnet = spec.block_type.startswith("resnet")
        self.post_act = activation(spec.activation) if resnet else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.has_residual:
            out = out + (self.shortcut(x) if self.shortcut is not None else x)
        if self.post_act is not None:
            out = self.post_act(out)
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
        return [conv_bn(cin, cout, k, s, act=act)]
    if kind == "mbv1_dual":
        return [
            conv_bn(cin, cin, k, s, groups=cin, act=act),
            conv_bn(cin, cout, 1, act=act),
            conv_bn(cout, cout, k, 1, groups=cout, act=act),
            conv_bn(cout, cout, 1, act=act),
        ]
    if kind in ("mbv2", "mbv3_se"):
        layers: list[nn.Module] = [
            conv_bn(cin, mid, 1, act=act),
            conv_bn(mid, mid, k, s, groups=mid, act=act),
        ]
        if spec.se:
            layers.append(SqueezeExcite(mid, se_channels(mid)))
        layers.append(conv_bn(mid, cout, 1))
        return layers
    if kind in ("resnet", "resnet_se"):
        layers = [
            conv_bn(cin, mid, 1, act=act),
            conv_bn(mid, mid, k, s, act=act),
            conv_bn(mid, cout, 1),
        ]
        if spec.se:
            layers.append(SqueezeExcite(cout, se_channels(cout)))
        return layers
    if kind == "fused_mbconv":
        return [conv_bn(cin, mid, k, s, act=act), conv_bn(mid, cout, 1)]
    raise ValueError(f"unknown block type {kind!r}")


class Head(nn.Module):
    """1x1 conv + BN + act, global average pool, 1x1 conv + act, linear classifier."""

    def __init__(self, in_channels: int, head: HeadSpec, num_classes: int):
        super().__init__()
        self.final_expand = conv_bn(in_channels, head.widths[0], 1, act=head.activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_mix = nn.Sequential(nn.Conv2d(head.widths[0], head.widths[1], 1), activation(head.activation))
        self.classifier = nn.Linear(head.widths[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_mix(self.pool(self.final_expand(x)))
        return self.classifier(torch.flatten(x, 1))


class StaticNet(nn.Module):
    """A deployable network: ``stages[i][j]`` are the blocks of a subnet, then the head."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.stages = nn.ModuleList(nn.Sequential(*(Block(b) for b in stage)) for stage in arch.stages)
        self.head = Head(arch.final_channels, arch.head, arch.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_static(arch: Architecture) -> StaticNet:
    """Build the static network of a resolved subnet with freshly initialised weights."""
    return StaticNet(arch)
