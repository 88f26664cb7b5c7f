"""Simulated quantizers of any number format in :mod:`spaceevo.quant.formats`, for PTQ and QAT.

:func:`make_quantizer` gives the quantizer of a format for a weight (per output channel) or an
activation (per tensor):

* integers: the LSQ+ quantizers of :mod:`spaceevo.quant.lsq` themselves (per-channel symmetric
  weights, per-tensor unsigned activations with a learned offset), so ``int8`` computes bit for bit
  what the INT8 export runs; :class:`ScaledQuantizer` covers per-tensor integer weights;
* minifloats: :class:`ScaledQuantizer`, ``x_hat = s * fmt.round(x / s)`` with a learned scale ``s``
  (per tensor or per channel), zero point 0;
* MX: :class:`MxQuantizer`, blocks of 32 along the channels with the scale the OCP spec computes
  from each block (nothing to learn).

Gradients (:class:`_ScaledRound`): the straight-through estimator passes ``dy`` to ``x`` where
``x / s`` lies within the format's range and 0 where it saturates, as LSQ does; the scale gets
LSQ's gradient ``fmt.round(u) - u`` inside the range and the saturation value outside it
(``u = x / s``), scaled by ``1 / sqrt(N * max_value)`` (LSQ's ``1 / sqrt(N * Qp)``, the format's
largest value standing for ``Qp``). For a minifloat, learning ``s`` is learning its exponent bias:
``s * FP_b(x / s)`` is the format with bias ``b - log2 s`` (Kuzmin et al., "FP8 Quantization: The
Power of the Exponent", NeurIPS 2022, learn the maximum value, equivalently a real-valued bias, by
this gradient); :attr:`ScaledQuantizer.exponent_bias` reports it. ``integer_bias=True`` rounds
``log2 s`` to an integer (straight-through), the per-tensor integer bias of flexible FP8 (Huang et
al., 2021) that hardware can apply as an exponent offset.

Every quantizer here is the identity while ``enabled`` is off and leaves biases and BatchNorm as
they are (:meth:`ScaledQuantizer.deployed_bias`, :meth:`ScaledQuantizer.folded_batchnorm`): the
float formats are simulated on a network whose BatchNorm is already folded
(:func:`spaceevo.quant.network.quantize_network`), and their export keeps biases in float.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from spaceevo.quant.formats import ElementFormat, FloatFormat, IntFormat, MxFormat, NumberFormat, exact_pow2
from spaceevo.nn.layers import QUANT_KINDS, QuantPoint
from spaceevo.quant.lsq import _GradScale, _positive
from spaceevo.quant.qat import lsq_quantizer

__all__ = ["ScaledQuantizer", "MxQuantizer", "make_quantizer"]


class _ScaledRound(torch.autograd.Function):
    """``s * fmt.round(x / s)`` with the STE gradient for ``x`` and LSQ's gradient for ``s``.

    ``scale`` broadcasts against ``x`` (one element, or one per channel along dim 0); its gradient
    is summed over the elements sharing each scale.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
        u = x / scale
        q = fmt.round(u)
        inside = (u >= fmt.min_value) & (u <= fmt.max_value)
        ctx.save_for_backward(u, q, inside)
        ctx.scale_shape = scale.shape
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        u, q, inside = ctx.saved_tensors
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        terms = grad * torch.where(inside, q - u, q)
        shape = ctx.scale_shape
        if len(shape) == 0 or shape.numel() == 1:
            grad_scale = terms.sum().reshape(shape)
        else:
            grad_scale = terms.flatten(1).sum(dim=1).reshape(shape)
        return grad_x, grad_scale, None


