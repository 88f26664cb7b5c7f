"""``spaceevo extract``: the accuracy/latency front in one search (:mod:`spaceevo.extraction`)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from spaceevo.cli import main
from spaceevo.deploy.evaluate import ExportReport
from spaceevo.errors import UsageError
from spaceevo.extraction.api import extract_subnets, open_extraction
from spaceevo.extraction.front import (
    BUDGETS,
    DIRECTIONS,
    FOCUS,
    WINDOW,
    Evaluated,
    FrontConfig,
    FrontSampler,
    FrontSearch,
    evaluated,
    hypervolume_improvement,
    non_dominated,
)
from spaceevo.extraction.genome import Genome, crossover, mutate, random_subnet
from spaceevo.extraction.predictor import AccuracyPredictor, cross_validate, features, spearman
from spaceevo.extraction.results import BudgetResult
from spaceevo.storage import open_storage, retry_stale_trial
from spaceevo.extraction.verify import _fallback, verify_results
from spaceevo.latency.api import load_predictor
from spaceevo.latency.measure import LatencyStats
from spaceevo.plot import nice_ticks
from spaceevo.search.budgets import space_latency_range
from spaceevo.space import Subnet, load_space

SPACE = "tiny-1111-0000"
TINY_SEARCH = FrontConfig(trials=6, initial=3, heldout_images=64)


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
    target = space.random_subnet(random.Random("target"))
    calls: list[str] = []

    def fitness(subnet: Subnet) -> float:
        calls.append(subnet.encode())
        score = 60.0 - abs(subnet.resolution - target.resolution)
        for mine, theirs in zip(subnet.stages, target.stages):
            score -= 4 * abs(len(mine) - len(theirs))
            for a, b in zip(mine, theirs):
                score -= abs(a.kernel - b.kernel) + abs(a.width - b.width) / 8 + abs(a.expand - b.expand)
        return float(score)

    fitness.calls = calls  # type: ignore[attr-defined]
    return fitness


def front_search(storage, predict_ms, fitness, seed: int = 0, config: FrontConfig | None = None,
                 budgets: list[float] | None = None) -> FrontSearch:
    space = load_space(SPACE)
    config = config or FrontConfig(trials=40, initial=10, candidates=200)
    (_, smallest), (high_ms, largest) = space_latency_range(space, predict_ms)
    study = optuna.create_study(
        storage=storage, study_name="front-test", directions=list(DIRECTIONS), load_if_exists=True,
        sampler=FrontSampler(space, predict_ms, config, seed, high_ms),
    )
    if budgets is not None and BUDGETS not in study.user_attrs:
        study.set_user_attr(BUDGETS, budgets)
    return FrontSearch(study, space, predict_ms, fitness, config, (smallest, largest))


def tradeoff_fitness(space, predict_ms):
    """Accuracy that grows with latency (log) plus closeness to a hidden target: the best subnet
    under each budget is a different one, and the search has to find it in each interval."""
    closeness = target_fitness(space)
    calls: list[str] = []

    def fitness(subnet: Subnet) -> float:
        calls.append(subnet.encode())
        return float(20 * np.log(predict_ms(subnet)) + 0.3 * closeness(subnet))

    fitness.calls = calls  # type: ignore[attr-defined]
    return fitness


def budgets_of(predict_ms, count: int) -> list[float]:
    (low_ms, _), (high_ms, _) = space_latency_range(load_space(SPACE), predict_ms)
    return [low_ms + (high_ms - low_ms) * i / count for i in range(1, count + 1)]


def answers(search: FrontSearch, budgets: list[float], fitness) -> list[float]:
    """Each budget's answer (the best evaluated subnet predicted at or under it), scored by ``fitness``."""
    points = evaluated(search.study.get_trials())
    space = load_space(SPACE)
    return [fitness(space.subnet(max((p for p in points if p.predicted_int8_ms <= b), key=lambda p: p.heldout_top1).subnet))
            for b in budgets]


