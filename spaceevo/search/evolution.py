"""Aging evolution over candidate spaces, as an ask/tell loop over an Optuna study.

DESIGN.md: population P, tournament S, T spaces evaluated in total, no crossover; a mutation changes
one stage's block type or one stage's width window; the first spaces are the homogeneous ones (same
block type in every stage), then random ones until the population is full. The study lives in Optuna
storage, which is the only state: every step rebuilds the population from the finished trials in the
order they finished, so a killed search resumes where it stopped and several workers (processes or
machines) share one search.

Each trial carries, as user attributes (shown by optuna-dashboard): ``worker`` (host:pid), ``space``
(the encoding) and ``score``: ``{"qt_score", "feasible_fraction": {"<C>ms": …}, "top_tier_loss":
{"<C>ms": …}}`` (one attribute, so one storage write); its value is the Q-T score.

No candidate space is evaluated twice, also across workers. A worker *claims* a space by writing it
into its RUNNING trial, then reads every trial and backs off (marks its trial PRUNED, unevaluated) if
another RUNNING or COMPLETE trial holds the same space. Of two workers claiming the same space, the
one that writes second reads the first one's claim (the storage orders writes and reads: RDB
transactions, or the journal file's lock), so at most one of them evaluates it; both may back off, which
costs a retry, never a duplicate. A claim lapses when its trial is abandoned: its worker's process is
gone (same host), or it has been RUNNING longer than ``stale_after_s`` (other hosts); such trials are
marked FAIL. The guarantee therefore holds as long as no evaluation outlives ``stale_after_s``
(default 600 s; one evaluation takes well under a second). The total is exact in the same way: a
trial that is not among the first T unfinished-or-complete trials by trial number backs off.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from spaceevo.errors import RunMismatchError, UsageError
from spaceevo.search.qt_score import SpaceScore, constraint_score
from spaceevo.space import CandidateSpace, Hyperspace

STUDY_NAME = "spaceevo-space-search"
CLAIMS = (TrialState.RUNNING, TrialState.COMPLETE)


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


# ---- storage -----------------------------------------------------------------------------------


def storage_url(storage: str | None, run_dir: str | Path | None) -> str:
    """The storage a search uses: ``storage`` as given, or SQLite in ``run_dir/search/study.db``."""
    if storage:
        return storage
    if run_dir is None:
        raise UsageError("a search needs a run directory or an Optuna storage URL")
    path = Path(run_dir).resolve() / "search" / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open any Optuna RDB URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``) or a journal file
    (``journal:PATH`` or ``journal:///abs/path``); a storage that cannot be opened raises
    :class:`UsageError` saying why."""
    _check_storage_url(url)
    for attempt in range(5):
        try:
            return _open_storage(url)
        except Exception as error:  # drivers raise many types; the user needs the reason, not a traceback
            creating = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
            if creating and attempt < 4:
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables right now
                continue
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"cannot open Optuna storage '{url}': {reason} (allowed: {STORAGE_FORMS})") from None
    raise AssertionError("unreachable")


STORAGE_FORMS = (
    "sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db, another RDB URL such as "
    "postgresql://USER@HOST/DB, or journal:PATH"
)
"""The storage URLs a search or an extraction accepts, as messages name them."""


def _check_storage_url(url: str) -> None:
    """:class:`UsageError` for a URL that names no shared, persistent study: no scheme, an empty
    journal path, or an SQLite URL without a file (in-memory, lost when the process ends)."""
    scheme, sep, rest = url.partition("://")
    if url.startswith("journal:"):
        if not url[len("journal:") :].removeprefix("//"):
            raise UsageError(f"--storage '{url}' names no journal file; allowed: {STORAGE_FORMS}")
    elif not sep:
        raise UsageError(f"--storage '{url}' is not a storage URL; allowed: {STORAGE_FORMS}")
    elif scheme.partition("+")[0] == "sqlite":
        path = rest.partition("?")[0]
        if not path.startswith("/") or path[1:] in ("", ":memory:"):
            raise UsageError(
                f"--storage '{url}' names no database file (SQLite would keep the study in memory, lost when "
                f"the process ends); allowed: {STORAGE_FORMS}"
            )


