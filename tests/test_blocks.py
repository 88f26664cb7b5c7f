"""The block-kind registry: one declaration per kind builds the static block, the elastic block, the
cost count and the latency segment alike; the built-in hyperspaces build the networks they built
before the registry; the published mobilew and onnxw encodings load and build."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from _block_figures import network_figures
from spaceevo.blocks import BLOCK_KINDS, BlockKind, BlockOptions, Layer, block_kind, register_block_kind
from spaceevo.errors import ConfigError
from spaceevo.latency.segments import Segment, network_segments, required_segments, segment_model
from spaceevo.nn import Supernet, build_static
from spaceevo.nn.cost import block_cost
from spaceevo.nn.layers import QuantizableConv2d
from spaceevo.nn.static import Block, DepthwiseStack
from spaceevo.space import CandidateSpace, load_hyperspace, load_space

DATA = Path(__file__).parent / "data"
RECORDED = json.loads((DATA / "block_equivalence.json").read_text())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the same networks as before the registry -----------------------------------------------


@pytest.mark.parametrize("case", sorted(RECORDED), ids=lambda c: f"{c.split()[0]}-{sorted(RECORDED).index(c)}")
def test_networks_match_the_figures_recorded_before_the_registry(case):
    """Parameters, MACs, state-dict names and shapes (static and supernet), segment keys, hyperspace
    hash and the logits for name-seeded weights all equal those of commit e908100."""
    encoding, subnet = case.split()
    before = RECORDED[case]
    now = network_figures(encoding, subnet)
    assert {k: v for k, v in now.items() if not k.startswith("logits")} == {
        k: v for k, v in before.items() if not k.startswith("logits")
    }
    assert now["logits"] == pytest.approx(before["logits"], rel=1e-5, abs=1e-6)
    assert now["logits_sum"] == pytest.approx(before["logits_sum"], rel=1e-5)


def test_built_in_variants_keep_their_kind_names_as_table_keys():
    for name in ("tiny", "onnxw", "mobilenetv3"):
        for block in load_hyperspace(name).block_types.values():
            assert block.variant.tag == block.name == block.variant.kind.name


# ---- one declaration, every consumer ------------------------------------------------------------


def _variants():
    """Every registered kind with every allowed combination of SE, K3 and residual rule."""
    for kind in BLOCK_KINDS.values():
        allowed = kind.allowed()
        for se, k3, residual in itertools.product(allowed["se"], allowed["dw_k3"], allowed["residual"]):
            yield kind.variant(se=se, dw_k3=k3, residual=residual)


VARIANTS = list(_variants())


def _conv_figures(block: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Parameters (BN folded into a bias) and MACs of the convs a forward pass of ``block`` runs."""
    macs = []

    def count(conv, inputs, output):
        macs.append(output[0].numel() * conv.weight[0].numel())

    convs = [m for m in block.modules() if isinstance(m, QuantizableConv2d)]
    handles = [c.register_forward_hook(count) for c in convs]
    with torch.no_grad():
        block.eval()(x)
    for handle in handles:
        handle.remove()
    return sum(c.weight.numel() + c.out_channels for c in convs), sum(macs)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.tag)
def test_cost_counts_what_the_static_block_runs(variant):
    for cin, cout, kernel, stride, position in ((16, 24, 5, 2, 0), (24, 24, 3, 1, 1), (16, 24, 7, 1, 1)):
        expand = 0.0 if variant.expand_of == "none" else 1.5
        spec = variant.spec(cin, cout, kernel, expand, stride, 9, position)
        block = Block(spec)
        out = block(torch.randn(1, cin, 9, 9))
        assert out.shape == (1, cout, spec.output_size, spec.output_size)
        cost = block_cost(spec)
        assert (cost.params, cost.macs) == _conv_figures(block, torch.randn(1, cin, 9, 9)), spec.key


def test_k3_variant_stacks_3x3_depthwise_convs_with_one_activation():
    variant = block_kind("mbv3_se").variant(activation="swish", residual="always", dw_k3=True)
    for kernel, count in ((3, 1), (5, 2), (7, 3)):
        spec = variant.spec(16, 16, kernel, 3.0, 2, 12, 0)
        stack = Block(spec).body[1]
        assert isinstance(stack, DepthwiseStack) and len(stack.convs) == count
        assert [c.conv.kernel_size for c in stack.convs] == [(3, 3)] * count
        assert [c.conv.stride for c in stack.convs] == [(2, 2)] + [(1, 1)] * (count - 1)
        assert all(c.act.name == "none" for c in stack.convs) and stack.act.name == "swish"
        assert spec.shortcut == "projection" and spec.key.startswith("mbv3_se+swish+residual_always+k3:")
    # a stack of linear 3x3 convs is one linear k x k filter: the receptive field grows by 2 per conv
    spec = block_kind("mbv2").variant(dw_k3=True).spec(8, 8, 7, 1.0, 1, 15, 0)
    stack = Block(spec).body[1].convs.eval()
    x = torch.zeros(1, 8, 15, 15, requires_grad=True)
    stack(x)[0, :, 7, 7].sum().backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten().tolist()
    assert rows == list(range(4, 11))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.tag != "conv"], ids=lambda v: v.tag)
