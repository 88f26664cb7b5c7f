"""``spaceevo run``: the whole method in one command, resumable at every step.

Every argument is checked before the first step (hyperspace YAML, data set, budgets, a writable run
directory), so a mistake never surfaces after minutes of work. Then:

0. this device's latency table for the hyperspace (:func:`spaceevo.latency.api.build_table`; a
   complete table is only loaded) and the latency budgets: the user's, checked against the
   hyperspace's latency range, or (``auto``) N budgets spread over it
   (:func:`spaceevo.search.budgets.hyperspace_range`), printed and written to ``RUN/budgets.json``;
1. space search (:func:`spaceevo.search.pipeline.search_space`): block LUTs, then aging evolution by
   Q-T score, in ``RUN/search/``;
2. quantized-for-all supernet training of the best space (:func:`spaceevo.train.loop.train_supernet`)
   in ``RUN/supernet/``;
3. subnet extraction: the accuracy/latency front in one search, every budget answered from it, with
   export and verification on the device (:func:`spaceevo.extraction.api.extract_subnets`) in ``RUN/supernet/extract/``;
4. ``RUN/report.json`` and a short report: per budget the subnet, predicted and measured INT8 latency,
   held-out and test top-1, the ONNX files; the Pareto PNG.

Each step skips what is already complete, so an interrupted run continues where it stopped when the
same command is given again (automatic budgets are a function of the latency table: the same again).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaceevo.io import atomic_write_json, writable_folder
from spaceevo.search.budgets import AUTO, BudgetChoice, LatencyBudgets, check_budgets, check_count

PRESETS = ("smoke", "default")
BUDGETS_FILE = "budgets.json"


@dataclass(frozen=True)
class PipelineReport:
    """What ``spaceevo run`` produced."""

    run_dir: Path
    budgets: BudgetChoice
    best_space: str
    qt_score: float
    heldout_top1_max: float | None
    extraction: dict[str, Any]
    report_path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": str(self.run_dir),
            "best_space": self.best_space,
            "qt_score": self.qt_score,
            "supernet_heldout_top1_max": self.heldout_top1_max,
            **self.extraction,
            "latency_budgets": self.budgets.to_dict(),
            "report": str(self.report_path),
        }


def run_pipeline(
    run_dir: str | Path,
    latency_budgets_ms: LatencyBudgets = AUTO,
    *,
    num_budgets: int | None = None,
    hyperspace: str = "tiny",
    data: str = "embedded",
    preset: str = "default",
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    tables: str | Path | None = None,
    finetune_epochs: int = 0,
    show_progress: bool = True,
) -> PipelineReport:
    """Search the space, train its supernet, extract and verify one INT8 subnet per budget
    (``auto``: ``num_budgets``, default 3, spread over this device's latency range), each
    fine-tuned for ``finetune_epochs`` FP32 epochs and one QAT epoch when that is > 0."""
    from spaceevo.errors import UsageError
    from spaceevo.latency import api as latency_api
    from spaceevo.search.budgets import choose_budgets, hyperspace_range
    from spaceevo.extraction.api import extract_subnets
    from spaceevo.extraction.finetune import check_finetune_epochs
    from spaceevo.search.pipeline import search_space
    from spaceevo.space import load_hyperspace
    from spaceevo.train.data import DataSpec
    from spaceevo.train.loop import train_supernet

    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; allowed: {', '.join(PRESETS)}")
    requested = AUTO if latency_budgets_ms == AUTO else check_budgets(latency_budgets_ms)
    count = check_count(num_budgets, requested)
    check_finetune_epochs(finetune_epochs)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"--threads must be an integer >= 1, got {threads!r}")
    hyper = load_hyperspace(hyperspace)
    DataSpec.parse(data).check()
    run = writable_folder(run_dir, "--run")

    def step(text: str) -> None:
        if show_progress:
            print(f"spaceevo run: {text}", file=sys.stderr)

    step("0/3 latency table and budgets")
    latency_api.build_table(hyper, device, threads, tables, show_progress=show_progress)  # loads a complete table at once
    predictor = latency_api.load_predictor(hyper, device, threads, tables)
    latency_range = hyperspace_range(hyper, predictor.predict_ms, seed=seed)
    too_small = [] if requested == AUTO else [b for b in requested if b < latency_range.smallest_ms]
    if too_small:
        raise UsageError(
            f"--latency-budget {', '.join(f'{b:g}' for b in too_small)} ms is below the smallest predicted INT8 "
            f"latency of {hyper.name} on this device ({latency_range.smallest_ms:.4g} ms, the smallest subnet of "
            f"its sampled candidate spaces); give budgets above {latency_range.low_ms:.4g} ms, or 'auto'"
        )
    choice = choose_budgets(requested, count, latency_range, show_progress)
    atomic_write_json(run / BUDGETS_FILE, choice.to_dict())

    step("1/3 space search")
    searched = search_space(
        run, hyper, data=data, preset=preset, seed=seed, device=device, tables=tables, show_progress=show_progress
    )
    assert searched is not None  # one shard: the search always runs
    step(f"2/3 supernet training of {searched.best_space}")
    trained = train_supernet(
        searched.best_space, run / "supernet", data=data, preset=preset, seed=seed, resume=True, progress=show_progress
    )
    step(f"3/3 extraction at {', '.join(f'{b:g}' for b in choice.budgets_ms)} ms")
    extracted = extract_subnets(
        run / "supernet", list(choice.budgets_ms), preset=preset, seed=seed, verify=True, device=device,
        threads=threads, tables=tables, finetune=finetune_epochs, show_progress=show_progress,
    )
    report = PipelineReport(
        run_dir=run,
        budgets=choice,
        best_space=searched.best_space,
        qt_score=searched.qt_score,
        heldout_top1_max=trained.top1_max,
        extraction=extracted.to_dict(),
        report_path=run / "report.json",
    )
    atomic_write_json(report.report_path, report.to_dict())
    return report


def report_rows(report: PipelineReport) -> list[tuple[str, object]]:
    """The human-readable summary: one line per budget, then the artifacts."""
    rows: list[tuple[str, object]] = [
        ("latency budgets", report.budgets.describe()),
        ("best space", f"{report.best_space} (Q-T {report.qt_score:.4g})"),
        ("supernet held-out top-1 (max)", report.heldout_top1_max),
    ]
    for result in report.extraction["results"]:
        measured = result.get("measured_int8_ms")
        rows.append((
            f"budget {result['budget_ms']:g} ms",
            f"predicted {result['predicted_int8_ms']:.3f} ms, measured "
            f"{'-' if measured is None else f'{measured:.3f}'} ms, held-out {result['heldout_int8_top1']:.2f} %, "
            f"test (ORT INT8) {result.get('test_ort_int8_top1')} %, "
            f"test (device INT8) {result.get('test_device_int8_top1')} %, {result.get('onnx_int8')}"
            + (f"  [{result['note']}]" if result.get("note") else ""),
        ))
        tuned = _deployed(result).get("finetuned")
        if tuned:
            rows.append((f"  fine-tuned ({tuned['epochs']}+{tuned['qat_epochs']} epochs)",
                         f"held-out {tuned['heldout_int8_top1']:.2f} %, test (ORT INT8) {tuned['test_ort_int8_top1']} %, "
                         f"{tuned['onnx_int8']}"))
    rows += [("pareto", report.extraction["pareto_png"]), ("report", str(report.report_path))]
    return rows


def _deployed(result: dict[str, Any]) -> dict[str, Any]:
    """The deployed answer of one budget's result dict: the last of its fallback chain."""
    while result.get("fallback"):
        result = result["fallback"]
    return result