def hypervolume(points: list[tuple[float, float]], high_ms: float, floor: float) -> float:
    """Area under the staircase of (ms, top1) points up to ``high_ms``, above ``floor``."""
    area = 0.0
    grid = np.linspace(0, high_ms, 4001)
    for b in grid[:-1]:
        best = max([t for m, t in points if m <= b], default=floor)
        area += (max(best, floor) - floor) * (grid[1] - grid[0])
    return area


# ---- genome, variation, plot --------------------------------------------------------------------


def test_genome_round_trips_every_subnet_with_the_same_parameters() -> None:
    space, rng = load_space(SPACE), random.Random(0)
    genome = Genome(space)
    names = list(genome.distributions)
    assert "resolution" in names and all(len(d.choices) > 1 for d in genome.distributions.values())
    for _ in range(200):
        subnet = random_subnet(space, rng, rng.choice([None, rng.random()]))
        params = genome.params(subnet)
        assert list(params) == names  # every trial has every parameter, inactive slots included
        assert all(params[n] in genome.distributions[n].choices for n in names)
        assert genome.subnet(params) == subnet


def test_mutation_crossover_and_sampling_give_valid_subnets() -> None:
    space, rng = load_space(SPACE), random.Random(0)
    parents = [random_subnet(space, rng) for _ in range(50)]
    children = [mutate(space, p, rng, 0.5) for p in parents] + [crossover(a, b, rng) for a, b in zip(parents, parents[1:])]
    for subnet in parents + children:
        space.check_subnet(subnet)
    assert len({c.encode() for c in children}) > 80  # they vary
    assert mutate(space, parents[0], rng, 0.0) == parents[0]


def test_size_levels_spread_random_subnets_over_the_latency_range(predict_ms) -> None:
    space, rng = load_space(SPACE), random.Random(0)
    low = [predict_ms(random_subnet(space, rng, 0.05)) for _ in range(30)]
    high = [predict_ms(random_subnet(space, rng, 0.95)) for _ in range(30)]
    assert np.median(low) < np.median(high)


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0.27, 0.41) == [0.3, 0.35, 0.4]
    assert nice_ticks(9.5, 12.6) == [10, 11, 12]


# ---- predictor and hypervolume --------------------------------------------------------------------


def test_spearman_handles_ties_and_constants() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_predictor_fits_a_synthetic_accuracy_and_reports_held_out_rank_correlation() -> None:
    space, rng = load_space(SPACE), random.Random(1)
    subnets = list({s.encode(): s for s in (random_subnet(space, rng) for _ in range(150))}.values())
    weights = np.random.default_rng(0).normal(size=len(features(space, subnets[0])))
    noise = np.random.default_rng(1).normal(scale=0.1, size=len(subnets))
    top1 = [float(features(space, s) @ weights) + e for s, e in zip(subnets, noise)]
    quality = cross_validate(space, subnets, top1, folds=5)
    assert quality.folds == 5 and quality.evaluated == len(subnets)
    assert quality.spearman > 0.9 and quality.rmse < 0.5
    model = AccuracyPredictor.fit(space, subnets, top1)
    mean, spread = model.predict(subnets[:10])
    assert mean.shape == spread.shape == (10,) and (spread >= 0).all()
    assert cross_validate(space, subnets[:3], top1[:3]).spearman is None  # too few to cross-validate


def test_hypervolume_improvement_is_the_area_a_point_adds() -> None:
    rng = random.Random(3)
    for _ in range(20):
        points = [(rng.uniform(0.1, 1.0), rng.uniform(50, 90)) for _ in range(8)]
        ms = np.asarray([rng.uniform(0.1, 1.0) for _ in range(5)])
        top1 = np.asarray([rng.uniform(50, 95) for _ in range(5)])
        gain, above = hypervolume_improvement(points, ms, top1, 1.0)
        floor = min(t for _, t in points)
        before = hypervolume(points, 1.0, floor)
        for m, t, g, a in zip(ms, top1, gain, above):
            assert g == pytest.approx(hypervolume(points + [(m, t)], 1.0, floor) - before, abs=0.05)
            assert (g > 1e-9) == (a > 0) or m >= 1.0
        dominated_gain, _ = hypervolume_improvement(points, np.asarray([max(m for m, _ in points)]), np.asarray([floor]), 1.0)
        assert dominated_gain[0] == 0


