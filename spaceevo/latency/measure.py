"""Latency measurement protocol for ONNX Runtime.

Sessions use graph optimisation level ALL (QDQ fusion and layout transforms), explicit intra-op
threads and sequential execution. A measurement is several rounds of timed runs after a warm-up;
the figure is the median over rounds of each round's median, robust to the spikes of a shared
machine. Variants that are compared are measured interleaved (round-robin), never one after another.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from spaceevo.latency.fingerprint import DeviceFingerprint


@dataclass(frozen=True)
class MeasureConfig:
    """How hard to measure: warm-up runs, rounds, runs per round, and a time floor per round."""

    warmup: int = 10
    rounds: int = 5
    runs_per_round: int = 10
    min_round_s: float = 0.01


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds: median of round medians, and the spread of round medians (robust CV)."""

    median_ms: float
    min_ms: float
    round_medians_ms: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(max - min) / median of the round medians: how much this figure moved during the run."""
        values = self.round_medians_ms
        return (max(values) - min(values)) / self.median_ms if self.median_ms > 0 else 0.0


def make_session(model: onnx.ModelProto | bytes | str, fingerprint: DeviceFingerprint) -> ort.InferenceSession:
    """An inference session configured as every latency figure in spaceevo is measured."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = fingerprint.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=[fingerprint.provider])


def random_feed(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Random input of the right shape and dtype (float32 or uint8) for a session."""
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        if arg.type == "tensor(uint8)":
            feed[arg.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            feed[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


class Timer:
    """A prepared session and input, timed with ``run_once``; the unit every protocol builds on."""

    def __init__(self, model: onnx.ModelProto | bytes | str, fingerprint: DeviceFingerprint):
        self.session = make_session(model, fingerprint)
        self.feed = random_feed(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run_once(self) -> float:
        start = time.perf_counter()
        self.session.run(self.outputs, self.feed)
        return (time.perf_counter() - start) * 1e3

    def round(self, runs: int, min_round_s: float) -> list[float]:
        times, spent = [], 0.0
        while len(times) < runs or spent * 1e-3 < min_round_s:
            times.append(self.run_once())
            spent += times[-1]
        return times


def measure_interleaved(timers: Sequence[Timer], config: MeasureConfig = MeasureConfig()) -> list[LatencyStats]:
    """Measure several prepared models round-robin, so drift of the machine hits all alike."""
    for timer in timers:
        for _ in range(config.warmup):
            timer.run_once()
    medians: list[list[float]] = [[] for _ in timers]
    for _ in range(config.rounds):
        for i, timer in enumerate(timers):
            medians[i].append(statistics.median(timer.round(config.runs_per_round, config.min_round_s)))
    return [
        LatencyStats(median_ms=statistics.median(m), min_ms=min(m), round_medians_ms=tuple(m)) for m in medians
    ]


def measure_model(
    model: onnx.ModelProto | bytes | str, fingerprint: DeviceFingerprint, config: MeasureConfig = MeasureConfig()
) -> LatencyStats:
    """Latency of one model on the fingerprinted device."""
    return measure_interleaved([Timer(model, fingerprint)], config)[0]
