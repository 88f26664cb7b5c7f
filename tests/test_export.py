"""Tests of the ONNX export path (spaceevo.quant.export): FP32 export, INT8 post-training
quantization, and the graph rewrites that keep ONNX Runtime on its INT8 kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from spaceevo.latency.endtoend import randomize_batchnorm
from spaceevo.nn.static import Block, build_static
from spaceevo.quant.export import (
    export_fp32,
    inline_initializer_identities,
    quantize_ptq,
    rewrite_reduce_mean_to_global_pool,
    strip_io_quantization,
)
from spaceevo.blocks import BLOCK_KINDS, BlockSpec
from spaceevo.space import load_space

SIZE = 8  # spatial size of block inputs: small keeps export, quantization and ORT fast


def make_spec(block_type: str, cin: int, cout: int, stride: int, shortcut: str, kernel: int = 3,
              expand: float | None = None, size: int = SIZE) -> BlockSpec:
    variant = BLOCK_KINDS[block_type].variant()
    if expand is None:
        expand = {"none": 0.0, "input": 3.0, "output": 1.0}[variant.expand_of]
    return BlockSpec(
        variant=variant,
        in_channels=cin,
        out_channels=cout,
        kernel=kernel,
        expand=expand,
        stride=stride,
        input_size=size,
        shortcut=shortcut,
    )


# Every block type; stride 2, projection and identity shortcuts; k3 and k5; expand 0.5 to 6.
SPECS = [
    make_spec("conv", 8, 16, 2, "none"),
    make_spec("conv", 16, 16, 1, "none", kernel=5),
    make_spec("mbv1_dual", 16, 24, 2, "none"),
    make_spec("mbv1_dual", 16, 16, 1, "identity", kernel=5),
    make_spec("mbv2", 16, 24, 2, "none", expand=6.0),
    make_spec("mbv2", 16, 16, 1, "identity"),
    make_spec("mbv2", 16, 24, 1, "projection"),
    make_spec("mbv3_se", 16, 24, 2, "none"),
    make_spec("mbv3_se", 24, 24, 1, "identity", kernel=5),
    make_spec("resnet", 16, 24, 2, "projection", expand=0.5),
    make_spec("resnet", 24, 24, 1, "identity"),
    make_spec("resnet_se", 16, 24, 2, "projection"),
    make_spec("resnet_se", 24, 24, 1, "identity", expand=0.5),
    make_spec("fused_mbconv", 16, 24, 2, "none", expand=2.0),
    make_spec("fused_mbconv", 16, 16, 1, "identity", kernel=5, expand=1.0),
]


def spec_id(spec: BlockSpec) -> str:
    return f"{spec.block_type}-s{spec.stride}-{spec.shortcut}-k{spec.kernel}"


def test_specs_cover_every_block_type_and_shortcut():
    assert {s.block_type for s in SPECS} == set(BLOCK_KINDS)
    assert {s.shortcut for s in SPECS} == {"none", "identity", "projection"}
    assert any(s.stride == 2 for s in SPECS)


def block_module(spec: BlockSpec, randomize: bool = True, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    module = Block(spec).eval()
    if randomize:
        randomize_batchnorm(module, seed)
    return module


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types of the graph ONNX Runtime actually runs (QDQ fusion happens at EXTENDED)."""
    path = tmp_path / "optimized.onnx"
    session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def calibration_batches(shape, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_no_float_conv(ops: Counter) -> None:
    assert ops["QLinearConv"] > 0, dict(ops)
    float_convs = {op: n for op, n in ops.items() if op in ("Conv", "FusedConv", "NhwcFusedConv")}
    assert not float_convs, f"convs left in float: {dict(ops)}"


# ---------------------------------------------------------------------------------------------
# Blocks: FP32 export, INT8 quantization, INT8 kernels


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_block_exports_and_quantizes(spec: BlockSpec, tmp_path: Path):
    module = block_module(spec)
    shape = (1, spec.in_channels, spec.input_size, spec.input_size)
    x = calibration_batches(shape, 1, seed=1)[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert expected.shape == (1, spec.out_channels, spec.output_size, spec.output_size)

    fp32 = export_fp32(module, shape)
    onnx.checker.check_model(fp32)
    (fp32_out,) = session(fp32).run(None, {"input": x})
    np.testing.assert_allclose(fp32_out, expected, atol=1e-4, rtol=1e-4)

    int8 = quantize_ptq(fp32, calibration_batches(shape) + [x], reduce_range=True, work_dir=tmp_path / "q")
    (int8_out,) = session(int8).run(None, {"input": x})
    assert int8_out.shape == expected.shape
    assert int8_out.dtype == np.float32
    assert cosine(int8_out, fp32_out) > 0.95
    assert np.linalg.norm(int8_out - fp32_out) / np.linalg.norm(fp32_out) < 0.2

    assert_no_float_conv(optimized_ops(int8, tmp_path))


@pytest.mark.parametrize("block_type", sorted(BLOCK_KINDS))
def test_fresh_batchnorm_blocks_still_quantize_every_conv(block_type: str, tmp_path: Path):
    """Freshly initialised BatchNorms have equal (zero) biases, which the TorchScript exporter shares
    through Identity nodes; unless they are inlined, the quantizer leaves those convs in float."""
    spec = next(s for s in SPECS if s.block_type == block_type and s.stride == 1) if block_type != "conv" else SPECS[1]
    module = block_module(spec, randomize=False)
    shape = (1, spec.in_channels, spec.input_size, spec.input_size)
    fp32 = export_fp32(module, shape)
    int8 = quantize_ptq(fp32, calibration_batches(shape, 2), reduce_range=True, work_dir=tmp_path / "q")
    assert_no_float_conv(optimized_ops(int8, tmp_path))
    assert not [n for n in fp32.graph.node if n.op_type == "Identity"]


def test_whole_static_net_exports_and_quantizes(tmp_path: Path):
    space = load_space("tiny-2222-0000")
    arch = space.resolve(space.max_subnet())
    torch.manual_seed(0)
    model = build_static(arch).eval()
    randomize_batchnorm(model)
    shape = (1, arch.in_channels, arch.resolution, arch.resolution)
    x = calibration_batches(shape, 1, seed=3)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()

    fp32 = export_fp32(model, shape)
    onnx.checker.check_model(fp32)
    assert not [n for n in fp32.graph.node if n.op_type in ("ReduceMean", "Identity")]
    (fp32_out,) = session(fp32).run(None, {"input": x})
    np.testing.assert_allclose(fp32_out, expected, atol=1e-4, rtol=1e-3)

    int8 = quantize_ptq(fp32, calibration_batches(shape, 2), reduce_range=True, work_dir=tmp_path / "q")
    onnx.checker.check_model(int8)
    ops = Counter(n.op_type for n in int8.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    (int8_out,) = session(int8).run(None, {"input": x})
    assert int8_out.shape == (1, arch.num_classes)
    assert np.isfinite(int8_out).all()


# ---------------------------------------------------------------------------------------------
# Graph rewrites on hand-made graphs


def reduce_mean_model(axes: list[int], keepdims: int = 1, opset: int = 13) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])
    out_shape = [1 if i in [a % 4 for a in axes] else d for i, d in enumerate([1, 3, 4, 5])]
    if not keepdims:
        out_shape = [d for i, d in enumerate([1, 3, 4, 5]) if i not in [a % 4 for a in axes]]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    initializers = []
    if opset >= 18:
        initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes"))
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="pool", keepdims=keepdims)
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], name="pool", axes=axes, keepdims=keepdims)
    relu_in = helper.make_node("Relu", ["x0"], ["x"], name="before")
    graph = helper.make_graph(
        [relu_in, node],
        "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 4, 5])],
        [y],
        initializers,
    )
    del x
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return session(model).run(None, feed)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes", [[2, 3], [3, 2], [-2, -1]])
def test_reduce_mean_over_hw_becomes_global_average_pool(opset: int, axes: list[int]):
    model = reduce_mean_model(axes, opset=opset)
    feed = {"x0": np.random.default_rng(0).standard_normal((1, 3, 4, 5)).astype(np.float32)}
    (before,) = run(model, feed)
    assert rewrite_reduce_mean_to_global_pool(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Relu", "GlobalAveragePool"]  # order kept
    pool = model.graph.node[1]
    assert list(pool.input) == ["x"] and list(pool.output) == ["y"]
    (after,) = run(model, feed)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([2], 1), ([1, 2, 3], 1), ([2, 3], 0)])
