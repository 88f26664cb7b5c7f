"""Segment latency for configurations a sampled table did not measure.

Large hyperspaces (``onnxw`` can produce ~70,000 distinct segments) are measured on a random sample.
The latency of an unmeasured segment is estimated by a linear model of its work, fitted per group
of segments that run the same kernels (block type, kernel size, stride, shortcut kind, input
format) on the measured entries:

    ms ≈ θ0 + θ1·dense MACs + θ2·depthwise MACs + θ3·input elements + θ4·output elements
           + θ5·elements through activations

Least squares on relative error, coefficients constrained to be non-negative by dropping features
with negative weights and refitting (a small active-set NNLS).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from spaceevo.latency.segments import Segment
from spaceevo.nn.cost import block_layers, head_layers

PER_GROUP = 30
FEATURES = ("intercept", "dense_macs", "dw_macs", "input_elements", "output_elements", "activation_elements")
MIN_SAMPLES = 12


def segment_features(segment: Segment) -> np.ndarray:
    """Work done by a segment, in the units of :data:`FEATURES` (MACs and elements in millions)."""
    if segment.block is not None:
        layers = block_layers(segment.block)
        out_elements = segment.block.out_channels * segment.block.output_size**2
    else:
        assert segment.head is not None
        layers = head_layers(segment.in_channels, segment.input_size, segment.head, segment.num_classes)
        out_elements = segment.num_classes
    dense = sum(layer.macs for layer in layers if not layer.depthwise)
    depthwise = sum(layer.macs for layer in layers if layer.depthwise)
    activations = sum(layer.output_elements for layer in layers)
    in_elements = segment.in_channels * segment.input_size**2
    return np.array([1.0, dense / 1e6, depthwise / 1e6, in_elements / 1e6, out_elements / 1e6, activations / 1e6])


def group_key(segment: Segment) -> str:
    """Segments whose latency follows one linear model: same kernels, same graph shape."""
    io = "f32in" if segment.first else "u8in"
    if segment.block is None:
        assert segment.head is not None
        return f"head:{segment.head.activation}:{io}"
    b = segment.block
    return f"{b.block_type}:k{b.kernel}:s{b.stride}:{b.shortcut}:{io}"


def _nnls(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares by dropping negative coefficients and refitting."""
    active = list(range(design.shape[1]))
    coef = np.zeros(design.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(design[:, active], target, rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            return coef
        active.pop(int(np.argmin(solution)))
    return coef


@dataclass
class SegmentRegressor:
    """Per-group linear latency models fitted on measured segments."""

    coefficients: dict[str, np.ndarray] = field(default_factory=dict)
    fallback: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, measured: Iterable[tuple[Segment, float]]) -> "SegmentRegressor":
        groups: dict[str, list[tuple[np.ndarray, float]]] = defaultdict(list)
        by_type: dict[str, list[tuple[np.ndarray, float]]] = defaultdict(list)
        for segment, ms in measured:
            features = segment_features(segment)
            groups[group_key(segment)].append((features, ms))
            by_type[group_key(segment).split(":")[0]].append((features, ms))
        model = cls()
        for key, rows in groups.items():
            if len(rows) >= MIN_SAMPLES:
                model.coefficients[key] = cls._fit_rows(rows)
        for key, rows in by_type.items():
            if len(rows) >= MIN_SAMPLES:
                model.fallback[key] = cls._fit_rows(rows)
        return model

    @staticmethod
    def _fit_rows(rows: list[tuple[np.ndarray, float]]) -> np.ndarray:
        design = np.stack([r[0] for r in rows])
        target = np.array([r[1] for r in rows])
        weights = 1.0 / target
        return _nnls(design * weights[:, None], target * weights)

    def covers(self, segment: Segment) -> bool:
        return group_key(segment) in self.coefficients or group_key(segment).split(":")[0] in self.fallback

    def predict(self, segment: Segment) -> float:
        key = group_key(segment)
        coef = self.coefficients.get(key)
        if coef is None:
            coef = self.fallback[key.split(":")[0]]
        return float(segment_features(segment) @ coef)


def sample_segments(segments: list[Segment], budget: int, seed: int = 0) -> list[Segment]:
    """A stratified sample of ``budget`` segments: every group gets up to :data:`PER_GROUP` members
    (all of a small group, such as the stem or the head), even if that exceeds the budget; the rest
    of the budget is drawn uniformly. Deterministic for a seed, so a resumed build measures the same
    sample. Sorted by key."""
    import random

    if len(segments) <= budget:
        return sorted(segments, key=lambda s: s.key)
    rng = random.Random(seed)
    groups: dict[str, list[Segment]] = defaultdict(list)
    for segment in sorted(segments, key=lambda s: s.key):
        groups[group_key(segment)].append(segment)
    chosen: dict[str, Segment] = {}
    for key in sorted(groups):
        members = groups[key]
        for segment in members if len(members) <= PER_GROUP else rng.sample(members, PER_GROUP):
            chosen[segment.key] = segment
    rest = [s for s in sorted(segments, key=lambda s: s.key) if s.key not in chosen]
    for segment in rng.sample(rest, max(0, min(len(rest), budget - len(chosen)))):
        chosen[segment.key] = segment
    return [chosen[k] for k in sorted(chosen)]
