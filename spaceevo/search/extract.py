"""``spaceevo extract``: the most accurate subnet of a trained supernet per latency budget, verified
on the device.

For every budget B (ms), a subnet search (:mod:`spaceevo.search.subnet_search`) inside the predicted
INT8 latency window [B − delta, B] (default delta: 10% of B), scored on the held-out split. Artifacts
in ``RUN/extract/``: ``study.db`` (the Optuna study, unless a storage URL is given), ``evaluated.csv``
(every subnet the searches evaluated), ``pareto.csv`` (one winner per budget) and ``pareto.png``
(held-out accuracy vs predicted latency). Then each winner is *verified*: exported as
``budget_<B>ms_{fp32,int8}.onnx``, both models timed end to end on the device (interleaved), and the
INT8 model's ONNX Runtime top-1 measured on the test split. A winner measured over its budget beyond
the measurement noise is reported as such (``over_budget``, ``note``) together with the next feasible
candidate (``fallback``): the best evaluated subnet with a lower predicted latency, verified in turn.

Without budgets (``auto``), N budgets are spread over the space's predicted latency range
(:mod:`spaceevo.search.budgets`); the budgets used are recorded in ``budgets.json``. Several
processes may extract from one run at once: they share the searches through the study, and the
verification runs under a lock (``verify.lock``), once per winner; its figures are kept in
``verified.json`` and reused by the other processes and by a re-run.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch
from tqdm import tqdm

from spaceevo.deploy.trained import TrainedRun, open_run
from spaceevo.errors import UsageError
from spaceevo.io import atomic_write_json, atomic_write_text, exclusive_lock, writable_folder
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
from spaceevo.search.evolution import open_storage
from spaceevo.search.pareto_plot import Point, write_pareto_png
from spaceevo.search.subnet_search import (
    BudgetSearch,
    HeldoutFitness,
    SubnetSearch,
    SubnetSearchConfig,
    Window,
    all_evaluated,
    open_extract_study,
    subnet_search_config,
)
from spaceevo.space import CandidateSpace, Subnet

MIN_NOISE = 0.05
"""A measurement is over budget above budget × (1 + max(MIN_NOISE, 2 × its spread))."""
MAX_FALLBACKS = 3
"""Next feasible candidates tried, one after the other, for a winner measured over budget."""


@dataclass
class BudgetResult:
    """One budget's answer. Latencies in ms (measured ones on the latency table's scale), top-1 in %;
    the measured figures and the test top-1 stay None without verification."""

    budget_ms: float
    subnet: str
    predicted_int8_ms: float
    heldout_int8_top1: float
    window_ms: tuple[float, float]
    evaluated: int
    measured_int8_ms: float | None = None
    measured_fp32_ms: float | None = None
    measured_int8_spread: float | None = None
    test_ort_int8_top1: float | None = None
    onnx_int8: str | None = None
    onnx_fp32: str | None = None
    pareto_optimal: bool | None = None
    over_budget: bool | None = None
    note: str | None = None
    fallback: BudgetResult | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_ms"] = list(self.window_ms)
        data["fallback"] = None if self.fallback is None else self.fallback.to_dict()
        return data


@dataclass(frozen=True)
class ExtractResult:
    """Every budget's result (in the order given) and where the artifacts are. ``evaluated_here``
    counts the subnets this call evaluated, ``verified_here`` the winners it verified (the others'
    figures come from another process or an earlier call)."""

    results: list[BudgetResult]
    evaluated_here: int
    fitness: str
    storage: str
    evaluated_csv: Path
    pareto_csv: Path
    pareto_png: Path
    latency_scale: str | None
    budgets: BudgetChoice
    verified_here: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "latency_budgets": self.budgets.to_dict(),
            "evaluated_here": self.evaluated_here,
            "verified_here": self.verified_here,
            "fitness": self.fitness,
            "storage": self.storage,
            "evaluated_csv": str(self.evaluated_csv),
            "pareto_csv": str(self.pareto_csv),
            "pareto_png": str(self.pareto_png),
            "latency_scale": self.latency_scale,
        }


# ---- setting up ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetPlan:
    """One budget's window; ``largest`` (with a ``note``) when the budget is above the largest subnet."""

    budget_ms: float
    window: Window
    largest: Subnet | None = None
    note: str | None = None


