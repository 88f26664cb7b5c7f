"""``spaceevo extract``: the accuracy/latency front of a trained supernet in one search, every
latency budget answered from it, the answers verified on the device.

1. The front search (:mod:`spaceevo.extraction.front`) in an Optuna study, one per supernet, fitness
   and seed, in ``RUN/extract/study.db`` unless a storage URL is given. The budgets of the first call
   are recorded in the study (user attribute ``budgets_ms``) and most trials aim at them. It runs
   until the study holds the preset's number of evaluated subnets: a re-run (with the same or other
   budgets) finds it complete and evaluates nothing.
2. Every budget B is answered with the most accurate evaluated subnet whose predicted INT8 latency
   is at most B (ties: the faster). A budget below the smallest subnet is a :class:`UsageError`;
   one above the largest subnet says so in a note. The smallest and the largest subnet are always
   evaluated, so every budget the space can meet has an answer.
3. Artifacts in ``RUN/extract/``: ``evaluated.csv`` (every evaluated subnet, ``on_front`` marking
   the non-dominated ones), ``pareto.csv`` (one answer per budget), ``pareto.png`` (the evaluated
   cloud, the front and the answers), ``predictor.json`` (the accuracy predictor's k-fold Spearman
   and RMSE) and ``budgets.json``.
4. Verification (:mod:`spaceevo.extraction.verify`) unless disabled: export, interleaved timing, test
   top-1 in ONNX Runtime, fallback to the next evaluated subnet below for an answer measured over
   budget; figures kept in ``verified.json``.

Without budgets (``auto``), N budgets are spread over the space's predicted latency range
(:mod:`spaceevo.search.budgets`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch

from spaceevo.deploy.trained import TrainedRun, open_run
from spaceevo.errors import UsageError
from spaceevo.extraction.finetune import FinetuneConfig, check_finetune_epochs, finetune_answers
from spaceevo.extraction.fitness import HeldoutFitness
from spaceevo.extraction.front import (
    BUDGETS,
    DIRECTIONS,
    Evaluated,
    FrontConfig,
    FrontSampler,
    FrontSearch,
    evaluated,
    front_config,
    non_dominated,
)
from spaceevo.extraction.plot import Point, write_pareto_png
from spaceevo.extraction.predictor import PredictorQuality, cross_validate
from spaceevo.extraction.results import BudgetResult, ExtractResult
from spaceevo.storage import open_storage
from spaceevo.extraction.verify import verify_results
from spaceevo.io import atomic_write_json, atomic_write_text, writable_folder
from spaceevo.latency.engines import ORT_DEVICE
from spaceevo.search.budgets import (
    AUTO,
    BudgetChoice,
    LatencyBudgets,
    candidate_space_range,
    check_budgets,
    check_count,
    choose_budgets,
    space_latency_range,
)
from spaceevo.space import CandidateSpace, Subnet

STUDY_PREFIX = "spaceevo-front"
BUDGETS_FILE = "budgets.json"
PREDICTOR_FILE = "predictor.json"


@dataclass
class Extraction:
    """What an extraction from one trained run shares: the run, a memoised latency predictor, the
    fitness (with its evaluation counter), the study of the front search and its sizes."""

    run: TrainedRun
    predict_ms: Callable[[Subnet], float]
    fitness: HeldoutFitness
    study: optuna.Study
    storage: str
    config: FrontConfig
    seed: int
    show_progress: bool = True

    @property
    def space(self) -> CandidateSpace:
        return self.run.space

    @property
    def directory(self) -> Path:
        return self.run.run.path / "extract"

    def budgets(self, requested: LatencyBudgets, count: int) -> BudgetChoice:
        """The user's budgets, or ``count`` spread over this space's predicted latency range."""
        return choose_budgets(requested, count, candidate_space_range(self.space, self.predict_ms), self.show_progress)

    def check(self, budgets_ms: Sequence[float]) -> None:
        """A :class:`UsageError` for a budget below the smallest subnet (no subnet can meet it)."""
        (low_ms, smallest), _ = space_latency_range(self.space, self.predict_ms)
        for budget in budgets_ms:
            if budget < low_ms:
                raise UsageError(
                    f"--latency-budget {budget:g} ms is below the smallest subnet of {self.space.encoding}: the "
                    f"smallest achievable predicted INT8 latency is {low_ms:.4g} ms ({smallest.encode()}); give "
                    f"budgets from {low_ms:.4g} ms up, or 'auto'"
                )

    def aim(self, budgets_ms: Sequence[float]) -> None:
        """Record the budgets the front search aims at in the study, unless it records some already:
        every worker and every resumed run of one study samples for the same budgets (a later call
        with other budgets is answered from the same evaluations)."""
        if BUDGETS not in self.study.user_attrs:
            self.study.set_user_attr(BUDGETS, [float(b) for b in budgets_ms])

    def search(self) -> None:
        """Run, resume or join the front search until the study holds ``config.trials`` subnets."""
        (_, smallest), (_, largest) = space_latency_range(self.space, self.predict_ms)
        FrontSearch(self.study, self.space, self.predict_ms, self.fitness, self.config, (smallest, largest)).run(
            self.show_progress
        )

    def evaluated(self) -> list[Evaluated]:
        """The search's result: the first ``config.trials`` subnets evaluated (see :func:`evaluated`)."""
        return evaluated(self.study.get_trials(deepcopy=False), self.config.trials)

    def answer(self, budgets_ms: Sequence[float]) -> list[BudgetResult]:
        """Each budget's most accurate evaluated subnet predicted at or under it (ties: the faster)."""
        points = self.evaluated()
        _, (high_ms, largest) = space_latency_range(self.space, self.predict_ms)
        front = non_dominated(points)
        results = []
        for budget in budgets_ms:
            feasible = [e for e in points if e.predicted_int8_ms <= budget]
            if not feasible:
                raise UsageError(
                    f"no evaluated subnet is predicted at or under {budget:g} ms yet (the smallest subnet's trial "
                    f"has not finished: another worker holds it); give the same command again"
                )
            best = max(feasible, key=lambda e: (e.heldout_top1, -e.predicted_int8_ms, -e.trial))
            note = None
            if budget >= high_ms:
                note = (
                    f"budget {budget:g} ms is above the largest subnet's predicted INT8 latency ({high_ms:.4g} ms): "
                    f"every subnet fits, returning the most accurate evaluated one"
                    + (" (the largest subnet)" if best.subnet == largest.encode() else "")
                )
            results.append(BudgetResult(
                budget_ms=budget, subnet=best.subnet, predicted_int8_ms=round(best.predicted_int8_ms, 4),
                heldout_int8_top1=round(best.heldout_top1, 2), evaluated=len(feasible),
                pareto_optimal=best in front, note=note,
            ))
        return results


