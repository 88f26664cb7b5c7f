"""LSQ+ fake quantization that computes exactly what ONNX Runtime's INT8 (QDQ, U8S8) graph computes.

Learned Step Size Quantization (LSQ; Esser et al., "Learned Step Size Quantization", ICLR 2020)
learns each quantizer's step size ``s`` by gradient descent, passing gradients through rounding with
the straight-through estimator (STE) and scaling the gradient of ``s`` by ``g = 1 / sqrt(N * Qp)``.
LSQ+ (Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable offsets and better
initialization", CVPR Workshops 2020) adds a learned offset ``beta`` for asymmetric activations.

Deployment decides the forward pass, not the papers:

* Activations are uint8 per tensor with an **integer** zero point, as ONNX Runtime's QuantizeLinear
  needs: ``zp = clamp(round(-beta / s), 0, Qp)`` and ``x_hat = (clamp(round(x / s) + zp, 0, Qp) - zp) * s``.
  ``beta`` still learns: the rounding of ``zp`` uses the STE too (while ``zp`` saturates at 0 or Qp
  the forward does not depend on ``beta`` and it gets no gradient).
* Weights are int8, symmetric (zero point 0), one scale per output channel (axis 0), with codes in
  ``-127..127`` (ONNX Runtime's symmetric int8 range, the one :func:`spaceevo.quant.export.quantize_ptq`
  uses) or ``-63..63`` with ``reduce_range`` (7-bit weights for x86 without VNNI). The code -128 is
  never used, so a negative BatchNorm scale folded into the weight flips codes exactly
  (see :func:`fold_bn_scales`).
* Rounding is ``round(x * (1 / s))`` half to even, the arithmetic of ``torch.fake_quantize_*``, so the
  training forward, the forward without autograd (evaluation, BN recalibration: four vectorised
  ops, ~7x faster on CPU than PyTorch's fake-quant kernel) and the export forward
  (:func:`export_mode`) are bit-identical.

Export: inside :func:`export_mode` the quantizers run ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` with constant scales and zero points, which the TorchScript
exporter writes as QuantizeLinear/DequantizeLinear pairs (the learnable ``_fake_quantize_learnable_*``
ops export with neither exporter). That exporter accepts only the int8 range -128..127, so weights
are clamped to ``+-Qp * s_c`` first: a Max/Min pair on the weight initializer that ONNX Runtime
constant-folds before its QDQ fusion.

Biases: in eval mode an activation quantizer leaves its step on its output, and the weight quantizer
of the conv / linear consuming it rounds that layer's bias to the int32 grid ``s_input * s_weight``
and folds its BatchNorm, as the INT8 export does (:meth:`LsqWeightQuantizer.deployed_bias`,
:meth:`LsqWeightQuantizer.folded_batchnorm`); training and export forwards leave biases in float.

Gradient scaling: ``N`` is the number of elements that share one scale within one sample, i.e.
``x[0].numel()`` for an activation (LSQ's "features in the layer") and ``w[0].numel()`` for a weight
channel (the weights of one output channel, LSQ's ``N_W`` taken per channel). It is recomputed on
every call, so elastic layers get the ``N`` of the active width and kernel. ``beta`` is scaled by
the same ``g`` as ``s``, as in LSQ+.

Initialisation: activations from the first batch seen in training mode, ``s = (max - min) / Qp`` and
``beta = min`` after widening ``[min, max]`` to contain 0 (as ONNX Runtime's calibration does, so the
zero point is representable); weights from the weight on first use, ``s_c = max|w_c| / Qp``. On
Kaiming-initialised convs the max rule gives 30-100x lower quantization MSE than LSQ's
``2 * mean|w| / sqrt(Qp)``, whose range is ~10x too wide at 8 bits.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

__all__ = [
    "LsqQuantizer",
    "LsqActivationQuantizer",
    "LsqWeightQuantizer",
    "set_quant_mode",
    "export_mode",
    "export_params",
    "fold_bn_scales",
    "batchnorm_fold",
    "bias_grid",
    "int32_codes",
]

_MIN_SCALE = 1e-8  # keeps 1 / s finite; a learned scale never gets near it in practice

#: Attribute under which an eval-mode activation quantizer leaves its step size on its output tensor,
#: for the conv / linear consuming it (its int32 bias grid is ``s_input * s_weight``).
_STEP_ATTRIBUTE = "_spaceevo_quant_step"


class _RoundSTE(torch.autograd.Function):
    """Round half to even; the gradient passes through unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _fake_quantize_inference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """``(clamp(round(x * (1 / s)) + zp, 0, qmax) - zp) * s`` without autograd: bit-identical to
    ``torch.fake_quantize_per_tensor_affine(x, s, zp, 0, qmax)`` for an integer-valued ``zp`` in
    ``[0, qmax]``, since clamping to ``[-zp, qmax - zp]`` before the rounding gives the same codes as
    clamping after (the bounds are integers). Four vectorised tensor ops: about 7x faster than
    PyTorch's per-tensor fake-quant kernel on CPU, which took half of a subnet evaluation's time."""
    return (x * torch.reciprocal(scale)).clamp_(-zero_point, qmax - zero_point).round_().mul_(scale)


