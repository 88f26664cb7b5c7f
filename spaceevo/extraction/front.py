"""One multi-objective search for the whole accuracy/latency front of a trained supernet.

The search is an Optuna study with two objectives, held-out top-1 (maximised) and predicted INT8
latency (minimised). Every evaluated subnet is a COMPLETE trial whose parameters are its genome
(:mod:`spaceevo.extraction.genome`) and whose user attributes are ``subnet`` (its encoding) and
``predicted_int8_ms``. ``study.optimize`` runs it; workers and crashes are Optuna's business: any
number of processes may run the same search on one storage URL, ``MaxTrialsCallback`` stops them
when the study holds :attr:`FrontConfig.trials` complete trials, and the storage's heartbeat fails
and retries the trial of a killed worker (:mod:`spaceevo.storage`).

The sampler (:class:`FrontSampler`) is model-based. The first trials are the smallest and the
largest subnet (so every budget the space can meet has an answer) and random subnets spread over
the size levels of the space. After :attr:`FrontConfig.initial` of them each trial is the best of
many candidates (never one evaluated or being evaluated), of one of two kinds:

- **whole front** (a share :attr:`FrontConfig.global_share` of the model-based trials, drawn from
  the trial's seeded generator): mutations and crossovers of the two best non-dominated layers of
  the evaluated subnets, and random subnets, ranked by predicted **hypervolume improvement** of the
  front, from the accuracy predictor (:mod:`spaceevo.extraction.predictor`, with its ensemble spread
  as an optimism bonus: a little exploration) and the latency predictor. With the reference point
  at the slowest subnet's latency, the 2-D hypervolume is the integral, over every budget, of the
  best top-1 at or under it: this keeps the front good for budgets asked for later;
- **one budget** (the other trials, and every trial of the last :attr:`FrontConfig.refine` share of
  the search: a local refinement phase): the budget aimed at least so far (trials carry the budget
  they were chosen for in the user attribute ``focus_budget_ms``; ties: the budget whose answer lies
  furthest below it, relative to the budget, i.e. the largest hole in the front), and for it the
  candidate of largest predicted top-1 plus spread among mutations (at the gene rate and half of it)
  and crossovers of its current answer and of the best evaluated subnets in and just below its
  window, kept only if predicted in the window: latency in [0.9 B, B] (above the previous budget if
  that window holds no candidate; the next budget if neither does; a whole-front trial if no budget
  has a candidate).

The budgets aimed at are the study's user attribute ``budgets_ms``: ``extract`` records the budgets of
its first call there before the search runs, and keeps them (a later call, a resumed search or a
second worker samples for the same budgets; a call with other budgets is answered from the same
evaluations). A study without it (a search run directly) aims at 8 budgets spread evenly from the
smallest subnet's latency to the largest's. Why budget trials: 200 whole-front trials on the
default run left the middle of the range thin (five of ten budgets shared one answer, 0.6-1.3
points below searching each budget alone, docs/RESULTS.md); the answer of a budget is the maximum
of noisy held-out scores just under it, which more evaluations there raise.

At most one worker evaluates a subnet: the sampler writes the chosen subnet into the trial as soon
as it has chosen it, and a trial whose subnet another COMPLETE trial or a lower-numbered RUNNING one
holds is PRUNED without evaluation. The bound: two workers evaluate the same subnet only if both
choose it within one storage write of each other (then each evaluates it at most once; a finished
evaluation is seen by every later choice). The retry of a killed worker's trial inherits the subnet
that trial chose (and the parameters it had suggested, one storage write each, before it died): the
sampler evaluates exactly that subnet again, and other workers see it as taken while it is queued.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from spaceevo.errors import UsageError
from spaceevo.interrupts import raise_if_interrupted
from spaceevo.extraction.genome import Genome, crossover, mutate, random_subnet
from spaceevo.extraction.predictor import AccuracyPredictor
from spaceevo.space import CandidateSpace, Subnet

SUBNET, PREDICTED_MS = "subnet", "predicted_int8_ms"
#: study user attribute: the latency budgets (ms) the search aims at; trial user attribute: the
#: budget a trial was chosen for (absent: chosen for the whole front)
BUDGETS, FOCUS = "budgets_ms", "focus_budget_ms"
#: budgets aimed at when the study records none: spread evenly over the evaluated latency range
DEFAULT_TARGETS = 8
#: a budget's window: predicted latency in [WINDOW * B, B] (widened to the previous budget if empty)
WINDOW = 0.9
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class FrontConfig:
    """Sizes of a front search: ``trials`` subnets evaluated in all (across workers), the first
    ``initial`` of them spread at random, then ``candidates`` screened by the predictors per trial;
    ``exploration`` weighs the predictor's spread, ``mutate_prob`` is the per-gene mutation rate;
    ``heldout_images`` the held-out images the fitness counts (None: the whole held-out split);
    ``global_share`` the share of model-based trials that improve the whole front (the others improve
    one budget's answer), ``refine`` the share of all trials, at the end, that only improve budgets."""

    trials: int
    initial: int
    candidates: int = 400
    exploration: float = 1.0
    mutate_prob: float = 0.1
    heldout_images: int | None = None
    global_share: float = 0.25
    refine: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 2:
            raise UsageError(f"--trials must be an integer >= 2, got {self.trials!r}")
        if (not 2 <= self.initial or self.candidates < 1 or self.exploration < 0 or not 0 < self.mutate_prob <= 1
                or not 0 <= self.global_share <= 1 or not 0 <= self.refine <= 1):
            raise UsageError(f"a front search needs initial >= 2, candidates >= 1, exploration >= 0, "
                             f"0 < mutate_prob <= 1 and global_share, refine in [0, 1], got {self}")


#: ``smoke`` checks the pipeline in seconds (12 subnets on 256 held-out images); ``default`` evaluates
#: 200 subnets on the whole held-out split (3-6 s each on one core for the tiny default run; aimed at
#: the budgets, the search evaluates larger subnets: ~17-20 minutes estimated, RESULTS.md).
PRESETS: dict[str, FrontConfig] = {
    "smoke": FrontConfig(trials=12, initial=6, heldout_images=256),
    "default": FrontConfig(trials=200, initial=40),
}


def front_config(preset: str | FrontConfig, trials: int | None = None) -> FrontConfig:
    """A named preset (or a config), with ``trials`` instead of its own when given."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UsageError(f"unknown extract preset '{preset}'; allowed: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if trials is None:
        return preset
    return replace(preset, trials=trials, initial=min(preset.initial, max(2, trials // 4)))


# ---- the front ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """One evaluated subnet: held-out top-1 (%) and predicted INT8 ms, and its trial number."""

    subnet: str
    heldout_top1: float
    predicted_int8_ms: float
    trial: int


def evaluated(trials: Sequence[FrozenTrial], limit: int | None = None) -> list[Evaluated]:
    """Every evaluated subnet of a study's trials, once, in the order they completed; with ``limit``
    only the first ``limit`` of them.

    The limit makes the result of a search with several workers the same for all of them: when the
    study reaches its size, another worker may still be evaluating a subnet (at most one per other
    worker); that trial is kept in the study but completes later, so it is not among the first."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and SUBNET in t.user_attrs]
    found: dict[str, Evaluated] = {}
    for t in sorted(complete, key=lambda t: (t.datetime_complete, t.number)):
        if t.user_attrs[SUBNET] not in found:
            found[t.user_attrs[SUBNET]] = Evaluated(t.user_attrs[SUBNET], float(t.values[0]), float(t.values[1]), t.number)
    return list(found.values())[:limit]


def non_dominated(points: Sequence[Evaluated]) -> list[Evaluated]:
    """The points no other point beats (at least as fast and as accurate, better in one), fastest first."""
    front: list[Evaluated] = []
    for p in sorted(points, key=lambda p: (p.predicted_int8_ms, -p.heldout_top1, p.trial)):
        if not front or p.heldout_top1 > front[-1].heldout_top1:
            front.append(p)
    return front


def hypervolume_improvement(
    points: Sequence[tuple[float, float]], ms: np.ndarray, top1: np.ndarray, high_ms: float
) -> tuple[np.ndarray, np.ndarray]:
    """For candidates at (``ms``, ``top1``): the area they add to the staircase of ``points``
    ((ms, top1) pairs) up to ``high_ms``, and how far above the staircase they are at their own latency.

    The staircase at latency b is the best top-1 of a point at most b ms (below every point: the
    worst top-1 of all points)."""
    ordered = sorted(points)
    floor = min(t for _, t in ordered)
    starts, values, best = [0.0], [floor], floor
    for m, t in ordered:
        if t > best:
            best = t
            if m == starts[-1]:
                values[-1] = t
            else:
                starts.append(m)
                values.append(t)
    starts_a, values_a = np.asarray(starts), np.asarray(values)
    ends_a = np.append(starts_a[1:], max(high_ms, starts_a[-1]))
    lengths = np.clip(ends_a[None, :] - np.maximum(starts_a[None, :], ms[:, None]), 0.0, None)
    gains = np.clip(top1[:, None] - values_a[None, :], 0.0, None)
    level = values_a[np.clip(np.searchsorted(starts_a, ms, side="right") - 1, 0, None)]
    return (lengths * gains).sum(axis=1), top1 - level


# ---- the sampler --------------------------------------------------------------------------------


class FrontSampler(BaseSampler):
    """Chooses each trial's whole genome (relative sampling); see the module docstring.

    Deterministic: the choice is a function of the seed, the trial number, the study's trials and
    its recorded budgets, so one worker with the same seed runs the same search."""

    def __init__(self, space: CandidateSpace, predict_ms: Callable[[Subnet], float], config: FrontConfig,
                 seed: int, high_ms: float):
        self.space, self.genome, self.predict_ms = space, Genome(space), predict_ms
        self.config, self.seed, self.high_ms = config, seed, high_ms
        self._parsed: dict[str, Subnet] = {}

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.genome.distributions)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        chosen = trial.user_attrs.get(SUBNET)
        if chosen is not None:  # a retry: its killed trial's subnet (and focus), whichever parameters were suggested
            return self.genome.params(self._subnet(chosen))
        subnet, focus = self.choose(study.get_trials(deepcopy=False), trial.number, study.user_attrs.get(BUDGETS))
        if focus is not None:
            study._storage.set_trial_user_attr(trial._trial_id, FOCUS, focus)
        study._storage.set_trial_user_attr(trial._trial_id, SUBNET, subnet.encode())  # seen by the other workers at once
        return self.genome.params(subnet)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        raise UsageError(f"parameter {param_name!r} is not part of the subnet genome")  # the objective suggests none

    def _subnet(self, encoding: str) -> Subnet:
        if encoding not in self._parsed:
            self._parsed[encoding] = self.space.subnet(encoding)
        return self._parsed[encoding]

    def _seen(self, trials: Sequence[FrozenTrial]) -> set[str]:
        """Subnets evaluated, being evaluated or queued (an enqueued subnet, or a retry of a killed
        worker's trial: it holds the subnet that trial chose)."""
        seen = set()
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) and SUBNET in t.user_attrs:
                seen.add(t.user_attrs[SUBNET])
            elif t.state == TrialState.WAITING and t.system_attrs.get("fixed_params"):
                seen.add(self.genome.subnet(t.system_attrs["fixed_params"]).encode())
        return seen

    def propose(self, trials: Sequence[FrozenTrial], number: int, budgets: Sequence[float] | None = None) -> Subnet:
        """The subnet of trial ``number`` given the study's ``trials`` (and the budgets it aims at)."""
        return self.choose(trials, number, budgets)[0]

    def targets(self, done: Sequence[Evaluated], budgets: Sequence[float] | None) -> list[float]:
        """The budgets aimed at: the study's, or :data:`DEFAULT_TARGETS` spread evenly over the
        evaluated latency range (smallest subnet) to the largest subnet."""
        if budgets:
            return sorted({float(b) for b in budgets})
        low = min(e.predicted_int8_ms for e in done)
        if not self.high_ms > low:
            return [self.high_ms]
        return [low + (self.high_ms - low) * i / DEFAULT_TARGETS for i in range(1, DEFAULT_TARGETS + 1)]

    def choose(self, trials: Sequence[FrozenTrial], number: int,
               budgets: Sequence[float] | None = None) -> tuple[Subnet, float | None]:
        """The subnet of trial ``number`` and the budget it was chosen for (None: the whole front)."""
        config, rng = self.config, random.Random(f"front:{self.seed}:{number}")
        done, seen = evaluated(trials), self._seen(trials)
        if len(done) < config.initial:
            for _ in range(200):  # a random size level in the number's stratum: spread over the latency range
                subnet = random_subnet(self.space, rng, ((number % config.initial) + rng.random()) / config.initial)
                if subnet.encode() not in seen:
                    break
            return subnet, None
        subnets = [self._subnet(e.subnet) for e in done]
        top1 = np.asarray([e.heldout_top1 for e in done])
        model = AccuracyPredictor.fit(self.space, subnets, top1, self.seed)
        refining = len(done) >= config.trials - round(config.refine * config.trials)
        if refining or rng.random() >= config.global_share:
            chosen = self._for_budget(trials, done, self.targets(done, budgets), model, seen, rng)
            if chosen is not None:
                return chosen
        return self._for_front(done, model, seen, rng), None

    def _ucb(self, model: AccuracyPredictor, pool: Sequence[Subnet]) -> np.ndarray:
        mean, spread = model.predict(pool)
        return mean + self.config.exploration * spread

    def _for_front(self, done: Sequence[Evaluated], model: AccuracyPredictor, seen: set[str],
                   rng: random.Random) -> Subnet:
        """The candidate of largest predicted hypervolume improvement of the whole front."""
        config = self.config
        first = non_dominated(done)
        second = non_dominated([e for e in done if e not in set(first)])
        parents = [self._subnet(e.subnet) for e in first + second]
        candidates: dict[str, Subnet] = {}
        for _ in range(config.candidates):
            draw = rng.random()
            if draw < 0.4:
                child = mutate(self.space, rng.choice(parents), rng, config.mutate_prob)
            elif draw < 0.8 and len(parents) > 1:
                child = crossover(*rng.sample(parents, 2), rng)
            else:
                child = random_subnet(self.space, rng)
            if child.encode() not in seen:
                candidates.setdefault(child.encode(), child)
        if not candidates:
            return random_subnet(self.space, rng)  # the objective prunes it if it is taken
        pool = list(candidates.values())
        ms = np.asarray([self.predict_ms(c) for c in pool])
        gain, above = hypervolume_improvement(
            [(e.predicted_int8_ms, e.heldout_top1) for e in done], ms, self._ucb(model, pool), self.high_ms
        )
        best = int(np.argmax(gain)) if gain.max() > 0 else int(np.argmax(above))
        return pool[best]

    def _for_budget(self, trials: Sequence[FrozenTrial], done: Sequence[Evaluated], targets: Sequence[float],
                    model: AccuracyPredictor, seen: set[str], rng: random.Random) -> tuple[Subnet, float] | None:
        """A candidate for the budget aimed at least so far (ties: the one whose answer lies furthest
        below it, relative to the budget: the largest hole in the front): the most promising
        (predicted top-1 plus spread) new subnet predicted in the budget's window, from mutations and
        crossovers of its answer and the best evaluated subnets in and around the window. The next
        budget if no candidate lands in the window; None if none lands in any."""
        aimed = {float(b): 0 for b in targets}
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING) and t.user_attrs.get(FOCUS) in aimed:
                aimed[t.user_attrs[FOCUS]] += 1
        low_ms = min(e.predicted_int8_ms for e in done)
        order = []
        for i, budget in enumerate(targets):
            feasible = [e for e in done if e.predicted_int8_ms <= budget]
            if feasible:
                answer = max(feasible, key=lambda e: (e.heldout_top1, -e.predicted_int8_ms, -e.trial))
                order.append((aimed[float(budget)], -(budget - answer.predicted_int8_ms) / budget, i))
        for *_, i in sorted(order):
            budget = targets[i]
            previous = targets[i - 1] if i else low_ms - 1e-9
            pool = self._window_candidates(done, max(previous, WINDOW * budget), budget, seen, rng)
            if not pool and previous < WINDOW * budget:
                pool = self._window_candidates(done, previous, budget, seen, rng)
            if pool:
                return pool[int(np.argmax(self._ucb(model, pool)))], float(budget)
        return None

    def _window_candidates(self, done: Sequence[Evaluated], low: float, high: float, seen: set[str],
                           rng: random.Random) -> list[Subnet]:
        """New subnets predicted in (``low``, ``high``] ms: mutations (at the configured gene rate
        and half of it) and crossovers of the best evaluated subnets in and around the window."""
        config = self.config
        near = sorted((e for e in done if 0.8 * low <= e.predicted_int8_ms <= high),
                      key=lambda e: (-e.heldout_top1, e.predicted_int8_ms, e.trial))
        inside = [e for e in near if low < e.predicted_int8_ms]
        answer = max((e for e in done if e.predicted_int8_ms <= high),
                     key=lambda e: (e.heldout_top1, -e.predicted_int8_ms, -e.trial))
        parents = [self._subnet(e.subnet) for e in dict.fromkeys([answer, *inside[:4], *near[:4]])]
        candidates: dict[str, Subnet] = {}
        for _ in range(max(1, config.candidates // 4)):
            draw = rng.random()
            if draw < 0.35:
                child = mutate(self.space, parents[0], rng, config.mutate_prob / 2)
            elif draw < 0.7 or len(parents) < 2:
                child = mutate(self.space, rng.choice(parents), rng, config.mutate_prob)
            else:
                child = crossover(*rng.sample(parents, 2), rng)
            key = child.encode()
            if key not in seen and key not in candidates and low < self.predict_ms(child) <= high:
                candidates[key] = child
        return list(candidates.values())


# ---- running it ---------------------------------------------------------------------------------


class FrontSearch:
    """The front search of one study: :meth:`run` runs (or resumes, or joins) it."""

    def __init__(self, study: optuna.Study, space: CandidateSpace, predict_ms: Callable[[Subnet], float],
                 fitness: Callable[[Subnet], float], config: FrontConfig, low_high: tuple[Subnet, Subnet]):
        self.study, self.space, self.predict_ms, self.fitness, self.config = study, space, predict_ms, fitness, config
        self.genome = Genome(space)
        self.smallest, self.largest = low_high

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        raise_if_interrupted()
        params = {name: trial.suggest_categorical(name, d.choices) for name, d in self.genome.distributions.items()}
        subnet = self.genome.subnet(params)
        encoding, ms = subnet.encode(), round(self.predict_ms(subnet), 6)
        trial.set_user_attr(SUBNET, encoding)
        trial.set_user_attr(PREDICTED_MS, ms)
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if other.number != trial.number and other.user_attrs.get(SUBNET) == encoding and (
                other.state == TrialState.COMPLETE or other.number < trial.number
            ):
                raise optuna.TrialPruned(f"{encoding} is trial {other.number}'s")
        return self.fitness(subnet), ms

    def complete(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def run(self, progress: bool = True) -> None:
        """Evaluate subnets until the study holds ``config.trials`` complete trials."""
        for subnet in (self.smallest, self.largest):
            self.study.enqueue_trial(self.genome.params(subnet), skip_if_exists=True)
        done = self.complete()
        if done >= self.config.trials:
            return
        bar = tqdm(total=self.config.trials, initial=done, desc="extract front", unit="subnet", file=sys.stderr,
                   disable=not progress, leave=False)

        def advance(study: optuna.Study, trial: FrozenTrial) -> None:
            bar.update(max(0, self.complete() - bar.n))

        try:
            self.study.optimize(
                self.objective, n_trials=2 * self.config.trials, gc_after_trial=False,  # the bound only matters for a space with fewer subnets
                callbacks=[MaxTrialsCallback(self.config.trials, states=(TrialState.COMPLETE,)), advance],
            )
        finally:
            bar.close()
