"""Deployment of trained subnets: open a training run, export FP32 and INT8 ONNX, evaluate them.

Python API behind ``spaceevo export`` and ``spaceevo evaluate``: :func:`export_subnet`,
:func:`evaluate_subnet`, :func:`evaluate_model`, :func:`open_run`.
"""

from spaceevo.deploy.evaluate import (
    ExportReport,
    ModelEvaluation,
    SubnetEvaluation,
    evaluate_model,
    evaluate_subnet,
    export_subnet,
)
from spaceevo.deploy.trained import TrainedRun, open_run

__all__ = [
    "ExportReport",
    "ModelEvaluation",
    "SubnetEvaluation",
    "TrainedRun",
    "evaluate_model",
    "evaluate_subnet",
    "export_subnet",
    "open_run",
]