# ---- the front search (stand-in fitness, real latency predictor) ----------------------------------


def test_front_search_is_reproducible_and_records_every_subnet_as_a_trial(predict_ms) -> None:
    space = load_space(SPACE)
    genome = Genome(space)
    runs = []
    for seed in (0, 0, 1):
        search = front_search(InMemoryStorage(), predict_ms, target_fitness(space), seed=seed)
        search.run(progress=False)
        trials = search.study.get_trials()
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 40
        for t in complete:
            assert genome.subnet(t.params).encode() == t.user_attrs["subnet"]
            assert t.values[1] == t.user_attrs["predicted_int8_ms"] == pytest.approx(predict_ms(space.subnet(t.user_attrs["subnet"])), abs=1e-6)
        assert len({t.user_attrs["subnet"] for t in complete}) == 40  # no subnet evaluated twice
        runs.append([(t.user_attrs["subnet"], t.values) for t in trials])
    assert runs[0] == runs[1]  # same seed, one worker: the same search
    assert runs[0] != runs[2]


def test_budget_trials_land_in_their_window_and_improve_the_answers(predict_ms) -> None:
    space = load_space(SPACE)
    budgets = budgets_of(predict_ms, 5)
    config = FrontConfig(trials=60, initial=12, candidates=200)
    aimed = front_search(InMemoryStorage(), predict_ms, tradeoff_fitness(space, predict_ms), config=config, budgets=budgets)
    aimed.run(progress=False)
    trials = [t for t in aimed.study.get_trials() if t.state == TrialState.COMPLETE]
    focused = [t for t in trials if FOCUS in t.user_attrs]
    assert len(focused) >= (config.trials - config.initial) // 2  # most model-based trials aim at a budget
    assert all(FOCUS not in t.user_attrs for t in trials[: config.initial])
    for t in focused:  # in the budget's window (or above the previous budget when the window had no candidate)
        budget = t.user_attrs[FOCUS]
        assert budget in budgets
        previous = max([b for b in budgets if b < budget], default=0.0)
        assert min(previous, WINDOW * budget) < t.values[1] <= budget
    counts = [sum(t.user_attrs[FOCUS] == b for t in focused) for b in budgets]
    assert max(counts) - min(counts) <= 1  # round robin over the budgets

    # the whole-front sampler alone (no budget trials): the answers per budget are no better
    front_only = FrontConfig(trials=60, initial=12, candidates=200, global_share=1.0, refine=0.0)
    plain = front_search(InMemoryStorage(), predict_ms, tradeoff_fitness(space, predict_ms), config=front_only, budgets=budgets)
    plain.run(progress=False)
    assert all(FOCUS not in t.user_attrs for t in plain.study.get_trials())
    score = tradeoff_fitness(space, predict_ms)
    mine, theirs = answers(aimed, budgets, score), answers(plain, budgets, score)
    assert sum(mine) >= sum(theirs), (mine, theirs)


def test_budgets_recorded_in_the_study_make_resumed_and_fresh_searches_alike(tmp_path, predict_ms) -> None:
    space = load_space(SPACE)
    budgets = budgets_of(predict_ms, 3)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    fitness = tradeoff_fitness(space, predict_ms)

    def dies_at_25(subnet: Subnet) -> float:
        if len(fitness.calls) == 25:
            raise KeyboardInterrupt
        return fitness(subnet)

    with pytest.raises(KeyboardInterrupt):
        front_search(open_storage(url, heartbeat=True), predict_ms, dies_at_25, budgets=budgets).run(progress=False)
    # resumed with other budgets: the study keeps (and samples for) the first ones
    resumed = front_search(open_storage(url, heartbeat=True), predict_ms, tradeoff_fitness(space, predict_ms), budgets=[0.3])
    resumed.run(progress=False)
    assert resumed.study.user_attrs[BUDGETS] == budgets
    fresh = front_search(InMemoryStorage(), predict_ms, tradeoff_fitness(space, predict_ms), budgets=budgets)
    fresh.run(progress=False)
    subnets = [(t.user_attrs["subnet"], t.user_attrs.get(FOCUS)) for t in resumed.study.get_trials() if t.state == TrialState.COMPLETE]
    assert subnets[:25] == [(t.user_attrs["subnet"], t.user_attrs.get(FOCUS)) for t in fresh.study.get_trials()][:25]
    assert {f for _, f in subnets[25:] if f is not None} == set(budgets)  # after the resume: still the first budgets


