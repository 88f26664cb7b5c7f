"""Accuracy-vs-latency plot of a subnet search as a PNG (:mod:`spaceevo.plot`): evaluated subnets
as grey points, the winners as red discs, the budgets as dashed lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from spaceevo.plot import Figure, Series, write_png

GREY, RED = (150, 150, 150), (210, 30, 30)


@dataclass(frozen=True)
class Point:
    """One subnet: predicted INT8 latency (ms) and held-out top-1 (%)."""

    latency_ms: float
    top1: float


def write_pareto_png(
    path: str | Path, points: Sequence[Point], winners: Sequence[Point], budgets_ms: Sequence[float], title: str
) -> Path:
    """Write the plot atomically to ``path``."""
    figure = Figure(
        [
            Series("evaluated", [(p.latency_ms, p.top1) for p in points], GREY, radius=3.0),
            Series("winners", [(p.latency_ms, p.top1) for p in winners], RED, radius=6.0, outline=True),
        ],
        "predicted INT8 latency (ms)",
        "held-out top-1 (%)",
        title,
        vlines=budgets_ms,
    )
    return write_png(path, figure)
