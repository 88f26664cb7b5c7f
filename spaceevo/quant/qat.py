"""Quantization-aware training of the supernet, and the INT8 ONNX export of its subnets.

The fake-quant forward simulates the graph that ONNX Runtime runs after its QDQ fusion, tensor for
tensor: quantizers sit exactly where :func:`onnxruntime.quantization.quantize_static` (QDQ, U8S8,
per-channel; :func:`spaceevo.quant.export.quantize_ptq`) puts QuantizeLinear nodes, so the exported
QAT model runs the same INT8 kernels as the post-training-quantized graphs the latency table was
measured on. The networks mark these places with :class:`~spaceevo.nn.layers.QuantPoint` s (the
identity in FP32); :func:`prepare_qat` replaces each by an LSQ+ quantizer of :mod:`spaceevo.quant.lsq`.

Weights: every conv and the classifier, int8 symmetric per output channel (codes -63..63 with
``reduce_range``), one quantizer per elastic layer allocated at its largest width and sliced. A conv
followed by BatchNorm quantizes its *unfolded* weight; at export BN is folded into the weight and
bias and the scales are folded alike (:func:`~spaceevo.quant.lsq.fold_bn_scales`), which keeps the
integer codes.

Activations: uint8 per tensor, shared by all subnets. Placement (Q = a quantizer; an activation
written ``+act`` is fused into its producer's requantization, so Q sees its output):

* network input: Q.
* conv + BN (+ReLU / +ReLU6 / linear): Q on the output. ReLU / ReLU6 outputs have their zero point
  fixed at 0 (:class:`ReluQuantizer`; ReLU6 also a range within [0, 6]), the condition under which
  ONNX Runtime drops the Relu / Clip and fuses into QLinearConv / QLinearAdd; a learned offset would
  leave the conv in float.
* conv + BN with hswish: Q on the conv output, Q on the HardSwish output (DQ→HardSwish→Q in float).
* conv + BN with swish: Q on the conv output, Q on the Sigmoid output, Q on the product.
* residual add: Q on the sum (+ReLU in ResNet blocks); it adds the quantized block input and the
  quantized body / projection-shortcut output.
* SE gate: Q after the global pool, Q after reduce conv +ReLU, Q on the expand conv output, Q on the
  HardSigmoid output, Q on the gated product.

Per block type (body in order, then the residual where the block has one):

* ``conv`` (stem): kxk+BN+ReLU→Q.
* ``mbv1_dual``: dw+BN+ReLU→Q, 1x1+BN+ReLU→Q, dw+BN+ReLU→Q, 1x1+BN+ReLU→Q; add→Q.
* ``mbv2``: 1x1+BN+ReLU6→Q, dw+BN+ReLU6→Q, 1x1+BN→Q; add→Q (projection 1x1+BN→Q).
* ``mbv3_se``: 1x1+BN→Q→hswish→Q, dw+BN→Q→hswish→Q, SE (5 Q), 1x1+BN→Q; add→Q.
* ``resnet``: 1x1+BN+ReLU→Q, kxk+BN+ReLU→Q, 1x1+BN→Q; add+ReLU→Q (projection 1x1+BN→Q).
* ``resnet_se``: as ``resnet`` with SE (5 Q) after the last conv.
* ``fused_mbconv``: kxk+BN→Q→sigmoid→Q, product→Q, 1x1+BN→Q; add→Q.
* head: 1x1+BN→Q→hswish→Q, pool→Q, 1x1 conv→Q→hswish, flatten→Q (ORT quantizes the classifier's
  input after the Flatten), linear→Q (quantized logits: the classifier runs as QGemm, as in PTQ).

Deployed arithmetic: in eval mode the fake-quant forward computes what the exported INT8 graph
computes. Each activation quantizer leaves its step on its output tensor, and a conv / linear whose
input carries one adds its bias rounded to the int32 grid ``s_input * s_weight`` and folds its
BatchNorm (running statistics) with the folded bias on that grid scaled by ``|gamma / sigma|``
(:meth:`~spaceevo.quant.lsq.LsqWeightQuantizer.deployed_bias` / ``folded_batchnorm``), as
:func:`export_int8` stores them. So every evaluation of a QAT supernet (held-out top-1 in training,
``extract``'s search fitness, ``spaceevo evaluate``) sees what ONNX Runtime runs, bias rounding
included. The training forward keeps BatchNorm in batch-statistics mode and biases in float: a
folded bias exists only for running statistics. :func:`fold_for_int8` is the deployed network with
BN folded into the weights; :func:`export_int8` writes exactly it, and ONNX Runtime's unfused QDQ
reference reproduces it up to float summation order. The fused INT8 kernels round on their own now
and then (QLinearAdd uses fixed-point multipliers, QLinearMul / QLinearConv requantize in float32):
single elements move by one step.

Quantizers initialise on the first training-mode batch they see; :func:`initialize_quantizers` does
that for all of them at once (the largest subnet, then subnets reaching the projection shortcuts it
does not use). :func:`~spaceevo.quant.lsq.set_quant_mode` switches between FP32 and QAT.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Collection, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from spaceevo.errors import UsageError
from spaceevo.nn.layers import QuantPoint
from spaceevo.nn.static import ConvBN, StaticNet
from spaceevo.nn.supernet import Supernet
from spaceevo.quant.export import export_fp32
from spaceevo.quant.lsq import (
    LsqActivationQuantizer,
    LsqQuantizer,
    LsqWeightQuantizer,
    _GradScale,
    _positive,
    batchnorm_fold,
    bias_grid,
    export_mode,
    export_params,
    fold_bn_scales,
    int32_codes,
    set_quant_mode,
)
from spaceevo.quant.mixed import keep_stages_float
from spaceevo.space import BlockChoice, CandidateSpace, Subnet

__all__ = [
    "ReluQuantizer",
    "prepare_qat",
    "lsq_quantizer",
    "initialize_quantizers",
    "extract_qat",
    "fold_for_int8",
    "fold_batchnorm",
    "export_int8",
    "set_quant_mode",
]


def _largest_scale_within(bound: float, qmax: int) -> float:
    """The largest float32 step ``s`` with ``float32(s * qmax) <= bound``: ORT compares in float32."""
    scale = np.float32(bound / qmax)
    while np.float32(scale * np.float32(qmax)) > np.float32(bound):
        scale = np.nextafter(scale, np.float32(0))
    return float(scale)


class ReluQuantizer(LsqActivationQuantizer):
    """LSQ quantizer of a ReLU / ReLU6 output: learned step, zero point fixed at 0, no learned offset.

    ONNX Runtime removes a Relu followed by QuantizeLinear only when the zero point is 0, and a
    Clip(0, 6) only when the quantized range lies within [0, 6]; otherwise the producing conv or add
    stays in float. So ``beta`` is a constant 0 buffer here and, with ``upper``, the step is capped
    at ``upper / Qp``.
    """

    def __init__(self, upper: float | None = None, bits: int = 8):
        super().__init__(bits)
        del self.beta
        self.register_buffer("beta", torch.tensor(0.0))
        self.upper = upper
        self.max_scale = math.inf if upper is None else _largest_scale_within(upper, self.qmax)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step so that ``[0, max(x)]`` (capped at ``upper``) maps onto ``0 .. Qp``."""
        high = x.detach().max().to(self.scale.dtype).clamp_min(torch.finfo(self.scale.dtype).eps)
        self.scale.copy_((high / self.qmax).clamp_max(self.max_scale))
        self.initialized.fill_(True)
        self._ready = True

    def _qparams(self, grad_factor: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale if grad_factor is None else _GradScale.apply(self.scale, grad_factor)
        scale = _positive(scale).clamp_max(self.max_scale)
        return scale, torch.zeros_like(scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", zero_point=0" + (f", upper={self.upper}" if self.upper is not None else "")


def lsq_quantizer(point: QuantPoint, reduce_range: bool, bits: int = 8) -> LsqQuantizer:
    """The LSQ+ quantizer of ``bits`` for a quantization point, as deployment quantizes it."""
    if point.kind == "weight":
        return LsqWeightQuantizer(point.channels, bits=bits, reduce_range=reduce_range)
    if point.kind == "relu":
        return ReluQuantizer(bits=bits)
    if point.kind == "relu6":
        return ReluQuantizer(upper=6.0, bits=bits)
    return LsqActivationQuantizer(bits=bits)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _lsq_quantizers(model: nn.Module) -> list[tuple[str, LsqQuantizer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LsqQuantizer)]


def prepare_qat(supernet: Supernet, *, reduce_range: bool) -> Supernet:
    """Put an LSQ+ quantizer (enabled, not yet initialised) at every quantization point of ``supernet``.

    Works in place and returns the supernet. ``reduce_range`` (7-bit weights) comes from the target's
    device fingerprint (:attr:`~spaceevo.latency.fingerprint.DeviceFingerprint.reduce_range`). Load a
    QAT checkpoint after this call: the quantizers' scales are part of the state dict.
    """
    if _lsq_quantizers(supernet):
        raise UsageError("the supernet already holds quantizers (prepare_qat was called before)")
    reference = next(supernet.parameters())
    for name, point in [(n, m) for n, m in supernet.named_modules() if isinstance(m, QuantPoint)]:
        quantizer = lsq_quantizer(point, reduce_range).to(device=reference.device, dtype=reference.dtype)
        _replace(supernet, name, quantizer.train(supernet.training))
    return supernet


def _alternating_subnet(space: CandidateSpace, start_wide: bool) -> Subnet:
    """Deepest subnet whose block widths alternate inside every stage (so every later block projects)."""
    stages = []
    for stage in space.stages:
        low, high = min(stage.widths), max(stage.widths)
        widths = [high if (index % 2 == 0) == start_wide else low for index in range(max(stage.depths))]
        stages.append(tuple(BlockChoice(max(stage.kernels), w, max(stage.expand_ratios)) for w in widths))
    return Subnet(tuple(stages), max(space.hyperspace.resolutions))


def _initialization_subnets(space: CandidateSpace, random_tries: int = 32) -> Iterator[Subnet]:
    """The largest subnet first, then subnets that reach what it does not (projection shortcuts)."""
    yield space.max_subnet()
    yield _alternating_subnet(space, start_wide=True)
    yield _alternating_subnet(space, start_wide=False)
    yield space.min_subnet()
    rng = random.Random(0)
    for _ in range(random_tries):
        yield space.random_subnet(rng)


@torch.no_grad()
def initialize_quantizers(supernet: Supernet, batch: torch.Tensor) -> None:
    """Initialise every quantizer of a prepared supernet from one batch, e.g. before DDP wrapping.

    Weight quantizers are set from the full (largest) weights; activation quantizers from training-
    mode forwards of ``batch``: the largest subnet, then subnets using the projection shortcuts it
    does not use. Quantizers already initialised (a loaded checkpoint) keep their values. BatchNorm
    statistics, the active subnet, the train/eval mode and the quant mode are left as they were.
    """
    quantizers = _lsq_quantizers(supernet)
    if not quantizers:
        raise UsageError("the supernet has no quantizers: call prepare_qat first")
    enabled = [q.enabled for _, q in quantizers]
    training = supernet.training
    active = supernet.active_subnet
    batchnorm_state = [
        (buffer, buffer.clone())
        for module in supernet.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in module.buffers()
    ]
    try:
        set_quant_mode(supernet, True)
        supernet.train()
        for module in supernet.modules():
            quantizer = getattr(module, "weight_quant", None)
            if isinstance(quantizer, LsqWeightQuantizer):
                quantizer.initialize(module.weight)
        pending = [(name, q) for name, q in quantizers if isinstance(q, LsqActivationQuantizer)]
        for subnet in _initialization_subnets(supernet.space):
            pending = [(name, q) for name, q in pending if not bool(q.initialized)]
            if not pending:
                break
            supernet.set_active(subnet)
            supernet(batch)
        pending = [name for name, q in pending if not bool(q.initialized)]
        if pending:
            raise RuntimeError(f"no subnet reached these quantizers: {', '.join(pending)}")
    finally:
        for buffer, saved in batchnorm_state:
            buffer.copy_(saved)
        for (_, quantizer), state in zip(quantizers, enabled):
            quantizer.enabled = state
        supernet.set_active(active)
        supernet.train(training)


def _static_copy(source: LsqQuantizer, point: QuantPoint) -> LsqQuantizer:
    """A copy of a supernet quantizer for a static layer: the leading scales of a weight quantizer."""
    if not isinstance(source, LsqWeightQuantizer):
        return copy.deepcopy(source)
    quantizer = LsqWeightQuantizer(point.channels, source.bits, source.reduce_range)
    quantizer.to(device=source.scale.device, dtype=source.scale.dtype)
    with torch.no_grad():
        quantizer.scale.copy_(source.scale[: point.channels])
        quantizer.initialized.copy_(source.initialized[: point.channels])
    quantizer.enabled = source.enabled
    return quantizer.train(source.training)


def extract_qat(supernet: Supernet, subnet: Subnet | None = None) -> StaticNet:
    """The static network of ``subnet`` (default: the active one) with copies of its quantizers.

    In eval mode it computes the supernet's fake-quant forward on that path; with quantizers of its
    own it can be fine-tuned or exported (:func:`export_int8`) on its own.
    """
    sources = dict(supernet.named_modules())
    if not any(isinstance(m, LsqQuantizer) for m in sources.values()):
        raise UsageError("the supernet has no quantizers: call prepare_qat first")
    static = supernet.extract(subnet)
    for name, point in [(n, m) for n, m in static.named_modules() if isinstance(m, QuantPoint)]:
        source = sources.get(name)
        if not isinstance(source, LsqQuantizer):
            raise RuntimeError(f"the supernet has no quantizer at {name}")
        _replace(static, name, _static_copy(source, point))
    return static.train(supernet.training)


def fold_batchnorm(model: StaticNet) -> StaticNet:
    """A CPU float32 copy of a static model (QAT or FP32) with every eval-mode BatchNorm folded into its conv.

    The folded weight is the fake-quantized weight times the BN factor and its quantizer gets the
    folded scales (:func:`~spaceevo.quant.lsq.fold_bn_scales`): it lies exactly on its grid, so the
    exported codes are the QAT codes (sign-flipped where the BN scale is negative) even for weights
    that float rounding would move across a rounding boundary if folded before quantization.
    """
    folded = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        for module in folded.modules():
            if not isinstance(module, ConvBN) or not isinstance(module.bn, nn.BatchNorm2d):
                continue
            conv, bn = module.conv, module.bn
            factor, bias = batchnorm_fold(bn)
            quantizer = conv.weight_quant
            weight = quantizer(conv.weight)
            if isinstance(quantizer, LsqWeightQuantizer) and quantizer.enabled:
                scales = fold_bn_scales(export_params(quantizer, conv.out_channels)[0], bn)
                conv.weight_quant = LsqWeightQuantizer.from_scales(scales, quantizer.bits, quantizer.reduce_range)
            conv.weight = nn.Parameter(weight * factor.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias)
            module.bn = nn.Identity()
    return folded.eval()


def fold_for_int8(model: StaticNet, float_stages: Collection[int] = ()) -> StaticNet:
    """The network :func:`export_int8` writes, in PyTorch: a CPU float32 eval-mode copy of ``model``
    (an initialised static QAT model, :func:`extract_qat`) with BatchNorm folded into the convs and
    ``float_stages`` in float (:func:`~spaceevo.quant.mixed.keep_stages_float`).

    In eval mode its convs and linear add their biases rounded to the int32 grid ``s_input * s_weight``
    (:meth:`~spaceevo.quant.lsq.LsqWeightQuantizer.deployed_bias`), as the export stores them; so it
    computes what ONNX Runtime's QDQ graph computes before kernel fusion, up to float summation order.
    ``model``'s own eval forward computes the same with BatchNorm unfolded.
    """
    _check_exportable(model)
    return fold_batchnorm(keep_stages_float(model, float_stages) if float_stages else model)


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, None if ``name`` is computed."""
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _quantize_biases(proto: onnx.ModelProto) -> int:
    """Store the float bias of every Conv/Gemm with quantized input and weight as int32 + DequantizeLinear.

    The grid is ``s_input * s_weight`` per output channel, as ``quantize_static`` writes it and as
    QLinearConv / QGemm need it; the float biases are removed. Returns the number of biases quantized.
    """
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes = []
    quantized = 0
    for node in graph.node:
        sources = [producers.get(name) for name in node.input[:2]]
        if (
            node.op_type in ("Conv", "Gemm")
            and len(node.input) > 2
            and node.input[2] in initializers
            and all(s is not None and s.op_type == "DequantizeLinear" for s in sources)
        ):
            input_scale = _constant(graph, sources[0].input[1])
            weight_scale = _constant(graph, sources[1].input[1])
            if input_scale is not None and weight_scale is not None:
                name = node.input[2]
                grid = bias_grid(torch.tensor(input_scale), torch.tensor(weight_scale))
                codes = int32_codes(torch.tensor(numpy_helper.to_array(initializers[name])), grid).numpy()
                scale = grid.numpy()
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(codes, f"{name}_quantized"),
                        numpy_helper.from_array(scale, f"{name}_quantized_scale"),
                        numpy_helper.from_array(np.zeros_like(codes), f"{name}_quantized_zero_point"),
                    ]
                )
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{name}_quantized", f"{name}_quantized_scale", f"{name}_quantized_zero_point"],
                        [f"{name}_dequantized"],
                        name=f"{node.name}_bias_DequantizeLinear",
                        axis=0,
                    )
                )
                node.input[2] = f"{name}_dequantized"
                quantized += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)
    return quantized


def _check_exportable(model: nn.Module) -> None:
    """Raise :class:`UsageError` unless every quantization point holds an enabled, initialised quantizer."""
    quantizers = _lsq_quantizers(model)
    if not quantizers or any(isinstance(m, QuantPoint) for m in model.modules()):
        raise UsageError("the model is not quantization-aware: prepare it with prepare_qat and extract_qat")
    disabled = [name for name, q in quantizers if not q.enabled]
    if disabled:
        raise UsageError(f"quantizers are disabled (set_quant_mode(model, True) first): {', '.join(disabled)}")
    missing = [
        name
        for name, q in quantizers
        if not (bool(q.initialized) if isinstance(q, LsqActivationQuantizer) else bool(q.initialized.all()))
    ]
    if missing:
        raise UsageError(f"quantizers are not initialised (initialize_quantizers first): {', '.join(missing)}")


def export_int8(
    model: Supernet | StaticNet, subnet: Subnet | None, input_shape: Sequence[int],
    float_stages: Collection[int] = (),
) -> onnx.ModelProto:
    """The INT8 QDQ ONNX model of a QAT subnet, ready for ONNX Runtime (not to be re-quantized).

    ``model`` is a prepared supernet (``subnet`` None: the active one) or a static QAT model from
    :func:`extract_qat` (``subnet`` None or its own). The network of :func:`fold_for_int8` is
    exported by the TorchScript exporter (GlobalAveragePool, fast) for a fixed input shape, its learned
    scales as QuantizeLinear / DequantizeLinear pairs with integer zero points
    (:func:`~spaceevo.quant.lsq.export_mode`) and its biases as int32 + DequantizeLinear.
    ``float_stages`` (stage indices, 0 the stem) are written in float: one mixed INT8/FP32 model.
    """
    if isinstance(model, Supernet):
        static = extract_qat(model, subnet)
    elif isinstance(model, StaticNet):
        if subnet is not None and subnet != model.arch.subnet:
            raise UsageError(f"the static model is subnet {model.arch.subnet}, not {subnet}")
        static = model
    else:
        raise TypeError(f"expected a Supernet or a StaticNet, got {type(model).__name__}")
    folded = fold_for_int8(static, float_stages)
    with export_mode(folded):
        proto = export_fp32(folded, input_shape)
    _quantize_biases(proto)
    onnx.checker.check_model(proto)
    return proto
