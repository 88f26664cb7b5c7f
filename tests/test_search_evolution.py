"""Aging evolution over candidate spaces as an Optuna sampler: determinism, genes as trial parameters,
a killed worker's trial failed by the heartbeat and retried, resuming, two worker processes on one
study, the best space beating the homogeneous seeds, unreachable storage and the
`spaceevo search --block-lut` command."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

import spaceevo
from spaceevo.cli import main
from spaceevo.errors import RunMismatchError, UsageError
from spaceevo import storage
from spaceevo.search import evolution
from spaceevo.search.api import score_spaces, search_block_lut
from spaceevo.search.evolution import (
    EvolutionSizes,
    count_spaces,
    evolution_sizes,
    genome_distributions,
    mutate,
    open_search_study,
    open_storage,
    params_space,
    run_evolution,
    space_params,
)
from spaceevo.search.lut import LutRow, load_block_lut, lut_filename, required_files, stage_input_sizes, write_lut_csv
from spaceevo.search.qt_score import QTScorer, SpaceScore
from spaceevo.space import load_hyperspace, load_space

TINY = load_hyperspace("tiny")
#: The block type that distils well in each stage of the synthetic LUT: the best space mixes them,
#: so no homogeneous seed has more than one good stage.
GOOD_BLOCK = [1, 3, 5, 2]
CONSTRAINTS = [4.1, 4.6]
SAMPLES = 2000


@pytest.fixture(scope="module")
def lut_dir(tmp_path_factory):
    """tiny LUT: loss 0.1 for the good block of a stage, 0.5-1.0 otherwise; window 1 a bit better
    and a bit slower; latency about 1 ms per stage, 6 rows per resolution."""
    directory = tmp_path_factory.mktemp("lut")
    rng = np.random.default_rng(0)
    sizes = stage_input_sizes(TINY)
    for stage, block, window in required_files(TINY):
        base_loss = 0.1 if GOOD_BLOCK[stage - 1] == block else 0.5 + 0.1 * block
        rows = [
            LutRow(
                "3#16#0", (1, 16, h, h),
                base_loss * (1.0 - 0.1 * window) * float(rng.uniform(0.8, 1.2)), 1.0, 0.1,
                (1.0 + 0.05 * window) * float(rng.uniform(0.8, 1.2)),
            )
            for h in sizes[stage - 1].values()
            for _ in range(6)
        ]
        write_lut_csv(directory / lut_filename(stage, block, window), rows)
    return directory


def complete_trials(url):
    study = optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(url))
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def space_of(trial: optuna.trial.FrozenTrial) -> str:
    """The candidate space a trial evaluated: its genes are its parameters."""
    return params_space(TINY, trial.params).encoding


def test_budgets_are_sized_to_the_hyperspace():
    assert count_spaces(TINY) == 6**4 * 2**4
    assert evolution_sizes("full", TINY) == EvolutionSizes(500, 125, 5000)
    assert evolution_sizes("smoke", TINY) == EvolutionSizes(16, 4, 48)
    with pytest.raises(UsageError, match="smoke, default, full"):
        evolution_sizes("huge", TINY)


def test_mutation_changes_one_stage_block_or_window():
    rng = random.Random(0)
    space = TINY.candidate_space("tiny-1111-0000")
    kinds = set()
    for _ in range(200):
        child = mutate(space, rng)
        blocks = sum(a != b for a, b in zip(child.block_digits, space.block_digits))
        windows = sum(a != b for a, b in zip(child.window_digits, space.window_digits))
        assert blocks + windows == 1
        kinds.add("block" if blocks else "window")
    assert kinds == {"block", "window"}


def test_same_seed_same_search_and_best_beats_every_homogeneous_seed(lut_dir, tmp_path):
    results = [
        search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path / name, preset="smoke", samples=SAMPLES, seed=3, progress=False)
        for name in ("a", "b")
    ]
    first, second = (json.loads(r.result_path.read_text()) for r in results)
    assert first["top"] == second["top"] and first["best_space"] == second["best_space"]
    order = [[space_of(t) for t in complete_trials(r.storage)] for r in results]
    assert order[0] == order[1] and len(order[0]) == 48 == len(set(order[0]))
    assert sorted(order[0][:6]) == sorted(s.encoding for s in TINY.homogeneous_spaces())  # seeded with them

    best = results[0]
    seeds = score_spaces(lut_dir, "tiny", CONSTRAINTS, [s.encoding for s in TINY.homogeneous_spaces()], samples=SAMPLES, seed=3)
    assert all(best.qt_score > s.qt_score for s in seeds)
    assert len({d for d in load_space(best.best_space).block_digits}) > 1  # a mixed space, as built
    assert set(first) >= {"best_space", "qt_score", "latency_constraints_ms", "top"}
    assert set(first["top"][0]) == {"space", "qt_score", "feasible_fraction", "top_tier_loss"}
    saved = yaml.safe_load(best.best_space_path.read_text())
    assert saved["space"] == best.best_space and load_space(saved["space"]).encoding == best.best_space


def test_genes_are_trial_params_and_taken_spaces_are_not_proposed(lut_dir, tmp_path, monkeypatch):
    """Each stage's block type and window are categorical parameters (optuna.importance ranks them);
    a space held by a RUNNING trial (another worker's) is not proposed, a WAITING one (a queued retry)
    is evaluated once, by the trial that takes it."""
    monkeypatch.setattr(storage, "GRACE_S", 1)  # the RUNNING trial below never beats: failed 1 s after it started
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_search_study(url, {"test": 1}, TINY, EvolutionSizes(4, 2, 12))
    running, queued = TINY.homogeneous_spaces()[:2]
    genes = genome_distributions(TINY)
    for state, space in ((optuna.trial.TrialState.RUNNING, running), (optuna.trial.TrialState.WAITING, queued)):
        study.add_trial(optuna.trial.create_trial(state=state, params=space_params(space), distributions=genes))
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    result = run_evolution(study, lambda space: scorer.score(space), progress=False)

    complete = complete_trials(url)
    spaces = [space_of(t) for t in complete]
    assert len(spaces) == 12 == len(set(spaces)) == len(result.scores)
    assert running.encoding not in spaces and spaces.count(queued.encoding) == 1
    for trial in complete:
        assert trial.distributions == genes and params_space(TINY, trial.params) is not None
        assert set(trial.user_attrs) == {"worker", "score"} and trial.value == trial.user_attrs["score"]["qt_score"]
    assert set(optuna.importance.get_param_importances(study)) == set(genes)
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the RUNNING trial without a worker, once stale


KILLED_SEARCH = textwrap.dedent(
    """
    import os, signal, sys
    from spaceevo.search.evolution import EvolutionSizes, open_search_study, run_evolution
    from spaceevo.search.lut import load_block_lut
    from spaceevo.search.qt_score import QTScorer
    from spaceevo.space import load_hyperspace

    lut_dir, url = sys.argv[1], sys.argv[2]
    hyperspace = load_hyperspace("tiny")
    scorer = QTScorer(load_block_lut(lut_dir, hyperspace), [4.1, 4.6], samples=2000)
    calls = []

    def evaluate(space):
        calls.append(space)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGKILL)  # killed midway through the 10th evaluation
        return scorer.score(space)

    run_evolution(open_search_study(url, {"test": 1}, hyperspace, EvolutionSizes(16, 4, 30)), evaluate, progress=False)
    """
)


def _url(backend: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else f"journal:{tmp_path / 'study.log'}"


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_killed_worker_trial_is_failed_by_heartbeat_and_its_space_retried(lut_dir, tmp_path, monkeypatch, backend):
    """kill -9 mid-evaluation: the next worker on the study fails the trial once its heartbeat is older
    than the grace period (2 s here) and evaluates its space again; finished trials are kept."""
    monkeypatch.setattr(storage, "GRACE_S", 2)
    url = _url(backend, tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_SEARCH, str(lut_dir), url], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    before = complete_trials(url)
    assert len(before) == 9
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    evaluated = []

    def evaluate(space):  # 21 of them take longer than the grace period: the stale trial is found while searching
        evaluated.append(space.encoding)
        time.sleep(0.3)
        return scorer.score(space)

    study = open_search_study(url, {"test": 1}, TINY, EvolutionSizes(16, 4, 30))
    result = run_evolution(study, evaluate, progress=False)
    assert len(evaluated) == 30 - 9 == result.evaluated_here == len(set(evaluated))
    assert not {space_of(t) for t in before} & set(evaluated)
    after = complete_trials(url)
    assert [t.number for t in after[:9]] == [t.number for t in before]  # finished trials kept as they were
    assert len(after) == 30 == len({space_of(t) for t in after})
    trials = study.get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params  # the killed worker's trial, its genome written
    retry = [t for t in after if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params  # its space, evaluated again
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials)


KILLED_AFTER_ASK = textwrap.dedent(
    """
    import os, signal, sys
    import optuna
    from spaceevo.search.evolution import EvolutionSizes, open_search_study, run_evolution
    from spaceevo.search.lut import load_block_lut
    from spaceevo.search.qt_score import QTScorer
    from spaceevo.space import load_hyperspace

    lut_dir, url = sys.argv[1], sys.argv[2]
    hyperspace = load_hyperspace("tiny")
    scorer = QTScorer(load_block_lut(lut_dir, hyperspace), [4.1, 4.6], samples=2000)
    created = []
    init = optuna.Trial.__init__

    def init_then_die(self, study, trial_id):
        init(self, study, trial_id)
        created.append(trial_id)
        if len(created) == 30:  # the last trial exists in storage: no heartbeat, no parameters yet
            os.kill(os.getpid(), signal.SIGKILL)

    optuna.Trial.__init__ = init_then_die
    study = open_search_study(url, {"test": 1}, hyperspace, EvolutionSizes(16, 4, 30))
    run_evolution(study, lambda space: scorer.score(space), progress=False)
    """
)


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_search_killed_before_the_first_heartbeat_does_not_stall(lut_dir, tmp_path, monkeypatch, backend):
    """Killed between creating a trial and its first heartbeat (Optuna's heartbeat never fails such a
    trial): its start is its last sign of life, so the resumed search fails it after the grace period
    instead of waiting for it (the old claim protocol waited 600 s)."""
    monkeypatch.setattr(storage, "GRACE_S", 2)
    url = _url(backend, tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ASK, str(lut_dir), url], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert len(complete_trials(url)) == 29
    study = open_search_study(url, {"test": 1}, TINY, EvolutionSizes(16, 4, 30))
    orphan = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert len(orphan) == 1 and not orphan[0].params
    waits = []
    sleep = time.sleep
    monkeypatch.setattr(evolution.time, "sleep", lambda seconds: (waits.append(seconds), sleep(seconds)))
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    result = run_evolution(study, lambda space: scorer.score(space), progress=False)
    assert result.evaluated_here == 1 and len(result.scores) == 30 == len({s.space for s in result.scores})
    assert sum(waits) <= storage.GRACE_S + 1  # it waited for the orphan at most the grace period
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 30
    assert len(states) == 31  # failed after the total was reached: not retried


def test_waiting_for_other_workers_says_for_what(lut_dir, tmp_path, monkeypatch, capsys):
    """T spaces are complete but another worker's trial still runs: the progress bar says which trial,
    whose, how long it has run and when it is failed if that worker is dead."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    run_evolution(open_search_study(url, {"test": 1}, TINY, EvolutionSizes(4, 2, 5)), lambda space: scorer.score(space),
                  progress=False)
    study = open_search_study(url, {"test": 1}, TINY, EvolutionSizes(4, 2, 6))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs={"worker": "elsewhere:1"}))
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 2:
            raise KeyboardInterrupt  # the user gives up waiting

    monkeypatch.setattr(evolution.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        run_evolution(study, lambda space: scorer.score(space), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"waiting for 1 trial\(s\) of other workers: trial 5 \(elsewhere:1\) running \d+ s, failed if its "
                     r"heartbeat stops for 10 s", err), err
    assert len(complete_trials(url)) == 6


def test_ctrl_c_while_optuna_tells_a_trial_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Optuna 5.1's study.optimize turns a KeyboardInterrupt during its tell into an UnboundLocalError
    (its clean-up reads a name the tell never set): the search raises KeyboardInterrupt, so the CLI
    says 'interrupted' instead of printing a traceback."""
    study = open_search_study(f"sqlite:///{tmp_path / 'study.db'}", {"test": 1}, TINY, EvolutionSizes(4, 2, 8))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.study._optimize, "_tell_with_warning", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evolution(study, lambda space: SpaceScore(space.encoding, 1.0, ()), progress=False)


SEARCH_COMMAND = textwrap.dedent(
    """
    import sys, time
    from spaceevo.cli import main
    from spaceevo.search.qt_score import QTScorer

    score = QTScorer.score
    def slower(self, *args, **kwargs):  # at least 0.05 s per space: the signal lands mid-search
        time.sleep(0.05)
        return score(self, *args, **kwargs)
    QTScorer.score = slower
    sys.exit(main())
    """
)


def test_search_interrupted_by_sigint_exits_130_with_the_hint_and_resumes(lut_dir, tmp_path, capsys):
    import sqlite3

    argv = ["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(tmp_path), "--preset", "smoke",
            "--samples", "500", "--latency-constraints", "4.1", "4.6"]
    database = tmp_path / "search" / "study.db"

    def complete() -> int:
        if not database.exists():
            return 0
        try:
            with sqlite3.connect(database, timeout=5) as connection:
                return connection.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:  # the tables are being created
            return 0

    process = subprocess.Popen([sys.executable, "-c", SEARCH_COMMAND, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        while complete() < 1:
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and out == "" and "Traceback" not in err
    assert ("spaceevo: interrupted; finished work is saved (teacher and block-KD epochs, LUT files, evaluated spaces), "
            "run the same command again to resume") in err
    before = complete()
    assert 1 <= before < 48

    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["evaluated"] == 48 and summary["evaluated_here"] == 48 - before
    trials = optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(summary["storage"])).get_trials()
    spaces = [space_of(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(spaces) == 48 == len(set(spaces))
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(url)).get_trials()
    except (KeyError, UsageError):  # the study is being created
        return []


def _pid(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs["worker"].rpartition(":")[2])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, which an init that does not reap leaves, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _search_with_a_helper(lut_dir: Path, run: Path) -> tuple[subprocess.Popen, str, int]:
    """``spaceevo search --workers 2`` (preset default: far from done when stopped), once the helper
    process has finished a space: the process, the storage URL and the helper's pid."""
    argv = ["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(run), "--preset", "default",
            "--samples", "500", "--latency-constraints", "4.1", "4.6", "--workers", "2"]
    process = subprocess.Popen([sys.executable, "-c", "import sys; from spaceevo.cli import main; sys.exit(main())", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"sqlite:///{run.resolve() / 'search' / 'study.db'}"
    while True:
        assert process.poll() is None, process.communicate()
        helpers = {_pid(t) for t in _trials(url) if t.state == optuna.trial.TrialState.COMPLETE} - {process.pid}
        if helpers:
            return process, url, helpers.pop()
        time.sleep(0.1)


@pytest.mark.parametrize("to", ["the main process", "the process group (Ctrl-C)"])
def test_search_with_helpers_interrupted_by_sigint_stops_them(lut_dir, tmp_path, monkeypatch, to):
    process, url, helper = _search_with_a_helper(lut_dir, tmp_path / "run")
    if to == "the main process":
        process.send_signal(signal.SIGINT)
    else:
        os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "spaceevo: interrupted;" in err
    assert not _alive(helper), "the helper stopped with the search"
    trials = _trials(url)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) < 1000, "it did not search on alone"
    running = {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING}
    assert len(running) <= 2  # at most one per process: Ctrl-C outside the objective (or SIGTERM) leaves it RUNNING
    monkeypatch.setattr(storage, "GRACE_S", 1)
    study = optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(url, heartbeat=True))
    time.sleep(2.5)  # past the grace period (SQLite's clock counts whole seconds): a re-run's heartbeat check fails them
    storage.fail_stale_trials(study)
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]


