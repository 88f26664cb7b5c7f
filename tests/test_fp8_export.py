"""FP8 QDQ ONNX export (spaceevo.quant.fp8_export): ONNX Runtime runs it and agrees with PyTorch's
simulation of the same format on the embedded Fashion-MNIST test split."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from spaceevo.deploy.evaluate import engine_predictions
from spaceevo.errors import UsageError
from spaceevo.nn import Supernet
from spaceevo.quant.formats import get_format
from spaceevo.quant.fp8_export import FP8_OPSET, export_fp8
from spaceevo.quant.network import FormatConfig, calibrate_network, quantize_network
from spaceevo.space import load_space
from spaceevo.train.data import DataSpec, make_loader
from spaceevo.train.loop import load_space_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONNX_TYPES = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}


@pytest.fixture(scope="module")
def trained():
    """The min subnet of tiny-1111-0000 trained briefly in FP32 (64 % test top-1), and its data."""
    torch.manual_seed(0)
    space = load_space("tiny-1111-0000")
    subnet = space.min_subnet()
    data = load_space_data(space.hyperspace, DataSpec.parse("embedded"))
    net = Supernet(space).extract(subnet).train()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    loader = make_loader(data.train.with_resolution(subnet.resolution), 64, True, seed=0, workers=0, distributed=False)
    for step, (x, y) in enumerate(loader):
        if step == 80:
            break
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), subnet.resolution, data


def simulated(trained, name: str):
    net, resolution, data = trained
    model = quantize_network(net, FormatConfig.named(name))
    loader = make_loader(data.heldout.with_resolution(resolution), 128, False, workers=0, distributed=False)
    calibrate_network(model, (x for step, (x, _) in enumerate(loader) if step < 2))
    return model


def torch_predictions(model, split, resolution: int) -> np.ndarray:
    loader = make_loader(split.with_resolution(resolution), 256, False, workers=0, distributed=False)
    with torch.no_grad():
        return np.concatenate([model(x).argmax(1).numpy() for x, _ in loader])


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_onnx_runtime_top1_is_within_0_3_points_of_the_simulation(trained, name: str) -> None:
    net, resolution, data = trained
    model = simulated(trained, name)
    proto = export_fp8(model, (1, 1, resolution, resolution))
    ours = torch_predictions(model, data.test, resolution)
    theirs = engine_predictions(proto, data.test, resolution, threads=1)
    targets = data.test.targets
    sim_top1, ort_top1 = 100 * (ours == targets).mean(), 100 * (theirs == targets).mean()
    fp32_top1 = 100 * (torch_predictions(net, data.test, resolution) == targets).mean()
    assert fp32_top1 > 40  # a trained network, so agreement is not agreement on noise
    assert abs(sim_top1 - ort_top1) <= 0.3, (sim_top1, ort_top1)
    assert (ours == theirs).mean() >= 0.99


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_the_graph_is_float8_qdq_at_opset_19(trained, name: str) -> None:
    _, resolution, _ = trained
    proto = export_fp8(simulated(trained, name), (1, 1, resolution, resolution))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == FP8_OPSET
    initializers = {i.name: i for i in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert "Relu" not in ops and "Clip" not in ops  # see _relu_and_clip_as_min_max
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(helper.get_attribute_value(a) == 1 for n in quantize for a in n.attribute if a.name == "saturate")
    assert all(initializers[n.input[2]].data_type == ONNX_TYPES[name] for n in quantize)
    producers = {out: node for node in proto.graph.node for out in node.output}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    for layer in layers:
        weight = producers[layer.input[1]]
        assert weight.op_type == "DequantizeLinear" and initializers[weight.input[0]].data_type == ONNX_TYPES[name]
        assert producers[layer.input[0]].op_type == "DequantizeLinear"


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_onnx_runtime_quantize_linear_rounds_as_the_format(name: str) -> None:
    """One QuantizeLinear / DequantizeLinear pair: ONNX Runtime's rounding and saturation are the
    format's, value for value, on random values and beyond the range."""
    fmt = get_format(name)
    zero = helper.make_tensor("zp", ONNX_TYPES[name], [], [0.0])
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], saturate=1),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [zero, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FP8_OPSET)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * rng.choice([1e-4, 1e-2, 1.0, 100.0], 20000)).astype(np.float32)
    x = np.concatenate([x, np.array([1e6, -1e6], np.float32)])
    expected = (fmt.round(torch.from_numpy(x) / torch.tensor(0.01)) * 0.01).numpy()
    assert np.array_equal(session.run(None, {"x": x})[0], expected)


def test_non_fp8_formats_are_refused_with_the_allowed_ones(trained) -> None:
    _, resolution, _ = trained
    with pytest.raises(UsageError, match="fp8_e4m3, fp8_e5m2"):
        export_fp8(simulated(trained, "fp6_e3m2"), (1, 1, resolution, resolution))
    uncalibrated = quantize_network(trained[0], FormatConfig.named("fp8_e4m3"))
    with pytest.raises(UsageError, match="calibrate_network"):
        export_fp8(uncalibrated, (1, 1, resolution, resolution))
    onnx.checker.check_model(export_fp8(simulated(trained, "fp8_e4m3"), (1, 1, resolution, resolution)))
