"""Aging evolution over candidate spaces on Optuna: determinism, resuming a killed search, two worker
processes on one study without a duplicate space, the best space beating the homogeneous seeds,
unreachable storage and the `spaceevo search --block-lut` command."""

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
from spaceevo.search import evolution
from spaceevo.search.api import score_spaces, search_block_lut
from spaceevo.search.evolution import (
    EvolutionSizes,
    evolution_sizes,
    count_spaces,
    mutate,
    open_storage,
    open_study,
    run_evolution,
)
from spaceevo.search.lut import LutRow, load_block_lut, lut_filename, required_files, stage_input_sizes, write_lut_csv
from spaceevo.search.qt_score import QTScorer
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
    order = [[t.user_attrs["space"] for t in complete_trials(r.storage)] for r in results]
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


KILLED_SEARCH = textwrap.dedent(
    """
    import os, signal, sys
    from spaceevo.search.evolution import EvolutionSizes, open_study, run_evolution
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

    run_evolution(open_study(url, {"test": 1}), hyperspace, evaluate, EvolutionSizes(16, 4, 30), progress=False)
    """
)


def test_killed_search_resumes_without_reevaluating_finished_trials(lut_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLED_SEARCH, str(lut_dir), url], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    before = complete_trials(url)
    assert len(before) == 9

    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    evaluated = []

    def evaluate(space):
        evaluated.append(space.encoding)
        return scorer.score(space)

    study = open_study(url, {"test": 1})
    result = run_evolution(study, TINY, evaluate, EvolutionSizes(16, 4, 30), progress=False)
    assert len(evaluated) == 30 - 9 == result.evaluated_here
    done_before = {t.user_attrs["space"] for t in before}
    assert not done_before & set(evaluated)
    after = complete_trials(url)
    assert [t.number for t in after[:9]] == [t.number for t in before]  # finished trials kept as they were
    assert len(after) == 30 == len({t.user_attrs["space"] for t in after})
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed worker's trial, no longer claiming
    assert states.count(optuna.trial.TrialState.RUNNING) == 0


KILLED_AFTER_ASK = textwrap.dedent(
    """
    import os, signal, sys
    import optuna
    from spaceevo.search.evolution import EvolutionSizes, open_study, run_evolution
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
        if len(created) == 30:  # the last trial exists in storage; nothing else has been written to it
            os.kill(os.getpid(), signal.SIGKILL)

    optuna.Trial.__init__ = init_then_die
    run_evolution(open_study(url, {"test": 1}), hyperspace, lambda space: scorer.score(space), EvolutionSizes(16, 4, 30),
                  progress=False)
    """
)


def test_search_killed_right_after_creating_a_trial_resumes_at_once(lut_dir, tmp_path, monkeypatch):
    """The issue: killed between study.ask() and the trial's worker attribute, the re-run waited at
    29/30 for the stale timeout (600 s). The orphan names its dead worker now, so it is freed at once:
    the resumed search never sleeps waiting for it (a sleep here fails the test, no clock involved)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ASK, str(lut_dir), url], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert len(complete_trials(url)) == 29
    study = open_study(url, {"test": 1})
    orphan = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert len(orphan) == 1 and "space" not in orphan[0].user_attrs

    def no_waiting(seconds):
        raise AssertionError(f"the resumed search waited ({seconds} s) for the killed worker's trial")

    monkeypatch.setattr(evolution.time, "sleep", no_waiting)
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    result = run_evolution(study, TINY, lambda space: scorer.score(space), EvolutionSizes(16, 4, 30), progress=False,
                           stale_after_s=1e9)
    assert result.evaluated_here == 1 and len(result.scores) == 30 == len({s.space for s in result.scores})
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and optuna.trial.TrialState.RUNNING not in states


def test_waiting_for_other_workers_says_for_what(lut_dir, tmp_path, monkeypatch, capsys):
    """A trial claimed by a live worker elsewhere (here: a RUNNING trial of another host) holds the
    last place: the progress bar says which trial, whose, how long it has run and when it is freed."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(url, {"test": 1})
    scorer = QTScorer(load_block_lut(lut_dir, TINY), CONSTRAINTS, samples=SAMPLES)
    run_evolution(study, TINY, lambda space: scorer.score(space), EvolutionSizes(4, 2, 5), progress=False)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs={"worker": "elsewhere:1"}))
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 2:
            raise KeyboardInterrupt  # the user gives up waiting

    monkeypatch.setattr(evolution.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        run_evolution(study, TINY, lambda space: scorer.score(space), EvolutionSizes(4, 2, 6), progress=True, stale_after_s=600)
    err = capsys.readouterr().err
    assert re.search(r"waiting for 1 space\(s\) of other workers: trial 5 \(elsewhere:1\) running \d+ s, freed after 600 s", err), err


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
    spaces = [t.user_attrs["space"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
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
def test_search_with_helpers_interrupted_by_sigint_stops_them(lut_dir, tmp_path, to):
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
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert all(evolution.is_abandoned(t, stale_after_s=1e9) for t in running), "a re-run frees their claims at once"


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
def test_two_worker_processes_share_a_search_without_duplicates(lut_dir, tmp_path, backend):
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(lut_dir), str(tmp_path), url, name], stderr=subprocess.PIPE, text=True)
        for name in ("w1", "w2")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in ("w1", "w2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start together: they race for the same seed spaces
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    trials = complete_trials(url)
    spaces = [t.user_attrs["space"] for t in trials]
    assert len(spaces) == 48 == len(set(spaces))  # exactly the budget, no space evaluated twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both took part
    results = [json.loads((tmp_path / n / "search" / "result.json").read_text()) for n in ("w1", "w2")]
    assert results[0]["best_space"] == results[1]["best_space"]


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
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        name: distributions.get(name, [name]) for name in third_party
        if not {_canonical(d) for d in distributions.get(name, [name])} & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