class _LsqPerTensorFakeQuant(torch.autograd.Function):
    """``(clamp(round(x * (1 / s)) + zp, 0, qmax) - zp) * s`` with the LSQ+ gradients of PyTorch's
    ``torch._fake_quantize_learnable_per_tensor_affine`` (at ``grad_factor`` 1), from vectorised ops.

    The forward is bit-identical to that op and to :func:`_fake_quantize_inference`. Gradients, with
    ``u = x / s``, ``r = round(u)`` and ``c = clamp(r, -zp, qmax - zp)``: ``dx = dy`` where ``r`` was not
    clamped (straight-through estimator), else 0; ``ds = sum(dy * c - dx * u)`` (``c - u`` over
    unclamped, ``c`` over clamped elements); ``dzp = -s * sum(dy)`` over clamped elements. ``dx``
    equals PyTorch's exactly; ``ds`` and ``dzp`` agree up to the order of float summation, except at
    an exact rounding tie, where PyTorch's backward rounds ``u + zp`` instead of ``u`` and so
    differentiates the neighbouring code. The forward keeps ``r`` (and ``x``, which its producer holds
    anyway); the backward makes the input gradient in one pass (``hardtanh_backward`` on ``r``: the
    mask of unclamped codes, exact since ``r`` is integer-valued) and both reductions from one
    temporary, about half the memory passes of a mask-then-multiply backward.
    Why not the PyTorch op: its forward + backward took 1.9-3.3x as long as these ops on the
    activations of a tiny supernet (medians per shape, ``scripts/bench_lsq.py --threads 1 --rounds 5``
    on a shared 2-core VM), and the previous version of this op, with a mask-then-multiply backward
    that kept ``x / s``, 1.2-1.4x as long as this one (medians per shape, interleaved, 1 thread). ``s`` and ``zp`` are read as
    Python numbers (as the PyTorch op does) when ``on_host`` (the caller passes it for CPU tensors),
    since broadcasting a one-element tensor through element-wise ops is slower on CPU. On a GPU they
    stay one-element tensors: reading them would stall its queue once per quantizer and subnet, as
    PyTorch's op does.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int, on_host: bool
    ) -> torch.Tensor:
        if on_host:
            scale_value, zp = torch.cat([scale, zero_point.to(scale.dtype)]).tolist()  # one device sync
            # the reciprocal in the scale's precision (float32), as PyTorch's kernel computes it
            inverse = float(torch.tensor(scale_value, dtype=scale.dtype).reciprocal())
            low, high, step = ctx.qparams = (-zp, qmax - zp, scale_value)
            rounded = torch.mul(x, inverse).round_()
            ctx.save_for_backward(x, rounded)
        else:
            step = scale.detach()
            low = -zero_point.detach().to(scale.dtype)
            high = low + qmax
            inverse = torch.reciprocal(step)
            rounded = torch.mul(x, inverse).round_()
            ctx.save_for_backward(x, rounded, low, high, step)
        ctx.inverse = inverse
        # rounding then clamping to integer bounds gives the codes of clamping then rounding
        return rounded.clamp(low, high).mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        inverse = ctx.inverse
        if hasattr(ctx, "qparams"):
            (x, rounded), (low, high, step) = ctx.saved_tensors, ctx.qparams
            grad_x = torch.ops.aten.hardtanh_backward(grad, rounded, low - 0.5, high + 0.5)
            terms = torch.mul(grad, rounded.clamp(low, high)).addcmul_(grad_x, x, value=-inverse)
        else:
            x, rounded, low, high, step = ctx.saved_tensors
            inside = (rounded >= low) & (rounded <= high)
            grad_x = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            terms = torch.mul(grad, rounded.clamp(low, high)).sub_(grad_x * x * inverse)
        grad_scale = terms.sum()  # sum(dy * c) - sum(dx * u)
        grad_zero_point = (grad_x.sum() - grad.sum()) * step
        return grad_x, grad_scale.reshape(1), grad_zero_point.reshape(1), None, None


class _GradScale(torch.autograd.Function):
    """Identity whose gradient is multiplied by ``factor`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """The step size actually used: ``|scale|``, floored so that ``1 / s`` stays finite."""
    return scale.abs().clamp_min(_MIN_SCALE)


def _leading_dim(tensor: torch.Tensor) -> int:
    """``tensor.shape[0]`` as an int, also while ``torch.onnx.export`` traces the model.

    Tracing turns sizes into tensors; a weight is a constant of the exported graph, so reading its
    size as a constant is exact and the tracer's warning about it is noise.
    """
    size = tensor.shape[0]
    if isinstance(size, int):
        return size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(size)


class LsqQuantizer(nn.Module):
    """Common switches of the LSQ+ quantizers.

    ``enabled`` off makes the quantizer the identity (FP32 training); it is a plain attribute, not
    state, set for a whole model by :func:`set_quant_mode`. Inside :func:`export_mode` the quantizer
    holds its :func:`export_params` as constants and runs the plain ``torch.fake_quantize_*`` ops,
    which ``torch.onnx.export`` writes as QuantizeLinear / DequantizeLinear with initializer scales and
    zero points.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self._export_qparams: tuple[torch.Tensor, torch.Tensor] | None = None

    def _sync_ready(self) -> None:
        """Refresh the Python-side mirror of the ``initialized`` buffer (one device sync)."""
        raise NotImplementedError


class LsqActivationQuantizer(LsqQuantizer):
    """Unsigned per-tensor LSQ+ quantizer with learned step ``scale`` and learned offset ``beta``.

    Codes are ``0 .. 2**bits - 1`` (uint8 in ONNX Runtime for the default 8 bits). The zero point is
    ``clamp(round(-beta / s), 0, Qp)``, an integer, so the forward is what QuantizeLinear followed by
    DequantizeLinear computes. The first batch seen in training mode initialises ``scale`` and ``beta``;
    the ``initialized`` buffer records it, so a loaded state dict is not re-initialised.
    """

    def __init__(self, bits: int = 8):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be in 2..8 (uint8 in ONNX Runtime), got {bits}")
        self.bits = bits
        self.qmax = 2**bits - 1
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirror of ``initialized`` that avoids a device sync on every call

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    def _sync_ready(self) -> None:
        self._ready = bool(self.initialized)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``scale`` and ``beta`` so that ``[min(x, 0), max(x, 0)]`` maps onto ``0 .. Qp``."""
        low = x.detach().min().clamp_max(0).to(self.scale.dtype)
        high = x.detach().max().clamp_min(0).to(self.scale.dtype)
        span = (high - low).clamp_min(torch.finfo(self.scale.dtype).eps)
        self.scale.copy_(span / self.qmax)
        self.beta.copy_(low)
        self.initialized.fill_(True)
        self._ready = True

    def _qparams(self, grad_factor: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and (float, integer-valued) zero point; STE and gradient scaling when training."""
        if grad_factor is None:
            scale = _positive(self.scale)
            return scale, torch.clamp(torch.round(-self.beta / scale), 0, self.qmax)
        scale = _positive(_GradScale.apply(self.scale, grad_factor))
        beta = _GradScale.apply(self.beta, grad_factor)
        return scale, torch.clamp(_RoundSTE.apply(-beta / scale), 0, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._ready and self._export_qparams is None:
            self._sync_ready()
            if not self._ready and self.training:
                self.initialize(x)
        if not self._ready:
            raise RuntimeError(
                "LsqActivationQuantizer is not initialised: run a batch through it in training mode first"
            )
        if self._export_qparams is not None:
            scale, zero_point = self._export_qparams
            if self.qmax < 255:
                x = torch.clamp(x, -zero_point * scale, (self.qmax - zero_point) * scale)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
        if not torch.is_grad_enabled():
            scale, zero_point = self._qparams(None)
            y = _fake_quantize_inference(x, scale, zero_point, self.qmax)
        else:
            per_sample = x[0].numel() if x.dim() > 1 else x.numel()
            scale, zero_point = self._qparams(1.0 / math.sqrt(per_sample * self.qmax))
            # (clamp(round(x / s) + z, 0, Qp) - z) * s, STE for the rounding, LSQ gradients for s and z
            # (passed on to ``scale`` and ``beta`` by autograd).
            on_host = x.device.type == "cpu"
            y = _LsqPerTensorFakeQuant.apply(x, scale.reshape(1), zero_point.reshape(1), self.qmax, on_host)
        if not self.training:
            setattr(y, _STEP_ATTRIBUTE, scale.detach())  # see LsqWeightQuantizer.deployed_bias
        return y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


class LsqWeightQuantizer(LsqQuantizer):
    """Signed symmetric per-output-channel LSQ quantizer for the weights of an elastic layer.

    Scales are allocated for ``max_channels`` output channels; ``forward(w)`` quantizes with the first
    ``w.shape[0]`` of them, so one quantizer serves every active width and kernel of a weight-sharing
    layer (whose active weight is a leading slice). Codes are ``-Qp .. Qp`` with ``Qp = 2**(bits-1) - 1``
    (127), or ``2**(bits-2) - 1`` (63) with ``reduce_range``. Each channel's scale is initialised from
    the first weight it quantizes, ``max|w_c| / Qp``; the per-channel ``initialized`` buffer records it.
    """

    def __init__(self, max_channels: int, bits: int = 8, reduce_range: bool = False):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be in 2..8 (int8 in ONNX Runtime), got {bits}")
        if reduce_range and bits < 3:
            raise ValueError("reduce_range needs at least 3 weight bits")
        self.max_channels = max_channels
        self.bits = bits
        self.reduce_range = reduce_range
        self.qmax = 2 ** (bits - 2 if reduce_range else bits - 1) - 1
        self.scale = nn.Parameter(torch.ones(max_channels))
        self.register_buffer("initialized", torch.zeros(max_channels, dtype=torch.bool))
        self._ready_channels = 0  # leading channels known initialised, to avoid a device sync per call

    @classmethod
    def from_scales(cls, scale: torch.Tensor, bits: int = 8, reduce_range: bool = False) -> LsqWeightQuantizer:
        """A quantizer holding copies of the given per-channel scales (e.g. sliced or BN-folded ones)."""
        quantizer = cls(scale.shape[0], bits, reduce_range).to(device=scale.device, dtype=scale.dtype)
        with torch.no_grad():
            quantizer.scale.copy_(scale)
        quantizer.initialized.fill_(True)
        return quantizer

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready_channels = 0

    def _sync_ready(self) -> None:
        self._ready_channels = int(self.initialized.int().cumprod(0).sum())

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Set the scales of the leading ``weight.shape[0]`` channels not yet initialised to ``max|w_c| / Qp``.

        ``forward`` calls it on first use. Calling it with the full (largest) weight of an elastic layer
        initialises every channel from its whole kernel, whichever subnet runs first.
        """
        channels = self._check_channels(weight)
        todo = ~self.initialized[:channels]
        fresh = weight.detach().flatten(1).abs().amax(dim=1).to(self.scale.dtype) / self.qmax
        self.scale[:channels] = torch.where(todo, fresh.clamp_min(_MIN_SCALE), self.scale[:channels])
        self.initialized[:channels] = True
        self._ready_channels = max(self._ready_channels, channels)

    def _check_channels(self, weight: torch.Tensor) -> int:
        channels = _leading_dim(weight)
        if channels > self.max_channels:
            raise ValueError(f"weight has {channels} output channels, the quantizer holds {self.max_channels}")
        return channels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        channels = self._check_channels(weight)
        if channels > self._ready_channels and self._export_qparams is None:
            self.initialize(weight)
        if channels > self._ready_channels:
            raise RuntimeError(f"LsqWeightQuantizer: channels beyond {self._ready_channels} are not initialised")
        shape = (channels,) + (1,) * (weight.dim() - 1)
        if self._export_qparams is not None:
            scale, zero_point = (t[:channels] for t in self._export_qparams)
            bound = scale.view(shape) * self.qmax
            weight = torch.clamp(weight, -bound, bound)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -128, 127)
        factor = 1.0 / math.sqrt(weight[0].numel() * self.qmax)
        scale = _positive(_GradScale.apply(self.scale[:channels], factor))
        # Fused: clamp(round(w / s_c), -Qp, Qp) * s_c with STE and LSQ's per-channel gradient.
        return torch._fake_quantize_learnable_per_channel_affine(
            weight, scale, torch.zeros_like(scale), 0, -self.qmax, self.qmax, 1.0
        )

    def _input_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """The step of the quantized input ``x`` when the layer computes the deployed arithmetic (eval
        mode, quantization on, outside :func:`export_mode`), else None."""
        if not self.enabled or self.training or self._export_qparams is not None:
            return None
        return getattr(x, _STEP_ATTRIBUTE, None)

    def deployed_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias of a conv / linear with this weight quantizer, as deployment adds it to ``x``'s products.

        In eval mode, on an input from an activation quantizer, that is ``bias`` rounded to its int32
        grid ``s_input * s_weight`` per output channel (what :func:`~spaceevo.quant.qat.export_int8`
        writes and QLinearConv / QGemm add); otherwise ``bias`` itself (training, FP32, export).
        """
        step = self._input_step(x)
        if bias is None or step is None:
            return bias
        return _dequantize_bias(bias, bias_grid(step, _positive(self.scale[: bias.shape[0]])))

    def folded_batchnorm(
        self, x: torch.Tensor, bn: nn.BatchNorm2d, channels: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(factor, bias)`` per channel such that ``conv(x) * factor + bias`` is the deployed conv + BN.

        Deployment folds an eval-mode BatchNorm into the conv: ``factor = gamma / sigma`` and the bias
        ``beta - mean * factor``, rounded to its int32 grid ``s_input * s_weight * |factor|``
        (:func:`fold_bn_scales`). None when the layer does not compute the deployed arithmetic (see
        :meth:`deployed_bias`) or ``bn`` is in training mode; the leading ``channels`` of ``bn``.
        """
        step = self._input_step(x)
        if step is None or bn.training or bn.running_var is None:
            return None
        factor, bias = batchnorm_fold(bn, channels)
        grid = bias_grid(step, _positive(self.scale[:channels]) * factor.abs())  # = fold_bn_scales
        return factor, _dequantize_bias(bias, grid)

    def extra_repr(self) -> str:
        return (
            f"max_channels={self.max_channels}, bits={self.bits}, reduce_range={self.reduce_range}, "
            f"codes=-{self.qmax}..{self.qmax}, enabled={self.enabled}"
        )


def export_params(quantizer: LsqQuantizer, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ONNX QuantizeLinear parameters of a quantizer, detached: ``(scale, zero_point)``.

    Activations: a 0-d float32 scale and a 0-d int32 zero point in ``0..255`` (``channels`` must be
    None). Weights: float32 scales and int32 zeros of shape ``(channels,)``, the leading ``channels``
    (all ``max_channels`` when None). These are the values the training forward uses.
    """
    if isinstance(quantizer, LsqActivationQuantizer):
        if channels is not None:
            raise ValueError("an activation quantizer has a single per-tensor scale; pass channels=None")
        scale, zero_point = quantizer._qparams(None)
        return scale.detach().float(), zero_point.detach().to(torch.int32)
    if isinstance(quantizer, LsqWeightQuantizer):
        channels = quantizer.max_channels if channels is None else channels
        if not 0 < channels <= quantizer.max_channels:
            raise ValueError(f"channels must be in 1..{quantizer.max_channels}, got {channels}")
        scale = _positive(quantizer.scale[:channels]).detach().float()
        return scale, torch.zeros(channels, dtype=torch.int32, device=scale.device)
    raise TypeError(f"not an LSQ quantizer: {type(quantizer).__name__}")


def _quantizers(model: nn.Module) -> list[LsqQuantizer]:
    return [m for m in model.modules() if isinstance(m, LsqQuantizer)]


def set_quant_mode(model: nn.Module, enabled: bool) -> int:
    """Switch every LSQ quantizer in ``model`` on (QAT) or off (FP32); returns how many were switched."""
    quantizers = _quantizers(model)
    for quantizer in quantizers:
        quantizer.enabled = enabled
    return len(quantizers)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, quantizers of ``model`` run the ``torch.fake_quantize_*`` ops that export as QDQ.

    The output equals the training forward bit for bit; no gradient reaches ``scale`` or ``beta``.
    Use it around ``torch.onnx.export(..., dynamo=False)``.
    """
    quantizers = [q for q in _quantizers(model) if q.enabled]
    try:
        for quantizer in quantizers:
            quantizer._sync_ready()
            quantizer._export_qparams = export_params(quantizer)
        yield model
    finally:
        for quantizer in quantizers:
            quantizer._export_qparams = None


@torch.no_grad()
def batchnorm_fold(bn: nn.BatchNorm2d, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(factor, bias)`` per channel of an eval-mode BatchNorm folded into the conv before it:
    ``factor = gamma / sqrt(var + eps)``, ``bias = beta - mean * factor``; the leading ``channels``
    (all when None) of ``bn``, which may be an elastic, wider one."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    channels = bn.running_var.shape[0] if channels is None else channels
    sigma = torch.sqrt(bn.running_var[:channels] + bn.eps)
    gamma = bn.weight[:channels] if bn.weight is not None else torch.ones_like(sigma)
    factor = gamma / sigma
    beta = bn.bias[:channels] if bn.bias is not None else torch.zeros_like(sigma)
    return factor, beta - bn.running_mean[:channels] * factor


@torch.no_grad()
def fold_bn_scales(weight_scale: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel weight scales after folding an eval-mode BatchNorm into the conv: ``s_c * |g_c / sigma_c|``.

    Symmetric per-channel quantization commutes with per-channel scaling, so quantizing the folded
    weight ``w * g / sigma`` with these scales gives the codes of ``w`` with ``weight_scale``,
    sign-flipped where ``g < 0`` (symmetric codes, never -128, flip exactly), so the deployed conv is the
    QAT conv followed by the eval-mode BatchNorm. Only a weight within float rounding (~1e-7 relative)
    of a rounding boundary can land on the neighbouring code. ``bn`` may be wider than ``weight_scale``
    (an elastic BatchNorm): its leading channels are used.
    """
    factor, _ = batchnorm_fold(bn, weight_scale.shape[0])
    return weight_scale.detach() * factor.abs()

def bias_grid(input_step: torch.Tensor, weight_steps: torch.Tensor) -> torch.Tensor:
    """The int32 bias grid of a quantized conv / linear, ``s_input * s_weight`` per output channel, as
    ONNX Runtime's quantizer computes it (the product in float64, stored as float32)."""
    return (input_step.detach().double() * weight_steps.detach().double()).float()


def int32_codes(bias: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The int32 codes of ``bias`` on ``grid``: ``round(bias / grid)`` in float64, half to even, as
    ONNX Runtime's quantizer rounds biases."""
    info = torch.iinfo(torch.int32)
    return torch.round(bias.detach().double() / grid.double()).clamp(info.min, info.max).to(torch.int32)


def _dequantize_bias(bias: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``bias`` on its int32 grid, as float in ``bias``'s dtype (DequantizeLinear of the int32 codes);
    a constant to autograd."""
    return (int32_codes(bias, grid).double() * grid.double()).to(bias.dtype)