@dataclass
class Extraction:
    """What the searches over one trained run share: the run, a memoised latency predictor, the
    fitness (with its evaluation counter) and the Optuna study."""

    run: TrainedRun
    predict_ms: Callable[[Subnet], float]
    fitness: HeldoutFitness
    study: optuna.Study
    storage: str
    sizes: SubnetSearchConfig
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

    def plan(self, budgets_ms: Sequence[float], delta_ms: float | None) -> list[BudgetPlan]:
        """Every budget's window (delta: 10% of the budget by default); a :class:`UsageError` for a
        budget below the smallest subnet, the largest subnet without a search for one above it."""
        (low_ms, smallest), (high_ms, largest) = space_latency_range(self.space, self.predict_ms)
        plans = []
        for budget in budgets_ms:
            if budget < low_ms:
                raise UsageError(
                    f"--latency-budget {budget:g} ms is below the smallest subnet of {self.space.encoding}: the "
                    f"smallest achievable predicted INT8 latency is {low_ms:.4g} ms ({smallest.encode()}); give "
                    f"budgets from {low_ms:.4g} ms up, or 'auto'"
                )
            delta = 0.1 * budget if delta_ms is None else delta_ms
            window = Window(round(max(0.0, budget - delta), 6), budget)
            if budget < high_ms:
                plans.append(BudgetPlan(budget, window))
                continue
            note = (
                f"budget {budget:g} ms is above the largest subnet's predicted INT8 latency ({high_ms:.4g} ms): "
                f"returning the largest subnet"
            )
            plans.append(BudgetPlan(budget, window, largest, note))
        return plans

    def search(self, budget_ms: float, window: Window, fixed: Sequence[Subnet] | None = None, seed: int | None = None) -> BudgetSearch:
        """Run (or resume) the search of one window, or evaluate exactly ``fixed``."""
        return SubnetSearch(
            self.study, self.space, self.predict_ms, self.fitness, self.sizes, budget_ms, window,
            seed=self.seed if seed is None else seed, fixed=fixed,
        ).run(progress=self.show_progress)


def open_extraction(
    run_dir: str | Path,
    *,
    preset: str | SubnetSearchConfig = "default",
    storage: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    show_progress: bool = True,
) -> Extraction:
    """Open the run (an error naming ``spaceevo train`` if it holds no supernet), the storage (default:
    SQLite ``RUN/extract/study.db``; an unreachable one is a :class:`UsageError`), this device's
    latency predictor and the study."""
    from spaceevo.latency.api import load_predictor

    sizes = subnet_search_config(preset)
    run = open_run(run_dir)
    writable_folder(run.run.path / "extract", "the extraction's artifacts")
    url = storage or f"sqlite:///{(run.run.path / 'extract' / 'study.db').resolve()}"
    opened = open_storage(url)
    predictor = load_predictor(run.space, device, threads, tables)
    memo: dict[str, float] = {}

    def predict_ms(subnet: Subnet) -> float:
        key = subnet.encode()
        if key not in memo:
            memo[key] = predictor.predict(run.space.resolve(subnet)).int8_ms
        return memo[key]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fitness = HeldoutFitness(run, sizes.heldout_images)
    study = open_extract_study(url, fitness, storage=opened)
    return Extraction(run, predict_ms, fitness, study, url, sizes, seed, show_progress)


def _check_delta(delta_ms: float | None) -> None:
    if delta_ms is not None and not (0 < delta_ms < float("inf")):
        raise UsageError(f"--delta must be a positive finite number of ms, got {delta_ms:g}")


# ---- the API ------------------------------------------------------------------------------------


def extract_subnets(
    run_dir: str | Path,
    latency_budgets_ms: LatencyBudgets = AUTO,
    *,
    num_budgets: int | None = None,
    delta_ms: float | None = None,
    preset: str | SubnetSearchConfig = "default",
    storage: str | None = None,
    seed: int = 0,
    verify: bool = True,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    show_progress: bool = True,
) -> ExtractResult:
    """The most accurate subnet (held-out INT8 top-1) inside [B − delta, B] ms of predicted INT8
    latency for every budget B, verified on the device unless ``verify`` is False.

    ``latency_budgets_ms="auto"``: ``num_budgets`` (default 3) budgets spread over the space's
    predicted latency range (:mod:`spaceevo.search.budgets`), printed when ``show_progress``.
    Resumable: the searches live in the Optuna study (``storage``, default SQLite in
    ``RUN/extract/study.db``); running the same call again reuses every finished evaluation and
    verification, and other processes can join with the same storage URL and settings. ``threads``
    is the device's ONNX Runtime thread count (the latency table's fingerprint) and torch's during
    the call.
    """
    requested = AUTO if latency_budgets_ms == AUTO else check_budgets(latency_budgets_ms)
    count = check_count(num_budgets, requested)
    _check_delta(delta_ms)
    subnet_search_config(preset)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the held-out evaluations run with the device's thread count too
    try:
        return _extract(requested, count, run_dir, delta_ms, preset, storage, seed, verify, device, threads, tables, show_progress)
    finally:
        torch.set_num_threads(torch_threads)


