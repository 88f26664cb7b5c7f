"""Quantization-aware training of the supernet and its INT8 export (spaceevo.quant.qat): quantizers sit
where ONNX Runtime's QDQ graph quantizes, extracted subnets keep them, and ONNX Runtime runs the exported
model as the PyTorch fake-quant model computes it, on the INT8 kernels of the post-training-quantized graph."""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from spaceevo.errors import UsageError
from spaceevo.nn import StaticNet, Supernet
from spaceevo.nn.elastic import ElasticBatchNorm2d
from spaceevo.nn.layers import QuantPoint
from spaceevo.quant.export import export_fp32, quantize_ptq
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqQuantizer, LsqWeightQuantizer, export_params, set_quant_mode
from spaceevo.quant.qat import (
    ReluQuantizer,
    export_int8,
    extract_qat,
    fold_for_int8,
    initialize_quantizers,
    prepare_qat,
)
from spaceevo.space import BlockChoice, CandidateSpace, Subnet, load_space

TINY_SPACES = {
    "mbv1_dual": "tiny-0000-0101",
    "mbv2": "tiny-1111-1010",
    "mbv3_se": "tiny-2222-0000",
    "resnet": "tiny-3333-1111",
    "resnet_se": "tiny-4444-0110",
    "fused_mbconv": "tiny-5555-1001",
}
SAMPLES = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _space(encoding: str) -> CandidateSpace:
    space = load_space(encoding)
    assert isinstance(space, CandidateSpace)
    return space


def _quantizers(model: torch.nn.Module) -> dict[str, LsqQuantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LsqQuantizer)}


def _reset_batchnorm(net: Supernet) -> None:
    """Running statistics become the plain average of the training-mode batches that follow."""
    for bn in net.modules():
        if isinstance(bn, ElasticBatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None


def _forward_train(net: Supernet, batches: list[torch.Tensor]) -> None:
    net.train()
    with torch.no_grad():
        for batch in batches:
            net(batch)


def _session(proto: onnx.ModelProto, level: ort.GraphOptimizationLevel, optimized: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_logits(proto: onnx.ModelProto, x: torch.Tensor, level: ort.GraphOptimizationLevel) -> np.ndarray:
    session = _session(proto, level)
    return np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])


def _optimized_ops(proto: onnx.ModelProto, path: Path) -> Counter:
    """Op types of the graph ONNX Runtime runs (QDQ fusion happens at EXTENDED)."""
    _session(proto, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


# ---------------------------------------------------------------------------------------------
# One quantization-aware subnet per block type, exported


def agreement_subnet(space: CandidateSpace) -> Subnet:
    """The smallest subnet, but with two blocks in the last stage (a residual add with a projection
    shortcut, k3 and k5, both expand ratios): every op of the block type, as few layers as possible."""
    stages = list(space.min_subnet().stages)
    last = space.stages[-1]
    stages[-1] = (
        BlockChoice(max(last.kernels), min(last.widths), min(last.expand_ratios)),
        BlockChoice(min(last.kernels), max(last.widths), max(last.expand_ratios)),
    )
    return Subnet(tuple(stages), min(space.hyperspace.resolutions))


@dataclass
class QatCase:
    """A prepared supernet with one active subnet, its static QAT model, the export and test inputs."""

    net: Supernet
    subnet: Subnet
    static: StaticNet
    proto: onnx.ModelProto
    x: torch.Tensor

    @property
    def logit_step(self) -> float:
        return export_params(self.net.head.logits_quant)[0].item()


def build_case(encoding: str, seed: int = 0) -> QatCase:
    """Quantization-aware supernet of a tiny space, after a few training-mode passes.

    Inputs are random images around 10 random prototypes, the classifier is their nearest centroid in
    feature space: the logits have margins as a trained classifier's do, where an untrained network's
    random classifier makes most argmax decisions near-ties. BatchNorm statistics average the
    training batches, so activations are normalised as after training.
    """
    space = _space(encoding)
    subnet = agreement_subnet(space)
    size = subnet.resolution
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, size, size, generator=generator)

    def sample(count: int) -> torch.Tensor:
        labels = torch.randint(0, 10, (count,), generator=generator)
        return prototypes[labels] + 0.5 * torch.randn(count, 1, size, size, generator=generator)

    net = prepare_qat(Supernet(space), reduce_range=True)
    net.set_active(subnet)
    set_quant_mode(net, False)
    _reset_batchnorm(net)
    _forward_train(net, [sample(32) for _ in range(3)])
    features: list[torch.Tensor] = []
    hook = net.head.classifier.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad():
        net.eval()(prototypes)
        hook.remove()
        centroids = features[0]
        net.head.classifier.weight.copy_(centroids)
        net.head.classifier.bias.copy_(-0.5 * centroids.pow(2).sum(1))
    set_quant_mode(net, True)
    _forward_train(net, [sample(32) for _ in range(2)])  # initialises the subnet's quantizers
    initialize_quantizers(net, sample(32))  # and the rest of the supernet's
    net.eval()
    static = extract_qat(net).eval()
    proto = export_int8(net, None, (1, 1, size, size))
    return QatCase(net, subnet, static, proto, sample(SAMPLES))


