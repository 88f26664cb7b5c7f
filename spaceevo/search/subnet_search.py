"""Evolutionary search for the most accurate subnet of a trained supernet inside a latency window.

Once-for-All / AttentiveNAS style, one latency budget at a time: a population of P subnets sampled
inside the window [budget − delta, budget] of the latency predictor, then G generations that keep
the best ``parent_ratio``·P subnets found so far and add children, ``mutation_ratio``·P by mutation
(each gene, resolution, stage depth, block kernel / width / expand, changes with probability
``mutate_prob``) and the rest by uniform crossover of two parents. Every child must fall inside the
window (bounded tries, else it is dropped). Fitness is the INT8 fake-quant top-1 on the held-out
split after BatchNorm recalibration (:class:`HeldoutFitness`); the test split is never looked at.

The search lives in an Optuna study (storage helpers of :mod:`spaceevo.search.evolution`): one trial
per *slot* ``(search, generation, index)``. A generation's plan is a deterministic function of the
seed and the finished earlier generations, so a killed search resumes from its finished trials,
several workers (processes or machines on one storage URL) share a generation's slots, and the same
seed gives the same search. A worker claims a slot by writing it into its RUNNING trial and backs off
if another RUNNING or COMPLETE trial holds it (the claim protocol of the space search). A subnet
already evaluated in the study (by any search over the same supernet and fitness) is not evaluated
again: its trial copies the value (``cached``).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from spaceevo.deploy.trained import TrainedRun
from spaceevo.nn import Supernet
from spaceevo.errors import UsageError
from spaceevo.search.evolution import CLAIMS, ask_as_worker, is_abandoned, open_study
from spaceevo.space import BlockChoice, CandidateSpace, StageChoices, Subnet
from spaceevo.train.data import Datasets, make_loader
from spaceevo.train.evaluate import evaluate
from spaceevo.train.loop import EVAL_SEED

STUDY_PREFIX = "spaceevo-extract"


@dataclass(frozen=True)
class SubnetSearchConfig:
    """Sizes of one search: population P, G generations after the first, OFA's parent and mutation
    ratios and per-gene mutation probability, sampling tries per child, and the held-out images the
    fitness counts (None: the whole held-out split)."""

    population: int
    generations: int
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    max_tries: int = 500
    heldout_images: int | None = None

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 0:
            raise UsageError(f"a subnet search needs population >= 2 and generations >= 0, got {self}")
        if not (0 < self.parent_ratio < 1 and 0 <= self.mutation_ratio and self.parent_ratio + self.mutation_ratio <= 1):
            raise UsageError(f"parent_ratio and mutation_ratio must be in (0, 1) and sum to at most 1, got {self}")

    @property
    def parents(self) -> int:
        return max(1, round(self.population * self.parent_ratio))

    @property
    def mutations(self) -> int:
        return min(self.population - self.parents, round(self.population * self.mutation_ratio))

    @property
    def max_evaluations(self) -> int:
        return self.population + self.generations * (self.population - self.parents)


#: ``smoke`` checks the pipeline on a smoke-trained supernet in seconds (20 evaluations of 256
#: held-out images); ``default`` evaluates up to 168 subnets on the whole held-out split.
PRESETS: dict[str, SubnetSearchConfig] = {
    "smoke": SubnetSearchConfig(population=8, generations=2, heldout_images=256),
    "default": SubnetSearchConfig(population=24, generations=8),
}


def subnet_search_config(preset: str | SubnetSearchConfig) -> SubnetSearchConfig:
    if isinstance(preset, SubnetSearchConfig):
        return preset
    if preset not in PRESETS:
        raise UsageError(f"unknown extract preset '{preset}'; allowed: {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class Window:
    """Predicted INT8 latency window [low_ms, high_ms] of one budget."""

    low_ms: float
    high_ms: float

    def __contains__(self, ms: float) -> bool:
        return self.low_ms <= ms <= self.high_ms


# ---- genes -------------------------------------------------------------------------------------


def _pick(options: Sequence, rng: random.Random, level: float | None) -> object:
    """A uniform choice, or (``level`` in [0, 1]) one near that position of the sorted options."""
    if level is None or len(options) == 1:
        return rng.choice(options)
    ordered = sorted(options)
    index = round(min(1.0, max(0.0, level + rng.gauss(0.0, 0.25))) * (len(ordered) - 1))
    return ordered[index]


def _block(stage: StageChoices, rng: random.Random, level: float | None = None) -> BlockChoice:
    return BlockChoice(_pick(stage.kernels, rng, level), _pick(stage.widths, rng, level), _pick(stage.expand_ratios, rng, level))


def random_subnet(space: CandidateSpace, rng: random.Random) -> Subnet:
    """A random subnet: uniform choices, or (half of the time) choices near one random size level,
    so that the small and large ends of the latency range are sampled too."""
    level = rng.random() if rng.random() < 0.5 else None
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
                BlockChoice(
                    rng.choice(options)[i].kernel, rng.choice(options)[i].width, rng.choice(options)[i].expand
                )
            )
        stages.append(tuple(new))
    return Subnet(tuple(stages), rng.choice((a.resolution, b.resolution)))


# ---- fitness -----------------------------------------------------------------------------------


class HeldoutFitness:
    """Top-1 (%) of a subnet on the held-out split after BatchNorm recalibration there: INT8
    fake-quant for a run with a QAT phase, FP32 otherwise. The supernet is loaded on first use, so
    a search whose subnets are all cached never loads it. ``evaluations`` counts the calls."""

    def __init__(self, run: TrainedRun, heldout_images: int | None):
        self.run = run
        self.heldout_images = heldout_images
        self.evaluations = 0
        self._loaded: tuple[Supernet, Datasets] | None = None

    @property
    def precision(self) -> str:
        return "int8 fake-quant" if self.run.quantization_aware else "fp32 (the run has no QAT phase)"

    def _load(self) -> tuple[Supernet, Datasets]:
        if self._loaded is None:
            self._loaded = (self.run.supernet(), self.run.load_data())
        return self._loaded

    @property
    def datasets(self) -> Datasets:
        """The run's data splits (the test split is for verification only)."""
        return self._load()[1]

    def __call__(self, subnet: Subnet) -> float:
        supernet, datasets = self._load()
        self.run.calibrated(supernet, subnet, datasets)
        batch = min(256, self.heldout_images or 256)
        loader = make_loader(
            datasets.heldout.with_resolution(subnet.resolution), batch, True, seed=EVAL_SEED, workers=0, distributed=False
        )
        self.evaluations += 1
        return evaluate(supernet, subnet, loader, self.heldout_images)

    def key(self) -> dict:
        """What determines the fitness values (a study shares its cache only between equal keys)."""
        run = self.run
        return {
            "kind": "subnet-search",
            "space": run.space.encoding,
            "hyperspace_digest": run.space.hyperspace.digest,
            "run": str(run.run.path.resolve()),
            "epoch": run.epoch,
            "phase": run.phase,
            "data": str(run.data),
            "heldout_images": self.heldout_images,
        }