def test_elastic_block_extracts_what_it_runs(variant, tmp_path):
    """A one-stage candidate space of the variant: the supernet's active path and the extracted
    static network compute the same logits, for the largest and for random subnets."""
    expand = [0] if variant.expand_of == "none" else [0.5, 1.0]
    options = variant.options
    text = yaml.safe_dump({
        "name": "one",
        "input": {"channels": 3, "resolutions": [12]},
        "num_classes": 4,
        "block_types": {"b": {
            "digit": 0, "kind": variant.kind.name, "kernels": [3, 5], "expand_ratios": expand,
            "activation": options.activation, "se": options.se, "residual": options.residual, "dw_k3": options.dw_k3,
        }},
        "stages": [{"name": "stage1", "block_types": ["b"], "widths": [8, 16], "window": 2, "depths": [1, 2], "stride": 2}],
        "head": {"widths": [16, 16], "activation": "relu"},
    })
    path = tmp_path / "one.yaml"
    path.write_text(text)
    space = load_hyperspace(path).candidate_space("one-0-0")
    torch.manual_seed(0)
    net = Supernet(space).eval()
    x = torch.randn(2, 3, 12, 12)
    for subnet in [space.max_subnet()] + [space.random_subnet(random.Random(s)) for s in range(3)]:
        net.set_active(subnet)
        with torch.no_grad():
            assert torch.allclose(net(x), net.extract(subnet).eval()(x), atol=1e-5)


def test_a_new_kind_is_one_registration():
    """A kind declared here and nowhere else builds, counts and segments."""
    kind = BlockKind(
        "test_dw_pw", "depthwise then pointwise",
        (Layer("in", "in", spatial=True, strided=True, depthwise=True, act=True), Layer("in", "out", act=True)),
        "none", BlockOptions("relu6"),
    )
    register_block_kind(kind)
    try:
        spec = kind.variant(dw_k3=True).spec(8, 16, 5, 0.0, 2, 8, 0)
        assert block_cost(spec).params == _conv_figures(Block(spec), torch.randn(1, 8, 8, 8))[0]
        with pytest.raises(ValueError, match="already registered"):
            register_block_kind(kind)
        with pytest.raises(ValueError, match="se=True is not allowed"):
            kind.variant(se=True)
    finally:
        del BLOCK_KINDS[kind.name]


# ---- the published hyperspaces --------------------------------------------------------------------

# Published SpaceEvo encodings (microsoft/Moonlit, SpaceEvo/data/search_result.yaml, MIT licence).
PUBLISHED = yaml.safe_load((DATA / "spaceevo_published.yaml").read_text())
PUBLISHED_SUBNETS = sorted(PUBLISHED["subnets"])


def test_mobilew_matches_design():
    h = load_hyperspace("mobilew")
    assert [len(s.windows) for s in h.searchable_stages] == [2, 6, 6, 7, 5, 4]
    assert sum(len(s.windows) * len(s.block_types) for s in h.searchable_stages) == 210
    assert [s.stride for s in h.searchable_stages] == [2, 2, 2, 1, 2, 1]
    assert [max(s.depths) for s in h.searchable_stages] == [4, 4, 6, 8, 8, 2]
    assert h.searchable_stages[4].widths == (192, 200, 208, 216, 224, 240, 256, 272, 288)
    assert h.head.widths == (1280, 1920) and h.head.activation == "swish"
    stem, stage0 = h.stages[:2]
    assert stem.widths == stage0.widths == (16, 24, 32) and stem.stride == 2 and stage0.depths == (1, 2)
    assert stage0.fixed_block.variant.tag == "mbv2+relu" and stage0.fixed_block.expand_ratios == (1.0,)
    by_digit = {d: b.variant for d, b in h.block_type_by_digit.items()}
    assert [by_digit[d].kind.name for d in range(7)] == [
        "mbv1_dual", "mbv2", "mbv3_se", "resnet", "fused_mbconv", "mbv3_se", "mbv2",
    ]
    assert [by_digit[d].options.dw_k3 for d in range(7)] == [False] * 5 + [True] * 2
    assert [by_digit[d].se for d in range(7)] == [False, False, True, False, True, True, False]
    assert all(by_digit[d].options.residual == "always" for d in (1, 2, 3, 4, 5, 6))
    assert [by_digit[d].activation for d in (1, 2, 4, 5, 6)] == ["relu6", "swish", "swish", "swish", "relu6"]
    assert h.block_type_by_digit[3].kernels == (3, 5) and h.block_type_by_digit[5].kernels == (3, 5, 7)


