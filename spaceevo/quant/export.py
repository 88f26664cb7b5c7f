"""ONNX export of static networks: FP32 through PyTorch, INT8 (QDQ, U8S8) through ONNX Runtime.

The TorchScript exporter is used on purpose: it is ~10x faster than the dynamo exporter on these
small graphs (latency tables export thousands of blocks) and writes ``AdaptiveAvgPool2d(1)`` as
GlobalAveragePool, which has an INT8 kernel, where the dynamo exporter writes ReduceMean.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

OPSET = 17


def export_fp32(model: torch.nn.Module, input_shape: Sequence[int], opset: int = OPSET) -> onnx.ModelProto:
    """Export ``model`` (in eval mode, BatchNorm folded into convs) for a fixed input shape at ``opset``."""
    model = model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(*input_shape),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    inline_initializer_identities(proto)
    rewrite_reduce_mean_to_global_pool(proto)
    return proto


def inline_initializer_identities(proto: onnx.ModelProto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The TorchScript exporter shares equal tensors (e.g. the zero biases of fresh BatchNorms) through
    Identity nodes; ONNX Runtime's quantizer then sees a bias that is not an initializer, cannot
    quantize it to int32, and the conv stays in float. Returns the number of nodes inlined.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    inlined = 0
    for node in list(proto.graph.node):
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
            proto.graph.node.remove(node)
            inlined += 1
    return inlined


def rewrite_reduce_mean_to_global_pool(proto: onnx.ModelProto) -> int:
    """Replace ReduceMean over H and W (keepdims) by GlobalAveragePool, which ONNX Runtime runs in INT8.

    Returns the number of nodes rewritten. A no-op for graphs from the TorchScript exporter.
    """
    rewritten = 0
    inits = {i.name: i for i in proto.graph.initializer}
    for index, node in enumerate(list(proto.graph.node)):
        if node.op_type != "ReduceMean":
            continue
        axes = None
        keepdims = 1
        for attr in node.attribute:
            if attr.name == "axes":
                axes = list(attr.ints)
            if attr.name == "keepdims":
                keepdims = attr.i
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = onnx.numpy_helper.to_array(inits[node.input[1]]).tolist()
        if keepdims != 1 or sorted(a % 4 for a in axes or []) != [2, 3]:
            continue
        replacement = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
        proto.graph.node.remove(node)
        proto.graph.node.insert(index, replacement)
        rewritten += 1
    return rewritten


class _ArrayReader(CalibrationDataReader):
    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._iter = iter({input_name: b.astype(np.float32)} for b in batches)

    def get_next(self):
        return next(self._iter, None)


def quantize_ptq(
    fp32: onnx.ModelProto,
    calibration: Iterable[np.ndarray],
    *,
    reduce_range: bool,
    work_dir: str | Path,
) -> onnx.ModelProto:
    """Static post-training quantization in QDQ format: uint8 activations, int8 per-channel weights.

    ``reduce_range`` (7-bit weights) comes from the device fingerprint: ONNX Runtime recommends it on
    x86 without VNNI, where U8S8 products can saturate 16-bit intermediates.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    src = work_dir / "fp32.onnx"
    dst = work_dir / "int8.onnx"
    onnx.save(fp32, src)
    input_name = fp32.graph.input[0].name
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice through the root logger on every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(src),
                str(dst),
                _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
    finally:
        root.setLevel(level)
    return onnx.load(str(dst))


def strip_io_quantization(
    proto: onnx.ModelProto, *, strip_input: bool = True, strip_output: bool = True
) -> onnx.ModelProto:
    """Make a QDQ model take and/or return uint8 tensors, as a block inside a whole INT8 network does.

    With ``strip_input`` the input QuantizeLinear is removed and the graph input becomes the quantized
    tensor; with ``strip_output`` the output DequantizeLinear is removed and the graph output becomes
    the quantized tensor. Raises ValueError if the graph does not have that shape.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    input_name = graph.input[0].name
    output_name = graph.output[0].name
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    in_q = [n for n in consumers.get(input_name, []) if n.op_type == "QuantizeLinear"]
    if len(in_q) != 1 or len(consumers[input_name]) != 1:
        raise ValueError("graph input is not consumed by exactly one QuantizeLinear")
    in_q = in_q[0]
    out_dq = producers.get(output_name)
    if out_dq is None or out_dq.op_type != "DequantizeLinear":
        raise ValueError("graph output is not produced by a DequantizeLinear")

    if strip_input:
        quant_in = in_q.output[0]
        graph.node.remove(in_q)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == quant_in:
                    node.input[i] = input_name
        shape_in = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        graph.input.remove(graph.input[0])
        graph.input.insert(0, helper.make_tensor_value_info(input_name, onnx.TensorProto.UINT8, shape_in))
    if strip_output:
        quant_out = out_dq.input[0]
        graph.node.remove(out_dq)
        shape_out = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        graph.output.remove(graph.output[0])
        graph.output.insert(0, helper.make_tensor_value_info(quant_out, onnx.TensorProto.UINT8, shape_out))
    return proto
