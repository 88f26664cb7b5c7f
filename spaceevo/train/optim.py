"""Optimizer and learning-rate schedule of supernet training.

SGD with Nesterov momentum; weight decay only on conv and linear weights, never on BatchNorm
parameters, biases or quantizer parameters (LSQ step sizes and offsets): every parameter with at
most one dimension. The schedule is per optimizer step: linear warm-up from ~0 to the peak rate,
then cosine decay to zero at the end of the phase.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD parameter groups: weights with ``weight_decay``, the rest (ndim <= 1) without."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=momentum > 0
    )


class WarmupCosine:
    """Learning-rate factor at step ``t``: ``(t + 1) / warmup`` during warm-up, then cosine to 0.

    A class (not a lambda) so that :class:`torch.optim.lr_scheduler.LambdaLR` checkpoints it.
    """

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))