def test_other_reduce_means_are_left_alone(opset: int, axes: list[int], keepdims: int):
    model = reduce_mean_model(axes, keepdims=keepdims, opset=opset)
    before = model.SerializeToString()
    assert rewrite_reduce_mean_to_global_pool(model) == 0
    assert model.SerializeToString() == before


def test_inline_initializer_identities():
    bias = numpy_helper.from_array(np.array([1.0, -2.0, 3.0], dtype=np.float32), "bias")
    nodes = [
        helper.make_node("Identity", ["bias"], ["bias_copy"], name="share"),
        helper.make_node("Identity", ["x"], ["x_copy"], name="not_an_initializer"),
        helper.make_node("Add", ["x_copy", "bias"], ["a"], name="add1"),
        helper.make_node("Add", ["a", "bias_copy"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feed = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    (before,) = run(model, feed)

    assert inline_initializer_identities(model) == 1
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    assert names == ["not_an_initializer", "add1", "add2"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(inits) == {"bias", "bias_copy"}
    np.testing.assert_array_equal(inits["bias_copy"], inits["bias"])
    (after,) = run(model, feed)
    np.testing.assert_array_equal(after, before)
    assert inline_initializer_identities(model) == 0  # idempotent


# ---------------------------------------------------------------------------------------------
# Quantized boundaries of stand-alone blocks


@pytest.fixture(scope="module")
def quantized_block(tmp_path_factory) -> tuple[BlockSpec, onnx.ModelProto, onnx.ModelProto]:
    spec = make_spec("mbv2", 8, 8, 1, "identity")
    shape = (1, spec.in_channels, spec.input_size, spec.input_size)
    fp32 = export_fp32(block_module(spec), shape)
    int8 = quantize_ptq(fp32, calibration_batches(shape, 2), reduce_range=True,
                        work_dir=tmp_path_factory.mktemp("q"))
    return spec, fp32, int8


def elem_type(value_info) -> int:
    return value_info.type.tensor_type.elem_type


def shape_of(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_strip_both_ends_gives_uint8_boundaries(quantized_block):
    spec, _, int8 = quantized_block
    original = int8.SerializeToString()
    stripped = strip_io_quantization(int8)
    assert int8.SerializeToString() == original, "the input model must not be modified"
    onnx.checker.check_model(stripped)
    assert elem_type(stripped.graph.input[0]) == TensorProto.UINT8
    assert elem_type(stripped.graph.output[0]) == TensorProto.UINT8
    assert shape_of(stripped.graph.input[0]) == [1, 8, SIZE, SIZE]
    assert shape_of(stripped.graph.output[0]) == [1, 8, SIZE, SIZE]
    ops = Counter(n.op_type for n in stripped.graph.node)
    ops_before = Counter(n.op_type for n in int8.graph.node)
    assert ops["QuantizeLinear"] == ops_before["QuantizeLinear"] - 1
    assert ops["DequantizeLinear"] == ops_before["DequantizeLinear"] - 1

    sess = session(stripped)
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).integers(0, 256, (1, 8, SIZE, SIZE), dtype=np.uint8)}
    (out,) = sess.run(None, feed)
    assert out.dtype == np.uint8 and out.shape == (1, 8, SIZE, SIZE)


def test_strip_output_only_keeps_float_input(quantized_block):
    _, _, int8 = quantized_block
    stripped = strip_io_quantization(int8, strip_input=False)
    assert elem_type(stripped.graph.input[0]) == TensorProto.FLOAT
    assert elem_type(stripped.graph.output[0]) == TensorProto.UINT8
    sess = session(stripped)
    (out,) = sess.run(None, {"input": np.zeros((1, 8, SIZE, SIZE), np.float32)})
    assert out.dtype == np.uint8

    input_only = strip_io_quantization(int8, strip_output=False)
    assert elem_type(input_only.graph.input[0]) == TensorProto.UINT8
    assert elem_type(input_only.graph.output[0]) == TensorProto.FLOAT
    (out,) = session(input_only).run(None, {"input": np.zeros((1, 8, SIZE, SIZE), np.uint8)})
    assert out.dtype == np.float32


def test_strip_without_quantization_raises(quantized_block):
    _, fp32, _ = quantized_block
    with pytest.raises(ValueError, match="QuantizeLinear"):
        strip_io_quantization(fp32)

    # input quantized, but the output not produced by a DequantizeLinear
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
            helper.make_node("Relu", ["xd"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="DequantizeLinear"):
        strip_io_quantization(model)