def open_extract_study(
    url: str, fitness: HeldoutFitness, storage: optuna.storages.BaseStorage | None = None
) -> optuna.Study:
    """The study of subnet searches over one supernet and fitness in storage ``url`` (or the already
    opened ``storage``): one study per fitness key, so a retrained supernet or another held-out
    sample starts a fresh cache."""
    key = fitness.key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return open_study(url, key, study_name=f"{STUDY_PREFIX}-{digest}", storage=storage)


# ---- the generational loop ---------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """One evaluated subnet of a search: held-out top-1 (%), predicted INT8 ms and where it was found."""

    subnet: str
    heldout_top1: float
    predicted_int8_ms: float
    generation: int
    slot: int
    cached: bool


@dataclass(frozen=True)
class BudgetSearch:
    """Outcome of the search for one budget: every subnet it evaluated (plan order) and its winner."""

    budget_ms: float
    window: Window
    evaluated: list[Evaluated]
    evaluated_here: int

    @property
    def best(self) -> Evaluated:
        return max(self.evaluated, key=lambda e: (e.heldout_top1, -e.generation, -e.slot))


def search_key(budget_ms: float, window: Window, sizes: SubnetSearchConfig, seed: int, fixed: Sequence[Subnet] | None) -> str:
    """Identity of one search in the study: every setting that shapes its plans."""
    key = {"budget_ms": budget_ms, "window": asdict(window), "sizes": asdict(sizes), "seed": seed}
    if fixed is not None:
        key["fixed"] = hashlib.sha256("|".join(s.encode() for s in fixed).encode()).hexdigest()[:12]
    return json.dumps(key, sort_keys=True)