def _extract(
    requested: LatencyBudgets, count: int, run_dir: str | Path, delta_ms: float | None, preset: str | SubnetSearchConfig,
    storage: str | None, seed: int, verify: bool, device: str, threads: int, tables: str | Path | None,
    show_progress: bool,
) -> ExtractResult:
    extraction = open_extraction(
        run_dir, preset=preset, storage=storage, seed=seed, device=device, threads=threads, tables=tables,
        show_progress=show_progress,
    )
    choice = extraction.budgets(requested, count)
    plans = extraction.plan(choice.budgets_ms, delta_ms)
    atomic_write_json(extraction.directory / BUDGETS_FILE, choice.to_dict())
    searches: list[BudgetSearch] = []
    results: list[BudgetResult] = []
    for plan in plans:
        found = extraction.search(plan.budget_ms, plan.window, fixed=None if plan.largest is None else [plan.largest])
        best = found.best
        searches.append(found)
        results.append(
            BudgetResult(
                budget_ms=plan.budget_ms,
                subnet=best.subnet,
                predicted_int8_ms=round(best.predicted_int8_ms, 4),
                heldout_int8_top1=round(best.heldout_top1, 2),
                window_ms=(plan.window.low_ms, plan.window.high_ms),
                evaluated=len(found.evaluated),
                note=plan.note,
            )
        )
    paths = write_artifacts(extraction, searches, results)
    scale, verified_here = None, 0
    if verify:
        scale, verified_here = verify_results(extraction, results, device, threads, tables, show_progress)
        write_pareto_csv(paths[1], results)
    return ExtractResult(
        results, extraction.fitness.evaluations, extraction.fitness.precision, extraction.storage, *paths, scale,
        choice, verified_here,
    )


def random_baseline(extraction: Extraction, budget_ms: float, window: Window, count: int, seed: int) -> BudgetSearch:
    """``count`` distinct random subnets inside ``window`` (the search's own sampler), evaluated
    through the study: what a search must beat."""
    probe = SubnetSearch(
        extraction.study, extraction.space, extraction.predict_ms, extraction.fitness, extraction.sizes, budget_ms, window,
    )
    rng, seen, subnets = random.Random(f"random:{seed}:{budget_ms!r}"), set(), []
    for _ in range(count):
        subnet = probe.sample(rng, seen)
        if subnet is None:
            break
        seen.add(subnet.encode())
        subnets.append(subnet)
    if not subnets:
        raise UsageError(f"no random subnet found in [{window.low_ms:g}, {window.high_ms:g}] ms")
    return extraction.search(budget_ms, window, fixed=subnets, seed=seed)


# ---- artifacts ----------------------------------------------------------------------------------

BUDGETS_FILE = "budgets.json"
VERIFIED_FILE = "verified.json"
VERIFY_LOCK = "verify.lock"
EVALUATED_COLUMNS = ["budget_ms", "generation", "slot", "subnet", "predicted_int8_ms", "heldout_int8_top1", "cached"]
PARETO_COLUMNS = [
    "budget_ms", "window_low_ms", "window_high_ms", "subnet", "predicted_int8_ms", "heldout_int8_top1",
    "pareto_optimal", "measured_int8_ms", "measured_fp32_ms", "test_ort_int8_top1", "over_budget", "note",
]


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


def _pareto_optimal(point: tuple[float, float], points: Sequence[tuple[float, float]]) -> bool:
    """No point (latency, top-1) is at least as fast and as accurate and better in one of the two."""
    ms, top1 = point
    return not any(m <= ms and t >= top1 and (m < ms or t > top1) for m, t in points)


def write_pareto_csv(path: Path, results: Sequence[BudgetResult]) -> Path:
    """``pareto.csv``: one row per budget."""
    rows = [{**r.to_dict(), "window_low_ms": r.window_ms[0], "window_high_ms": r.window_ms[1]} for r in results]
    return atomic_write_text(path, _csv(PARETO_COLUMNS, rows))