@pytest.mark.parametrize("name", sorted(PUBLISHED["spaces"]))
def test_published_spaces_load_and_their_supernets_run(name):
    space = load_space(PUBLISHED["spaces"][name])
    assert isinstance(space, CandidateSpace) and space.encoding == PUBLISHED["spaces"][name]
    torch.manual_seed(0)
    net = Supernet(space).eval()
    subnet = space.random_subnet(random.Random(0))
    net.set_active(subnet)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
        assert torch.allclose(logits, net.extract(subnet).eval()(x), atol=1e-4)


@pytest.mark.parametrize("name", PUBLISHED_SUBNETS)
def test_published_subnets_build_as_static_networks(name):
    entry = PUBLISHED["subnets"][name]
    space = load_space(PUBLISHED["spaces"][entry["space"]])
    subnet = space.subnet(entry["subnet"])
    assert subnet.encode() == entry["subnet"]
    arch = space.resolve(subnet)
    net = build_static(arch).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [s.block for s in network_segments(arch)[:-1]] == arch.blocks
    assert sum(block_cost(b).params for b in arch.blocks) > 0


def test_every_mobilew_segment_key_is_unique_per_computation():
    """Two block types with different options never share a latency-table key."""
    segments = required_segments(load_hyperspace("mobilew"))
    by_key = {}
    for segment in segments:
        if segment.block is not None:
            assert by_key.setdefault(segment.key, segment.block.variant) == segment.block.variant
    tags = {s.block.block_type for s in segments if s.block is not None}
    assert {"mbv2+residual_always+k3", "mbv3_se+swish+residual_always+k3", "fused_mbconv+se+residual_always"} <= tags


@pytest.mark.parametrize("digit, depthwise_3x3", [(5, 3), (6, 3), (4, 0)])
def test_mobilew_segments_export_as_int8_onnx(digit, depthwise_3x3):
    """The latency segment of a K3 block (k7: three stacked 3x3 depthwise convs) and of a
    FusedMBConv-SE block exports, quantizes and runs in ONNX Runtime."""
    block = load_hyperspace("mobilew").block_type_by_digit[digit]
    spec = block.variant.spec(16, 24, 7, 3.0, 2, 12, 0)
    model = onnx.load_from_string(segment_model(Segment(16, 12, first=True, block=spec), reduce_range=True))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
    stacked = [a for a in attributes if a.get("group", 1) > 1 and list(a["kernel_shape"]) == [3, 3]]
    assert len(stacked) == depthwise_3x3
    (out,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input": np.zeros((1, 16, 12, 12), np.float32)})
    assert out.shape == (1, 24, 6, 6) and out.dtype == np.uint8


# ---- YAML errors ----------------------------------------------------------------------------------


def _mobilew_with(tmp_path: Path, old: str, new: str) -> str:
    text = (Path(load_hyperspace("mobilew").source)).read_text()
    assert old in text
    path = tmp_path / "mobilew.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_hyperspace(path)
    message = str(info.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    "old, new, fragments",
    [
        ("kind: mbv2,", "kind: mbv7,", ["block_types.mbv2_res.kind", "'mbv7'", "allowed: conv, mbv1_dual, mbv2"]),
        ("mbv1_dual:       {digit: 0,", "mbv1_dual:       {digit: 0, se: true,", ["block_types.mbv1_dual.se", "allowed: False"]),
        ("residual: always}", "residual: sometimes}", ["block_types.mbv2_res.residual", "'sometimes'", "after_first, always"]),
        ("dw_k3: true}", "dw_k3: yes please}", ["block_types.mbv3_k3.dw_k3", "expected bool"]),
        ("resnet:          {digit: 3,", "resnet:          {digit: 3, dw_k3: true,", ["block_types.resnet.dw_k3", "allowed: False"]),
        ("kernels: [3, 5, 7], expand_ratios: [3, 6, 8], activation: swish, residual: always, dw_k3",
         "kernels: [1, 3], expand_ratios: [3, 6, 8], activation: swish, residual: always, dw_k3",
         ["block_types.mbv3_k3.kernels", "1 is not allowed", "at least 3"]),
        ("activation: relu}", "activation: gelu}", ["stages.1.activation", "'gelu'", "relu, relu6, hswish, swish"]),
        ("    window: 2\n    depths: [2, 3, 4]\n    stride: 2\n  - name: stage2",
         "    window: 2\n    se: true\n    depths: [2, 3, 4]\n    stride: 2\n  - name: stage2",
         ["stages.2.se", "unknown key"]),
        ("{digit: 1, kind: mbv2,", "{digit: 1, kind: mbv2, flavour: mint,", ["block_types.mbv2_res.flavour", "unknown key"]),
        ("  mbv2_k3:         {digit: 6, kind: mbv2,", "  mbv2_k3:         {digit: 6,", ["block_types.mbv2_k3", "unknown block type 'mbv2_k3'", "kind:"]),
    ],
)
def test_variant_errors_name_file_key_and_allowed_values(tmp_path, old, new, fragments):
    message = _mobilew_with(tmp_path, old, new)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
