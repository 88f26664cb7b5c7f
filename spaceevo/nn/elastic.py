"""Elastic (weight-sharing) layers and blocks of the supernet.

Every elastic layer allocates its weights once, at the largest size any subnet of the candidate
space can ask for, and a subnet uses *leading slices* of them: the first ``c`` input/output channels
and the centred ``k x k`` crop of the largest kernel (as in Once-for-All). Sharing the leading slices
is what lets one training run serve every subnet.

Each elastic piece can hand back its static twin (``to_static``) with *copied* weight slices, so a
subnet extracted from the supernet is a plain :mod:`spaceevo.nn.static` network that computes exactly
what the supernet computed on that path. Quantization points
(:class:`~spaceevo.nn.layers.QuantPoint`) sit under the same names as in the static twins; a weight
point is allocated for the largest output width and quantizes the active slice.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spaceevo.nn.depthwise import conv2d
from spaceevo.nn.layers import Activation, QuantizableConv2d, QuantizableLinear, QuantPoint, conv_batchnorm
from spaceevo.blocks import BlockSpec, Layer, se_channels, stacked_convs
from spaceevo.nn.static import Block, ConvBN, DepthwiseStack, Head, SqueezeExcite, mix_activation
from spaceevo.space import HeadSpec, StageChoices


def _copy(target: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``target``'s own storage (strict: names and shapes must match)."""
    target.load_state_dict(tensors, strict=True)


