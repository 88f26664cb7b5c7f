"""Accuracy-vs-latency plot of a front search as a PNG (:mod:`spaceevo.plot`): every evaluated
subnet as a grey point, the front (non-dominated subnets) in blue, the subnets chosen for the
budgets as red discs, the budgets as dashed lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from spaceevo.plot import Figure, Series, write_png

GREY, BLUE, RED = (170, 170, 170), (40, 90, 200), (210, 30, 30)


@dataclass(frozen=True)
class Point:
    """One subnet: predicted INT8 latency (ms) and held-out top-1 (%)."""

    latency_ms: float
    top1: float


def write_pareto_png(
    path: str | Path, points: Sequence[Point], front: Sequence[Point], chosen: Sequence[Point],
    budgets_ms: Sequence[float], title: str,
) -> Path:
    """Write the plot atomically to ``path``."""
    figure = Figure(
        [
            Series("evaluated", [(p.latency_ms, p.top1) for p in points], GREY, radius=2.5),
            Series("front", [(p.latency_ms, p.top1) for p in front], BLUE, radius=4.0, line=True),
            Series("chosen", [(p.latency_ms, p.top1) for p in chosen], RED, radius=6.0, outline=True),
        ],
        "predicted INT8 latency (ms)",
        "held-out top-1 (%)",
        title,
        vlines=budgets_ms,
    )
    return write_png(path, figure)
