"""Small building pieces shared by static and elastic blocks: activations and the SE gate."""

from __future__ import annotations

from typing import Callable

from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hswish": lambda: nn.Hardswish(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
    "none": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by its hyperspace name (``relu``, ``relu6``, ``hswish``, ``swish``, ``none``)."""
    return _ACTIVATIONS[name]()