def test_without_budgets_the_sampler_aims_at_budgets_spread_over_the_range(predict_ms) -> None:
    space = load_space(SPACE)
    (_, _), (high_ms, _) = space_latency_range(space, predict_ms)
    sampler = FrontSampler(space, predict_ms, FrontConfig(trials=10, initial=2), 0, high_ms)
    done = [Evaluated("a", 50.0, 0.1, 0), Evaluated("b", 60.0, high_ms, 1)]
    targets = sampler.targets(done, None)
    assert len(targets) == 8 and targets[-1] == pytest.approx(high_ms) and 0.1 < targets[0] < targets[1]
    assert sampler.targets(done, [0.5, 0.2, 0.5]) == [0.2, 0.5]
    for bad in (dict(global_share=1.5), dict(refine=-0.1)):
        with pytest.raises(UsageError, match="global_share, refine"):
            FrontConfig(trials=10, initial=2, **bad)


def test_front_is_non_dominated_and_beats_as_many_random_subnets(predict_ms) -> None:
    space = load_space(SPACE)
    fitness = target_fitness(space)
    search = front_search(InMemoryStorage(), predict_ms, fitness)
    search.run(progress=False)
    points = evaluated(search.study.get_trials())
    front = non_dominated(points)
    for p in front:
        assert not any(q.predicted_int8_ms <= p.predicted_int8_ms and q.heldout_top1 >= p.heldout_top1
                       and (q.predicted_int8_ms, q.heldout_top1) != (p.predicted_int8_ms, p.heldout_top1) for q in points)
    for q in points:  # every evaluated subnet is dominated by (or on) the front
        assert any(p.predicted_int8_ms <= q.predicted_int8_ms and p.heldout_top1 >= q.heldout_top1 for p in front)
    (_, _), (high_ms, _) = space_latency_range(space, predict_ms)
    rng = random.Random(7)
    randoms = [random_subnet(space, rng) for _ in range(len(points))]
    random_points = [(predict_ms(s), fitness(s)) for s in randoms]
    floor = min(t for _, t in random_points + [(p.predicted_int8_ms, p.heldout_top1) for p in points])
    searched = hypervolume([(p.predicted_int8_ms, p.heldout_top1) for p in points], high_ms, floor)
    assert searched > hypervolume(random_points, high_ms, floor)


