"""Convolution whose depthwise weight gradient avoids oneDNN's slow path for kernels wider than 3.

On CPU, oneDNN has a specialised depthwise backward-weights kernel only for kernels at most 3 wide
with at most ``kernel // 2`` padding on each side; a depthwise 5x5 falls back to its generic grouped
kernel, which took 5-10x the forward's time and about a sixth of a sandwich step of
``tiny-1144-1101`` (profile of ``scripts/bench_training.py``). :func:`conv2d` computes the same
weight gradient as a few convolutions at most 3 wide: the kernel's columns are split into chunks of
1-3 taps, and each chunk's gradient is the weight gradient of a narrower depthwise convolution over
the same input, with the output gradient shifted by whole output columns (zero-filled) so that every
tap reads the input column it reads in the wide convolution. Only chunks whose shift drops no output
column that reads a real input pixel are used, so the gradient is exact up to float summation order.

The forward and the input gradient are PyTorch's own; on CUDA, without autograd, while tracing for
ONNX export, and where no chunking applies, :func:`conv2d` is :func:`torch.nn.functional.conv2d`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["conv2d"]

_CHUNK_PAD = {1: 0, 2: 1, 3: 1}
"""Symmetric column padding of a chunk convolution of 1, 2 or 3 taps: the most the fast kernel takes."""

_MIN_WIDTH = 6
"""Narrower inputs keep PyTorch's backward: three small calls cost more than the slow one saves."""

Chunk = tuple[int, int, int, int]


@functools.lru_cache(maxsize=4096)
def _column_chunks(kernel: int, padding: int, stride: int, width: int, out_width: int) -> tuple[Chunk, ...] | None:
    """``(first_tap, taps, shift, chunk_out_width)`` per chunk covering the tap offsets
    ``-padding .. kernel - 1 - padding`` of a convolution over ``width`` input columns; None when
    no exact cover exists. A chunk convolution of ``taps`` columns (padding ``_CHUNK_PAD[taps]``) at
    output column ``w + shift`` reads what tap ``first_tap + j`` reads at output column ``w``;
    taps outside the kernel are computed and dropped. A chunk is accepted only if the output columns
    its shift drops read no real input pixel through a real tap, so dropping them changes nothing."""
    low, high = -padding, kernel - 1 - padding

    def fits(first: int, taps: int) -> tuple[int, int] | None:
        pad = _CHUNK_PAD[taps]
        if (first + pad) % stride:
            return None
        shift = (first + pad) // stride
        chunk_width = (width + 2 * pad - taps) // stride + 1
        for column in range(out_width):
            if 0 <= column + shift < chunk_width:
                continue
            for tap in range(first, first + taps):
                if low <= tap <= high and 0 <= column * stride + tap < width:
                    return None
        return shift, chunk_width

    chunks: list[Chunk] = []
    uncovered = low
    while uncovered <= high:
        best: tuple[tuple[int, bool], Chunk] | None = None
        for taps in (3, 2, 1):
            for first in range(uncovered - taps + 1, uncovered + 1):
                placed = fits(first, taps)
                if placed is None:
                    continue
                key = (min(first + taps - 1, high), taps == 3)  # cover the most, prefer 3-tap chunks
                if best is None or key > best[0]:
                    best = (key, (first, taps) + placed)
        if best is None:
            return None
        chunks.append(best[1])
        uncovered = best[0][0] + 1
    return tuple(chunks)


def _depthwise_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
    chunks: tuple[Chunk, ...],
) -> torch.Tensor:
    """The weight gradient of a depthwise convolution, chunk by chunk (see the module docstring)."""
    channels, _, kernel_h, kernel_w = weight.shape
    pad_w = padding[1]
    out_width = grad.shape[-1]
    result = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    for first, taps, shift, chunk_width in chunks:
        pad = _CHUNK_PAD[taps]
        shifted = grad if shift == 0 and chunk_width == out_width else F.pad(grad, (shift, chunk_width - out_width - shift))
        like = weight.new_empty((channels, 1, kernel_h, taps)).contiguous(memory_format=torch.channels_last)
        chunk = torch.ops.aten.convolution_backward(
            shifted, x, like, None, list(stride), [padding[0], pad], [1, 1], False, [0, 0], channels,
            [False, True, False],
        )[1]
        start, stop = max(first, -pad_w), min(first + taps - 1, kernel_w - 1 - pad_w)
        result[..., start + pad_w : stop + pad_w + 1] = chunk[..., start - first : stop - first + 1]
    return result


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise convolution: PyTorch's forward and input gradient, the chunked weight gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        stride: tuple[int, int], padding: tuple[int, int], chunks: tuple[Chunk, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.chunks, ctx.has_bias = stride, padding, chunks, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_bias = grad_weight = None
        if need_x or need_bias:
            grad_x, _, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(ctx.stride), list(ctx.padding),
                [1, 1], False, [0, 0], x.shape[1], [need_x, False, need_bias and ctx.has_bias],
            )
        if need_weight:
            grad_weight = _depthwise_weight_grad(grad, x, weight, ctx.stride, ctx.padding, ctx.chunks)
        return grad_x, grad_weight, grad_bias, None, None, None


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> torch.Tensor:
    """:func:`torch.nn.functional.conv2d` (dilation 1, zero padding), with the chunked depthwise
    weight gradient where it applies: on CPU, with autograd, for a depthwise convolution (one
    weight channel per input channel) whose kernel is wider than 3 over an input at least
    ``_MIN_WIDTH`` columns wide, at stride 1, or stride 2 with a 5-wide kernel."""
    stride, padding = _pair(stride), _pair(padding)
    kernel_w = weight.shape[-1]
    if (
        kernel_w <= 3
        or x.device.type != "cpu"
        or x.dim() != 4
        or groups != x.shape[1]
        or weight.shape[0] != groups
        or x.shape[-1] < _MIN_WIDTH
        or not torch.is_grad_enabled()
        or not weight.requires_grad
        or not (stride[1] == 1 or (stride[1] == 2 and kernel_w == 5))
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    ):
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)
    out_width = (x.shape[-1] + 2 * padding[1] - kernel_w) // stride[1] + 1
    chunks = _column_chunks(kernel_w, padding[1], stride[1], x.shape[-1], out_width)
    if chunks is None:
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return _DepthwiseConv2d.apply(x, weight, bias, stride, padding, chunks)