class SubnetSearch:
    """The evolutionary search for one latency window, run (or resumed, or joined) in a study.

    With ``fixed``, no search: exactly those subnets are evaluated (one generation), through the
    same study, cache and claims (the largest subnet for a budget above it; random baselines).
    """

    def __init__(
        self,
        study: optuna.Study,
        space: CandidateSpace,
        predict_ms: Callable[[Subnet], float],
        fitness: Callable[[Subnet], float],
        sizes: SubnetSearchConfig,
        budget_ms: float,
        window: Window,
        seed: int = 0,
        fixed: Sequence[Subnet] | None = None,
        stale_after_s: float = 600.0,
        poll_s: float = 0.05,
    ):
        self.study, self.space, self.predict_ms, self.fitness = study, space, predict_ms, fitness
        self.sizes, self.budget_ms, self.window, self.seed = sizes, budget_ms, window, seed
        self.fixed = None if fixed is None else list(dict.fromkeys(fixed))
        self.generations = 0 if fixed is not None else sizes.generations
        self.key = search_key(budget_ms, window, sizes, seed, self.fixed)
        self.stale_after_s, self.poll_s = stale_after_s, poll_s

    # -- plans ---------------------------------------------------------------------------------
    def _feasible(self, subnet: Subnet, seen: set[str]) -> bool:
        return subnet.encode() not in seen and self.predict_ms(subnet) in self.window

    def sample(self, rng: random.Random, seen: set[str]) -> Subnet | None:
        """A random subnet inside the window and not in ``seen``; None after ``max_tries`` misses."""
        for _ in range(self.sizes.max_tries):
            subnet = random_subnet(self.space, rng)
            if self._feasible(subnet, seen):
                return subnet
        return None

    def plan(self, generation: int, history: Sequence[Evaluated]) -> list[Subnet]:
        """The subnets of ``generation`` given the finished earlier ones (``history``): P samples
        first, then children of the best ``parents`` found so far. Deterministic."""
        if self.fixed is not None:
            return list(self.fixed)
        rng = random.Random(f"{self.seed}:{self.budget_ms!r}:{generation}")
        seen = {e.subnet for e in history}
        planned: list[Subnet] = []

        def add(subnet: Subnet | None) -> None:
            if subnet is not None:
                planned.append(subnet)
                seen.add(subnet.encode())

        sizes = self.sizes
        if generation == 0:
            for _ in range(sizes.population):
                add(self.sample(rng, seen))
            return planned
        ranked = sorted(history, key=lambda e: (-e.heldout_top1, e.generation, e.slot))
        parents = [self.space.subnet(e.subnet) for e in ranked[: sizes.parents]]
        for index in range(sizes.population - sizes.parents):
            mutation = index < sizes.mutations
            for attempt in range(sizes.max_tries):
                # crossovers of near-identical parents run out of new children: then mutate instead
                if mutation or len(parents) < 2 or attempt >= sizes.max_tries // 2:
                    child = mutate(self.space, rng.choice(parents), rng, sizes.mutate_prob)
                else:
                    child = crossover(*rng.sample(parents, 2), rng)
                if self._feasible(child, seen):
                    add(child)
                    break
        return planned

    # -- trials --------------------------------------------------------------------------------
    def _mine(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        return [t for t in trials if t.user_attrs.get("search") == self.key]

    @staticmethod
    def _evaluated(trial: FrozenTrial) -> Evaluated:
        a = trial.user_attrs
        return Evaluated(a["subnet"], float(trial.value), a["predicted_int8_ms"], a["generation"], a["slot"], a["cached"])

    def run(self, progress: bool = True) -> BudgetSearch:
        """Evaluate every slot of every generation (those finished already are kept as they are)."""
        evaluated_here = 0
        bar = tqdm(
            total=len(self.fixed) if self.fixed is not None else self.sizes.max_evaluations, desc=f"extract {self.budget_ms:g} ms", unit="subnet",
            file=sys.stderr, disable=not progress, leave=False,
        )
        try:
            generation, plan = 0, None
            while generation <= self.generations:
                trials = self.study.get_trials(deepcopy=False)
                for trial in trials:
                    if trial.state == TrialState.RUNNING and is_abandoned(trial, self.stale_after_s):
                        self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                mine = self._mine(trials)
                done = [self._evaluated(t) for t in mine if t.state == TrialState.COMPLETE]
                bar.update(len(done) - bar.n)
                if plan is None:
                    plan = self.plan(generation, [e for e in done if e.generation < generation])
                    if generation == 0 and not plan:
                        raise UsageError(
                            f"no subnet of {self.space.encoding} found with a predicted INT8 latency in "
                            f"[{self.window.low_ms:g}, {self.window.high_ms:g}] ms after "
                            f"{self.sizes.max_tries} tries; widen the window (--delta)"
                        )
                finished = {e.slot for e in done if e.generation == generation}
                if len(finished) >= len(plan):
                    generation, plan = generation + 1, None
                    continue
                claimed = {
                    t.user_attrs.get("slot") for t in mine if t.state == TrialState.RUNNING and t.user_attrs.get("generation") == generation
                }
                free = [i for i in range(len(plan)) if i not in finished and i not in claimed]
                if not free:
                    time.sleep(self.poll_s)  # other workers are evaluating the last slots of this generation
                    continue
                if self._step(generation, free[0], plan[free[0]], trials):
                    evaluated_here += 1
        finally:
            bar.close()
        done = sorted(
            (self._evaluated(t) for t in self._mine(self.study.get_trials(deepcopy=False)) if t.state == TrialState.COMPLETE),
            key=lambda e: (e.generation, e.slot),
        )
        return BudgetSearch(self.budget_ms, self.window, done, evaluated_here)

    def _step(self, generation: int, slot: int, subnet: Subnet, trials: Sequence[FrozenTrial]) -> bool:
        """Claim one slot, evaluate its subnet (or copy a cached value) and tell; True if evaluated here."""
        trial = ask_as_worker(self.study, search=self.key, generation=generation, slot=slot)  # the claim, in one write
        try:
            encoding = subnet.encode()
            rivals = [
                t for t in self.study.get_trials(deepcopy=False, states=CLAIMS)
                if t.number != trial.number and t.user_attrs.get("search") == self.key
                and t.user_attrs.get("generation") == generation and t.user_attrs.get("slot") == slot
            ]
            if rivals:
                self.study.tell(trial, state=TrialState.PRUNED)
                time.sleep(random.uniform(0.0, 0.05))  # break the symmetry of workers that collided
                return False
            cached = next(
                (t.value for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("subnet") == encoding), None
            )
            top1 = float(cached) if cached is not None else self.fitness(subnet)
            trial.set_user_attr("subnet", encoding)
            trial.set_user_attr("predicted_int8_ms", round(self.predict_ms(subnet), 6))
            trial.set_user_attr("cached", cached is not None)
            self.study.tell(trial, top1, skip_if_finished=True)
            return cached is None
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise


def all_evaluated(study: optuna.Study) -> dict[str, tuple[float, float]]:
    """Every subnet the study evaluated: encoding → (held-out top-1, predicted INT8 ms)."""
    return {
        t.user_attrs["subnet"]: (float(t.value), float(t.user_attrs["predicted_int8_ms"]))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "subnet" in t.user_attrs
    }

