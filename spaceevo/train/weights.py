"""Weight initialisation of a freshly built supernet.

Conv weights: Kaiming normal with ``fan_out`` (as torchvision's MobileNets and ResNets), biases zero;
BatchNorm: weight one, bias zero; the classifier: normal(0, 0.01). With ``zero_init_residual`` the
last BatchNorm of the body of every block that has a shortcut starts at zero, so each residual block
starts as its shortcut: the shallow and the deep subnets of the sandwich then begin from the same
function, which steadies the first epochs of weight-sharing training (BigNAS, AttentiveNAS).
"""

from __future__ import annotations

import torch
from torch import nn

from spaceevo.nn.elastic import ElasticConv2d, ElasticConvBN


@torch.no_grad()
def initialize_weights(supernet: nn.Module, *, zero_init_residual: bool = True) -> None:
    """Initialise every conv, BatchNorm and linear layer of ``supernet`` in place."""
    for module in supernet.modules():
        if isinstance(module, (ElasticConv2d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if zero_init_residual:
        for block in residual_blocks(supernet):
            last = [m for m in block.body if isinstance(m, ElasticConvBN)][-1]
            nn.init.zeros_(last.bn.weight)


def residual_blocks(supernet: nn.Module) -> list[nn.Module]:
    """The elastic blocks of ``supernet`` whose output always adds a shortcut (identity or projection)."""
    blocks = []
    for choices, stage in zip(supernet.space.stages, supernet.stages):
        for position, block in enumerate(stage):
            # whether a shortcut exists depends on the block type and position, not on the widths
            width = choices.widths[0]
            if choices.block_type.variant.shortcut(position, width, width, block.stride) != "none":
                blocks.append(block)
    return blocks
