"""The depthwise convolution with a chunked weight gradient computes PyTorch's convolution and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spaceevo.nn.depthwise import _column_chunks, conv2d


def _grads(op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int):
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    bias = None if bias is None else bias.clone().requires_grad_(True)
    y = op(x, weight, bias, stride, padding, groups=x.shape[1])
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * upstream).sum().backward()
    return y.detach(), x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("kernel, stride", [(5, 1), (5, 2), (7, 1), (3, 1)])
@pytest.mark.parametrize("size", [(6, 6), (7, 9), (12, 12), (13, 8), (32, 32)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_gradients_equal_pytorchs(kernel, stride, size, channels_last, with_bias):
    generator = torch.Generator().manual_seed(kernel * 100 + size[0] * 10 + size[1])
    channels = 24
    x = torch.randn(3, channels, *size, generator=generator)
    weight = torch.randn(channels, 1, kernel, kernel, generator=generator)
    bias = torch.randn(channels, generator=generator) if with_bias else None
    if channels_last:
        x, weight = x.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
    ours = _grads(conv2d, x, weight, bias, stride, kernel // 2)
    reference = _grads(F.conv2d, x, weight, bias, stride, kernel // 2)
    assert torch.equal(ours[0], reference[0])  # the forward is PyTorch's
    assert torch.equal(ours[1], reference[1])  # and so is the input gradient
    scale = reference[2].abs().max()
    assert torch.allclose(ours[2], reference[2], rtol=0, atol=1e-5 * float(scale))
    if with_bias:
        assert torch.allclose(ours[3], reference[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride", [(5, 1), (5, 2), (7, 1)])
def test_chunks_cover_every_tap_once_on_training_widths(kernel, stride):
    """Every tap of the kernel belongs to exactly one chunk, chunks are at most 3 taps wide, and a cover
    exists for the widths the tiny and ImageNet spaces train at."""
    padding = kernel // 2
    for width in (6, 7, 8, 12, 14, 16, 24, 28, 32, 56, 112):
        out_width = (width + 2 * padding - kernel) // stride + 1
        chunks = _column_chunks(kernel, padding, stride, width, out_width)
        assert chunks is not None, width
        covered = []
        for first, taps, _, _ in chunks:
            assert 1 <= taps <= 3
            covered += [t for t in range(first, first + taps) if -padding <= t <= kernel - 1 - padding and t not in covered]
        assert sorted(covered) == list(range(-padding, kernel - padding))


def test_plain_convolution_without_autograd_or_for_narrow_kernels():
    """Without autograd, and for kernels at most 3 wide, ``conv2d`` is ``F.conv2d`` (no custom node)."""
    x = torch.randn(2, 8, 10, 10)
    weight = torch.randn(8, 1, 5, 5, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(conv2d(x, weight, None, 1, 2, 8), F.conv2d(x, weight, None, 1, 2, 1, 8))
    narrow = torch.randn(8, 1, 3, 3, requires_grad=True)
    assert conv2d(x, narrow, None, 1, 1, 8).grad_fn.name() == F.conv2d(x, narrow, None, 1, 1, groups=8).grad_fn.name()
    assert conv2d(x, weight, None, 1, 2, 8).grad_fn.name() != F.conv2d(x, weight, None, 1, 2, 1, 8).grad_fn.name()
