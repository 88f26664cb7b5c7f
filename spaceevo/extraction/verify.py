"""Verification of the answers on the device: export, interleaved end-to-end timing, ONNX Runtime
test top-1, and a fallback for an answer measured over its budget.

Runs under ``RUN/extract/verify.lock``, so processes extracting from one run verify one after the
other (never timing each other's load) and each answer once: one verified before (by another
process or an earlier call, for the same supernet and device) takes its recorded figures from
``verified.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tqdm import tqdm

from spaceevo.extraction.results import BudgetResult
from spaceevo.io import atomic_write_bytes, atomic_write_json, exclusive_lock

if TYPE_CHECKING:
    from spaceevo.extraction.api import Extraction

MIN_NOISE = 0.05
"""A measurement is over budget above budget × (1 + max(MIN_NOISE, 2 × its spread))."""
MAX_FALLBACKS = 3
"""Next feasible candidates tried, one after the other, for an answer measured over budget."""
VERIFIED_FILE = "verified.json"
VERIFY_LOCK = "verify.lock"
VERIFIED_FIELDS = (
    "measured_int8_ms", "measured_fp32_ms", "measured_int8_spread", "test_ort_int8_top1", "test_device_int8_top1",
    "onnx_int8", "onnx_fp32",
)


def verify_results(
    extraction: Extraction, results: Sequence[BudgetResult], device: str, threads: int, tables: str | Path | None,
    show_progress: bool = True,
) -> tuple[str, int]:
    """Export every answer, time its FP32 and INT8 models on the device (all interleaved in one
    measurement), measure the INT8 model's test top-1 in ONNX Runtime and the device's engine, and give every answer measured
    over budget its fallback chain. Fills ``results`` in place; returns the latency scale used and
    the number of answers verified by this call."""
    directory = extraction.directory

    def waiting() -> None:
        if show_progress:
            print(f"spaceevo: another process is verifying subnets in {directory}; waiting to reuse its figures",
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

    key = {k: v for k, v in extraction.fitness.key().items() if k != "heldout_images"}
    key["device"] = device_fingerprint(device, threads).slug
    key["tables"] = str(Path(tables or default_tables()).resolve())
    return key


@dataclass
class VerifiedRecord:
    """``verified.json``: the figures of every answer verified in a run's extract folder, keyed by
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
            print(f"spaceevo: ignoring unreadable {path} ({error}); its subnets are verified again", file=sys.stderr)
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
    """The best evaluated subnet with a lower predicted latency than ``over``, compared at the study's
    precision: ``over.predicted_int8_ms`` is rounded, and a rounded-up figure made ``over`` its own
    fallback (verified again and again under ``_fallback`` stems)."""
    points = {e.subnet: e for e in extraction.evaluated()}
    limit = points[over.subnet].predicted_int8_ms if over.subnet in points else over.predicted_int8_ms
    cheaper = [e for s, e in points.items() if e.predicted_int8_ms < limit and s != over.subnet]
    if not cheaper:
        return None
    best = max(cheaper, key=lambda e: (e.heldout_top1, -e.predicted_int8_ms, -e.trial))
    return BudgetResult(
        budget_ms=over.budget_ms, subnet=best.subnet, predicted_int8_ms=round(best.predicted_int8_ms, 4),
        heldout_int8_top1=round(best.heldout_top1, 2), evaluated=len(cheaper),
    )


def _share(source: BudgetResult, result: BudgetResult, output: Path) -> None:
    """Give ``result`` (another budget answered by the same subnet) copies of ``source``'s exported
    files under its own name and ``source``'s test top-1: the same subnet is exported and measured once."""
    from spaceevo.deploy.evaluate import output_paths

    fp32_path, int8_path = output_paths(output)
    for source_path, path in ((source.onnx_fp32, fp32_path), (source.onnx_int8, int8_path)):
        atomic_write_bytes(path, Path(source_path).read_bytes())
    result.onnx_fp32, result.onnx_int8 = str(fp32_path), str(int8_path)
    result.test_ort_int8_top1 = source.test_ort_int8_top1
    result.test_device_int8_top1 = source.test_device_int8_top1


def _verify(
    extraction: Extraction, pending: Sequence[tuple[BudgetResult, str]], device: str, threads: int,
    tables: str | Path | None, show_progress: bool, record: VerifiedRecord,
) -> tuple[str, int]:
    """Verify the answers ``record`` has no figures for (interleaved), take the others' from it;
    returns the latency scale and how many were verified here."""
    import onnx

    from spaceevo.deploy.evaluate import engine_top1, export_subnet
    from spaceevo.latency.engines import ORT_DEVICE
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
        first: dict[str, BudgetResult] = {}  # one export, test top-1 and timing per distinct subnet
        try:
            for result, stem in todo:
                if result.subnet in first:
                    _share(first[result.subnet], result, extraction.directory / stem)
                    bar.update(2)
                    continue
                first[result.subnet] = result
                bar.set_postfix_str(f"export {result.budget_ms:g} ms", refresh=True)
                report = export_subnet(run.run.path, result.subnet, extraction.directory / stem, device=device, threads=threads, show_progress=False)
                result.onnx_fp32, result.onnx_int8 = report.onnx_fp32, report.onnx_int8
                device_int8 = Path(report.model_int8).read_bytes()  # the ONNX, or the engine's own model
                models += [Path(report.model_fp32).read_bytes(), device_int8]
                bar.update(1)
                bar.set_postfix_str(f"test top-1 {result.budget_ms:g} ms", refresh=True)
                resolution = run.space.subnet(result.subnet).resolution
                int8_model = onnx.load_from_string(Path(report.onnx_int8).read_bytes())
                result.test_ort_int8_top1 = round(engine_top1(int8_model, test, resolution, threads), 2)
                result.test_device_int8_top1 = result.test_ort_int8_top1 if device == ORT_DEVICE else round(
                    engine_top1(device_int8, test, resolution, threads, device=device), 2
                )
                bar.update(1)
            bar.set_postfix_str("latency", refresh=True)
            stats, scale = measure_onnx(models, device, threads, tables)
            bar.update(1)
        finally:
            bar.close()
        measured = {subnet: (stats[2 * i], stats[2 * i + 1]) for i, subnet in enumerate(first)}
        for result, stem in todo:
            fp32, int8 = measured[result.subnet]
            result.measured_fp32_ms, result.measured_int8_ms = round(fp32.ms, 4), round(int8.ms, 4)
            result.measured_int8_spread = round(int8.spread, 4)
            record.add(stem, result, scale)
        record.save()
    for result, _ in pending:
        spread = result.measured_int8_spread or 0.0
        result.over_budget = result.measured_int8_ms > result.budget_ms * (1 + max(MIN_NOISE, 2 * spread))
    return scale, len(todo)