def test_search_helpers_end_when_the_search_is_killed(lut_dir, tmp_path):
    process, url, helper = _search_with_a_helper(lut_dir, tmp_path / "run")
    process.kill()
    process.communicate()
    for _ in range(600):  # the helper notices within about half a second; this bounds a failure, it times nothing
        if not _alive(helper):
            break
        time.sleep(0.1)
    assert not _alive(helper), "the helper outlived the killed search"
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in _trials(url))
    assert complete < 1000, "the helper searched on alone"


WORKER = textwrap.dedent(
    """
    import pathlib, sys, time
    from spaceevo.search.api import search_block_lut

    lut_dir, run_dir, url, name = sys.argv[1:5]
    pathlib.Path(run_dir, f"ready-{name}").touch()
    while not pathlib.Path(run_dir, "go").exists():
        time.sleep(0.01)
    search_block_lut(lut_dir, "tiny", [4.1, 4.6], pathlib.Path(run_dir, name), storage=url, preset="smoke",
                     samples=2000, progress=False)
    """
)


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_two_worker_processes_share_a_search(lut_dir, tmp_path, backend):
    url = _url(backend, tmp_path)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(lut_dir), str(tmp_path), url, name], stderr=subprocess.PIPE, text=True)
        for name in ("w1", "w2")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in ("w1", "w2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start together: they propose from the same seeds at the same moment
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    trials = complete_trials(url)
    assert 48 <= len(trials) <= 49  # the total, and the other worker's trial that was running when it was reached
    by_worker = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(space_of(trial))
    assert len(by_worker) == 2 and all(len(s) == len(set(s)) for s in by_worker.values())  # both took part, never twice
    spaces = [space_of(t) for t in trials]
    assert len(spaces) - len(set(spaces)) <= 3  # a duplicate needs two proposals in the same milliseconds (docs/search.md)
    results = [json.loads((tmp_path / n / "search" / "result.json").read_text()) for n in ("w1", "w2")]
    assert results[0]["best_space"] == results[1]["best_space"] and results[0]["evaluated"] == results[1]["evaluated"]
    first = [space_of(t) for t in sorted(trials, key=lambda t: (t.datetime_complete, t.number))[:48]]
    assert results[0]["evaluated"] == len(set(first))  # the first T to finish, each space counted once
    states = {t.state for t in optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(url)).get_trials()}
    assert states == {optuna.trial.TrialState.COMPLETE}