class _PowerOfTwo(torch.autograd.Function):
    """``2**round(log2 s)``, exactly; the gradient passes straight through to ``s``."""

    @staticmethod
    def forward(ctx: Any, scale: torch.Tensor) -> torch.Tensor:
        return exact_pow2(torch.round(torch.log2(scale)).clamp(-126, 127), torch.float32).to(scale.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ScaledQuantizer(nn.Module):
    """Symmetric quantizer of an element format with a learned scale, per tensor or per channel.

    ``channels`` None: one scale; otherwise one per output channel (dim 0 of a weight). ``weight``
    says what the tensor is, for LSQ's gradient scale (``N``: a weight's elements per scale, an
    activation's per sample). The scale is initialised on first use from the tensor
    (``max|x| / max_value``, per channel for weights) unless :meth:`calibrate` set it.
    """

    def __init__(
        self, fmt: ElementFormat, channels: int | None = None, *, weight: bool = False, integer_bias: bool = False
    ):
        super().__init__()
        if not isinstance(fmt, (IntFormat, FloatFormat)):
            raise TypeError(f"ScaledQuantizer takes an integer or minifloat format, got {type(fmt).__name__}")
        if integer_bias and not isinstance(fmt, FloatFormat):
            raise ValueError("integer_bias applies to minifloat formats")
        if channels is not None and not weight:
            raise ValueError("per-channel scales are for weights (dim 0: output channels)")
        self.fmt = fmt
        self.channels = channels
        self.weight = weight
        self.integer_bias = integer_bias
        self.enabled = True
        self.scale = nn.Parameter(torch.ones(channels if channels is not None else ()))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def calibrate(self, amax: torch.Tensor) -> None:
        """Set the scale so that ``amax`` (per tensor, or per channel) maps to the format's largest value."""
        value = amax.detach().to(self.scale.dtype).reshape(self.scale.shape).clamp_min(torch.finfo(self.scale.dtype).tiny)
        self.scale.copy_(value / self.fmt.max_value)
        self.initialized.fill_(True)

    def _amax(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return x.detach().abs().amax()
        return x.detach().flatten(1).abs().amax(dim=1)

    def step(self, channels: int | None = None) -> torch.Tensor:
        """The scale in use, detached: positive, a power of two with ``integer_bias``."""
        return self._scale(None, channels).detach()

    def _scale(self, grad_factor: float | None, channels: int | None) -> torch.Tensor:
        scale = self.scale if channels is None else self.scale[:channels]
        if grad_factor is not None:
            scale = _GradScale.apply(scale, grad_factor)
        scale = _positive(scale)
        return _PowerOfTwo.apply(scale) if self.integer_bias else scale

    @property
    def exponent_bias(self) -> torch.Tensor:
        """The effective exponent bias of a minifloat, ``bias - log2 s`` (per tensor or per channel)."""
        if not isinstance(self.fmt, FloatFormat):
            raise TypeError("an integer format has no exponent bias")
        return self.fmt.bias - torch.log2(self.step())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if self.channels is not None and x.shape[0] != self.channels:
                raise RuntimeError("a per-channel quantizer initialises from its full weight; calibrate it first")
            self.calibrate(self._amax(x))
        channels = None if self.channels is None else x.shape[0]
        if torch.is_grad_enabled():
            shared = x.numel() if self.weight and self.channels is None else (x[0].numel() if x.dim() > 1 else x.numel())
            scale = self._scale(1.0 / math.sqrt(shared * self.fmt.max_value), channels)
        else:
            scale = self._scale(None, channels)
        if self.channels is not None:
            scale = scale.view((-1,) + (1,) * (x.dim() - 1))
        if not torch.is_grad_enabled():
            return self.fmt.round(x / scale).mul_(scale)
        return _ScaledRound.apply(x, scale, self.fmt)

    def deployed_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``bias`` unchanged: the float-format export adds biases in float."""
        return bias

    def folded_batchnorm(self, x: torch.Tensor, bn: nn.BatchNorm2d, channels: int) -> None:
        """None: BatchNorm runs as it is (networks in these formats are simulated BN-folded)."""
        return None

    def extra_repr(self) -> str:
        granularity = "per tensor" if self.channels is None else f"per channel ({self.channels})"
        return f"{self.fmt.name}, {granularity}, integer_bias={self.integer_bias}, enabled={self.enabled}"


class _MxRound(torch.autograd.Function):
    """MX quantize-dequantize along ``axis``; the gradient passes straight through (the block scale
    follows the data, so nothing saturates but the rounding of the block maximum itself)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: MxFormat, axis: int) -> torch.Tensor:
        return fmt.quantize(x, axis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class MxQuantizer(nn.Module):
    """OCP MX quantizer: blocks of ``fmt.block_size`` along the channels (dim 1 of an activation;
    for a weight, its flattened input channels and kernel positions, the dot-product dimension)."""

    def __init__(self, fmt: MxFormat, weight: bool):
        super().__init__()
        self.fmt = fmt
        self.weight = weight
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.weight:
            return _MxRound.apply(x.flatten(1), self.fmt, 1).view_as(x)
        return _MxRound.apply(x, self.fmt, 1 if x.dim() > 1 else 0)

    def deployed_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return bias

    def folded_batchnorm(self, x: torch.Tensor, bn: nn.BatchNorm2d, channels: int) -> None:
        return None

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, {'weight' if self.weight else 'activation'}, enabled={self.enabled}"


def make_quantizer(
    fmt: NumberFormat,
    kind: str,
    channels: int = 0,
    *,
    per_channel: bool = True,
    integer_bias: bool = False,
    reduce_range: bool = False,
) -> nn.Module:
    """The quantizer of ``fmt`` for a quantization point of ``kind`` (:data:`~spaceevo.nn.layers.QUANT_KINDS`).

    Integer formats get the LSQ+ quantizer deployment uses for that point
    (:func:`~spaceevo.quant.qat.lsq_quantizer`: zero point 0 after ReLU, ``reduce_range`` weights),
    except per-tensor weights (``per_channel=False``), which get a :class:`ScaledQuantizer`.
    ``channels`` is a weight's number of output channels.
    """
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantization point kind {kind!r}; allowed: {', '.join(QUANT_KINDS)}")
    weight = kind == "weight"
    if isinstance(fmt, MxFormat):
        return MxQuantizer(fmt, weight=weight)
    if isinstance(fmt, IntFormat) and (per_channel or not weight) and not integer_bias:
        return lsq_quantizer(QuantPoint(kind, channels if weight else 0), reduce_range, fmt.bits)
    return ScaledQuantizer(fmt, channels if weight and per_channel else None, weight=weight, integer_bias=integer_bias)