def _open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :].removeprefix("//"))
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if not url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
    storage.engine.dispose()  # later connections get the pragmas
    return storage


def _sqlite_wal(connection: object, _record: object) -> None:
    """Write-ahead log without an fsync per commit: a killed process loses nothing committed (a power
    cut may lose the last trials, which a resumed search evaluates again); several processes on one
    host share the file. Not for network file systems: use a server database or a journal there."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_study(url: str, config: dict, study_name: str = STUDY_NAME, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or load the search's study in ``url`` (or the already opened ``storage``) and check that
    it holds a search with the same ``config``."""
    storage = storage or open_storage(url)
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=0),  # unused: the loop chooses every space
        )
    except Exception as error:
        raise UsageError(f"cannot open Optuna study '{study_name}' in '{url}': {error}") from None
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
    elif stored != config:
        differences = ", ".join(
            f"{key}: {stored.get(key)!r} there, {config.get(key)!r} now"
            for key in sorted(set(stored) | set(config))
            if stored.get(key) != config.get(key)
        )
        raise RunMismatchError(
            f"study '{study_name}' in {url} holds a search with other settings ({differences}); "
            f"use the same settings to resume it, or another run directory / --storage"
        )
    return study


# ---- trials ------------------------------------------------------------------------------------


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ask_as_worker(study: optuna.Study, **user_attrs: Any) -> optuna.Trial:
    """A new RUNNING trial that carries this process's ``worker`` attribute (and ``user_attrs``, e.g.
    a claim) from its creation, in one storage write. ``study.ask()`` followed by
    ``set_user_attr("worker", …)`` leaves a trial without a worker when the process is killed in
    between, which no one can tell from a live one until ``stale_after_s``; a trial made here always
    names its process, so a killed worker's trial is freed at once (:func:`is_abandoned`)."""
    template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"worker": worker_id(), **user_attrs})
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)  # what study.ask() does
    return optuna.Trial(study, trial_id)