class ElasticConv2d(nn.Module):
    """A conv whose active input/output channels and kernel are chosen per call.

    The weight is ``(max_out, max_in, K, K)`` (``(max_channels, 1, K, K)`` when depthwise); a call uses
    ``weight[:out, :in]`` cropped to the centred ``k x k`` window, with 'same' padding ``k // 2``.
    A depthwise conv has as many groups as active channels, so its output width is its input width.
    The active weight passes through ``weight_quant``, per output channel.
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        max_kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        if depthwise and max_in_channels != max_out_channels:
            raise ValueError("a depthwise conv needs as many input as output channels")
        if max_kernel % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {max_kernel}")
        self.max_in_channels = max_in_channels
        self.max_out_channels = max_out_channels
        self.max_kernel = max_kernel
        self.stride = stride
        self.depthwise = depthwise
        in_per_group = 1 if depthwise else max_in_channels
        self.weight = nn.Parameter(torch.empty(max_out_channels, in_per_group, max_kernel, max_kernel))
        self.bias = nn.Parameter(torch.empty(max_out_channels)) if bias else None
        self.weight_quant = QuantPoint("weight", max_out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.Conv2d` of the largest size."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def weight_slice(self, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
        """The active weight: leading channels, centred kernel crop (a view, not a copy)."""
        if self.depthwise and in_channels != out_channels:
            raise ValueError(f"depthwise conv: {in_channels} input channels but {out_channels} output channels")
        if in_channels > self.max_in_channels or out_channels > self.max_out_channels or kernel > self.max_kernel:
            raise ValueError(
                f"active conv ({in_channels}->{out_channels}, k{kernel}) exceeds the allocated "
                f"{self.max_in_channels}->{self.max_out_channels}, k{self.max_kernel}"
            )
        start = (self.max_kernel - kernel) // 2
        weight = self.weight[:out_channels] if self.depthwise else self.weight[:out_channels, :in_channels]
        return weight[:, :, start : start + kernel, start : start + kernel]

    def bias_slice(self, out_channels: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[:out_channels]

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
        in_channels = x.shape[1]
        return conv2d(
            x,
            self.weight_quant(self.weight_slice(in_channels, out_channels, kernel)),
            self.weight_quant.deployed_bias(x, self.bias_slice(out_channels)),
            stride=self.stride,
            padding=kernel // 2,
            groups=in_channels if self.depthwise else 1,
        )

    def to_static(self, in_channels: int, out_channels: int, kernel: int) -> QuantizableConv2d:
        """A plain (FP32) conv holding copies of the active weight slices."""
        conv = QuantizableConv2d(
            in_channels,
            out_channels,
            kernel,
            stride=self.stride,
            padding=kernel // 2,
            groups=in_channels if self.depthwise else 1,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        tensors = {"weight": self.weight_slice(in_channels, out_channels, kernel)}
        if self.bias is not None:
            tensors["bias"] = self.bias_slice(out_channels)
        _copy(conv, tensors)
        return conv

    def extra_repr(self) -> str:
        kind = ", depthwise" if self.depthwise else ""
        return (
            f"max {self.max_in_channels}->{self.max_out_channels}, max_kernel={self.max_kernel}, "
            f"stride={self.stride}{kind}, bias={self.bias is not None}"
        )


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading ``C`` channels of its largest-size parameters and statistics.

    It is a :class:`torch.nn.BatchNorm2d` (of the largest width), so code that resets or recalibrates
    BN statistics finds it. In training mode only the active slice of the running statistics moves:
    the slices handed to :func:`torch.nn.functional.batch_norm` are views that it updates in place.
    """

    def __init__(self, max_channels: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(max_channels, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(
            x,
            self.running_mean[:channels],
            self.running_var[:channels],
            self.weight[:channels],
            self.bias[:channels],
            training=self.training,
            momentum=factor,
            eps=self.eps,
        )

    def to_static(self, channels: int) -> nn.BatchNorm2d:
        """A plain :class:`torch.nn.BatchNorm2d` holding copies of the active slices."""
        bn = nn.BatchNorm2d(
            channels, eps=self.eps, momentum=self.momentum, device=self.weight.device, dtype=self.weight.dtype
        )
        _copy(
            bn,
            {
                "weight": self.weight[:channels],
                "bias": self.bias[:channels],
                "running_mean": self.running_mean[:channels],
                "running_var": self.running_var[:channels],
                "num_batches_tracked": self.num_batches_tracked,
            },
        )
        return bn


class ElasticConvBN(nn.Module):
    """Elastic conv (no bias) + elastic BatchNorm + activation, the twin of :class:`ConvBN`."""

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        max_kernel: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        act: str = "none",
    ):
        super().__init__()
        self.conv = ElasticConv2d(max_in_channels, max_out_channels, max_kernel, stride, depthwise)
        self.bn = ElasticBatchNorm2d(max_out_channels)
        self.act = Activation(act)

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
        return self.act(conv_batchnorm(self.bn, self.conv(x, out_channels, kernel), x, self.conv.weight_quant))

    def to_static(self, in_channels: int, out_channels: int, kernel: int) -> ConvBN:
        """The :class:`ConvBN` layer of this active configuration, weights copied."""
        groups = in_channels if self.conv.depthwise else 1
        static = ConvBN(in_channels, out_channels, kernel, self.conv.stride, groups=groups, act=self.act.name)
        static.to(device=self.conv.weight.device, dtype=self.conv.weight.dtype)
        static.conv.load_state_dict(self.conv.to_static(in_channels, out_channels, kernel).state_dict())
        static.bn.load_state_dict(self.bn.to_static(out_channels).state_dict())
        static.bn.momentum = self.bn.momentum
        return static


class ElasticSqueezeExcite(nn.Module):
    """The SE gate of :class:`SqueezeExcite` on a variable width: squeeze to ``se_channels(C)``."""

    def __init__(self, max_channels: int, max_squeeze: int):
        super().__init__()
        self.pool_quant = QuantPoint()
        self.reduce = ElasticConv2d(max_channels, max_squeeze, bias=True)
        self.act = Activation("relu")
        self.expand = ElasticConv2d(max_squeeze, max_channels, bias=True)
        self.gate = Activation("hardsigmoid")
        self.out_quant = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        scale = self.reduce(self.pool_quant(F.adaptive_avg_pool2d(x, 1)), se_channels(channels), 1)
        scale = self.gate(self.expand(self.act(scale), channels, 1))
        return self.out_quant(x * scale)

    def to_static(self, channels: int) -> SqueezeExcite:
        """A :class:`SqueezeExcite` on ``channels`` with the active slices copied."""
        squeeze = se_channels(channels)
        se = SqueezeExcite(channels, squeeze).to(device=self.reduce.weight.device, dtype=self.reduce.weight.dtype)
        se.reduce.load_state_dict(self.reduce.to_static(channels, squeeze, 1).state_dict())
        se.expand.load_state_dict(self.expand.to_static(squeeze, channels, 1).state_dict())
        return se


# --------------------------------------------------------------------------------------------
# Blocks


class ElasticDepthwiseStack(nn.Module):
    """The elastic twin of :class:`DepthwiseStack`: ``stacked_convs(max_kernel)`` elastic 3x3
    depthwise convs, of which a kernel ``k`` runs the first ``stacked_convs(k)``."""

    def __init__(self, max_channels: int, max_kernel: int, stride: int, act: str):
        super().__init__()
        self.convs = nn.ModuleList(
            ElasticConvBN(max_channels, max_channels, 3, stride if i == 0 else 1, depthwise=True)
            for i in range(stacked_convs(max_kernel))
        )
        self.act = Activation(act)

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
        for conv in self.convs[: stacked_convs(kernel)]:
            x = conv(x, out_channels, 3)
        return self.act(x)

    def to_static(self, in_channels: int, out_channels: int, kernel: int) -> DepthwiseStack:
        """The :class:`DepthwiseStack` of ``kernel`` on ``in_channels``, weights copied."""
        weight = self.convs[0].conv.weight
        static = DepthwiseStack(in_channels, kernel, self.convs[0].conv.stride, self.act.name)
        static.to(device=weight.device, dtype=weight.dtype)
        for conv, source in zip(static.convs, self.convs):
            conv.load_state_dict(source.to_static(in_channels, in_channels, 3).state_dict())
        return static


def _elastic_layer(layer: Layer, widths: dict[str, list[int]], max_kernel: int, stride: int, act: str) -> nn.Module:
    """The elastic module of one declared layer, allocated for the largest of ``widths`` per role."""
    cin, cout = max(widths[layer.cin]), max(widths[layer.cout])
    if layer.se:
        return ElasticSqueezeExcite(cin, max(se_channels(c) for c in widths[layer.cin]))
    kernel = max_kernel if layer.spatial else 1
    stride = stride if layer.strided else 1
    act = act if layer.act else "none"
    if layer.stacked:
        return ElasticDepthwiseStack(cin, kernel, stride, act)
    return ElasticConvBN(cin, cout, kernel, stride, depthwise=layer.depthwise, act=act)


class ElasticBlock(nn.Module):
    """The elastic twin of a static :class:`Block` at one position of one stage.

    It holds weights for the largest configuration it can meet: every input width in ``in_widths``
    (the previous stage's widths for a stage's first block, the stage's own widths afterwards), every
    output width, kernel and expand ratio of ``choices``. A 1x1 projection shortcut exists when some
    configuration needs one and runs only when the active :class:`BlockSpec` asks for it; so does
    ``post_act`` (the residual add's activation and quantization point).
    """

    def __init__(self, choices: StageChoices, position: int, in_widths: Sequence[int]):
        super().__init__()
        variant = choices.block_type.variant
        self.block_type = variant.tag
        self.stride = choices.stride if position == 0 else 1
        self.plan = variant.layers()
        widths = {
            "in": sorted(set(in_widths)),
            "out": sorted(set(choices.widths)),
            "mid": sorted(
                {
                    variant.mid_channels(cin, cout, e)
                    for cin in in_widths
                    for cout in choices.widths
                    for e in choices.expand_ratios
                }
            ),
        }
        max_kernel = max(choices.kernels)
        self.body = nn.ModuleList(
            _elastic_layer(layer, widths, max_kernel, self.stride, variant.activation) for layer in self.plan
        )
        shortcuts = {variant.shortcut(position, cin, cout, self.stride) for cin in in_widths for cout in choices.widths}
        self.shortcut = (
            ElasticConvBN(max(in_widths), max(choices.widths), 1, self.stride) if "projection" in shortcuts else None
        )
        self.post_act = Activation(variant.post_add_activation) if shortcuts != {"none"} else None

    def _check(self, spec: BlockSpec) -> None:
        if spec.block_type != self.block_type or spec.stride != self.stride:
            raise ValueError(
                f"elastic {self.block_type} block (stride {self.stride}) cannot run {spec.key}"
            )
        if spec.shortcut == "projection" and self.shortcut is None:
            raise ValueError(f"elastic {self.block_type} block has no projection shortcut for {spec.key}")

    def forward(self, x: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
        self._check(spec)
        dims = spec.widths()
        out = x
        for layer, module in zip(self.plan, self.body):
            out = module(out) if layer.se else module(out, dims[layer.cout], spec.kernel if layer.spatial else 1)
        if spec.shortcut == "projection":
            out = self.post_act(out + self.shortcut(x, spec.out_channels, 1))
        elif spec.shortcut == "identity":
            out = self.post_act(out + x)
        return out

    def to_static(self, spec: BlockSpec) -> Block:
        """The static :class:`Block` of ``spec`` with this block's active weight slices copied in."""
        self._check(spec)
        dims = spec.widths()
        weight = next(self.parameters())
        static = Block(spec).to(device=weight.device, dtype=weight.dtype)
        for index, (layer, module) in enumerate(zip(self.plan, self.body)):
            if layer.se:
                source = module.to_static(dims[layer.cin])
            else:
                source = module.to_static(dims[layer.cin], dims[layer.cout], spec.kernel if layer.spatial else 1)
            static.body[index].load_state_dict(source.state_dict())
        if static.shortcut is not None:
            static.shortcut.load_state_dict(
                self.shortcut.to_static(spec.in_channels, spec.out_channels, 1).state_dict()
            )
        return static


class ElasticHead(nn.Module):
    """The elastic twin of :class:`Head`: only the first 1x1 conv's input width varies."""

    def __init__(self, in_widths: Sequence[int], head: HeadSpec, num_classes: int):
        super().__init__()
        self.spec = head
        self.num_classes = num_classes
        self.final_expand = ElasticConvBN(max(in_widths), head.widths[0], 1, act=head.activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_quant = QuantPoint()
        self.feature_mix = QuantizableConv2d(head.widths[0], head.widths[1], 1)
        self.mix_act = mix_activation(head.activation)
        self.features_quant = QuantPoint()
        self.classifier = QuantizableLinear(head.widths[1], num_classes)
        self.logits_quant = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool_quant(self.pool(self.final_expand(x, self.spec.widths[0], 1)))
        x = self.mix_act(self.feature_mix(x))
        return self.logits_quant(self.classifier(self.features_quant(torch.flatten(x, 1))))

    def to_static(self, in_channels: int) -> Head:
        """The static :class:`Head` for ``in_channels`` input channels, weights copied."""
        weight = self.classifier.weight
        static = Head(in_channels, self.spec, self.num_classes).to(device=weight.device, dtype=weight.dtype)
        static.final_expand.load_state_dict(
            self.final_expand.to_static(in_channels, self.spec.widths[0], 1).state_dict()
        )
        for name in ("feature_mix", "classifier"):
            layer = getattr(self, name)
            _copy(getattr(static, name), {"weight": layer.weight, "bias": layer.bias})
        return static
