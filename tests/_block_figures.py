"""Figures that pin a network down: parameter count, MACs, state-dict names and shapes, segment keys,
and the logits for weights set from each tensor's name (so they do not depend on construction order)
and BatchNorm statistics from one calibration batch.

``tests/data/block_equivalence.json`` holds these figures as computed before the block-kind registry
(commit e908100); ``tests/test_blocks.py`` checks the registry-built networks reproduce them. Run
``python tests/_block_figures.py OUT.json`` to compute them with the code at hand.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zlib

import torch

from spaceevo.latency.segments import network_segments
from spaceevo.nn import Supernet, build_static
from spaceevo.nn.cost import block_cost, head_layers, layers_cost
from spaceevo.space import load_space

#: Candidate spaces covering every block type of tiny, onnxw's published space and mobilenetv3; each
#: is recorded with its largest and smallest subnet and two random ones.
SPACES = [
    "tiny-0000-0101",
    "tiny-1111-1010",
    "tiny-2222-0000",
    "tiny-3333-1111",
    "tiny-4444-0110",
    "tiny-5555-1001",
    "onnxw-151122-023231",
    "mobilenetv3-22222-00000",
]


def recorded_subnets(encoding: str) -> list[str]:
    """The subnets recorded for one candidate space."""
    space = load_space(encoding)
    randoms = [space.random_subnet(random.Random(seed)).encode() for seed in (1, 2)]
    return [space.max_subnet().encode(), space.min_subnet().encode(), *randoms]


def _digest(items: list) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def fill_by_name(module: torch.nn.Module) -> None:
    """Set every floating-point tensor of the state dict from a generator seeded by its name."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var"):
                tensor.copy_(values + 0.5)
            elif name.endswith("bn.weight"):
                tensor.copy_(values * 0.5 + 0.75)
            else:
                fan_in = max(1, tensor[0].numel()) if tensor.dim() > 1 else 16
                tensor.copy_((values - 0.5) * 2.0 / fan_in**0.5)


def network_figures(encoding: str, subnet_text: str) -> dict:
    """The figures of one subnet of one candidate space (see the module docstring)."""
    space = load_space(encoding)
    arch = space.resolve(space.subnet(subnet_text))
    net = build_static(arch)
    fill_by_name(net)
    size = min(arch.resolution, 64)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn((8, arch.in_channels, size, size), generator=generator)
    x = torch.randn((2, arch.in_channels, size, size), generator=generator)
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None
        net.train()(calibration)
        logits = net.eval()(x).double()
    macs = sum(block_cost(b).macs for b in arch.blocks)
    macs += layers_cost(head_layers(arch.final_channels, arch.final_size, arch.head, arch.num_classes)).macs
    supernet = Supernet(space)
    return {
        "subnet": arch.subnet.encode(),
        "params": sum(p.numel() for p in net.parameters()),
        "cost_params": sum(block_cost(b).params for b in arch.blocks),
        "macs": macs,
        "state": _digest([[k, list(v.shape)] for k, v in net.state_dict().items()]),
        "supernet_state": _digest([[k, list(v.shape)] for k, v in supernet.state_dict().items()]),
        "segments": _digest([s.key for s in network_segments(arch)]),
        "hyperspace_digest": space.hyperspace.digest,
        "logits": [round(float(v), 6) for v in logits[:, :4].flatten()],
        "logits_sum": float(logits.sum()),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    figures = {
        f"{encoding} {text}": network_figures(encoding, text) for encoding in SPACES for text in recorded_subnets(encoding)
    }
    with open(sys.argv[1], "w") as out:
        json.dump(figures, out, indent=1, sort_keys=True)
