"""spaceevo: hardware-aware neural architecture search for INT8 inference on real devices.

The public API mirrors the command line, one typed function per command, each returning a
dataclass:

- ``spaceevo run``: :func:`run` -> :class:`PipelineReport`
- ``spaceevo search``: :func:`search_space` -> :class:`SearchResult`
- ``spaceevo search --block-lut``: :func:`search_block_lut` -> :class:`SearchResult`
- ``spaceevo score``: :func:`score_spaces` -> list of :class:`SpaceScore`
- ``spaceevo train``: :func:`train_supernet` -> :class:`TrainResult`
- ``spaceevo extract``: :func:`extract` -> :class:`ExtractResult`
- ``spaceevo export``: :func:`export` -> :class:`ExportReport`
- ``spaceevo evaluate``: :func:`evaluate` -> :class:`SubnetEvaluation`, :func:`evaluate_model` ->
  :class:`ModelEvaluation`
- ``spaceevo latency build|predict|measure|validate``: :mod:`spaceevo.latency` (``build_table`` ->
  ``BuildReport``, ``predict_latency`` -> ``LatencyPrediction``, ``measure_latency`` ->
  ``LatencyMeasurement``, ``validate_latency`` -> ``ValidationReport``)

Names load on first use, so ``import spaceevo`` stays light (no PyTorch until a function is
called); the ``TYPE_CHECKING`` imports below give IDEs and type checkers the same names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spaceevo import latency
    from spaceevo.deploy.evaluate import ExportReport, ModelEvaluation, SubnetEvaluation, evaluate_model
    from spaceevo.deploy.evaluate import evaluate_subnet as evaluate
    from spaceevo.deploy.evaluate import export_subnet as export
    from spaceevo.pipeline import PipelineReport
    from spaceevo.pipeline import run_pipeline as run
    from spaceevo.search.api import SearchResult, score_spaces, search_block_lut
    from spaceevo.extraction.api import extract_subnets as extract
    from spaceevo.extraction.results import ExtractResult
    from spaceevo.search.pipeline import search_space
    from spaceevo.search.qt_score import SpaceScore
    from spaceevo.space import CandidateSpace, Hyperspace, Subnet, load_space
    from spaceevo.train.loop import TrainResult, train_supernet

#: public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "run": ("spaceevo.pipeline", "run_pipeline"),
    "PipelineReport": ("spaceevo.pipeline", "PipelineReport"),
    "search_space": ("spaceevo.search.pipeline", "search_space"),
    "search_block_lut": ("spaceevo.search.api", "search_block_lut"),
    "score_spaces": ("spaceevo.search.api", "score_spaces"),
    "SearchResult": ("spaceevo.search.api", "SearchResult"),
    "SpaceScore": ("spaceevo.search.qt_score", "SpaceScore"),
    "train_supernet": ("spaceevo.train.loop", "train_supernet"),
    "TrainResult": ("spaceevo.train.loop", "TrainResult"),
    "extract": ("spaceevo.extraction.api", "extract_subnets"),
    "ExtractResult": ("spaceevo.extraction.results", "ExtractResult"),
    "export": ("spaceevo.deploy.evaluate", "export_subnet"),
    "ExportReport": ("spaceevo.deploy.evaluate", "ExportReport"),
    "evaluate": ("spaceevo.deploy.evaluate", "evaluate_subnet"),
    "evaluate_model": ("spaceevo.deploy.evaluate", "evaluate_model"),
    "SubnetEvaluation": ("spaceevo.deploy.evaluate", "SubnetEvaluation"),
    "ModelEvaluation": ("spaceevo.deploy.evaluate", "ModelEvaluation"),
    "load_space": ("spaceevo.space", "load_space"),
    "Hyperspace": ("spaceevo.space", "Hyperspace"),
    "CandidateSpace": ("spaceevo.space", "CandidateSpace"),
    "Subnet": ("spaceevo.space", "Subnet"),
}

__all__ = sorted([*_EXPORTS, "latency", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "latency":
        return importlib.import_module("spaceevo.latency")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spaceevo' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
