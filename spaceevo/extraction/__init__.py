"""Subnet extraction from a trained supernet (``spaceevo extract``): the accuracy/latency front in
one multi-objective Optuna search (:mod:`spaceevo.extraction.front`), any latency budget answered from
it and verified on the device (:mod:`spaceevo.extraction.api`).

Modules: ``genome`` (subnet <-> trial parameters, variation operators), ``fitness`` (held-out top-1
after BN recalibration), ``predictor`` (accuracy predictor), ``front`` (sampler and search),
``storage`` (Optuna storage with heartbeat), ``api`` (budgets answered, artifacts), ``verify``
(export and on-device verification), ``results``, ``plot``. Names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spaceevo.extraction.api import extract_subnets
    from spaceevo.extraction.results import BudgetResult, ExtractResult

_EXPORTS = {
    "extract_subnets": "spaceevo.extraction.api",
    "ExtractResult": "spaceevo.extraction.results",
    "BudgetResult": "spaceevo.extraction.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spaceevo.extraction' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
