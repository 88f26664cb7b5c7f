"""What ``spaceevo extract`` returns: one :class:`BudgetResult` per budget in an :class:`ExtractResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spaceevo.extraction.finetune import FinetunedSubnet
from spaceevo.extraction.predictor import PredictorQuality
from spaceevo.search.budgets import BudgetChoice


@dataclass
class BudgetResult:
    """One budget's answer: the best evaluated subnet predicted at or under it (``evaluated``: how
    many evaluated subnets were). Latencies in ms (measured ones on the latency table's scale, by the
    ``--device`` engine), top-1 in %: ``test_ort_int8_top1`` in ONNX Runtime, ``test_device_int8_top1``
    in the ``--device`` engine (the same figure for ``cpu``); the measured figures and the test top-1
    stay None without verification. ``finetuned``: the deployed subnet (:meth:`deployed`) after
    fine-tuning, when asked for."""

    budget_ms: float
    subnet: str
    predicted_int8_ms: float
    heldout_int8_top1: float
    evaluated: int
    measured_int8_ms: float | None = None
    measured_fp32_ms: float | None = None
    measured_int8_spread: float | None = None
    test_ort_int8_top1: float | None = None
    test_device_int8_top1: float | None = None
    onnx_int8: str | None = None
    onnx_fp32: str | None = None
    pareto_optimal: bool | None = None
    over_budget: bool | None = None
    note: str | None = None
    fallback: BudgetResult | None = None
    finetuned: FinetunedSubnet | None = None

    def deployed(self) -> BudgetResult:
        """The answer deployed for this budget: the last of its chain of fallbacks (itself without one)."""
        result = self
        while result.fallback is not None:
            result = result.fallback
        return result

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fallback"] = None if self.fallback is None else self.fallback.to_dict()
        return data


@dataclass(frozen=True)
class ExtractResult:
    """Every budget's result (in the order given) and where the artifacts are. ``evaluated`` counts
    the subnets of the front search, ``evaluated_here`` those this call evaluated, ``verified_here``
    the answers it verified (the others' figures come from another process or an earlier call);
    ``predictor`` is the accuracy predictor's k-fold quality on the evaluated subnets."""

    results: list[BudgetResult]
    evaluated: int
    evaluated_here: int
    front_size: int
    predictor: PredictorQuality
    fitness: str
    storage: str
    evaluated_csv: Path
    pareto_csv: Path
    pareto_png: Path
    predictor_json: Path
    latency_scale: str | None
    budgets: BudgetChoice
    verified_here: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "latency_budgets": self.budgets.to_dict(),
            "evaluated": self.evaluated,
            "evaluated_here": self.evaluated_here,
            "front_size": self.front_size,
            "predictor": self.predictor.to_dict(),
            "verified_here": self.verified_here,
            "fitness": self.fitness,
            "storage": self.storage,
            "evaluated_csv": str(self.evaluated_csv),
            "pareto_csv": str(self.pareto_csv),
            "pareto_png": str(self.pareto_png),
            "predictor_json": str(self.predictor_json),
            "latency_scale": self.latency_scale,
        }
