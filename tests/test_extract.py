"""Latency-constrained subnet search on a trained supernet (``spaceevo extract``)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.storages import InMemoryStorage

from spaceevo.cli import main
from spaceevo.deploy.evaluate import ExportReport
from spaceevo.errors import UsageError
from spaceevo.latency.api import load_predictor
from spaceevo.latency.measure import LatencyStats
from spaceevo.search import extract_subnets
from spaceevo.search.evolution import open_storage, open_study
from spaceevo.search.extract import BudgetResult, open_extraction, random_baseline, verify_results
from spaceevo.plot import nice_ticks
from spaceevo.search.subnet_search import SubnetSearch, SubnetSearchConfig, Window, crossover, mutate, random_subnet
from spaceevo.space import Subnet, load_space

SPACE = "tiny-1111-0000"
TINY_SEARCH = SubnetSearchConfig(population=3, generations=1, heldout_images=64)  # 3 + 2 evaluations at most


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predict_ms(latency_tables):
    """Predicted INT8 ms of a subnet of SPACE, from the session's synthetic latency table."""
    predictor, space = load_predictor(SPACE, "cpu", 1, latency_tables), load_space(SPACE)
    return lambda subnet: predictor.predict(space.resolve(subnet)).int8_ms


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, predict_ms) -> Path:
    run = tmp_path_factory.mktemp("extract") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--threads", "1", "--json"]) == 0
    return run


def target_fitness(space):
    """A smooth stand-in for accuracy: closeness of every gene to a hidden target subnet."""
    target = random_subnet(space, random.Random("target"))
    calls: list[str] = []

    def fitness(subnet: Subnet) -> float:
        calls.append(subnet.encode())
        score = -abs(subnet.resolution - target.resolution)
        for mine, theirs in zip(subnet.stages, target.stages):
            score -= 4 * abs(len(mine) - len(theirs))
            for a, b in zip(mine, theirs):
                score -= abs(a.kernel - b.kernel) + abs(a.width - b.width) / 8 + abs(a.expand - b.expand)
        return float(score)

    fitness.calls = calls  # type: ignore[attr-defined]
    return fitness


def fake_search(storage: optuna.storages.BaseStorage, predict_ms, fitness, seed: int = 0,
                sizes: SubnetSearchConfig | None = None, window: Window = Window(0.4, 0.45)) -> SubnetSearch:
    study = open_study("memory", {"test": 1}, study_name="extract-test", storage=storage)
    sizes = sizes or SubnetSearchConfig(population=8, generations=3, max_tries=300)
    return SubnetSearch(study, load_space(SPACE), predict_ms, fitness, sizes, window.high_ms, window, seed=seed)


# ---- genes and plot --------------------------------------------------------------------------------


def test_mutation_crossover_and_sampling_give_valid_subnets() -> None:
    space, rng = load_space(SPACE), random.Random(0)
    parents = [random_subnet(space, rng) for _ in range(50)]
    children = [mutate(space, p, rng, 0.5) for p in parents] + [crossover(a, b, rng) for a, b in zip(parents, parents[1:])]
    for subnet in parents + children:
        space.check_subnet(subnet)
    assert len({c.encode() for c in children}) > 80  # they vary
    assert mutate(space, parents[0], rng, 0.0) == parents[0]


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0.27, 0.41) == [0.3, 0.35, 0.4]
    assert nice_ticks(9.5, 12.6) == [10, 11, 12]


# ---- the search loop (stand-in fitness, real latency predictor) -------------------------------------


def test_search_stays_in_its_window_and_is_reproducible(predict_ms) -> None:
    space = load_space(SPACE)
    results = []
    for seed in (0, 0, 1):
        found = fake_search(InMemoryStorage(), predict_ms, target_fitness(space), seed=seed).run(progress=False)
        assert all(0.4 <= predict_ms(space.subnet(e.subnet)) <= 0.45 for e in found.evaluated)
        assert len({e.subnet for e in found.evaluated}) == len(found.evaluated) == found.evaluated_here
        assert 8 < len(found.evaluated) <= 8 + 3 * 6  # the population, then children of every generation
        results.append([(e.subnet, e.heldout_top1) for e in found.evaluated])
    assert results[0] == results[1]  # same seed, same search
    assert results[0] != results[2]


