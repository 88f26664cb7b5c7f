"""One optimizer step of the sandwich rule with in-place distillation (AttentiveNAS / AlphaNet).

Per step and batch: the largest subnet at the largest resolution learns from the labels
(label-smoothed cross-entropy); the smallest subnet (at the smallest resolution) and
``num_random_subnets`` uniformly drawn subnets (each at its own drawn resolution) learn from the
largest subnet's detached logits (KL divergence at temperature 1). Each subnet gets the batch resized
to its resolution (:func:`~spaceevo.train.data.resize_batch`); the four backward passes accumulate
gradients, then one optimizer step and one scheduler step follow.

A largest-only step (``largest_only=True``) runs the largest subnet alone, at a resolution drawn
uniformly from the space's resolutions: the first stage of Once-for-All's progressive shrinking
(Cai et al., ICLR 2020), which trains the full network with elastic resolution before the smaller
ones share its weights, so that they distil from a teacher that has already learned. The drawn
resolution also makes the step cheaper, since cost grows with the pixel count: for ``tiny`` (24, 28
and 32 px) 0.78x the pixels of 32 px on average, and largest-only epochs of ``tiny-1144-1101`` took
35-39 s against 51-54 s at 32 px (2 threads).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spaceevo.space import Subnet
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import resize_batch
from spaceevo.train.engine import Optimization


@dataclass(frozen=True)
class StepResult:
    """Losses of one sandwich step (averaged over ranks), the gradient norm, and whether all are finite.

    ``min`` is None and ``random`` empty for a largest-only step. ``random`` holds the distillation
    losses of the random subnets in drawing order; ``grad_norm`` is the global L2 norm of the
    accumulated (rank-averaged) gradients, unscaled under a float16 gradient scaler, NaN when a loss
    already was not finite. When ``finite`` is False the optimizer did not step and the gradients were
    discarded.
    """

    max: float
    min: float | None
    random: tuple[float, ...]
    grad_norm: float
    finite: bool
    subnets: tuple[Subnet, ...]

    @property
    def total(self) -> float:
        return self.max + (self.min or 0.0) + sum(self.random)

    def first_non_finite(self) -> str | None:
        """What was not finite first, in the order of the step: a subnet's loss, or the gradient."""
        named = [("max", self.max)] + ([] if self.min is None else [("min", self.min)])
        named += [(f"random {i + 1}", value) for i, value in enumerate(self.random)]
        for index, (name, value) in enumerate(named):
            if not math.isfinite(value):
                return f"loss of the {name} subnet ({self.subnets[index].encode()})"
        if not math.isfinite(self.grad_norm):
            return "gradient (the losses were finite)"
        return None


def memory_format(config: TrainConfig, device: torch.device) -> torch.memory_format:
    """The memory format a supernet trains in on ``device`` (:meth:`TrainConfig.uses_channels_last`)."""
    return torch.channels_last if config.uses_channels_last(device.type) else torch.contiguous_format


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at temperature 1, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), teacher_probs, reduction="batchmean")


class SandwichStep:
    """Callable that runs one sandwich step on a batch: ``step(images, labels) -> StepResult``
    (``step(images, labels, largest_only=True)``: the largest subnet alone).

    ``optimization`` (:class:`~spaceevo.train.engine.Optimization`) gives the autocast and the
    backward pass of every subnet and finishes the step (:meth:`~spaceevo.train.engine.Optimization.update`:
    gradients averaged over ranks, unscaled under a float16 gradient scaler, one optimizer and one
    schedule step when everything is finite). ``rng`` draws the random subnets (seed it identically on
    every rank). The supernet's weights are converted to the :func:`memory_format` of its device (in
    place, the parameters stay the same objects) and so is every input.
    """

    def __init__(self, supernet: nn.Module, optimization: Optimization, config: TrainConfig, rng: random.Random):
        self.device = next(supernet.parameters()).device
        self.memory_format = memory_format(config, self.device)
        # weights and inputs in one memory format (mixed formats are slow)
        supernet.to(memory_format=self.memory_format)
        self.supernet = supernet
        self.optimization = optimization
        self.config = config
        self.rng = rng
        space = supernet.space
        self.max_subnet = space.max_subnet()
        self.min_subnet = space.min_subnet()

    def _forward(self, subnet: Subnet, images: torch.Tensor) -> torch.Tensor:
        self.supernet.set_active(subnet)
        images = resize_batch(images, subnet.resolution)
        images = images.contiguous(memory_format=self.memory_format)
        with self.optimization.autocast():
            return self.supernet(images).float()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, largest_only: bool = False) -> StepResult:
        optimization = self.optimization
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.supernet.train()
        optimization.optimizer.zero_grad(set_to_none=True)
        space = self.supernet.space
        if largest_only:
            subnets = [space.max_subnet(self.rng.choice(space.hyperspace.resolutions))]
        else:
            subnets = [self.max_subnet, self.min_subnet]
            subnets += [space.random_subnet(self.rng) for _ in range(self.config.num_random_subnets)]

        losses = []
        logits = self._forward(subnets[0], images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        optimization.backward(loss)
        losses.append(loss.detach())
        teacher = F.softmax(logits.detach(), dim=1)
        del logits, loss
        for subnet in subnets[1:]:
            loss = distillation_loss(self._forward(subnet, images), teacher)
            optimization.backward(loss)
            losses.append(loss.detach())
            del loss

        # short names: StepResult.first_non_finite words what was not finite, naming the subnet
        update = optimization.update(self.supernet, torch.stack(losses), [str(i) for i in range(len(losses))])
        values = update.losses
        min_loss = None if largest_only else values[1]
        return StepResult(
            values[0], min_loss, tuple(values[2:]), update.grad_norm, update.non_finite is None, tuple(subnets)
        )