def test_killed_search_resumes_without_reevaluating(tmp_path, predict_ms) -> None:
    space, url = load_space(SPACE), f"sqlite:///{tmp_path / 'study.db'}"
    fitness = target_fitness(space)

    def dies_at_11(subnet: Subnet) -> float:
        if len(fitness.calls) == 11:
            raise KeyboardInterrupt
        return fitness(subnet)

    with pytest.raises(KeyboardInterrupt):
        front_search(open_storage(url, heartbeat=True), predict_ms, dies_at_11).run(progress=False)
    resumed_fitness = target_fitness(space)
    search = front_search(open_storage(url, heartbeat=True), predict_ms, resumed_fitness)
    search.run(progress=False)
    assert not set(fitness.calls[:11]) & set(resumed_fitness.calls)
    assert len(evaluated(search.study.get_trials())) == 40 == 11 + len(resumed_fitness.calls)
    states = [t.state for t in search.study.get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 40
    again = target_fitness(space)
    front_search(open_storage(url, heartbeat=True), predict_ms, again).run(progress=False)
    assert again.calls == []  # complete: nothing to do


def test_a_subnet_taken_by_another_trial_is_pruned_not_evaluated(predict_ms) -> None:
    space = load_space(SPACE)
    fitness = target_fitness(space)
    search = front_search(InMemoryStorage(), predict_ms, fitness, config=FrontConfig(trials=4, initial=2))
    search.run(progress=False)
    taken = evaluated(search.study.get_trials())[-1].subnet
    search.study.enqueue_trial(Genome(space).params(space.subnet(taken)))
    calls = len(fitness.calls)
    search.study.optimize(search.objective, n_trials=1)
    last = search.study.get_trials()[-1]
    assert last.state == TrialState.PRUNED and last.user_attrs["subnet"] == taken and len(fitness.calls) == calls


@pytest.mark.parametrize("suggested", [0, 1, 17], ids=["no parameter", "one parameter", "half the parameters"])
def test_retry_of_a_killed_trial_evaluates_the_subnet_it_chose(predict_ms, suggested) -> None:
    """A worker killed after the sampler wrote its trial's subnet but before the trial had suggested every
    parameter (one storage write each): the heartbeat's retry inherits the subnet and only those parameters,
    and must evaluate that subnet, not one completed by a new choice."""
    space = load_space(SPACE)
    genome, fitness = Genome(space), target_fitness(space)
    search = front_search(InMemoryStorage(), predict_ms, fitness, config=FrontConfig(trials=4, initial=2))
    search.run(progress=False)
    study = search.study
    killed = study.ask()
    assert killed.relative_params  # the sampler chooses (and writes) the subnet before the first parameter
    for name, distribution in list(genome.distributions.items())[:suggested]:
        killed.suggest_categorical(name, distribution.choices)
    chosen = study._storage.get_trial(killed._trial_id).user_attrs["subnet"]
    study.tell(killed, state=TrialState.FAIL)  # what the heartbeat does to a killed worker's trial
    retry_stale_trial(study, study._storage.get_trial(killed._trial_id))
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert chosen in study.sampler._seen(study.get_trials()), "a queued retry's subnet is taken"
    calls = len(fitness.calls)
    study.optimize(search.objective, n_trials=1)
    retry = study.get_trials()[queued.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["subnet"] == chosen
    assert genome.subnet(retry.params).encode() == chosen and fitness.calls[calls:] == [chosen]


# ---- extract on a smoke-trained supernet ----------------------------------------------------------


def test_extract_answers_every_budget_from_the_front_writes_the_artifacts_and_resumes(run_dir, predict_ms, latency_tables) -> None:
    space = load_space(SPACE)
    kwargs = dict(preset=TINY_SEARCH, verify=False, tables=latency_tables, show_progress=False)
    result = extract_subnets(run_dir, [0.3, 0.5], **kwargs)
    assert [r.budget_ms for r in result.results] == [0.3, 0.5] and result.fitness == "int8 fake-quant"
    assert result.evaluated == result.evaluated_here == TINY_SEARCH.trials
    with result.evaluated_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TINY_SEARCH.trials and {"subnet", "predicted_int8_ms", "heldout_int8_top1", "on_front"} <= set(rows[0])
    for r in result.results:  # the best evaluated subnet at or under the budget
        assert predict_ms(space.subnet(r.subnet)) <= r.budget_ms
        feasible = [float(row["heldout_int8_top1"]) for row in rows if float(row["predicted_int8_ms"]) <= r.budget_ms]
        assert r.heldout_int8_top1 == round(max(feasible), 2) and r.evaluated == len(feasible)
        assert r.pareto_optimal is True and r.measured_int8_ms is None and r.over_budget is None
    with result.pareto_csv.open() as handle:
        answers = list(csv.DictReader(handle))
    assert [(float(r["budget_ms"]), r["subnet"]) for r in answers] == [(r.budget_ms, r.subnet) for r in result.results]
    assert result.pareto_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.pareto_png.parent == run_dir / "extract"
    predictor = json.loads(result.predictor_json.read_text())
    assert predictor["evaluated"] == TINY_SEARCH.trials and "spearman" in predictor and "rmse" in predictor

    again = extract_subnets(run_dir, [0.3, 0.5], **kwargs)  # resumed: every evaluation comes from the study
    assert again.evaluated_here == 0 and [r.to_dict() for r in again.results] == [r.to_dict() for r in result.results]
    other = extract_subnets(run_dir, [0.25, 0.4, 0.6], **kwargs)  # other budgets: answered from the same front
    assert other.evaluated_here == 0 and all(r.predicted_int8_ms <= r.budget_ms for r in other.results)
    study = open_extraction(run_dir, preset=TINY_SEARCH, tables=latency_tables, show_progress=False).study
    assert study.user_attrs[BUDGETS] == [0.3, 0.5]  # the budgets the search aimed at: the first call's


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
    code = main(["extract", "--run", str(run_dir), "--latency-budget", "50", "--preset", "smoke", "--trials", "4",
                 "--tables", str(latency_tables), "--no-verify", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert "above the largest subnet" in r["note"] and "every subnet fits" in r["note"]
    assert r["heldout_int8_top1"] == round(max(float(row.split(",")[3]) for row in (run_dir / "extract" / "evaluated.csv").read_text().splitlines()[1:]), 2)
    assert r["measured_int8_ms"] is None and r["onnx_int8"] is None


def test_missing_supernet_bad_trials_and_unreachable_storage_are_clear_errors(run_dir, tmp_path, latency_tables, capsys) -> None:
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
    code = main(["extract", "--run", str(run_dir), "--trials", "1", "--tables", str(latency_tables)])
    err = capsys.readouterr().err
    assert code == 2 and "--trials must be an integer >= 2" in err and "Traceback" not in err


def test_answers_are_exported_and_measured_on_the_device(run_dir, latency_tables) -> None:
    result = extract_subnets(run_dir, [0.3], preset=TINY_SEARCH, tables=latency_tables, show_progress=False)
    r = result.results[0].to_dict()  # the search itself is done by the first extract test
    assert {"budget_ms", "subnet", "predicted_int8_ms", "measured_int8_ms", "measured_fp32_ms", "heldout_int8_top1",
            "test_ort_int8_top1", "onnx_int8", "onnx_fp32", "over_budget", "note"} <= set(r)
    assert r["onnx_int8"] == str(run_dir / "extract" / "budget_0.3ms_int8.onnx") and Path(r["onnx_int8"]).is_file()
    assert Path(r["onnx_fp32"]).is_file() and r["measured_int8_ms"] > 0 and r["measured_fp32_ms"] > 0
    assert 0 <= r["test_ort_int8_top1"] <= 100 and isinstance(r["over_budget"], bool)
    assert (r["fallback"] is not None) == r["over_budget"]
    with result.pareto_csv.open() as handle:
        assert float(next(csv.DictReader(handle))["measured_int8_ms"]) == r["measured_int8_ms"]


def test_answer_over_budget_is_reported_with_the_next_feasible_candidate(run_dir, monkeypatch, latency_tables) -> None:
    import spaceevo.deploy.evaluate as evaluate_module
    import spaceevo.latency.api as latency_api

    extraction = open_extraction(run_dir, preset=TINY_SEARCH, tables=latency_tables, show_progress=False)
    points = extraction.evaluated()  # done by the first extract test
    slowest = max(points, key=lambda e: e.predicted_int8_ms)  # has cheaper alternatives
    results = [BudgetResult(0.3, slowest.subnet, slowest.predicted_int8_ms, slowest.heldout_top1, 5)]

    def fake_export(run, subnet, output, **_):
        paths = (str(output) + "_fp32.onnx", str(output) + "_int8.onnx")
        for path in paths:
            Path(path).write_bytes(b"onnx")
        return ExportReport(SPACE, str(subnet), "qat", *paths, 0.0, 0.0, "fp32 phase", *paths, 0.0)

    measured = iter([0.6, 0.29])  # the answer is twice as slow as predicted; its fallback fits

    def fake_measure(models, *_):
        ms = next(measured)
        stats = [LatencyStats(ms, ms, (ms,) * 5) for _ in models]
        return stats, "latency table"

    monkeypatch.setattr(evaluate_module, "export_subnet", fake_export)
    monkeypatch.setattr(evaluate_module, "engine_top1", lambda *_: 50.0)
    monkeypatch.setattr(evaluate_module.onnx, "load_from_string", lambda data: data)
    monkeypatch.setattr(latency_api, "measure_onnx", fake_measure)
    verify_results(extraction, results, "cpu", 1, latency_tables, show_progress=False)
    (r,) = results
    assert r.over_budget is True and "over the budget" in r.note and r.fallback is not None
    assert r.fallback.predicted_int8_ms < r.predicted_int8_ms and r.fallback.over_budget is False
    assert r.fallback.onnx_int8.endswith("budget_0.3ms_fallback_int8.onnx")
    cheaper = [e.heldout_top1 for e in points if e.predicted_int8_ms < slowest.predicted_int8_ms]
    assert r.fallback.heldout_int8_top1 == round(max(cheaper), 2)


def test_a_subnet_answering_several_budgets_is_exported_and_measured_once(run_dir, monkeypatch, latency_tables) -> None:
    import spaceevo.deploy.evaluate as evaluate_module
    import spaceevo.latency.api as latency_api

    extraction = open_extraction(run_dir, preset=TINY_SEARCH, tables=latency_tables, show_progress=False)
    best = max(extraction.evaluated(), key=lambda e: e.heldout_top1)
    results = [BudgetResult(budget, best.subnet, best.predicted_int8_ms, best.heldout_top1, 5) for budget in (5.0, 6.0)]
    exported, timed = [], []

    def fake_export(run, subnet, output, **_):
        exported.append(str(subnet))
        paths = (str(output) + "_fp32.onnx", str(output) + "_int8.onnx")
        for path, data in zip(paths, (b"fp32", b"int8")):
            Path(path).write_bytes(data)
        return ExportReport(SPACE, str(subnet), "qat", *paths, 0.0, 0.0, "fp32 phase", *paths, 0.0)

    def fake_measure(models, *_):
        timed.extend(models)
        return [LatencyStats(0.1 * (i + 1), 0.0, (0.1,) * 5) for i in range(len(models))], "latency table"

    monkeypatch.setattr(evaluate_module, "export_subnet", fake_export)
    monkeypatch.setattr(evaluate_module, "engine_top1", lambda *_: 50.0)
    monkeypatch.setattr(evaluate_module.onnx, "load_from_string", lambda data: data)
    monkeypatch.setattr(latency_api, "measure_onnx", fake_measure)
    verify_results(extraction, results, "cpu", 1, latency_tables, show_progress=False)
    assert exported == [best.subnet] and timed == [b"fp32", b"int8"]
    first, second = results
    assert second.onnx_int8.endswith("budget_6ms_int8.onnx") and Path(second.onnx_int8).read_bytes() == b"int8"
    assert Path(second.onnx_fp32).read_bytes() == b"fp32"
    for key in ("measured_int8_ms", "measured_fp32_ms", "measured_int8_spread", "test_ort_int8_top1"):
        assert getattr(second, key) == getattr(first, key) is not None


def test_fallback_is_never_the_answer_whose_rounded_latency_is_above_its_own() -> None:
    """An answer predicted 0.301353 ms is reported as 0.3014 ms: measured over budget, it used to be
    its own fallback (below 0.3014), verified three more times as budget_…_fallback_fallback…"""
    from types import SimpleNamespace

    study = optuna.create_study(storage=InMemoryStorage(), directions=list(DIRECTIONS))
    for subnet, ms, top1 in [("winner", 0.301353, 40.0), ("cheaper", 0.25, 30.0), ("slower", 0.31, 45.0)]:
        study.add_trial(optuna.trial.create_trial(
            values=[top1, ms], user_attrs={"subnet": subnet, "predicted_int8_ms": ms}, state=TrialState.COMPLETE,
        ))
    over = BudgetResult(0.3, "winner", round(0.301353, 4), 40.0, 5)
    def points():
        return evaluated(study.get_trials())

    fallback = _fallback(SimpleNamespace(evaluated=points), over)
    assert fallback is not None and fallback.subnet == "cheaper" and fallback.predicted_int8_ms == 0.25
    last = BudgetResult(0.3, "cheaper", 0.25, 30.0, 5)
    assert _fallback(SimpleNamespace(evaluated=points), last) is None


def test_non_dominated_keeps_the_fastest_of_equals() -> None:
    points = [Evaluated("a", 80.0, 0.2, 0), Evaluated("b", 80.0, 0.3, 1), Evaluated("c", 85.0, 0.3, 2), Evaluated("d", 70.0, 0.1, 3)]
    assert [p.subnet for p in non_dominated(points)] == ["d", "a", "c"]
