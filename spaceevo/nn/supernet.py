"""The weight-sharing supernet of one candidate space.

One :class:`Supernet` holds, per stage, as many elastic blocks as the stage's largest depth, each
allocated at the largest widths, kernel and expand ratio the stage allows. Choosing a subnet
(:meth:`Supernet.set_active`) resolves it to concrete :class:`~spaceevo.blocks.BlockSpec` s; the
forward pass then runs the first ``depth`` blocks of every stage on the active weight slices.
:meth:`Supernet.extract` turns the active path into a deployable static network.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from spaceevo.nn.elastic import ElasticBlock, ElasticHead
from spaceevo.nn.layers import QuantPoint
from spaceevo.nn.static import StaticNet
from spaceevo.space import Architecture, CandidateSpace, Subnet


class Supernet(nn.Module):
    """All subnets of a candidate space in one network, sharing weights by leading slices."""

    def __init__(self, space: CandidateSpace):
        super().__init__()
        self.space = space
        self.input_quant = QuantPoint()
        stages = []
        in_widths: tuple[int, ...] = (space.hyperspace.in_channels,)
        for choices in space.stages:
            blocks = [
                ElasticBlock(choices, position, in_widths if position == 0 else choices.widths)
                for position in range(max(choices.depths))
            ]
            stages.append(nn.ModuleList(blocks))
            in_widths = choices.widths
        self.stages = nn.ModuleList(stages)
        self.head = ElasticHead(in_widths, space.hyperspace.head, space.hyperspace.num_classes)
        self._arch = space.resolve(space.max_subnet())

    @property
    def active_arch(self) -> Architecture:
        """The resolved architecture of the active subnet."""
        return self._arch

    @property
    def active_subnet(self) -> Subnet:
        return self._arch.subnet

    def set_active(self, subnet: Subnet) -> None:
        """Make ``subnet`` the path that :meth:`forward` runs.

        Raises :class:`~spaceevo.errors.EncodingError` if it does not fit the space (the check of
        :meth:`CandidateSpace.resolve`). The resolution is only the expected input size.
        """
        self._arch = self.space.resolve(subnet)

    def set_max(self) -> Subnet:
        """Activate the largest subnet (the sandwich rule's teacher) and return it."""
        subnet = self.space.max_subnet()
        self.set_active(subnet)
        return subnet

    def set_min(self) -> Subnet:
        """Activate the smallest subnet and return it."""
        subnet = self.space.min_subnet()
        self.set_active(subnet)
        return subnet

    def sample_active(self, rng: random.Random) -> Subnet:
        """Activate a uniformly drawn subnet (depths, k/w/e per block, resolution) and return it."""
        subnet = self.space.random_subnet(rng)
        self.set_active(subnet)
        return subnet

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        for blocks, specs in zip(self.stages, self._arch.stages):
            for block, spec in zip(blocks, specs):
                x = block(x, spec)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def extract(self, subnet: Subnet | None = None) -> StaticNet:
        """A static network of ``subnet`` (default: the active one) with the shared weights copied.

        It computes what the supernet computes on that path in FP32, in the supernet's train/eval
        mode, device and dtype; the active subnet of the supernet is left unchanged. Quantizers are
        not copied: :func:`spaceevo.quant.qat.extract_qat` extracts a quantization-aware subnet.
        """
        arch = self._arch if subnet is None else self.space.resolve(subnet)
        weight = self.head.classifier.weight
        net = StaticNet(arch).to(device=weight.device, dtype=weight.dtype)
        for blocks, specs, static_stage in zip(self.stages, arch.stages, net.stages):
            for block, spec, static_block in zip(blocks, specs, static_stage):
                static_block.load_state_dict(block.to_static(spec).state_dict())
        net.head.load_state_dict(self.head.to_static(arch.final_channels).state_dict())
        return net.train(self.training)
