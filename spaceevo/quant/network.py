"""A static network simulated in a number format: quantizers at its quantization points, PTQ calibration.

:func:`quantize_network` folds BatchNorm into the convs of an FP32 static network (what every
deployment does before quantizing) and puts the quantizer of a :class:`FormatConfig` at each of its
:class:`~spaceevo.nn.layers.QuantPoint` s: the places ONNX Runtime's INT8 graph holds quantized,
so every format is compared on the same tensors. :func:`calibrate_network` sets the scales for
post-training quantization from held-out images: weights per output channel (``max|w_c| /
max_value``), activations per tensor (``max|x| / max_value`` over the calibration images, the
statistics taken with quantization off); integer formats initialise their LSQ+ quantizers from the
same statistics (``[min, max]``). MX quantizers need no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from spaceevo.errors import UsageError
from spaceevo.nn.layers import QuantPoint
from spaceevo.nn.static import StaticNet
from spaceevo.quant.formats import NumberFormat, get_format
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqWeightQuantizer
from spaceevo.quant.qat import fold_batchnorm
from spaceevo.quant.quantizers import MxQuantizer, ScaledQuantizer, make_quantizer

__all__ = ["FormatConfig", "quantize_network", "calibrate_network", "format_quantizers", "set_format_mode"]

_QUANTIZERS = (ScaledQuantizer, MxQuantizer, LsqActivationQuantizer, LsqWeightQuantizer)


@dataclass(frozen=True)
class FormatConfig:
    """The formats of a network's weights and activations and how their scales work.

    ``per_channel``: weight scales per output channel (else per tensor). ``integer_bias``: minifloat
    scales restricted to powers of two (a per-tensor integer exponent bias, flexible FP8).
    ``reduce_range``: 7-bit integer weights, as on x86 without VNNI.
    """

    weight: NumberFormat
    activation: NumberFormat
    per_channel: bool = True
    integer_bias: bool = False
    reduce_range: bool = False

    @classmethod
    def named(cls, name: str, **options: bool) -> FormatConfig:
        """Weights and activations in the registered format ``name`` (:func:`~spaceevo.quant.formats.get_format`)."""
        fmt = get_format(name)
        return cls(fmt, fmt, **options)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def quantize_network(static: StaticNet, config: FormatConfig) -> StaticNet:
    """A CPU float32 eval-mode copy of an FP32 static network (BatchNorm calibrated for it) with
    BatchNorm folded and a quantizer of ``config`` at every quantization point, not yet calibrated."""
    points = [(n, m) for n, m in static.named_modules() if isinstance(m, QuantPoint)]
    if not points:
        raise UsageError("the network has no quantization points left: pass an FP32 static network (Supernet.extract)")
    folded = fold_batchnorm(static)
    for name, point in [(n, m) for n, m in folded.named_modules() if isinstance(m, QuantPoint)]:
        fmt = config.weight if point.kind == "weight" else config.activation
        quantizer = make_quantizer(
            fmt, point.kind, point.channels, per_channel=config.per_channel, integer_bias=config.integer_bias,
            reduce_range=config.reduce_range,
        )
        _replace(folded, name, quantizer)
    return folded.eval()


def format_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantizers :func:`quantize_network` put into ``model``, with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _QUANTIZERS)]


def set_format_mode(model: nn.Module, enabled: bool) -> int:
    """Switch every quantizer of ``model`` on or off (FP32); returns how many were switched."""
    quantizers = format_quantizers(model)
    for _, quantizer in quantizers:
        quantizer.enabled = enabled
    return len(quantizers)


def _weights(model: nn.Module) -> dict[int, torch.Tensor]:
    """The weight each weight quantizer of ``model`` quantizes, by the quantizer's id."""
    return {
        id(module.weight_quant): module.weight
        for module in model.modules()
        if isinstance(getattr(module, "weight_quant", None), _QUANTIZERS)
    }


@torch.no_grad()
def calibrate_network(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every scale of a :func:`quantize_network` model for post-training quantization from
    ``batches`` of calibration images (see the module docstring); returns the number of images.
    The model ends in eval mode with its quantizers on."""
    quantizers = format_quantizers(model)
    weights = _weights(model)
    activations = [(n, q) for n, q in quantizers if id(q) not in weights and not isinstance(q, MxQuantizer)]
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            low[name] = torch.minimum(low[name], x.min()) if name in low else x.min()
            high[name] = torch.maximum(high[name], x.max()) if name in high else x.max()

        return hook

    handles = [q.register_forward_pre_hook(observer(n)) for n, q in activations]
    set_format_mode(model, False)
    model.eval()
    images = 0
    try:
        for batch in batches:
            model(batch)
            images += int(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        set_format_mode(model, True)
    if images == 0:
        raise UsageError("no calibration images")
    missing = [n for n, _ in activations if n not in low]
    if missing:
        raise RuntimeError(f"calibration never reached these quantizers: {', '.join(missing)}")
    for name, quantizer in activations:
        if isinstance(quantizer, ScaledQuantizer):
            quantizer.calibrate(torch.maximum(low[name].abs(), high[name].abs()))
        else:
            quantizer.initialized.fill_(False)
            quantizer.initialize(torch.stack([low[name], high[name]]))
    for _, quantizer in quantizers:
        weight = weights.get(id(quantizer))
        if weight is None:
            continue
        if isinstance(quantizer, ScaledQuantizer):
            amax = weight.abs().amax() if quantizer.channels is None else weight.flatten(1).abs().amax(dim=1)
            quantizer.calibrate(amax)
        elif isinstance(quantizer, LsqWeightQuantizer):
            quantizer.initialized.fill_(False)
            quantizer.initialize(weight)
    return images
