"""Aging evolution over candidate spaces, as an Optuna sampler run by ``study.optimize``.

DESIGN.md: population P, tournament S, T spaces evaluated in total, no crossover; a mutation changes
one stage's block type or one stage's width window; the first spaces are the homogeneous ones (same
block type in every stage), then random ones until the population is full.

:class:`AgingEvolutionSampler` is an ``optuna.samplers.BaseSampler``: a candidate space's genes are
the trial's parameters, one categorical per searchable stage for its block type (``stage1_block``,
the block type's name) and one for its width window (``stage1_window``, the window's index), so
optuna-dashboard and ``optuna.importance`` see them. The trial's value is the Q-T score; its user
attributes are ``worker`` (host:pid) and ``score``: ``{"qt_score",
"feasible_fraction": {"<C>ms": …}, "top_tier_loss": {"<C>ms": …}}``. The study in Optuna storage is
the only state: each trial's genome is proposed from the finished trials in the order they finished,
so a killed search resumes where it stopped and several workers (processes or machines) share one.

Workers and crashes are Optuna's business (:mod:`spaceevo.storage`): ``study.optimize`` keeps a
heartbeat per running trial and fails trials whose heartbeat stopped (a killed worker's), queueing
their genome again; ``MaxTrialsCallback(T, states=(COMPLETE,))`` stops every worker once T spaces are
complete. The sampler treats the genomes of RUNNING, WAITING and COMPLETE trials as taken, so a worker
never evaluates a space twice. Across workers a duplicate needs two workers to propose the same space
in the few milliseconds between one reading the study and writing its trial's parameters; homogeneous
seeds are taken in trial-number order so that workers starting together take different ones. A
duplicate costs one evaluation (the score depends only on seed and space) and is reported once. With W
workers, up to W - 1 trials that were running when the T-th finished complete as well.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from spaceevo.errors import UsageError
from spaceevo import storage as storage_module
from spaceevo.interrupts import raise_if_interrupted
from spaceevo.search.qt_score import SpaceScore, constraint_score
from spaceevo.storage import STORAGE_FORMS, fail_stale_trials, open_storage, storage_url
from spaceevo.space import CandidateSpace, Hyperspace

STUDY_NAME = "spaceevo-space-search"
TAKEN = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE)
"""Trials whose space no other trial may propose: being evaluated, queued for a retry, or done."""


@dataclass(frozen=True)
class EvolutionSizes:
    """Aging-evolution sizes: population P, tournament S, spaces evaluated in total T."""

    population: int
    tournament: int
    total: int


#: Paper: 500/125/5000 (``full``); ``default`` is a tenth of it, ``smoke`` a quick check.
PRESETS: dict[str, EvolutionSizes] = {
    "smoke": EvolutionSizes(population=16, tournament=4, total=48),
    "default": EvolutionSizes(population=100, tournament=25, total=1000),
    "full": EvolutionSizes(population=500, tournament=125, total=5000),
}


def count_spaces(hyperspace: Hyperspace) -> int:
    """Number of candidate spaces of a hyperspace (tiny: 6^4 * 2^4 = 20,736)."""
    return math.prod(len(s.block_types) * len(s.windows) for s in hyperspace.searchable_stages)


def evolution_sizes(name: str, hyperspace: Hyperspace) -> EvolutionSizes:
    """A named preset sized to the hyperspace: T at most the number of spaces, P at most T/2, S at most P."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}'; allowed: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    total = min(preset.total, count_spaces(hyperspace))
    population = max(1, min(preset.population, total // 2))
    return EvolutionSizes(population, max(1, min(preset.tournament, population)), total)


# ---- storage (spaceevo.storage; these names stay importable from here) --------------------


def open_study(
    url: str,
    config: dict,
    study_name: str = STUDY_NAME,
    storage: optuna.storages.BaseStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """:func:`spaceevo.storage.open_study`, by default the space search's study."""
    return storage_module.open_study(url, config, study_name, storage, sampler)


def open_search_study(
    url: str,
    config: dict,
    hyperspace: Hyperspace,
    sizes: EvolutionSizes,
    seed: int = 0,
    storage: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """The space search's study in ``url`` (or in ``storage``, opened with ``heartbeat=True``), with
    its sampler; ``config`` must match what the study holds (:func:`open_study`)."""
    storage = storage or open_storage(url, heartbeat=True)
    return open_study(url, config, storage=storage, sampler=AgingEvolutionSampler(hyperspace, sizes, seed))


# ---- genomes -----------------------------------------------------------------------------------


def genome_distributions(hyperspace: Hyperspace) -> dict[str, BaseDistribution]:
    """A candidate space's genes as Optuna parameters: per searchable stage, its block type's name
    and its width window's index."""
    genes: dict[str, BaseDistribution] = {}
    for stage in hyperspace.searchable_stages:
        names = sorted(stage.block_types, key=lambda n: hyperspace.block_types[n].digit)
        genes[f"{stage.name}_block"] = CategoricalDistribution(names)
        genes[f"{stage.name}_window"] = CategoricalDistribution(list(range(len(stage.windows))))
    return genes


def space_params(space: CandidateSpace) -> dict[str, Any]:
    """The parameters of a candidate space (:func:`genome_distributions`)."""
    hyperspace = space.hyperspace
    names = hyperspace.block_type_by_digit
    params: dict[str, Any] = {}
    for stage, block, window in zip(hyperspace.searchable_stages, space.block_digits, space.window_digits):
        params[f"{stage.name}_block"] = names[block].name
        params[f"{stage.name}_window"] = window
    return params


def params_space(hyperspace: Hyperspace, params: dict[str, Any]) -> CandidateSpace | None:
    """The candidate space of a trial's parameters; None if some gene is not set yet."""
    try:
        stages = hyperspace.searchable_stages
        blocks = tuple(hyperspace.block_types[params[f"{s.name}_block"]].digit for s in stages)
        windows = tuple(int(params[f"{s.name}_window"]) for s in stages)
    except KeyError:
        return None
    return CandidateSpace(hyperspace, blocks, windows)


def trial_space(hyperspace: Hyperspace, trial: FrozenTrial) -> str | None:
    """The encoding a trial holds: from its parameters, else its ``space`` attribute (studies written
    before the genes were parameters), else None (its parameters are not written yet)."""
    space = params_space(hyperspace, trial.params)
    return trial.user_attrs.get("space") if space is None else space.encoding


def finished_in_order(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The COMPLETE trials in the order they finished (the aging order)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(complete, key=lambda t: (t.datetime_complete or datetime.min, t.number))


def _score_attr(score: SpaceScore) -> dict:
    """A score as one user attribute (one storage write): Q-T score and, per constraint, keyed
    ``"<C>ms"``, the feasible fraction and the top-tier loss."""
    return {
        "qt_score": score.qt_score,
        "feasible_fraction": {f"{c.latency_ms:g}ms": c.feasible_fraction for c in score.constraints},
        "top_tier_loss": {f"{c.latency_ms:g}ms": c.top_tier_loss for c in score.constraints},
    }


def trial_score(hyperspace: Hyperspace, trial: FrozenTrial) -> SpaceScore:
    """Rebuild a space's score from a finished trial's parameters and ``score`` attribute."""
    attr = trial.user_attrs["score"]
    parts = tuple(
        constraint_score(float(key.removesuffix("ms")), fraction, attr["top_tier_loss"][key])
        for key, fraction in attr["feasible_fraction"].items()
    )
    return SpaceScore(str(trial_space(hyperspace, trial)), float(trial.value), parts)


# ---- proposals ---------------------------------------------------------------------------------


def mutate(space: CandidateSpace, rng: random.Random) -> CandidateSpace:
    """Change one stage's block type or one stage's width window (each with probability 1/2 where
    both are possible) to another allowed value."""
    hyperspace = space.hyperspace
    stages = hyperspace.searchable_stages
    block_options = [sorted(hyperspace.block_types[n].digit for n in s.block_types) for s in stages]
    window_options = [list(range(len(s.windows))) for s in stages]
    kinds = [
        kind
        for kind, options in (("block", block_options), ("window", window_options))
        if any(len(o) > 1 for o in options)
    ]
    if not kinds:
        return space
    kind = rng.choice(kinds)
    options = block_options if kind == "block" else window_options
    current = list(space.block_digits if kind == "block" else space.window_digits)
    stage = rng.choice([i for i, o in enumerate(options) if len(o) > 1])
    current[stage] = rng.choice([v for v in options[stage] if v != current[stage]])
    if kind == "block":
        return CandidateSpace(hyperspace, tuple(current), space.window_digits)
    return CandidateSpace(hyperspace, space.block_digits, tuple(current))


def _random_unknown(hyperspace: Hyperspace, known: set[str], rng: random.Random) -> CandidateSpace | None:
    for _ in range(1000):
        space = hyperspace.random_candidate_space(rng)
        if space.encoding not in known:
            return space
    if count_spaces(hyperspace) > 100_000:
        return None
    left = [s for s in hyperspace.all_candidate_spaces() if s.encoding not in known]
    return rng.choice(left) if left else None


def propose(
    hyperspace: Hyperspace,
    finished: Sequence[tuple[str, float, int]],
    known: set[str],
    sizes: EvolutionSizes,
    rng: random.Random,
    number: int = 0,
) -> CandidateSpace | None:
    """The next space to evaluate (for trial ``number``), not in ``known``; ``finished`` holds
    (encoding, score, trial number) in finishing order. Homogeneous seeds first (the one at ``number``
    modulo those left, so that workers proposing at the same moment take different ones), random
    spaces until P are finished, then a mutation of the best of S random members of the last P
    finished. ``None`` when every space is known."""
    if len(finished) < sizes.population:
        seeds = [s for s in hyperspace.homogeneous_spaces() if s.encoding not in known]
        return seeds[number % len(seeds)] if seeds else _random_unknown(hyperspace, known, rng)
    population = list(finished[-sizes.population :])
    for _ in range(100):
        contenders = rng.sample(population, min(sizes.tournament, len(population)))
        parent = max(contenders, key=lambda item: (item[1], -item[2]))
        child = mutate(hyperspace.candidate_space(parent[0]), rng)
        if child.encoding not in known:
            return child
    return _random_unknown(hyperspace, known, rng)


class AgingEvolutionSampler(optuna.samplers.BaseSampler):
    """Aging evolution over a hyperspace's candidate spaces as an Optuna sampler: each trial's genome
    (:func:`genome_distributions`) is sampled jointly by :func:`propose` from the study's trials. The
    proposal of trial n draws from ``random.Random(f"{seed}:{n}")``, so one worker with the same seed
    reproduces the same search."""

    def __init__(self, hyperspace: Hyperspace, sizes: EvolutionSizes, seed: int = 0) -> None:
        self.hyperspace, self.sizes, self.seed = hyperspace, sizes, seed
        self._genes = genome_distributions(hyperspace)
        self._finished_spaces: dict[int, str | None] = {}  # trial id -> encoding, for finished trials (they never change)
        self.complete_seen = 0  # COMPLETE trials at the last proposal (for a progress bar)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._genes)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """The proposed genome; empty when every space is taken."""
        trials = study._get_trials(deepcopy=False, use_cache=True)  # one read per trial, shared with Optuna
        known = {self._space(t) for t in trials if t.state in TAKEN and t.number != trial.number}
        history = [(self._space(t), float(t.value), t.number) for t in finished_in_order(trials)]
        self.complete_seen = len(history)
        rng = random.Random(f"{self.seed}:{trial.number}")
        space = propose(self.hyperspace, history, known - {None}, self.sizes, rng, trial.number)
        return {} if space is None else {k: v for k, v in space_params(space).items() if k in search_space}

    def _space(self, trial: FrozenTrial) -> str | None:
        """:func:`trial_space`, remembered for finished trials (the proposal reads every trial)."""
        if not trial.state.is_finished():
            return trial_space(self.hyperspace, trial)
        if trial._trial_id not in self._finished_spaces:
            self._finished_spaces[trial._trial_id] = trial_space(self.hyperspace, trial)
        return self._finished_spaces[trial._trial_id]

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """A parameter outside the genome, or a gene when every space is taken (run_evolution's
        objective never asks for one then): drawn at random."""
        rng = random.Random(f"{self.seed}:{trial.number}:{param_name}")
        return optuna.samplers.RandomSampler(seed=rng.randrange(2**31)).sample_independent(
            study, trial, param_name, param_distribution
        )

    def search_complete(self, study: optuna.Study) -> bool:
        """Whether T spaces are complete (a stale trial is then failed, not retried)."""
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= self.sizes.total


# ---- the search --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvolutionResult:
    """Every finished space of the study (finishing order, each space once) and how many this call
    evaluated."""

    scores: list[SpaceScore]
    evaluated_here: int

    @property
    def best(self) -> SpaceScore:
        return max(self.scores, key=lambda s: s.qt_score)


def worker_id() -> str:
    """This process as ``host:pid`` (a trial's ``worker`` attribute)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_evolution(
    study: optuna.Study,
    evaluate: Callable[[CandidateSpace], SpaceScore],
    progress: bool = True,
    poll_s: float = 0.2,
) -> EvolutionResult:
    """Run (or resume, or join) the aging evolution of ``study`` (:func:`open_search_study`) until T
    spaces are complete, then wait for the trials other workers are still running (at most one
    evaluation, or the heartbeat's grace period for a dead worker's trial). The result is the first T
    trials to finish, the same for every worker. An exception of ``evaluate`` fails its trial and is raised."""
    sampler = study.sampler
    if not isinstance(sampler, AgingEvolutionSampler):
        raise TypeError("run_evolution needs a study opened by open_search_study (an AgingEvolutionSampler)")
    hyperspace, sizes = sampler.hyperspace, sampler.sizes
    evaluated_here = 0
    exhausted = False
    current: list[int] = []  # this worker's trial, unless its evaluation raised

    def objective(trial: optuna.Trial) -> float:
        nonlocal evaluated_here, exhausted
        raise_if_interrupted()
        current[:] = [trial._trial_id]
        retried = params_space(hyperspace, trial.params)  # a WAITING retry holds its genome already
        if retried is None and not trial.relative_params:
            exhausted = True  # every space is taken: the workers that hold them finish the rest
            study.stop()
            raise optuna.TrialPruned("every candidate space is taken")
        genes = {name: trial.suggest_categorical(name, d.choices) for name, d in sampler._genes.items()}
        space = params_space(hyperspace, genes)
        assert space is not None
        trial.set_user_attr("worker", worker_id())
        try:
            score = evaluate(space)
        except BaseException:
            current.clear()
            raise
        trial.set_user_attr("score", _score_attr(score))
        evaluated_here += 1
        return score.qt_score

    bar = tqdm(total=sizes.total, desc="space search", unit="space", disable=not progress)

    def show(_study: optuna.Study, trial: FrozenTrial) -> None:
        raise_if_interrupted()
        complete = sampler.complete_seen + (trial.state == TrialState.COMPLETE)  # as of this trial's proposal
        bar.update(max(0, min(complete, sizes.total) - bar.n))

    try:
        bar.update(min(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), sizes.total))
        while not sampler.search_complete(study):
            try:
                study.optimize(objective, callbacks=[MaxTrialsCallback(sizes.total, states=(TrialState.COMPLETE,)), show])
            except UnboundLocalError as error:
                if isinstance(error.__context__, KeyboardInterrupt):  # Ctrl-C while Optuna told the trial:
                    raise KeyboardInterrupt from None  # its clean-up then fails on a name the tell never set
                raise
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                if not _failed_as_stale(study, current):
                    raise
                continue  # this worker was so slow that another failed its trial; it was retried
            if exhausted:
                break
        _wait_for_others(study, bar, poll_s)
    finally:
        bar.close()
    # The first T trials to finish: every worker returns the same search even if another worker's trial
    # was created just after this one stopped waiting. Each space once (a duplicate has the same score).
    scores: dict[str, SpaceScore] = {}
    for trial in finished_in_order(study.get_trials(deepcopy=False))[: sizes.total]:
        score = trial_score(hyperspace, trial)
        scores.setdefault(score.space, score)
    return EvolutionResult(list(scores.values()), evaluated_here)


def _failed_as_stale(study: optuna.Study, current: list[int]) -> bool:
    """Whether this worker's last trial, evaluated without an error, was failed by another worker's
    heartbeat check (its result cannot be written: Optuna raises when it tells a finished trial)."""
    return bool(current) and study._storage.get_trial(current[0]).state == TrialState.FAIL


def _wait_for_others(study: optuna.Study, bar: tqdm, poll_s: float) -> None:
    """Wait until no trial is RUNNING: other workers' last trials finish, a dead worker's trial is
    failed once its heartbeat is older than the grace period (and not retried: the search is complete)."""
    while True:
        fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        bar.update(min(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), bar.total) - bar.n)
        bar.set_postfix_str(_waiting_for(running), refresh=True)
        time.sleep(poll_s)


def _waiting_for(running: Sequence[FrozenTrial]) -> str:
    """What a worker waits for at the end: the oldest trial still running, its worker and when it is
    failed if that worker is dead."""
    oldest = min(running, key=lambda t: t.datetime_start or datetime.now())
    age = (datetime.now() - (oldest.datetime_start or datetime.now())).total_seconds()
    worker = oldest.user_attrs.get("worker", "no worker recorded yet")
    return (
        f"waiting for {len(running)} trial(s) of other workers: trial {oldest.number} ({worker}) running "
        f"{age:.0f} s, failed if its heartbeat stops for {storage_module.GRACE_S} s"
    )


__all__ = [
    "STUDY_NAME", "STORAGE_FORMS", "EvolutionSizes", "PRESETS", "count_spaces", "evolution_sizes", "open_storage",
    "open_study", "open_search_study", "storage_url", "genome_distributions", "space_params", "params_space",
    "AgingEvolutionSampler", "EvolutionResult", "run_evolution", "mutate", "propose",
]