def write_artifacts(extraction: Extraction, searches: Sequence[BudgetSearch], results: Sequence[BudgetResult]) -> tuple[Path, Path, Path]:
    """``evaluated.csv``, ``pareto.csv`` and ``pareto.png`` in ``RUN/extract/``."""
    directory = extraction.directory
    rows = [
        {"budget_ms": s.budget_ms, **{k: v for k, v in asdict(e).items() if k != "heldout_top1"}, "heldout_int8_top1": e.heldout_top1}
        for s in searches for e in s.evaluated
    ]
    evaluated_csv = atomic_write_text(directory / "evaluated.csv", _csv(EVALUATED_COLUMNS, rows))
    unique = {row["subnet"]: (row["predicted_int8_ms"], row["heldout_int8_top1"]) for row in rows}
    for r, s in zip(results, searches):
        r.pareto_optimal = _pareto_optimal((s.best.predicted_int8_ms, s.best.heldout_top1), list(unique.values()))
    pareto_csv = write_pareto_csv(directory / "pareto.csv", results)
    pareto_png = write_pareto_png(
        directory / "pareto.png",
        [Point(ms, top1) for ms, top1 in unique.values()],
        [Point(r.predicted_int8_ms, r.heldout_int8_top1) for r in results],
        [r.budget_ms for r in results],
        f"{extraction.space.encoding}: held-out {extraction.fitness.precision} top-1 vs predicted INT8 latency",
    )
    return evaluated_csv, pareto_csv, pareto_png


# ---- verification on the device ------------------------------------------------------------------


def verify_results(
    extraction: Extraction, results: Sequence[BudgetResult], device: str, threads: int, tables: str | Path | None,
    show_progress: bool = True,
) -> tuple[str, int]:
    """Export every winner, time its FP32 and INT8 models on the device (all interleaved in one
    measurement), measure the INT8 model's ONNX Runtime test top-1, and give every winner measured
    over budget its fallback chain. Fills ``results`` in place; returns the latency scale used and
    the number of winners verified by this call.

    Runs under ``RUN/extract/verify.lock``, so processes extracting from one run verify one after
    the other (never timing each other's load), and each winner once: a winner verified before (by
    another process or an earlier call, for the same supernet and device) takes its recorded figures.
    """
    directory = extraction.directory

    def waiting() -> None:
        if show_progress:
            print(f"spaceevo: another process is verifying winners in {directory}; waiting to reuse its figures",
                  file=sys.stderr)

    with exclusive_lock(directory / VERIFY_LOCK, waiting):
        record = VerifiedRecord.load(directory / VERIFIED_FILE, _verification_key(extraction, device, threads, tables))
        pending = [(r, f"budget_{r.budget_ms:g}ms") for r in results]
        scale, verified_here = "", 0
        for attempt in range(MAX_FALLBACKS + 1):
            scale, measured = _verify(extraction, pending, device, threads, tables, show_progress, record)
            verified_here += measured
            over = [(r, stem) for r, stem in pending if r.over_budget]
            pending = []
            for r, stem in over:
                fallback = _fallback(extraction, r) if attempt < MAX_FALLBACKS else None
                r.note = (
                    f"measured INT8 latency {r.measured_int8_ms:.4g} ms is over the budget {r.budget_ms:g} ms beyond "
                    f"the measurement noise (spread {r.measured_int8_spread:.1%}); "
                    + ("next feasible candidate: see fallback" if fallback else "no evaluated subnet with a lower predicted latency is left")
                )
                if fallback is not None:
                    r.fallback = fallback
                    pending.append((fallback, f"{stem}_fallback"))
            if not pending:
                break
    return scale, verified_here


def _verification_key(extraction: Extraction, device: str, threads: int, tables: str | Path | None) -> dict[str, Any]:
    """What a verification's figures depend on: the supernet (run, epoch, phase, data), the device
    fingerprint and the latency table folder (the scale of the measured figures)."""
    from spaceevo.latency.fingerprint import device_fingerprint
    from spaceevo.latency.table import default_tables

    key = {k: v for k, v in extraction.fitness.key().items() if k not in ("kind", "heldout_images")}
    key["device"] = device_fingerprint(device, threads).slug
    key["tables"] = str(Path(tables or default_tables()).resolve())
    return key


VERIFIED_FIELDS = (
    "measured_int8_ms", "measured_fp32_ms", "measured_int8_spread", "test_ort_int8_top1", "onnx_int8", "onnx_fp32",
)


