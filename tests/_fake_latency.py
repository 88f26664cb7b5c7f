"""A deterministic stand-in for this device's latency predictor, for tests that must not depend on
the host CPU or on a committed latency table: predicted INT8 ms grow with every subnet gene
(resolution, depth, kernel, width, expand), so windows, ranges and budgets behave as with a real
table. Also usable from a subprocess with ``tests/`` on ``sys.path``: ``import _fake_latency; _fake_latency.install()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spaceevo.space import Architecture


@dataclass(frozen=True)
class FakePrediction:
    int8_ms: float


def fake_ms(arch: Architecture) -> float:
    """0.05 ms plus a MAC-like cost of every block at the subnet's resolution."""
    cost = 0.0
    for stage in arch.subnet.stages:
        for block in stage:
            cost += block.kernel**2 * block.width * max(block.expand, 1.0)
    return 0.05 + cost * (arch.subnet.resolution / 32) ** 2 * 2e-5


class FakePredictor:
    def predict(self, arch: Architecture) -> FakePrediction:
        return FakePrediction(fake_ms(arch))

    def predict_ms(self, arch: Architecture) -> float:
        return fake_ms(arch)


def load_fake_predictor(*_: Any, **__: Any) -> FakePredictor:
    return FakePredictor()


def install(monkeypatch: Any = None) -> None:
    """Replace :func:`spaceevo.latency.api.load_predictor` (and ``build_table``, a no-op then) with
    the fake; with ``monkeypatch`` the change is undone after the test."""
    import spaceevo.latency.api as api

    def no_table(*_: Any, **__: Any) -> None:
        return None

    for name, value in (("load_predictor", load_fake_predictor), ("build_table", no_table)):
        if monkeypatch is None:
            setattr(api, name, value)
        else:
            monkeypatch.setattr(api, name, value)