def test_a_trial_finished_after_the_total_is_not_part_of_the_result(lut_dir, tmp_path):
    """Two workers agree on the result even when one of them creates a trial just after the other
    stopped waiting: the result is the first T trials to finish."""
    done = search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path, preset="smoke", samples=500, progress=False)
    study = optuna.load_study(study_name="spaceevo-space-search", storage=open_storage(done.storage))
    taken = {space_of(t) for t in study.get_trials()}
    late = next(s for s in (TINY.random_candidate_space(random.Random(i)) for i in range(1000)) if s.encoding not in taken)
    template = study.get_trials()[0]
    study.add_trial(optuna.trial.create_trial(
        params=evolution.space_params(late), distributions=template.distributions, value=1e9,
        user_attrs={**template.user_attrs, "worker": "late"},
    ))
    again = search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path, preset="smoke", samples=500, progress=False)
    assert again.evaluated_here == 0 and again.evaluated == done.evaluated == 48
    assert again.best_space == done.best_space != late.encoding


def test_resumed_search_with_other_settings_is_refused(lut_dir, tmp_path):
    search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path, preset="smoke", samples=500, progress=False)
    again = search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path, preset="smoke", samples=500, progress=False)
    assert again.evaluated_here == 0 and again.evaluated == 48  # complete: nothing to do
    with pytest.raises(RunMismatchError, match="latency_constraints_ms"):
        search_block_lut(lut_dir, "tiny", [5.0], tmp_path, preset="smoke", samples=500, progress=False)