@dataclass
class VerifiedRecord:
    """``verified.json``: the figures of every winner verified in a run's extract folder, keyed by
    its file stem, its subnet and :func:`_verification_key`. A cache of what verification
    measured: an unreadable file is measured again, not an error."""

    path: Path
    key: dict[str, Any]
    entries: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> VerifiedRecord:
        try:
            entries = json.loads(path.read_text())["entries"]
            if not isinstance(entries, list):
                raise TypeError("entries is not a list")
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"spaceevo: ignoring unreadable {path} ({error}); its winners are verified again", file=sys.stderr)
            entries = []
        return cls(path, key, [e for e in entries if isinstance(e, dict)])

    def find(self, stem: str, subnet: str) -> dict[str, Any] | None:
        for entry in self.entries:
            if entry.get("stem") == stem and entry.get("subnet") == subnet and entry.get("key") == self.key:
                if all(entry.get(k) is not None for k in VERIFIED_FIELDS) and all(
                    Path(entry[k]).is_file() for k in ("onnx_int8", "onnx_fp32")
                ):
                    return entry
        return None

    def add(self, stem: str, result: BudgetResult, scale: str) -> None:
        self.entries = [e for e in self.entries if e.get("stem") != stem]
        self.entries.append(
            {"stem": stem, "subnet": result.subnet, "key": self.key, "scale": scale,
             **{k: getattr(result, k) for k in VERIFIED_FIELDS}}
        )

    def save(self) -> None:
        atomic_write_json(self.path, {"entries": self.entries})


def _fallback(extraction: Extraction, over: BudgetResult) -> BudgetResult | None:
    """The best evaluated subnet (any search of the study) with a lower predicted latency than ``over``."""
    cheaper = [(top1, -ms, s) for s, (top1, ms) in all_evaluated(extraction.study).items() if ms < over.predicted_int8_ms]
    if not cheaper:
        return None
    top1, neg_ms, subnet = max(cheaper)
    return BudgetResult(
        budget_ms=over.budget_ms, subnet=subnet, predicted_int8_ms=round(-neg_ms, 4), heldout_int8_top1=round(top1, 2),
        window_ms=over.window_ms, evaluated=0,
    )


def _verify(
    extraction: Extraction, pending: Sequence[tuple[BudgetResult, str]], device: str, threads: int,
    tables: str | Path | None, show_progress: bool, record: VerifiedRecord,
) -> tuple[str, int]:
    """Verify the winners ``record`` has no figures for (interleaved), take the others' from it;
    returns the latency scale and how many were verified here."""
    import onnx

    from spaceevo.deploy.evaluate import export_subnet, ort_top1
    from spaceevo.latency.api import measure_onnx

    scale = ""
    todo: list[tuple[BudgetResult, str]] = []
    for result, stem in pending:
        entry = record.find(stem, result.subnet)
        if entry is None:
            todo.append((result, stem))
            continue
        for key in VERIFIED_FIELDS:
            setattr(result, key, entry[key])
        scale = entry.get("scale", scale)
    if todo:
        run = extraction.run
        test = extraction.fitness.datasets.test
        bar = tqdm(total=2 * len(todo) + 1, desc="verify", unit="step", file=sys.stderr, disable=not show_progress, leave=False)
        models: list[bytes] = []
        try:
            for result, stem in todo:
                bar.set_postfix_str(f"export {result.budget_ms:g} ms", refresh=True)
                report = export_subnet(run.run.path, result.subnet, extraction.directory / stem, device=device, threads=threads, show_progress=False)
                result.onnx_fp32, result.onnx_int8 = report.onnx_fp32, report.onnx_int8
                int8 = Path(report.onnx_int8).read_bytes()
                models += [Path(report.onnx_fp32).read_bytes(), int8]
                bar.update(1)
                bar.set_postfix_str(f"test top-1 {result.budget_ms:g} ms", refresh=True)
                resolution = run.space.subnet(result.subnet).resolution
                result.test_ort_int8_top1 = round(ort_top1(onnx.load_from_string(int8), test, resolution, threads), 2)
                bar.update(1)
            bar.set_postfix_str("latency", refresh=True)
            stats, scale = measure_onnx(models, device, threads, tables)
            bar.update(1)
        finally:
            bar.close()
        for index, (result, stem) in enumerate(todo):
            fp32, int8 = stats[2 * index], stats[2 * index + 1]
            result.measured_fp32_ms, result.measured_int8_ms = round(fp32.ms, 4), round(int8.ms, 4)
            result.measured_int8_spread = round(int8.spread, 4)
            record.add(stem, result, scale)
        record.save()
    for result, _ in pending:
        spread = result.measured_int8_spread or 0.0
        result.over_budget = result.measured_int8_ms > result.budget_ms * (1 + max(MIN_NOISE, 2 * spread))
    return scale, len(todo)
