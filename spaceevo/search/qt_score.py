"""The Q-T score of a candidate space (DESIGN.md, "Q-T score"), vectorised with numpy.

For a space A and each latency constraint C: draw N subnets of A from the block LUT (one resolution r
per batch of ``batch_size`` samples, one LUT row per stage among the rows measured at r), with
loss_j = sum of the stages' NSR loss and lat_j = sum of their latency + the fixed stages' latency at
r; p = feasible fraction + 1e-5; L_top = mean loss of the k lowest-loss feasible samples (1e5 if
none); L_lat = max(1, (t / p)^a); score_C = 1 / (L_lat * L_top); Q-T(A) = sum over C of score_C.

The published implementation (github.com/xudoong/SpaceEvo, ``modules/block_kd/search``) loops in
Python and draws fresh samples per constraint; here one draw of N samples serves every constraint
(the constraints are compared on the same subnets) and the draw depends only on (seed, space), so a
space scores the same wherever and whenever it is evaluated (several workers, resumed searches).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from spaceevo.errors import ArtifactError, UsageError
from spaceevo.search.lut import BlockLUT, StageTable
from spaceevo.space import CandidateSpace, Hyperspace

TOP_K = 50
LATENCY_T = 0.1
LATENCY_A = 0.01
P_EPSILON = 1e-5
NO_FEASIBLE_LOSS = 1e5
BATCH_SIZE = 500

FixedStageMs = float | Mapping[int, float]


@dataclass(frozen=True)
class ConstraintScore:
    """What one latency constraint contributes to a space's Q-T score."""

    latency_ms: float
    feasible_fraction: float
    top_tier_loss: float
    score: float


@dataclass(frozen=True)
class SpaceScore:
    """Q-T score of one candidate space, with its per-constraint parts (in constraint order)."""

    space: str
    qt_score: float
    constraints: tuple[ConstraintScore, ...]

    @property
    def feasible_fraction(self) -> list[float]:
        return [c.feasible_fraction for c in self.constraints]

    @property
    def top_tier_loss(self) -> list[float]:
        return [c.top_tier_loss for c in self.constraints]

    def to_dict(self) -> dict:
        """JSON form: per-constraint figures are lists in the order of the latency constraints."""
        return {
            "space": self.space,
            "qt_score": self.qt_score,
            "feasible_fraction": self.feasible_fraction,
            "top_tier_loss": self.top_tier_loss,
        }


def fixed_stage_array(hyperspace: Hyperspace, fixed_stage_ms: FixedStageMs) -> np.ndarray:
    """Latency of the stages the LUT does not cover, per hyperspace resolution (index order).

    For the LUTs spaceevo builds it is the remainder of the latency table's linear boundary model
    (its intercept, the fixed stages and the head), which may be negative where the model's
    intercept is (an OpenVINO table's can be); the sum with the LUT rows is the prediction.
    """
    if isinstance(fixed_stage_ms, Mapping):
        missing = [r for r in hyperspace.resolutions if r not in fixed_stage_ms]
        if missing:
            raise UsageError(
                f"fixed-stage latency is missing for resolution(s) {missing}; "
                f"'{hyperspace.name}' uses {list(hyperspace.resolutions)}"
            )
        values = [float(fixed_stage_ms[r]) for r in hyperspace.resolutions]
    else:
        values = [float(fixed_stage_ms)] * len(hyperspace.resolutions)
    if any(not np.isfinite(v) for v in values):
        raise UsageError(f"fixed-stage latency must be finite, got {values}")
    return np.array(values, dtype=np.float64)


def space_rng(seed: int, space: CandidateSpace) -> np.random.Generator:
    """The generator for one space's samples: a function of (seed, encoding) only."""
    return np.random.default_rng([seed, zlib.crc32(space.encoding.encode())])