def test_killed_search_resumes_without_reevaluating(tmp_path, predict_ms) -> None:
    space, url = load_space(SPACE), f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    fitness = target_fitness(space)

    def dies_at_11(subnet: Subnet) -> float:
        if len(fitness.calls) == 11:
            raise KeyboardInterrupt
        return fitness(subnet)

    with pytest.raises(KeyboardInterrupt):
        fake_search(storage, predict_ms, dies_at_11).run(progress=False)
    resumed_fitness = target_fitness(space)
    found = fake_search(open_storage(url), predict_ms, resumed_fitness).run(progress=False)
    assert found.evaluated_here == len(found.evaluated) - 11 == len(resumed_fitness.calls) > 0
    assert not set(fitness.calls) & set(resumed_fitness.calls)
    fresh = fake_search(InMemoryStorage(), predict_ms, target_fitness(space)).run(progress=False)
    assert found.evaluated == fresh.evaluated  # an interrupted search ends where an uninterrupted one does
    again = fake_search(storage, predict_ms, target_fitness(space)).run(progress=False)
    assert again.evaluated_here == 0
    states = [t.state for t in optuna.load_study(study_name="extract-test", storage=url).get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1


def test_every_claim_names_its_worker_from_its_first_write(predict_ms, monkeypatch) -> None:
    """A trial is created with its worker and its claim (search, generation, slot) in one storage
    write, so a process killed right after creating it leaves a claim that names a dead process,
    freed at once on resume (never a bare RUNNING trial that only the stale timeout frees)."""
    storage = InMemoryStorage()
    created: list[dict] = []
    create = storage.create_new_trial

    def recording(study_id, template_trial=None):
        created.append(dict(template_trial.user_attrs) if template_trial is not None else {})
        return create(study_id, template_trial=template_trial)

    monkeypatch.setattr(storage, "create_new_trial", recording)
    search = fake_search(storage, predict_ms, target_fitness(load_space(SPACE)))
    found = search.run(progress=False)
    assert len(created) >= len(found.evaluated) > 0
    assert all({"worker", "search", "generation", "slot"} <= set(attrs) and attrs["search"] == search.key for attrs in created)


def test_search_beats_the_best_of_random_subnets_in_the_window(predict_ms) -> None:
    space = load_space(SPACE)
    fitness = target_fitness(space)
    sizes = SubnetSearchConfig(population=16, generations=6, max_tries=300)  # 88 evaluations at most
    search = fake_search(InMemoryStorage(), predict_ms, fitness, sizes=sizes)
    best = search.run(progress=False).best
    rng, seen, randoms = random.Random(1), set(), []
    for _ in range(50):
        subnet = search.sample(rng, seen)
        seen.add(subnet.encode())
        randoms.append(fitness(subnet))
    assert best.heldout_top1 >= max(randoms)


# ---- extract on a smoke-trained supernet ----------------------------------------------------------


def test_extract_finds_subnets_in_their_windows_writes_the_front_and_resumes(run_dir, predict_ms, latency_tables) -> None:
    space = load_space(SPACE)
    kwargs = dict(preset=TINY_SEARCH, verify=False, tables=latency_tables, show_progress=False)
    result = extract_subnets(run_dir, [0.3, 0.5], **kwargs)
    assert [r.budget_ms for r in result.results] == [0.3, 0.5] and result.fitness == "int8 fake-quant"
    for r in result.results:
        assert r.window_ms == (pytest.approx(0.9 * r.budget_ms), r.budget_ms)
        assert r.window_ms[0] <= predict_ms(space.subnet(r.subnet)) <= r.budget_ms
        assert r.measured_int8_ms is None and r.over_budget is None
        assert TINY_SEARCH.population <= r.evaluated <= TINY_SEARCH.max_evaluations
    assert result.evaluated_here == sum(r.evaluated for r in result.results)
    with result.pareto_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["budget_ms"]), r["subnet"]) for r in rows] == [(r.budget_ms, r.subnet) for r in result.results]
    assert {"predicted_int8_ms", "heldout_int8_top1", "pareto_optimal"} <= set(rows[0])
    with result.evaluated_csv.open() as handle:
        evaluated = list(csv.DictReader(handle))
    assert len(evaluated) == result.evaluated_here
    windows = {r.budget_ms: r.window_ms for r in result.results}
    for row in evaluated:  # every evaluated subnet lies in its budget's window
        low, high = windows[float(row["budget_ms"])]
        assert low <= predict_ms(space.subnet(row["subnet"])) <= high
    assert result.pareto_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.pareto_png.parent == run_dir / "extract"

    again = extract_subnets(run_dir, [0.3, 0.5], **kwargs)  # resumed: every evaluation comes from the study
    assert again.evaluated_here == 0 and [r.to_dict() for r in again.results] == [r.to_dict() for r in result.results]


