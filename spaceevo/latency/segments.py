"""Segments: the separately timed pieces of a network, and the INT8 models that time them.

A network is cut into segments at block boundaries: every block is one segment, the classifier head
is the last. Inside a whole INT8 network the tensor between two blocks stays uint8, so a block's
segment model takes and returns uint8 (its input QuantizeLinear and output DequantizeLinear are
removed); only the first segment takes the float image (and pays the input QuantizeLinear) and only
the head returns float logits. What stand-alone segments still pay and a whole network does not (the
NCHW↔NHWC transposes at each cut, one session call each) is the boundary cost that
:mod:`spaceevo.latency.predictor` fits against whole networks. An engine with its own format
(:attr:`~spaceevo.latency.engines.Engine.converts`) times its own INT8 model of each segment instead;
what its segments pay at the cuts is fitted the same way.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spaceevo.latency.engines import ORT_DEVICE, get_engine
from spaceevo.nn.static import Block, Head
from spaceevo.quant.export import export_fp32, quantize_ptq, strip_io_quantization
from spaceevo.blocks import BlockSpec, conv_output_size
from spaceevo.space import Architecture, HeadSpec, Hyperspace


@dataclass(frozen=True)
class Segment:
    """A block (``block`` set) or the head (``head`` set), with where it sits in the network."""

    in_channels: int
    input_size: int
    first: bool
    block: BlockSpec | None = None
    head: HeadSpec | None = None
    num_classes: int = 0

    @property
    def key(self) -> str:
        """Table key: the computation and whether the input is the float image."""
        io = "f32in" if self.first else "u8in"
        if self.block is not None:
            return f"{self.block.key}:{io}"
        assert self.head is not None
        return (
            f"head:i{self.in_channels}:h{self.input_size}:w{self.head.widths[0]}x{self.head.widths[1]}"
            f":{self.head.activation}:c{self.num_classes}:{io}"
        )

    @property
    def last(self) -> bool:
        return self.head is not None

    @property
    def output_elements(self) -> int:
        """Elements of the uint8 tensor this segment hands to the next (0 for the head)."""
        if self.block is None:
            return 0
        return self.block.out_channels * self.block.output_size**2

    def module(self) -> nn.Module:
        if self.block is not None:
            return Block(self.block)
        assert self.head is not None
        return Head(self.in_channels, self.head, self.num_classes)


def network_segments(arch: Architecture) -> list[Segment]:
    """The segments of a resolved subnet, in order: every block, then the head."""
    segments = [
        Segment(in_channels=b.in_channels, input_size=b.input_size, first=i == 0, block=b)
        for i, b in enumerate(arch.blocks)
    ]
    segments.append(
        Segment(
            in_channels=arch.final_channels,
            input_size=arch.final_size,
            first=False,
            head=arch.head,
            num_classes=arch.num_classes,
        )
    )
    return segments


def required_segments(hyperspace: Hyperspace) -> list[Segment]:
    """Every segment any subnet of any candidate space of ``hyperspace`` can contain.

    First blocks of a stage may take any width of the previous stage; later blocks take and give
    widths of one window. The list is sorted by key and free of duplicates.
    """
    found: dict[str, Segment] = {}
    for resolution in hyperspace.resolutions:
        size = resolution
        previous_widths: tuple[int, ...] = (hyperspace.in_channels,)
        is_first_stage = True
        for stage in hyperspace.stages:
            block_types = (
                [stage.fixed_block] if not stage.searchable else [hyperspace.block_types[b] for b in stage.block_types]
            )
            windows = stage.windows if stage.searchable else [stage.widths]
            out_size = conv_output_size(size, stage.stride)
            for block_type in block_types:
                kernels = stage.kernels or block_type.kernels
                expands = stage.expand_ratios or block_type.expand_ratios
                pairs = set(itertools.product(previous_widths, stage.widths))
                first_pairs = [(cin, cout, stage.stride, size, True) for cin, cout in pairs]
                later_pairs = {
                    (cin, cout, 1, out_size, False)
                    for window in windows
                    for cin, cout in itertools.product(window, window)
                } if max(stage.depths) > 1 else set()
                for (cin, cout, stride, in_size, first_in_stage), kernel, expand in itertools.product(
                    list(first_pairs) + sorted(later_pairs), kernels, expands
                ):
                    spec = block_type.variant.spec(cin, cout, kernel, expand, stride, in_size, 0 if first_in_stage else 1)
                    segment = Segment(
                        in_channels=cin, input_size=in_size, first=is_first_stage and first_in_stage, block=spec
                    )
                    found[segment.key] = segment
            previous_widths = stage.widths
            size = out_size
            is_first_stage = False
        for width in previous_widths:
            head = Segment(
                in_channels=width,
                input_size=size,
                first=False,
                head=hyperspace.head,
                num_classes=hyperspace.num_classes,
            )
            found[head.key] = head
    return [found[k] for k in sorted(found)]


def segment_model(segment: Segment, *, reduce_range: bool, device: str = ORT_DEVICE, seed: int = 0) -> bytes:
    """The INT8 model of one segment, serialized, in the format of the engine ``device`` names: the
    QDQ (U8S8) ONNX with uint8 boundaries, or the engine's own INT8 model (:meth:`Engine.convert`,
    with the boundaries the engine's converter gives it).

    Weights are random (latency does not depend on their values); BatchNorm statistics are
    randomised so folding produces realistic, non-identical scales.
    """
    torch.manual_seed(seed)
    module = segment.module()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    shape = (1, segment.in_channels, segment.input_size, segment.input_size)
    rng = np.random.default_rng(seed)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    engine = get_engine(device)
    if engine.converts:
        return engine.convert(module, shape, calibration)
    fp32 = export_fp32(module, shape)
    with tempfile.TemporaryDirectory() as work_dir:
        int8 = quantize_ptq(fp32, calibration, reduce_range=reduce_range, work_dir=work_dir)
    int8 = strip_io_quantization(int8, strip_input=not segment.first, strip_output=not segment.last)
    return int8.SerializeToString()