def study_name(fitness: HeldoutFitness, seed: int, engine: str, device_slug: str) -> tuple[str, dict[str, Any]]:
    """One study per supernet, fitness, seed and engine: a retrained supernet, or latencies of another
    engine, start a fresh front. Studies of ONNX Runtime's engine keep the names they had before
    engines existed (their key has no device)."""
    key = {**fitness.key(), "seed": seed, "kind": "front"}
    if engine != ORT_DEVICE:
        key["device"] = device_slug
    return f"{STUDY_PREFIX}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}", key


def open_extraction(
    run_dir: str | Path,
    *,
    preset: str | FrontConfig = "default",
    trials: int | None = None,
    storage: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    show_progress: bool = True,
) -> Extraction:
    """Open the run (an error naming ``spaceevo train`` if it holds no supernet), the storage (default:
    SQLite ``RUN/extract/study.db``), this device's latency predictor and the study."""
    from spaceevo.latency.api import load_predictor
    from spaceevo.latency.fingerprint import device_fingerprint

    config = front_config(preset, trials)
    run = open_run(run_dir)
    writable_folder(run.run.path / "extract", "the extraction's artifacts")
    url = storage or f"sqlite:///{(run.run.path / 'extract' / 'study.db').resolve()}"
    opened = open_storage(url, heartbeat=True)
    predictor = load_predictor(run.space, device, threads, tables)
    memo: dict[str, float] = {}

    def predict_ms(subnet: Subnet) -> float:
        key = subnet.encode()
        if key not in memo:
            memo[key] = predictor.predict(run.space.resolve(subnet)).int8_ms
        return memo[key]

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by the exception it raises
    fitness = HeldoutFitness(run, config.heldout_images)
    fingerprint = device_fingerprint(device, threads)
    name, key = study_name(fitness, seed, fingerprint.engine, fingerprint.slug)
    _, (high_ms, _) = space_latency_range(run.space, predict_ms)
    try:
        study = optuna.create_study(
            storage=opened, study_name=name, directions=list(DIRECTIONS), load_if_exists=True,
            sampler=FrontSampler(run.space, predict_ms, config, seed, high_ms),
        )
    except Exception as error:
        raise UsageError(f"cannot open Optuna study '{name}' in '{url}': {error}") from None
    if "key" not in study.user_attrs:
        study.set_user_attr("key", key)
    return Extraction(run, predict_ms, fitness, study, url, config, seed, show_progress)


