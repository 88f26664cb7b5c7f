"""Analytical cost of blocks and networks: conv layers, MACs, parameters, activation sizes.

Computed from the :class:`~spaceevo.space.BlockSpec` alone (no module is built), so latency
models and block LUTs can evaluate thousands of configurations cheaply. The layer list mirrors
:func:`spaceevo.nn.static._body_layers`; tests check parameter counts against the built modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from spaceevo.nn.static import se_channels
from spaceevo.space import BlockSpec, HeadSpec, conv_output_size


@dataclass(frozen=True)
class ConvLayer:
    """One convolution (BatchNorm folded) as it runs: shapes and grouping."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    input_size: int
    bias: bool = True  # folded BN or explicit bias

    @property
    def output_size(self) -> int:
        return conv_output_size(self.input_size, self.stride)

    @property
    def macs(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel**2 * self.output_size**2

    @property
    def params(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * self.kernel**2 + (self.out_channels if self.bias else 0)

    @property
    def output_elements(self) -> int:
        return self.out_channels * self.output_size**2

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels


def block_layers(spec: BlockSpec) -> list[ConvLayer]:
    """The convolutions of a block (body, SE gate, projection shortcut) in execution order."""
    cin, cout, k, s, mid, h = (
        spec.in_channels,
        spec.out_channels,
        spec.kernel,
        spec.stride,
        spec.mid_channels,
        spec.input_size,
    )
    out = conv_output_size(h, s)
    kind = spec.block_type
    layers: list[ConvLayer]
    if kind == "conv":
        layers = [ConvLayer(cin, cout, k, s, 1, h)]
    elif kind == "mbv1_dual":
        layers = [
            ConvLayer(cin, cin, k, s, cin, h),
            ConvLayer(cin, cout, 1, 1, 1, out),
            ConvLayer(cout, cout, k, 1, cout, out),
            ConvLayer(cout, cout, 1, 1, 1, out),
        ]
    elif kind in ("mbv2", "mbv3_se"):
        layers = [ConvLayer(cin, mid, 1, 1, 1, h), ConvLayer(mid, mid, k, s, mid, h)]
        if spec.se:
            squeeze = se_channels(mid)
            layers += [ConvLayer(mid, squeeze, 1, 1, 1, 1), ConvLayer(squeeze, mid, 1, 1, 1, 1)]
        layers.append(ConvLayer(mid, cout, 1, 1, 1, out))
    elif kind in ("resnet", "resnet_se"):
        layers = [ConvLayer(cin, mid, 1, 1, 1, h), ConvLayer(mid, mid, k, s, 1, h), ConvLayer(mid, cout, 1, 1, 1, out)]
        if spec.se:
            squeeze = se_channels(cout)
            layers += [ConvLayer(cout, squeeze, 1, 1, 1, 1), ConvLayer(squeeze, cout, 1, 1, 1, 1)]
    elif kind == "fused_mbconv":
        layers = [ConvLayer(cin, mid, k, s, 1, h), ConvLayer(mid, cout, 1, 1, 1, out)]
    else:
        raise ValueError(f"unknown block type {kind!r}")
    if spec.shortcut == "projection":
        layers.append(ConvLayer(cin, cout, 1, s, 1, h))
    return layers


def head_layers(in_channels: int, input_size: int, head: HeadSpec, num_classes: int) -> list[ConvLayer]:
    """Head convolutions; the classifier is written as a 1x1 conv on the pooled 1x1 map."""
    return [
        ConvLayer(in_channels, head.widths[0], 1, 1, 1, input_size),
        ConvLayer(head.widths[0], head.widths[1], 1, 1, 1, 1),
        ConvLayer(head.widths[1], num_classes, 1, 1, 1, 1),
    ]


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    @property
    def mflops(self) -> float:
        """Millions of multiply-accumulates, the "FLOPs" convention of the NAS literature."""
        return self.macs / 1e6

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def layers_cost(layers: list[ConvLayer]) -> Cost:
    return Cost(macs=sum(layer.macs for layer in layers), params=sum(layer.params for layer in layers))


def block_cost(spec: BlockSpec) -> Cost:
    return layers_cost(block_layers(spec))

