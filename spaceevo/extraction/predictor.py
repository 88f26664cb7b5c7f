"""Accuracy predictor of a supernet's subnets, fitted on the subnets a search has evaluated
(Once-for-All, Cai et al. 2020, Sec. 3.3, predicts accuracy from the architecture encoding to screen
candidates without evaluating them).

Features of a subnet (:func:`features`): resolution and per-stage depth, and for every block slot
whether it is active and, if so, its kernel, width and expand ratio, each scaled to [0, 1] over its
allowed values. The model is an ensemble of ridge regressions on bootstrap resamples of the
evaluated subnets (closed form, numpy only; the penalty is chosen by leave-one-out error): with a
few hundred evaluations a linear model is what the data supports, and the spread of the ensemble
says where it is unsure, which the sampler uses for exploration. :func:`cross_validate` reports its
rank correlation (Spearman) and RMSE on held-out evaluated subnets (k-fold).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from spaceevo.space import CandidateSpace, Subnet

PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0)
MEMBERS = 8


def _scaled(value: float, options: Sequence[float]) -> float:
    low, high = min(options), max(options)
    return 0.0 if high == low else (value - low) / (high - low)


def features(space: CandidateSpace, subnet: Subnet) -> np.ndarray:
    """The feature vector of ``subnet`` (same length for every subnet of ``space``)."""
    row = [_scaled(subnet.resolution, space.hyperspace.resolutions)]
    for stage, blocks in zip(space.stages, subnet.stages):
        if len(stage.depths) > 1:
            row.append(_scaled(len(blocks), stage.depths))
        for slot in range(max(stage.depths)):
            active = slot < len(blocks)
            if len(stage.depths) > 1 and slot >= min(stage.depths):
                row.append(float(active))
            for value, options in (
                (lambda b: b.kernel, stage.kernels), (lambda b: b.width, stage.widths), (lambda b: b.expand, stage.expand_ratios)
            ):
                if len(options) > 1:
                    row.append(_scaled(value(blocks[slot]), options) if active else 0.0)
    return np.asarray(row, dtype=np.float64)


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Weights (intercept last) of ridge regression on centred data; the intercept is not penalised."""
    mean_x, mean_y = x.mean(axis=0), y.mean()
    xc = x - mean_x
    w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return np.append(w, mean_y - mean_x @ w)


def _loo_error(x: np.ndarray, y: np.ndarray, penalty: float) -> float:
    """Leave-one-out mean squared error of ridge regression (closed form through the hat matrix)."""
    xc = x - x.mean(axis=0)
    hat = xc @ np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T) + 1.0 / len(y)
    residual = y - hat @ y
    return float(np.mean((residual / np.clip(1.0 - np.diag(hat), 1e-6, None)) ** 2))


@dataclass(frozen=True)
class AccuracyPredictor:
    """Predicted top-1 (%) of subnets: mean and spread of a bootstrap ensemble of ridge regressions."""

    space: CandidateSpace
    weights: np.ndarray  # (members, features + 1)
    penalty: float

    @classmethod
    def fit(cls, space: CandidateSpace, subnets: Sequence[Subnet], top1: Sequence[float], seed: int = 0,
            members: int = MEMBERS) -> AccuracyPredictor:
        x = np.stack([features(space, s) for s in subnets])
        y = np.asarray(top1, dtype=np.float64)
        penalty = min(PENALTIES, key=lambda p: _loo_error(x, y, p)) if len(y) > 2 else PENALTIES[-1]
        rng = np.random.default_rng(random.Random(f"predictor:{seed}:{len(y)}").getrandbits(32))
        weights = [_ridge(x, y, penalty)]
        for _ in range(members - 1):
            pick = rng.integers(0, len(y), len(y))
            weights.append(_ridge(x[pick], y[pick], penalty))
        return cls(space, np.stack(weights), penalty)

    def predict(self, subnets: Sequence[Subnet]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard deviation) of the ensemble's predictions, one per subnet."""
        x = np.stack([features(self.space, s) for s in subnets])
        x = np.hstack([x, np.ones((len(x), 1))])
        predictions = x @ self.weights.T
        return predictions.mean(axis=1), predictions.std(axis=1)


@dataclass(frozen=True)
class PredictorQuality:
    """How well the predictor ranks and predicts evaluated subnets it was not fitted on (k-fold)."""

    spearman: float | None
    rmse: float | None
    folds: int
    evaluated: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None when either side is constant)."""
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def cross_validate(space: CandidateSpace, subnets: Sequence[Subnet], top1: Sequence[float], folds: int = 5,
                   seed: int = 0) -> PredictorQuality:
    """Spearman and RMSE (points of top-1) of predictions on each fold by a predictor fitted on the
    others, pooled over the folds; None with fewer than 2 subnets per fold."""
    n = len(subnets)
    folds = min(folds, n // 2)
    if folds < 2:
        return PredictorQuality(None, None, 0, n)
    order = list(range(n))
    random.Random(f"folds:{seed}").shuffle(order)
    predicted = np.empty(n)
    y = np.asarray(top1, dtype=np.float64)
    for fold in range(folds):
        test = order[fold::folds]
        train = sorted(set(order) - set(test))
        model = AccuracyPredictor.fit(space, [subnets[i] for i in train], y[train], seed, members=1)
        predicted[test] = model.predict([subnets[i] for i in test])[0]
    rho = spearman(predicted, y)
    rmse = float(np.sqrt(np.mean((predicted - y) ** 2)))
    return PredictorQuality(None if rho is None else round(rho, 4), round(rmse, 4), folds, n)
