"""BatchNorm recalibration of one subnet of a weight-sharing supernet (or of a static network).

During sandwich training every BatchNorm sees the statistics of whichever subnet ran last, so its
running averages fit no subnet in particular. Before any evaluation the statistics of the subnet
under test are recomputed from scratch: running statistics reset, cumulative averaging
(``momentum=None``, every batch weighted equally) over a few hundred held-out images in training
mode without gradients, then evaluation mode. :func:`preserved_bn_state` lets a training loop
evaluate without disturbing the state it trains and checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from spaceevo.space import Subnet
from spaceevo.train.data import resize_batch


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm of ``model`` (elastic ones included: they subclass ``BatchNorm2d``)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def recalibrate_bn(supernet: nn.Module, subnet: Subnet, loader: Iterable, batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics for ``subnet``; return the images used.

    Activates ``subnet``, then :func:`recompute_bn_statistics` at the subnet's resolution: the
    supernet is left in evaluation mode.
    """
    supernet.set_active(subnet)
    return recompute_bn_statistics(supernet, loader, subnet.resolution, batches)


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, loader: Iterable, resolution: int, batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` (a static network, or a supernet
    with its subnet active); return the images used.

    Resets all running statistics, then forwards up to ``batches`` batches of ``loader`` (all when
    None) resized to ``resolution``, in training mode without gradients and with cumulative
    averaging. Leaves the model in evaluation mode with the BN momenta it had. Deterministic for a
    deterministic loader (no shuffling, or a seeded one).
    """
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    norms = batchnorms(model)
    momenta = [bn.momentum for bn in norms]
    device = _device(model)
    images = 0
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for index, (x, _) in enumerate(loader):
            if batches is not None and index >= batches:
                break
            model(resize_batch(x.to(device, non_blocking=True), resolution))
            images += x.shape[0]
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()
    return images


@contextlib.contextmanager
def preserved_bn_state(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block BN statistics may change (recalibration); afterwards they, the BN momenta,
    the active subnet and the train/eval mode are restored exactly."""
    norms = batchnorms(model)
    saved = [
        (bn.momentum, *(t.detach().clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
        for bn in norms
    ]
    active = getattr(model, "active_subnet", None)
    training = model.training
    try:
        yield model
    finally:
        with torch.no_grad():
            for bn, (momentum, mean, var, count) in zip(norms, saved):
                bn.momentum = momentum
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        if active is not None:
            model.set_active(active)
        model.train(training)