# ---- the API ------------------------------------------------------------------------------------


def extract_subnets(
    run_dir: str | Path,
    latency_budgets_ms: LatencyBudgets = AUTO,
    *,
    num_budgets: int | None = None,
    preset: str | FrontConfig = "default",
    trials: int | None = None,
    storage: str | None = None,
    seed: int = 0,
    verify: bool = True,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    finetune: int | FinetuneConfig = 0,
    show_progress: bool = True,
) -> ExtractResult:
    """The most accurate subnet (held-out INT8 top-1) predicted at or under every budget, from one
    front search of the trained supernet, verified on the device unless ``verify`` is False.

    ``latency_budgets_ms="auto"``: ``num_budgets`` (default 3) budgets spread over the space's
    predicted latency range, printed when ``show_progress``. ``trials`` overrides the preset's number
    of evaluated subnets. Resumable: the search lives in the Optuna study (``storage``, default SQLite
    in ``RUN/extract/study.db``); the same call again reuses every evaluation and verification, and
    other processes can join with the same storage URL and settings. ``threads`` is the device's ONNX
    Runtime thread count (the latency table's fingerprint) and torch's during the call.
    ``finetune``: fine-tune the subnet deployed for every budget for that many FP32 epochs, then
    one QAT epoch (or as a :class:`~spaceevo.extraction.finetune.FinetuneConfig` says; 0: no
    fine-tuning), export it and measure it (:mod:`spaceevo.extraction.finetune`); results get
    ``finetuned`` next to the supernet weights' figures.
    """
    finetune_config = finetune if isinstance(finetune, FinetuneConfig) else (
        FinetuneConfig(epochs=check_finetune_epochs(finetune)) if finetune else None
    )
    requested = AUTO if latency_budgets_ms == AUTO else check_budgets(latency_budgets_ms)
    count = check_count(num_budgets, requested)
    front_config(preset, trials)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the held-out evaluations run with the device's thread count too
    try:
        extraction = open_extraction(
            run_dir, preset=preset, trials=trials, storage=storage, seed=seed, device=device, threads=threads,
            tables=tables, show_progress=show_progress,
        )
        return _extract(extraction, requested, count, verify, device, threads, tables, finetune_config, show_progress)
    finally:
        torch.set_num_threads(torch_threads)


