"""Top-1 accuracy of a model, or of one subnet of a supernet (recalibrate its BatchNorm first: :mod:`spaceevo.train.bn`)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from spaceevo.space import Subnet
from spaceevo.train.data import resize_batch


@torch.no_grad()
def top1(model: nn.Module, loader: Iterable, resolution: int | None = None, max_images: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (in its current mode) on ``loader``, images resized to
    ``resolution`` when given; ``max_images`` stops after that many images (whole batches)."""
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        if max_images is not None and total >= max_images:
            break
        x = x.to(device, non_blocking=True)
        logits = model(x if resolution is None else resize_batch(x, resolution))
        correct += int((logits.argmax(dim=1) == y.to(device)).sum())
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return 100.0 * correct / total


def evaluate(supernet: nn.Module, subnet: Subnet, loader: Iterable, max_images: int | None = None) -> float:
    """Top-1 accuracy in percent of ``subnet`` on ``loader`` (images resized to its resolution).

    Runs in evaluation mode, so the BatchNorm statistics must be this subnet's: call
    :func:`~spaceevo.train.bn.recalibrate_bn` first. ``max_images`` stops after that many images
    (whole batches; None: the whole loader). The supernet is left in evaluation mode with
    ``subnet`` active.
    """
    supernet.set_active(subnet)
    supernet.eval()
    return top1(supernet, loader, subnet.resolution, max_images)