class QTScorer:
    """Scores candidate spaces of one block LUT under fixed latency constraints."""

    def __init__(
        self,
        lut: BlockLUT,
        latency_constraints_ms: Sequence[float],
        fixed_stage_ms: FixedStageMs = 0.0,
        samples: int = 100_000,
        batch_size: int = BATCH_SIZE,
        top_k: int = TOP_K,
    ) -> None:
        if not latency_constraints_ms:
            raise UsageError("give at least one latency constraint (ms)")
        if any(not np.isfinite(c) or c <= 0 for c in latency_constraints_ms):
            raise UsageError(f"latency constraints must be positive numbers of ms, got {list(latency_constraints_ms)}")
        if samples < 1 or batch_size < 1 or top_k < 1:
            raise UsageError(f"samples, batch size and k must be at least 1, got {samples}, {batch_size}, {top_k}")
        self.lut = lut
        self.latency_constraints_ms = tuple(float(c) for c in latency_constraints_ms)
        self.fixed_ms = fixed_stage_array(lut.hyperspace, fixed_stage_ms)
        self.samples = samples
        self.batch_size = batch_size
        self.top_k = top_k

    def draw_indices(self, space: CandidateSpace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The random part of a score: per sample its resolution index (one per batch), and per
        stage and sample a row index into the stage's file, counted in the stage table's arrays
        (``floor(u * rows at r)`` with u uniform in [0, 1), never reaching the row count)."""
        tables = self.lut.stage_tables(space)
        usable = _usable_resolutions(tables)
        if not usable.size:
            raise ArtifactError(
                f"{self.lut.directory}: no resolution has rows in every LUT file of {space.encoding} "
                f"({', '.join(t.path.name for t in tables)})"
            )
        batches = -(-self.samples // self.batch_size)
        batch_resolution = usable[rng.integers(0, usable.size, size=batches)]
        counts = np.stack([t.counts[batch_resolution] for t in tables])[:, :, None]
        offsets = np.stack([t.offsets[batch_resolution] for t in tables])[:, :, None]
        uniform = rng.random((len(tables), batches, self.batch_size))
        rows = (uniform * counts).astype(np.int64) + offsets
        resolution = np.repeat(batch_resolution, self.batch_size)[: self.samples]
        return resolution, rows.reshape(len(tables), -1)[:, : self.samples]

    def sample(self, space: CandidateSpace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """N sampled subnets of a space: (NSR loss, latency ms) arrays."""
        resolution, rows = self.draw_indices(space, rng)
        tables = self.lut.stage_tables(space)
        base = np.cumsum([0] + [t.nsr_loss.size for t in tables[:-1]])[:, None]
        flat = rows + base  # one gather over the stages' concatenated arrays
        loss = np.concatenate([t.nsr_loss for t in tables])[flat].sum(axis=0)
        latency_ms = np.concatenate([t.latency_ms for t in tables])[flat].sum(axis=0) + self.fixed_ms[resolution]
        return loss, latency_ms

    def score(self, space: CandidateSpace, seed: int = 0) -> SpaceScore:
        """Q-T score of one space; the samples depend only on (seed, space)."""
        loss, latency_ms = self.sample(space, space_rng(seed, space))
        parts = tuple(self._constraint_score(loss, latency_ms, c) for c in self.latency_constraints_ms)
        return SpaceScore(space.encoding, float(sum(p.score for p in parts)), parts)

    def _constraint_score(self, loss: np.ndarray, latency_ms: np.ndarray, constraint_ms: float) -> ConstraintScore:
        feasible = loss[latency_ms <= constraint_ms]
        fraction = feasible.size / loss.size
        if feasible.size == 0:
            top_loss = NO_FEASIBLE_LOSS
        elif feasible.size <= self.top_k:
            top_loss = float(feasible.mean())
        else:
            top_loss = float(np.partition(feasible, self.top_k - 1)[: self.top_k].mean())
        return constraint_score(constraint_ms, fraction, top_loss)


def constraint_score(latency_ms: float, feasible_fraction: float, top_tier_loss: float) -> ConstraintScore:
    """score_C = 1 / (L_lat * L_top) with L_lat = max(1, (t / (p + 1e-5))^a)."""
    latency_loss = max(1.0, (LATENCY_T / (feasible_fraction + P_EPSILON)) ** LATENCY_A)
    return ConstraintScore(latency_ms, feasible_fraction, top_tier_loss, 1.0 / (latency_loss * top_tier_loss))


def _usable_resolutions(tables: Sequence[StageTable]) -> np.ndarray:
    """Resolution indices at which every stage table has rows."""
    return np.flatnonzero(np.all([t.counts > 0 for t in tables], axis=0))


def space_min_latency_ms(lut: BlockLUT, space: CandidateSpace, fixed_stage_ms: FixedStageMs = 0.0) -> float:
    """Smallest latency a subnet of this space can have: min over resolutions of the stages' minima
    plus the fixed stages."""
    fixed = fixed_stage_array(lut.hyperspace, fixed_stage_ms)
    per_resolution = sum(t.min_latency_ms() for t in lut.stage_tables(space)) + fixed
    return float(per_resolution.min())


def smallest_latency_ms(lut: BlockLUT, fixed_stage_ms: FixedStageMs = 0.0) -> tuple[float, int]:
    """Smallest latency any space of the loaded LUT can reach, and the resolution where it does.

    Stages are independent, so it is the per-stage minimum over every loaded (block, window) file,
    summed per resolution."""
    fixed = fixed_stage_array(lut.hyperspace, fixed_stage_ms)
    stages = sorted({key[0] for key in lut.tables})
    per_resolution = fixed.copy()
    for stage in stages:
        minima = [t.min_latency_ms() for key, t in lut.tables.items() if key[0] == stage]
        per_resolution += np.min(minima, axis=0)
    best = int(np.argmin(per_resolution))
    return float(per_resolution[best]), lut.hyperspace.resolutions[best]


def check_constraints(
    lut: BlockLUT,
    latency_constraints_ms: Sequence[float],
    fixed_stage_ms: FixedStageMs = 0.0,
    what: str = "any space of the loaded LUT files",
) -> None:
    """Raise :class:`UsageError` if a constraint is below what any space of the loaded LUT files can
    reach: such a constraint gives every space the same useless score."""
    smallest, resolution = smallest_latency_ms(lut, fixed_stage_ms)
    impossible = [c for c in latency_constraints_ms if c < smallest]
    if impossible:
        raise UsageError(
            f"latency constraint(s) {', '.join(f'{c:g}' for c in impossible)} ms cannot be met by {what} "
            f"with the block LUT in {lut.directory}: the smallest achievable latency is "
            f"{smallest:.4g} ms (at resolution {resolution}, fixed stages included); "
            f"use larger constraints or --latency-constraints auto"
        )


def auto_constraints(
    lut: BlockLUT,
    fixed_stage_ms: FixedStageMs = 0.0,
    count: int = 4,
    spaces: int = 64,
    samples: int = 2_000,
    seed: int = 0,
    among: Sequence[CandidateSpace] | None = None,
) -> list[float]:
    """``count`` constraints spread over a latency range: the (2i+1)/(2*count) quantiles of subnet
    latencies pooled over the spaces ``among`` (the spaces being scored), by default over the
    hyperspace's homogeneous spaces and ``spaces`` random spaces (only spaces whose LUT files are
    loaded), rounded to 3 significant digits."""
    if among is None:
        hyperspace = lut.hyperspace
        picker = random.Random(seed)
        candidates = {s.encoding: s for s in hyperspace.homogeneous_spaces()}
        for _ in range(spaces):
            space = hyperspace.random_candidate_space(picker)
            candidates[space.encoding] = space
        among = list(candidates.values())
    loaded = [s for s in among if _loaded(lut, s)]
    if not loaded:
        raise ArtifactError(f"{lut.directory}: no candidate space has all its LUT files loaded")
    scorer = QTScorer(lut, [1.0], fixed_stage_ms, samples=samples)
    pooled = np.concatenate([scorer.sample(s, space_rng(seed, s))[1] for s in loaded])
    quantiles = [(2 * i + 1) / (2 * count) for i in range(count)]
    return [float(f"{v:.3g}") for v in np.quantile(pooled, quantiles)]


def _loaded(lut: BlockLUT, space: CandidateSpace) -> bool:
    keys = enumerate(zip(space.block_digits, space.window_digits), start=1)
    return all((i, b, w) in lut.tables for i, (b, w) in keys)