def test_budget_below_the_smallest_subnet_names_the_smallest_latency(run_dir, predict_ms, latency_tables, capsys) -> None:
    space = load_space(SPACE)
    smallest = min(predict_ms(space.min_subnet(r)) for r in space.hyperspace.resolutions)
    assert 0.01 < smallest < 0.5
    with pytest.raises(UsageError, match=rf"smallest achievable predicted INT8 latency is {smallest:.4g} ms"):
        extract_subnets(run_dir, [0.5, 0.01], preset=TINY_SEARCH, verify=False, tables=latency_tables, show_progress=False)
    code = main(["extract", "--run", str(run_dir), "--latency-budget", "0.01", "--tables", str(latency_tables), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and "smallest achievable predicted INT8 latency" in err and "Traceback" not in err


def test_budget_above_the_largest_subnet_returns_it_and_says_so(run_dir, latency_tables, capsys) -> None:
    code = main(["extract", "--run", str(run_dir), "--latency-budget", "50", "--preset", "smoke", "--tables", str(latency_tables),
                 "--no-verify", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert r["subnet"] == load_space(SPACE).max_subnet().encode() and r["evaluated"] == 1
    assert "above the largest subnet" in r["note"] and "returning the largest subnet" in r["note"]
    assert r["measured_int8_ms"] is None and r["onnx_int8"] is None


def test_missing_supernet_and_unreachable_storage_are_clear_errors(run_dir, tmp_path, latency_tables, capsys) -> None:
    code = main(["extract", "--run", str(tmp_path / "empty"), "--latency-budget", "0.3", "--tables", str(latency_tables)])
    err = capsys.readouterr().err
    assert code == 3 and "no trained supernet" in err and "spaceevo train --space" in err and "Traceback" not in err
    code = main(["extract", "--run", str(run_dir), "--latency-budget", "0.3", "--tables", str(latency_tables),
                 "--storage", "nosuchdb://host/db"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open Optuna storage 'nosuchdb://host/db'" in err and "Traceback" not in err
    code = main(["extract", "--run", str(run_dir), "--latency-budget", "0.3", "--tables", str(latency_tables),
                 "--storage", f"journal:{tmp_path}/no/such/folder.log"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_winners_are_exported_and_measured_on_the_device(run_dir, latency_tables) -> None:
    result = extract_subnets(run_dir, [0.3], preset=TINY_SEARCH, tables=latency_tables, show_progress=False)
    r = result.results[0].to_dict()  # the search itself is cached from the first extract test
    assert {"budget_ms", "subnet", "predicted_int8_ms", "measured_int8_ms", "measured_fp32_ms", "heldout_int8_top1",
            "test_ort_int8_top1", "onnx_int8", "onnx_fp32", "over_budget", "note"} <= set(r)
    assert r["onnx_int8"] == str(run_dir / "extract" / "budget_0.3ms_int8.onnx") and Path(r["onnx_int8"]).is_file()
    assert Path(r["onnx_fp32"]).is_file() and r["measured_int8_ms"] > 0 and r["measured_fp32_ms"] > 0
    assert 0 <= r["test_ort_int8_top1"] <= 100 and isinstance(r["over_budget"], bool)
    assert (r["fallback"] is not None) == r["over_budget"]
    with result.pareto_csv.open() as handle:
        assert float(next(csv.DictReader(handle))["measured_int8_ms"]) == r["measured_int8_ms"]


def test_winner_over_budget_is_reported_with_the_next_feasible_candidate(run_dir, monkeypatch, latency_tables) -> None:
    import spaceevo.deploy.evaluate as evaluate_module
    import spaceevo.latency.api as latency_api

    extraction = open_extraction(run_dir, preset=TINY_SEARCH, tables=latency_tables, show_progress=False)
    plan = extraction.plan([0.3], None)[0]
    found = extraction.search(plan.budget_ms, plan.window)  # cached by the first extract test
    slowest = max(found.evaluated, key=lambda e: e.predicted_int8_ms)  # has cheaper alternatives
    results = [BudgetResult(0.3, slowest.subnet, slowest.predicted_int8_ms, slowest.heldout_top1, (0.27, 0.3), 5)]

    def fake_export(run, subnet, output, **_):
        paths = (str(output) + "_fp32.onnx", str(output) + "_int8.onnx")
        for path in paths:
            Path(path).write_bytes(b"onnx")
        return ExportReport(SPACE, str(subnet), "qat", *paths, 0.0, 0.0, "fp32 phase")

    measured = iter([0.6, 0.29])  # the winner is twice as slow as predicted; its fallback fits

    def fake_measure(models, *_):
        ms = next(measured)
        stats = [LatencyStats(ms, ms, (ms,) * 5) for _ in models]
        return stats, "latency table"

    monkeypatch.setattr(evaluate_module, "export_subnet", fake_export)
    monkeypatch.setattr(evaluate_module, "ort_top1", lambda *_: 50.0)
    monkeypatch.setattr(evaluate_module.onnx, "load_from_string", lambda data: data)
    monkeypatch.setattr(latency_api, "measure_onnx", fake_measure)
    verify_results(extraction, results, "cpu", 1, latency_tables, show_progress=False)
    (r,) = results
    assert r.over_budget is True and "over the budget" in r.note and r.fallback is not None
    assert r.fallback.predicted_int8_ms < r.predicted_int8_ms and r.fallback.over_budget is False
    assert r.fallback.onnx_int8.endswith("budget_0.3ms_fallback_int8.onnx")
    cheaper = [e.heldout_top1 for e in found.evaluated if e.predicted_int8_ms < slowest.predicted_int8_ms]
    assert r.fallback.heldout_int8_top1 >= round(max(cheaper), 2)


@pytest.mark.slow
def test_search_on_a_trained_supernet_is_no_worse_than_50_random_subnets_within_fitness_noise(tmp_path_factory, latency_tables) -> None:
    """The whole extraction on a real (15-step) supernet against 50 random subnets of each window,
    with as many search evaluations as random ones and the same fitness (256 held-out images).

    This supernet is near chance, so its subnets differ by less than the fitness's own noise: the
    check allows two binomial standard errors. The comparison at the default search size on a
    default-trained supernet is ``scripts/bench_extract.py`` (figures in the README); the search
    logic itself is checked against random on a noise-free fitness above."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--epochs", "5",
                     "--threads", "1", "--json"]) == 0
    sizes = SubnetSearchConfig(population=12, generations=5, heldout_images=256)
    assert sizes.max_evaluations >= 50
    result = extract_subnets(run, [0.3, 0.5], preset=sizes, verify=False, tables=latency_tables, show_progress=False)
    extraction = open_extraction(run, preset=sizes, tables=latency_tables, show_progress=False)
    for r, plan in zip(result.results, extraction.plan([0.3, 0.5], None)):
        assert r.predicted_int8_ms in plan.window
        baseline = random_baseline(extraction, plan.budget_ms, plan.window, 50, seed=1)
        assert len(baseline.evaluated) == 50
        p = baseline.best.heldout_top1 / 100
        noise_points = 2 * 100 * math.sqrt(p * (1 - p) / sizes.heldout_images)
        assert r.heldout_int8_top1 >= baseline.best.heldout_top1 - noise_points