def test_unreachable_storage_is_a_clear_error(lut_dir, tmp_path, capsys):
    with pytest.raises(UsageError, match="cannot open Optuna storage 'sqlite:////nonexistent-dir/"):
        search_block_lut(lut_dir, "tiny", CONSTRAINTS, tmp_path, storage="sqlite:////nonexistent-dir/x/study.db")
    code = main(["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(tmp_path),
                 "--storage", "nosuchdb://host/db"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open Optuna storage 'nosuchdb://host/db'" in err and "Traceback" not in err
    code = main(["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(tmp_path),
                 "--storage", f"journal:{tmp_path}/no/such/folder.log"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_search_command(lut_dir, tmp_path, capsys):
    code = main(["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(tmp_path),
                 "--preset", "smoke", "--samples", "500", "--latency-constraints", "4.1", "4.6", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["evaluated"] == 48 and summary["latency_constraints_ms"] == CONSTRAINTS
    assert (tmp_path / "search" / "result.json").exists() and (tmp_path / "search" / "best_space.yaml").exists()
    code = main(["search", "--run", str(tmp_path), "--fixed-stage-ms", "1.0"])  # only with --block-lut
    assert code == 2 and "latency table" in capsys.readouterr().err
    code = main(["search", "--block-lut", str(lut_dir), "--hyperspace", "tiny", "--run", str(tmp_path / "x"),
                 "--latency-constraints", "1"])
    assert code == 2 and "smallest achievable latency" in capsys.readouterr().err


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency():
    package = Path(spaceevo.__file__).resolve().parent
    imported = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "spaceevo"}
    assert {"optuna", "sqlalchemy", "torch"} <= third_party
    pyproject = (package.parent / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[\n(.*?)^\]", pyproject, re.S | re.M).group(1)
    declared = {_canonical(re.match(r'\s*"([A-Za-z0-9_.-]+)', line).group(1)) for line in block.splitlines() if line.strip()}
    extras = re.search(r"^\[project.optional-dependencies\]\n(.*?)^\[", pyproject, re.S | re.M).group(1)
    optional = {_canonical(name) for name in re.findall(r'"([A-Za-z0-9_.-]+)[^"]*"', extras)}
    assert "openvino" in optional  # an optional engine (--device openvino) is an extra, imported only when used
    declared |= optional
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        name: distributions.get(name, [name]) for name in third_party
        if not {_canonical(d) for d in distributions.get(name, [name])} & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
