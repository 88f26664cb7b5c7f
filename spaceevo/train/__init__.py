"""Supernet training.

Modules: :mod:`~spaceevo.train.data` (data sets, splits, loaders), :mod:`~spaceevo.train.config`
(:class:`TrainConfig`, budgets), :mod:`~spaceevo.train.weights` (initialisation),
:mod:`~spaceevo.train.optim` (SGD groups, warm-up + cosine), :mod:`~spaceevo.train.sandwich` (one
sandwich step), :mod:`~spaceevo.train.bn` (BatchNorm recalibration), :mod:`~spaceevo.train.evaluate`
(top-1), :mod:`~spaceevo.train.distributed` (torchrun), :mod:`~spaceevo.train.checkpoint` (run
directory), :mod:`~spaceevo.train.loop` (:func:`train_supernet`).

The names below load on first use, so ``import spaceevo.train.config`` stays free of torchvision
(``evaluate`` is not among them: the submodule of that name would shadow it; import it from
:mod:`spaceevo.train.evaluate`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spaceevo.train.bn import recalibrate_bn
    from spaceevo.train.config import PRESETS, TrainConfig
    from spaceevo.train.loop import TrainResult, train_supernet


_EXPORTS = {
    "TrainConfig": "spaceevo.train.config",
    "PRESETS": "spaceevo.train.config",
    "train_supernet": "spaceevo.train.loop",
    "TrainResult": "spaceevo.train.loop",
    "recalibrate_bn": "spaceevo.train.bn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spaceevo.train' has no attribute {name!r}")