@pytest.fixture(scope="module", params=sorted(TINY_SPACES))
def case(request: pytest.FixtureRequest) -> QatCase:
    return build_case(TINY_SPACES[request.param])


def measure(reference: np.ndarray, logits: np.ndarray, step: float) -> dict[str, float]:
    """Max and mean absolute logit difference in logit quantization steps, and argmax agreement."""
    difference = np.abs(reference - logits)
    return {
        "max_steps": float(difference.max() / step),
        "mean_steps": float(difference.mean() / step),
        "max_abs": float(difference.max()),
        "argmax": float((reference.argmax(1) == logits.argmax(1)).mean()),
    }


def test_onnxruntime_runs_the_int8_export_as_pytorch_computes_it(case: QatCase):
    """The eval-mode fake-quant forward computes the deployed arithmetic (int32 biases, BN folded at
    run time) and :func:`fold_for_int8` the same with BN folded into the weights: ONNX Runtime's
    reference semantics (no fusion) and its fused INT8 kernels reproduce both. Float summation order
    and the kernels' own rounding (fixed-point QLinearAdd, float QLinearMul / requantization) move an
    element by one step now and then, which these random networks amplify."""
    with torch.no_grad():
        fake_quant = case.static(case.x).numpy()
        supernet = case.net(case.x).numpy()
        twin = fold_for_int8(case.static)(case.x).numpy()
    assert fake_quant.std(axis=0).mean() > 10 * case.logit_step  # the logits depend on the input
    np.testing.assert_array_equal(supernet, fake_quant)
    reference = _ort_logits(case.proto, case.x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fused = _ort_logits(case.proto, case.x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    for name, (ours, theirs) in {
        "folded vs reference": (twin, reference),
        "folded vs kernels": (twin, fused),
        "fake-quant vs folded": (fake_quant, twin),
        "fake-quant vs kernels": (fake_quant, fused),
    }.items():
        agreement = measure(ours, theirs, case.logit_step)
        assert agreement["argmax"] >= 0.99 and agreement["mean_steps"] <= 0.25, (name, agreement)
        assert agreement["max_steps"] <= 8, (name, agreement)


def test_eval_forward_rounds_every_bias_as_deployed(case: QatCase, monkeypatch: pytest.MonkeyPatch):
    """In eval mode every quantized conv / linear knows its input's step (so its bias is rounded to
    the int32 grid and its BatchNorm folded, as deployed); in training mode none does."""
    inputs: dict[int, object] = {}
    original = LsqWeightQuantizer._input_step

    def recording(self: LsqWeightQuantizer, x: torch.Tensor):
        inputs[id(self)] = step = original(self, x)
        return step

    monkeypatch.setattr(LsqWeightQuantizer, "_input_step", recording)
    for model in (case.static, case.net):
        inputs.clear()
        with torch.no_grad():
            model(case.x[:4])
        assert all(isinstance(step, torch.Tensor) and step.item() > 0 for step in inputs.values())
        if model is case.static:  # every layer of the static network runs
            assert set(inputs) == {id(m) for m in model.modules() if isinstance(m, LsqWeightQuantizer)}
        assert len(inputs) >= 5
    training = copy.deepcopy(case.static).train()
    inputs.clear()
    with torch.no_grad():
        training(case.x[:4])
    assert inputs and all(step is None for step in inputs.values())


def test_deployed_bias_is_rounded_to_the_int32_grid(case: QatCase):
    """The biases the eval forward adds are the int32 codes of the export times their grid."""
    layer = case.static.head.classifier
    features = {}
    hook = layer.register_forward_pre_hook(lambda module, args: features.setdefault("x", args[0]))
    with torch.no_grad():
        case.static(case.x[:2])
    hook.remove()
    step = export_params(case.static.head.features_quant)[0]
    grid = (step.double() * export_params(layer.weight_quant)[0].double()).float()
    deployed = layer.weight_quant.deployed_bias(features["x"], layer.bias)
    codes = deployed.double() / grid.double()
    np.testing.assert_allclose(codes.numpy(), np.rint(codes.numpy()), atol=1e-6)
    assert (deployed - layer.bias).abs().le(grid / 2 * (1 + 1e-6)).all()
    assert not torch.equal(deployed, layer.bias.detach())
    plain = torch.randn(4, layer.in_features)  # not from a quantizer: the bias is left as it is
    assert layer.weight_quant.deployed_bias(plain, layer.bias) is layer.bias


def _producer(proto: onnx.ModelProto, name: str) -> str:
    """The op computing ``name``, looking through the Relu / Clip that ONNX Runtime's quantizer drops."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(name)
    while node is not None and node.op_type in ("Relu", "Clip"):
        node = producers.get(node.input[0])
    return "input" if node is None else node.op_type


def _activation_quantization(proto: onnx.ModelProto) -> Counter:
    """Which ops' outputs a QDQ graph quantizes (weights and their clamps excluded)."""
    weights = {i.name for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    placement = Counter()
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in weights:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type in ("Max", "Min", "Constant"):
            continue
        placement[_producer(proto, node.input[0])] += 1
    return placement


def test_int8_export_has_the_ptq_placement_and_kernels(case: QatCase, tmp_path: Path):
    """The latency table is measured on post-training-quantized graphs: the QAT export must quantize
    the same tensors and run the same INT8 kernels."""
    shape = (1, 1, case.subnet.resolution, case.subnet.resolution)
    fp32 = export_fp32(case.net.extract(), shape)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    ptq = quantize_ptq(fp32, calibration, reduce_range=True, work_dir=tmp_path / "ptq")

    assert _activation_quantization(case.proto) == _activation_quantization(ptq)
    qat_ops = _optimized_ops(case.proto, tmp_path / "qat.onnx")
    assert qat_ops == _optimized_ops(ptq, tmp_path / "ptq.onnx")
    assert qat_ops["QLinearConv"] > 0 and qat_ops["QGemm"] == 1
    assert not {"Conv", "FusedConv", "Gemm", "Relu", "Clip"} & set(qat_ops)


def test_int8_export_graph(case: QatCase):
    proto = case.proto
    onnx.checker.check_model(proto)
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["GlobalAveragePool"] >= 1 and not ops["ReduceMean"]
    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    constants.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    )
    producers = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.input[1] in constants and node.input[2] in constants, node.name
        if node.op_type in ("Conv", "Gemm"):
            dequantized = [producers[name] for name in node.input]
            assert [d.op_type for d in dequantized] == ["DequantizeLinear"] * len(node.input), node.name
            weight_zero = constants[dequantized[1].input[2]]
            assert weight_zero.dtype == np.int8 and not weight_zero.any()
            assert [a.i for a in dequantized[1].attribute if a.name == "axis"] == [0]
            bias = constants[dequantized[2].input[0]]
            assert bias.dtype == np.int32 and bias.shape == weight_zero.shape
            input_zero = constants[dequantized[0].input[2]]
            assert input_zero.dtype == np.uint8 and input_zero.shape == ()


# ---------------------------------------------------------------------------------------------
# Quantizers in the supernet


def test_prepare_qat_puts_a_quantizer_at_every_point():
    space = _space(TINY_SPACES["mbv2"])
    net = prepare_qat(Supernet(space), reduce_range=True)
    assert not [m for m in net.modules() if isinstance(m, QuantPoint)]
    quantizers = _quantizers(net)
    stage = net.stages[2][0]
    weights = stage.body[1].conv.weight_quant  # the depthwise conv, allocated at the largest width
    assert isinstance(weights, LsqWeightQuantizer) and weights.reduce_range and weights.qmax == 63
    assert weights.max_channels == stage.body[1].conv.max_out_channels
    relu6 = stage.body[0].act.out_quant
    assert isinstance(relu6, ReluQuantizer) and relu6.upper == 6.0 and "beta" not in dict(relu6.named_parameters())
    assert type(stage.body[2].act.out_quant) is LsqActivationQuantizer  # linear projection: learned offset
    assert type(net.input_quant) is LsqActivationQuantizer
    assert all(q.enabled for q in quantizers.values())
    with pytest.raises(UsageError, match="already"):
        prepare_qat(net, reduce_range=True)
    with pytest.raises(UsageError, match="prepare_qat"):
        initialize_quantizers(Supernet(space), torch.zeros(1, 1, 24, 24))


def test_quant_mode_off_is_the_fp32_supernet():
    space = _space(TINY_SPACES["fused_mbconv"])
    torch.manual_seed(0)
    fp32 = Supernet(space).eval()
    net = prepare_qat(copy.deepcopy(fp32), reduce_range=True)
    initialize_quantizers(net, torch.randn(8, 1, 32, 32))
    x = torch.randn(4, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        assert set_quant_mode(net, False) == len(_quantizers(net))
        assert torch.equal(net(x), fp32(x))
        set_quant_mode(net, True)
        assert not torch.equal(net(x), fp32(x))


def test_relu_quantizers_keep_zero_point_zero_and_relu6_range():
    relu = ReluQuantizer().train()
    x = torch.rand(4, 8) * 3.0
    relu(x)
    scale, zero_point = export_params(relu)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(x.max().item() / 255)
    relu6 = ReluQuantizer(upper=6.0).train()
    relu6(torch.rand(4, 8) * 10.0)
    with torch.no_grad():
        relu6.scale.mul_(3.0)  # training may push the step up: the range stays within [0, 6]
    scale, zero_point = export_params(relu6)
    assert zero_point.item() == 0
    assert np.float32(scale.numpy() * np.float32(255)) <= np.float32(6.0)
    assert relu6(torch.full((1, 4), 7.0)).max().item() <= 6.0


def test_initialize_quantizers_reaches_every_quantizer_and_restores_the_supernet():
    space = _space(TINY_SPACES["mbv2"])
    torch.manual_seed(0)
    net = prepare_qat(Supernet(space), reduce_range=True)
    subnet = space.min_subnet()
    net.set_active(subnet)
    net.eval()
    set_quant_mode(net, False)
    buffers = {name: b.clone() for name, b in net.named_buffers() if "running" in name or "num_batches" in name}
    initialize_quantizers(net, torch.randn(8, 1, 32, 32))
    assert net.active_subnet == subnet and not net.training
    assert not any(q.enabled for q in _quantizers(net).values())
    for name, buffer in buffers.items():
        assert torch.equal(dict(net.named_buffers())[name], buffer), name
    for name, quantizer in _quantizers(net).items():
        assert bool(quantizer.initialized.all()), name
    # projection shortcuts run only in subnets whose widths change inside a stage
    assert any(block.shortcut is not None for stage in net.stages for block in stage)


def test_qat_step_trains_weights_scales_and_offsets():
    space = _space(TINY_SPACES["mbv3_se"])
    torch.manual_seed(0)
    net = prepare_qat(Supernet(space), reduce_range=True)
    x = torch.randn(8, 1, 32, 32)
    initialize_quantizers(net, x)
    net.set_min()
    net.train()
    F.cross_entropy(net(x), torch.arange(8) % 10).backward()
    first = net.stages[1][0]
    assert first.body[0].conv.weight.grad is not None
    assert first.body[0].conv.weight_quant.scale.grad.abs().sum() > 0
    hswish_input = first.body[0].act.in_quant
    assert hswish_input.scale.grad.abs() > 0 and hswish_input.beta.grad is not None
    assert net.head.logits_quant.scale.grad.abs() > 0


# ---------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("block_type", sorted(TINY_SPACES))
def test_extract_qat_matches_supernet(block_type: str):
    space = _space(TINY_SPACES[block_type])
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    net = prepare_qat(Supernet(space), reduce_range=True)
    initialize_quantizers(net, torch.randn(16, 1, 32, 32, generator=generator))
    rng = random.Random(block_type)
    for subnet in [space.max_subnet(), space.random_subnet(rng)]:
        size = subnet.resolution
        net.set_active(subnet)
        _reset_batchnorm(net)
        _forward_train(net, [torch.randn(16, 1, size, size, generator=generator)])
        net.eval()
        x = torch.randn(4, 1, size, size, generator=generator)
        static = extract_qat(net)
        assert isinstance(static, StaticNet) and not static.training
        assert not [m for m in static.modules() if isinstance(m, QuantPoint)]
        with torch.no_grad():
            expected = net(x)
            got = static(x)
        assert (expected - got).abs().max().item() < 1e-5, subnet.encode()
        assert expected.std(dim=0).mean().item() > 1e-3
        static_weights = static.stages[1][0].body[0].conv.weight_quant
        supernet_weights = net.stages[1][0].body[0].conv.weight_quant
        channels = static_weights.max_channels
        assert torch.equal(static_weights.scale, supernet_weights.scale[:channels])


def test_export_needs_enabled_initialised_quantizers():
    space = _space(TINY_SPACES["resnet"])
    net = prepare_qat(Supernet(space), reduce_range=True)
    shape = (1, 1, 32, 32)
    with pytest.raises(UsageError, match="not initialised"):
        export_int8(net, None, shape)
    initialize_quantizers(net, torch.randn(8, 1, 32, 32))
    static = extract_qat(net).eval()
    set_quant_mode(static, False)
    with pytest.raises(UsageError, match="disabled"):
        export_int8(static, None, shape)
    with pytest.raises(UsageError, match="not quantization-aware"):
        export_int8(net.extract(), None, shape)
    with pytest.raises(UsageError, match="prepare_qat"):
        extract_qat(Supernet(space))
    with pytest.raises(UsageError, match="the static model is subnet"):
        export_int8(static, space.min_subnet(), shape)