def _extract(
    extraction: Extraction, requested: LatencyBudgets, count: int, verify: bool, device: str, threads: int,
    tables: str | Path | None, finetune: FinetuneConfig | None, show_progress: bool,
) -> ExtractResult:
    choice = extraction.budgets(requested, count)
    extraction.check(choice.budgets_ms)
    atomic_write_json(extraction.directory / BUDGETS_FILE, choice.to_dict())
    extraction.aim(choice.budgets_ms)
    extraction.search()
    results = extraction.answer(choice.budgets_ms)
    points = extraction.evaluated()
    quality = cross_validate(extraction.space, [extraction.space.subnet(e.subnet) for e in points],
                             [e.heldout_top1 for e in points], seed=extraction.seed)
    paths = write_artifacts(extraction, points, results, quality)
    scale, verified_here = None, 0
    if verify:
        scale, verified_here = verify_results(extraction, results, device, threads, tables, show_progress)
    if finetune is not None:
        finetune_answers(extraction.run, results, finetune, extraction.fitness.datasets, show_progress=show_progress)
    if verify or finetune is not None:
        write_pareto_csv(paths[1], results)
    return ExtractResult(
        results, len(points), extraction.fitness.evaluations, len(non_dominated(points)), quality,
        extraction.fitness.precision, extraction.storage, *paths, scale, choice, verified_here,
    )


# ---- artifacts ----------------------------------------------------------------------------------

EVALUATED_COLUMNS = ["trial", "subnet", "predicted_int8_ms", "heldout_int8_top1", "on_front"]
PARETO_COLUMNS = [
    "budget_ms", "subnet", "predicted_int8_ms", "heldout_int8_top1", "evaluated", "pareto_optimal",
    "measured_int8_ms", "measured_fp32_ms", "test_ort_int8_top1", "test_device_int8_top1", "over_budget",
    "finetuned_heldout_int8_top1", "finetuned_test_ort_int8_top1", "finetuned_onnx_int8", "note",
]


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


def write_pareto_csv(path: Path, results: Sequence[BudgetResult]) -> Path:
    """``pareto.csv``: one row per budget (the fine-tuned figures are those of its deployed answer)."""
    rows = []
    for result in results:
        finetuned = result.deployed().finetuned
        rows.append({**result.to_dict(), **({} if finetuned is None else {
            "finetuned_heldout_int8_top1": finetuned.heldout_int8_top1,
            "finetuned_test_ort_int8_top1": finetuned.test_ort_int8_top1,
            "finetuned_onnx_int8": finetuned.onnx_int8,
        })})
    return atomic_write_text(path, _csv(PARETO_COLUMNS, rows))


def write_artifacts(
    extraction: Extraction, points: Sequence[Evaluated], results: Sequence[BudgetResult], quality: PredictorQuality
) -> tuple[Path, Path, Path, Path]:
    """``evaluated.csv``, ``pareto.csv``, ``pareto.png`` and ``predictor.json`` in ``RUN/extract/``."""
    directory = extraction.directory
    front = non_dominated(points)
    on_front = set(front)
    rows = [
        {"trial": e.trial, "subnet": e.subnet, "predicted_int8_ms": e.predicted_int8_ms,
         "heldout_int8_top1": e.heldout_top1, "on_front": e in on_front}
        for e in points
    ]
    evaluated_csv = atomic_write_text(directory / "evaluated.csv", _csv(EVALUATED_COLUMNS, rows))
    pareto_csv = write_pareto_csv(directory / "pareto.csv", results)
    pareto_png = write_pareto_png(
        directory / "pareto.png",
        [Point(e.predicted_int8_ms, e.heldout_top1) for e in points],
        [Point(e.predicted_int8_ms, e.heldout_top1) for e in front],
        [Point(r.predicted_int8_ms, r.heldout_int8_top1) for r in results],
        [r.budget_ms for r in results],
        f"{extraction.space.encoding}: held-out {extraction.fitness.precision} top-1 vs predicted INT8 latency",
    )
    predictor_json = atomic_write_json(directory / PREDICTOR_FILE, {
        **quality.to_dict(), "model": "bootstrap ensemble of ridge regressions on genome features",
        "targets": f"held-out {extraction.fitness.precision} top-1 (%)",
    })
    return evaluated_csv, pareto_csv, pareto_png, predictor_json
