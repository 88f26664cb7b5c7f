"""A subnet as a fixed-length genome: the parameters of one Optuna trial.

One categorical parameter per gene: ``resolution``, ``<stage>.depth`` and, for every block *slot*
of a stage up to its largest depth, ``<stage>.<slot>.kernel`` / ``.width`` / ``.expand`` (genes with
a single allowed value, such as the stem's, are left out). Slots beyond a stage's depth are inactive
but still carry a value (the smallest allowed one when a subnet is turned into parameters), so every
trial has the same parameters and optuna-dashboard and Optuna's importance tools see them all.

The variation operators of Once-for-All's evolutionary search (random sampling, per-gene mutation,
uniform crossover) act on :class:`~spaceevo.space.Subnet`s; the sampler (:mod:`spaceevo.extraction.front`)
uses them to propose candidates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from optuna.distributions import CategoricalDistribution

from spaceevo.space import BlockChoice, CandidateSpace, StageChoices, Subnet

GENES = ("kernel", "width", "expand")


@dataclass(frozen=True)
class Genome:
    """The trial parameters of a candidate space's subnets."""

    space: CandidateSpace

    @property
    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Every parameter and its allowed values (sorted), in a fixed order."""
        result: dict[str, CategoricalDistribution] = {}
        resolutions = sorted(self.space.hyperspace.resolutions)
        if len(resolutions) > 1:
            result["resolution"] = CategoricalDistribution(resolutions)
        for stage in self.space.stages:
            if len(stage.depths) > 1:
                result[f"{stage.name}.depth"] = CategoricalDistribution(sorted(stage.depths))
            for slot in range(max(stage.depths)):
                for gene, options in zip(GENES, _options(stage)):
                    if len(options) > 1:
                        result[f"{stage.name}.{slot}.{gene}"] = CategoricalDistribution(sorted(options))
        return result

    def params(self, subnet: Subnet) -> dict[str, Any]:
        """``subnet`` as trial parameters (inactive slots: the smallest allowed values)."""
        values: dict[str, Any] = {"resolution": subnet.resolution}
        for stage, blocks in zip(self.space.stages, subnet.stages):
            values[f"{stage.name}.depth"] = len(blocks)
            for slot in range(max(stage.depths)):
                for gene, options in zip(GENES, _options(stage)):
                    values[f"{stage.name}.{slot}.{gene}"] = getattr(blocks[slot], gene) if slot < len(blocks) else min(options)
        return {name: values[name] for name in self.distributions}

    def subnet(self, params: dict[str, Any]) -> Subnet:
        """The subnet of trial parameters (a gene left out takes its single allowed value)."""

        def value(name: str, options: Sequence) -> Any:
            return params[name] if name in params else options[0]

        stages = []
        for stage in self.space.stages:
            depth = int(value(f"{stage.name}.depth", stage.depths))
            blocks = []
            for slot in range(depth):
                genes = [value(f"{stage.name}.{slot}.{gene}", options) for gene, options in zip(GENES, _options(stage))]
                blocks.append(BlockChoice(int(genes[0]), int(genes[1]), float(genes[2])))
            stages.append(tuple(blocks))
        return Subnet(tuple(stages), int(value("resolution", self.space.hyperspace.resolutions)))


def _options(stage: StageChoices) -> tuple[Sequence[int], Sequence[int], Sequence[float]]:
    return stage.kernels, stage.widths, stage.expand_ratios


# ---- variation operators -------------------------------------------------------------------------


def _pick(options: Sequence, rng: random.Random, level: float | None) -> Any:
    """A uniform choice, or (``level`` in [0, 1]) one near that position of the sorted options."""
    if level is None or len(options) == 1:
        return rng.choice(list(options))
    ordered = sorted(options)
    index = round(min(1.0, max(0.0, level + rng.gauss(0.0, 0.25))) * (len(ordered) - 1))
    return ordered[index]


def _block(stage: StageChoices, rng: random.Random, level: float | None = None) -> BlockChoice:
    return BlockChoice(_pick(stage.kernels, rng, level), _pick(stage.widths, rng, level), _pick(stage.expand_ratios, rng, level))


def random_subnet(space: CandidateSpace, rng: random.Random, level: float | None = None) -> Subnet:
    """A random subnet: choices near the size ``level`` in [0, 1] (0: smallest options, 1: largest),
    or, without a level, uniform choices half of the time and choices near a random level otherwise,
    so that the small and large ends of the latency range are sampled too."""
    if level is None and rng.random() < 0.5:
        level = rng.random()
    stages = tuple(
        tuple(_block(s, rng, level) for _ in range(int(_pick(s.depths, rng, level)))) for s in space.stages
    )
    return Subnet(stages, int(_pick(space.hyperspace.resolutions, rng, level)))


def mutate(space: CandidateSpace, subnet: Subnet, rng: random.Random, prob: float) -> Subnet:
    """Each gene (resolution, stage depth, block kernel / width / expand) resampled with probability
    ``prob``; blocks added by a deeper stage are random."""
    resolution = rng.choice(space.hyperspace.resolutions) if rng.random() < prob else subnet.resolution
    stages = []
    for stage, blocks in zip(space.stages, subnet.stages):
        depth = rng.choice(stage.depths) if rng.random() < prob else len(blocks)
        new = []
        for i in range(depth):
            if i >= len(blocks):
                new.append(_block(stage, rng))
                continue
            b = blocks[i]
            new.append(
                BlockChoice(
                    rng.choice(stage.kernels) if rng.random() < prob else b.kernel,
                    rng.choice(stage.widths) if rng.random() < prob else b.width,
                    rng.choice(stage.expand_ratios) if rng.random() < prob else b.expand,
                )
            )
        stages.append(tuple(new))
    return Subnet(tuple(stages), resolution)


def crossover(a: Subnet, b: Subnet, rng: random.Random) -> Subnet:
    """Uniform crossover: every gene from either parent (blocks only one parent has come from it)."""
    stages = []
    for blocks_a, blocks_b in zip(a.stages, b.stages):
        depth = len(rng.choice((blocks_a, blocks_b)))
        new = []
        for i in range(depth):
            options = [blocks for blocks in (blocks_a, blocks_b) if i < len(blocks)]
            new.append(
                BlockChoice(rng.choice(options)[i].kernel, rng.choice(options)[i].width, rng.choice(options)[i].expand)
            )
        stages.append(tuple(new))
    return Subnet(tuple(stages), rng.choice((a.resolution, b.resolution)))
