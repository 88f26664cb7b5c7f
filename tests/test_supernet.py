"""The elastic supernet: extracted static subnets compute exactly what the supernet's active path does."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from spaceevo.errors import EncodingError
from spaceevo.nn import Supernet, StaticNet, build_static
from spaceevo.nn.elastic import ElasticBatchNorm2d, ElasticConv2d
from spaceevo.space import BlockChoice, CandidateSpace, Subnet, load_space

TINY_SPACES = [
    "tiny-0000-0101",  # mbv1_dual
    "tiny-1111-1010",  # mbv2
    "tiny-2222-0000",  # mbv3_se
    "tiny-3333-1111",  # resnet
    "tiny-4444-0110",  # resnet_se
    "tiny-5555-1001",  # fused_mbconv
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _space(encoding: str) -> CandidateSpace:
    space = load_space(encoding)
    assert isinstance(space, CandidateSpace)
    return space


def _randomise_bn(net: Supernet, subnet: Subnet, generator: torch.Generator) -> None:
    """Give the active BNs non-trivial statistics and affine parameters.

    Statistics come from one training-mode batch (cumulative average), so activations keep an O(1)
    scale through the depth and the logits really depend on the input; the affine parameters and a
    shift of the running mean are random on top.
    """
    net.set_active(subnet)
    bns = [m for m in net.modules() if isinstance(m, ElasticBatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(8, net.space.hyperspace.in_channels, subnet.resolution, subnet.resolution, generator=generator))
        for bn in bns:
            bn.momentum = 0.1
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.2, generator=generator)
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=generator) * 0.05)
            bn.running_var.mul_(torch.empty(bn.running_var.shape).uniform_(0.8, 1.25, generator=generator))
    net.eval()


def _assert_extract_matches(net: Supernet, subnet: Subnet, generator: torch.Generator) -> torch.Tensor:
    _randomise_bn(net, subnet, generator)
    x = torch.randn(3, net.space.hyperspace.in_channels, subnet.resolution, subnet.resolution, generator=generator)
    static = net.extract()
    assert isinstance(static, StaticNet) and not static.training
    with torch.no_grad():
        expected = net(x)
        got = static(x)
    assert got.shape == (3, net.space.hyperspace.num_classes)
    assert (expected - got).abs().max().item() < 1e-5, subnet.encode()
    # Not trivially equal: the logits depend on the input.
    assert expected.std(dim=0).mean().item() > 1e-3
    return expected


@pytest.mark.parametrize("encoding", TINY_SPACES)
def test_extract_matches_supernet(encoding: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    space = _space(encoding)
    net = Supernet(space)
    rng = random.Random(encoding)
    subnets = [space.max_subnet(), space.min_subnet()] + [space.random_subnet(rng) for _ in range(3)]
    for subnet in subnets:
        _assert_extract_matches(net, subnet, generator)
        assert net.active_arch.subnet == subnet


def test_elastic_conv_uses_leading_channels_and_centre_kernel() -> None:
    torch.manual_seed(0)
    conv = ElasticConv2d(8, 12, 5, stride=2)
    static = conv.to_static(6, 4, 3)
    assert static.stride == (2, 2) and static.padding == (1, 1)
    assert torch.equal(static.weight, conv.weight[:4, :6, 1:4, 1:4])
    assert static.weight.data_ptr() != conv.weight.data_ptr()
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(conv(x, 4, 3), static(x))

    depthwise = ElasticConv2d(8, 8, 5, depthwise=True)
    static = depthwise.to_static(5, 5, 3)
    assert static.groups == 5 and torch.equal(static.weight, depthwise.weight[:5, :, 1:4, 1:4])
    x = torch.randn(2, 5, 7, 7)
    torch.testing.assert_close(depthwise(x, 5, 3), static(x))


def test_projection_shortcut_only_where_needed() -> None:
    space = _space("tiny-1111-1010")
    net = Supernet(space)
    # Inverted residuals: no shortcut on a stage's first block, a projection afterwards (two widths).
    assert all(stage[0].shortcut is None for stage in net.stages)
    assert all(block.shortcut is not None for stage in net.stages[1:] for block in stage[1:])
    # ResNet blocks: projection on the strided first block of every searchable stage.
    resnet = Supernet(_space("tiny-3333-1111"))
    assert all(stage[0].shortcut is not None for stage in resnet.stages[1:])
    assert resnet.stages[0][0].shortcut is None  # the plain-conv stem


def test_training_updates_only_the_active_bn_slice() -> None:
    torch.manual_seed(0)
    space = _space("tiny-1111-1010")
    net = Supernet(space)
    subnet = net.set_min()
    last_stage = len(space.stages) - 1
    active, allocated = min(space.stages[last_stage].widths), max(space.stages[last_stage].widths)
    assert active < allocated
    projection_bn = net.stages[last_stage][0].body[-1].bn  # 1x1 projection to the stage width
    skipped_bn = net.stages[2][-1].body[0].bn  # beyond the active depth
    before = projection_bn.running_mean.clone()
    skipped_before = skipped_bn.running_mean.clone()
    net.train()
    net(torch.randn(4, 1, subnet.resolution, subnet.resolution) + 1.0)
    after = projection_bn.running_mean
    assert not torch.equal(after[:active], before[:active])
    assert torch.equal(after[active:], before[active:])
    assert torch.equal(skipped_bn.running_mean, skipped_before)


def test_subnet_outside_space_is_rejected() -> None:
    space = _space("tiny-2222-0000")
    net = Supernet(space)
    good = space.min_subnet()
    wrong_width = Subnet(
        (good.stages[0], (replace(good.stages[1][0], width=17),)) + good.stages[2:], good.resolution
    )
    too_deep = Subnet((good.stages[0], good.stages[1] * 3) + good.stages[2:], good.resolution)
    wrong_resolution = Subnet(good.stages, 30)
    for subnet in (wrong_width, too_deep, wrong_resolution):
        with pytest.raises(EncodingError):
            net.set_active(subnet)
        with pytest.raises(EncodingError):
            net.extract(subnet)
    assert net.active_subnet == space.max_subnet()


def test_extract_of_max_has_static_parameter_count() -> None:
    space = _space("tiny-4444-0110")
    net = Supernet(space)
    net.set_min()
    extracted = net.extract(space.max_subnet())
    assert net.active_subnet == space.min_subnet()
    reference = build_static(space.resolve(space.max_subnet()))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(extracted) == count(reference)
    assert {k: v.shape for k, v in extracted.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_sample_active_and_min_max() -> None:
    space = _space("tiny-5555-1001")
    net = Supernet(space)
    assert net.set_max() == space.max_subnet() == net.active_subnet
    assert net.set_min() == space.min_subnet() == net.active_subnet
    subnet = net.sample_active(random.Random(3))
    assert subnet == space.random_subnet(random.Random(3)) == net.active_subnet
    assert net.active_arch == space.resolve(subnet)


def test_onnxw_fixed_stages() -> None:
    """Stem conv and the fixed ResNet stage0 (identity and projection shortcuts) on the published space."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    space = _space("onnxw-151122-023231")
    net = Supernet(space)
    minimum = space.min_subnet(160)
    _assert_extract_matches(net, minimum, generator)
    assert net.active_arch.stages[1][0].shortcut == "identity"
    # Stem at 32 feeding stage0 at 16: the stage0 block needs its projection shortcut.
    wide_stem = Subnet(((BlockChoice(3, 32, 0.0),),) + minimum.stages[1:], 160)
    _assert_extract_matches(net, wide_stem, generator)
    assert net.active_arch.stages[1][0].shortcut == "projection"