def is_abandoned(trial: FrozenTrial, stale_after_s: float) -> bool:
    """A RUNNING trial whose worker process is gone (same host) or that has run too long (a trial
    of another host, or one without a ``worker``, as :func:`ask_as_worker` never makes)."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    started = trial.datetime_start or datetime.now()
    return (datetime.now() - started).total_seconds() > stale_after_s


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


def trial_score(trial: FrozenTrial) -> SpaceScore:
    """Rebuild a space's score from a finished trial's ``score`` attribute."""
    attr = trial.user_attrs["score"]
    parts = tuple(
        constraint_score(float(key.removesuffix("ms")), fraction, attr["top_tier_loss"][key])
        for key, fraction in attr["feasible_fraction"].items()
    )
    return SpaceScore(trial.user_attrs["space"], float(trial.value), parts)


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
) -> CandidateSpace | None:
    """The next space to evaluate, not in ``known``; ``finished`` holds (encoding, score, trial number)
    in finishing order. Homogeneous seeds first (in random order, so that workers starting together
    rarely claim the same one), random spaces until P are finished, then a mutation of the best of S
    random members of the last P finished. ``None`` when every space is known."""
    if len(finished) < sizes.population:
        seeds = [s for s in hyperspace.homogeneous_spaces() if s.encoding not in known]
        return rng.choice(seeds) if seeds else _random_unknown(hyperspace, known, rng)
    population = list(finished[-sizes.population :])
    for _ in range(100):
        contenders = rng.sample(population, min(sizes.tournament, len(population)))
        parent = max(contenders, key=lambda item: (item[1], -item[2]))
        child = mutate(hyperspace.candidate_space(parent[0]), rng)
        if child.encoding not in known:
            return child
    return _random_unknown(hyperspace, known, rng)


# ---- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvolutionResult:
    """Every finished space of the study (finishing order) and how many this call evaluated."""

    scores: list[SpaceScore]
    evaluated_here: int

    @property
    def best(self) -> SpaceScore:
        return max(self.scores, key=lambda s: s.qt_score)


def run_evolution(
    study: optuna.Study,
    hyperspace: Hyperspace,
    evaluate: Callable[[CandidateSpace], SpaceScore],
    sizes: EvolutionSizes,
    seed: int = 0,
    progress: bool = True,
    stale_after_s: float = 600.0,
    poll_s: float = 0.05,
) -> EvolutionResult:
    """Run (or resume, or join) the aging evolution in ``study`` until T spaces are finished.

    The proposal of trial n draws from ``random.Random(f"{seed}:{n}")`` and the study's history, so a
    single worker with the same seed reproduces the same search."""
    evaluated_here = 0
    bar = tqdm(total=sizes.total, desc="space search", unit="space", disable=not progress)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            running = []
            for trial in trials:
                if trial.state != TrialState.RUNNING:
                    continue
                if is_abandoned(trial, stale_after_s):
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                else:
                    running.append(trial)
            finished = finished_in_order(trials)
            bar.update(min(len(finished), sizes.total) - bar.n)
            if len(finished) >= sizes.total:
                break
            if len(finished) + len(running) >= sizes.total:
                bar.set_postfix_str(_waiting_for(running, stale_after_s), refresh=True)
                time.sleep(poll_s)  # the last spaces are being evaluated by other workers
                continue
            if _step(study, hyperspace, evaluate, sizes, seed, finished):
                evaluated_here += 1
            elif _exhausted(study, hyperspace):
                break
    finally:
        bar.close()
    latest = finished_in_order(study.get_trials(deepcopy=False))
    return EvolutionResult([trial_score(t) for t in latest], evaluated_here)


def _waiting_for(running: Sequence[FrozenTrial], stale_after_s: float) -> str:
    """What a worker waits for when the last spaces are claimed by others: the oldest claim, its
    worker and when it is freed if that worker never finishes it."""
    oldest = min(running, key=lambda t: t.datetime_start or datetime.now())
    age = (datetime.now() - (oldest.datetime_start or datetime.now())).total_seconds()
    worker = oldest.user_attrs.get("worker", "no worker recorded")
    return (
        f"waiting for {len(running)} space(s) of other workers: trial {oldest.number} ({worker}) running "
        f"{age:.0f} s, freed after {stale_after_s:.0f} s"
    )


def _exhausted(study: optuna.Study, hyperspace: Hyperspace) -> bool:
    claimed = {t.user_attrs.get("space") for t in study.get_trials(deepcopy=False, states=CLAIMS)}
    return len(claimed - {None}) >= count_spaces(hyperspace)


def _step(
    study: optuna.Study,
    hyperspace: Hyperspace,
    evaluate: Callable[[CandidateSpace], SpaceScore],
    sizes: EvolutionSizes,
    seed: int,
    finished: list[FrozenTrial],
) -> bool:
    """Ask one trial, claim a space for it, evaluate and tell; False if it backed off."""
    trial = ask_as_worker(study)
    try:
        others = [t for t in study.get_trials(deepcopy=False, states=CLAIMS) if t.number != trial.number]
        rank = sum(1 for t in others if t.state == TrialState.COMPLETE or t.number < trial.number)
        if rank >= sizes.total:  # not among the first T: another worker takes the last places
            study.tell(trial, state=TrialState.PRUNED)
            return False
        known = {t.user_attrs["space"] for t in others if "space" in t.user_attrs}
        history = [(t.user_attrs["space"], float(t.value), t.number) for t in finished]
        space = propose(hyperspace, history, known, sizes, random.Random(f"{seed}:{trial.number}"))
        if space is None:
            study.tell(trial, state=TrialState.PRUNED)
            return False
        trial.set_user_attr("space", space.encoding)  # the claim
        rivals = [
            t for t in study.get_trials(deepcopy=False, states=CLAIMS)
            if t.number != trial.number and t.user_attrs.get("space") == space.encoding
        ]
        if rivals:
            trial.set_user_attr("backed_off_for", rivals[0].number)
            study.tell(trial, state=TrialState.PRUNED)
            time.sleep(random.uniform(0.0, 0.05))  # break the symmetry of workers that collided
            return False
        score = evaluate(space)
        trial.set_user_attr("score", _score_attr(score))
        study.tell(trial, score.qt_score, skip_if_finished=True)
        return True
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise

