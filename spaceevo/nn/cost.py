"""Analytical cost of blocks and networks: conv layers, MACs, parameters, activation sizes.

Computed from the :class:`~spaceevo.blocks.BlockSpec` alone (no module is built), so latency
models and block LUTs can evaluate thousands of configurations cheaply. The layers are the variant's
declared ones (:meth:`spaceevo.blocks.BlockVariant.layers`), as the static network builds them;
tests check parameter counts against the built modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from spaceevo.blocks import BlockSpec, conv_output_size, se_channels, stacked_convs
from spaceevo.space import HeadSpec


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
    """The convolutions of a block (body, SE gates, projection shortcut) in execution order, from
    its variant's declared layers: a stacked depthwise layer is its 3x3 convs, an SE gate its two
    1x1 convs on the pooled map."""
    widths = spec.widths()
    size, layers = spec.input_size, []
    for layer in spec.variant.layers():
        cin, cout = widths[layer.cin], widths[layer.cout]
        if layer.se:
            squeeze = se_channels(cin)
            layers += [ConvLayer(cin, squeeze, 1, 1, 1, 1), ConvLayer(squeeze, cin, 1, 1, 1, 1)]
            continue
        stride = spec.stride if layer.strided else 1
        groups = cin if layer.depthwise else 1
        if layer.stacked:
            for index in range(stacked_convs(spec.kernel)):
                layers.append(ConvLayer(cin, cout, 3, stride if index == 0 else 1, groups, size))
                size = conv_output_size(size, stride if index == 0 else 1)
            continue
        layers.append(ConvLayer(cin, cout, spec.kernel if layer.spatial else 1, stride, groups, size))
        size = conv_output_size(size, stride)
    if spec.shortcut == "projection":
        layers.append(ConvLayer(spec.in_channels, spec.out_channels, 1, spec.stride, 1, spec.input_size))
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

