"""Python API behind ``spaceevo score`` and ``spaceevo search --block-lut``.

``score_spaces`` gives the Q-T scores of named candidate spaces; ``search_block_lut`` runs (or resumes,
or joins) the aging evolution over a hyperspace's candidate spaces on an existing block LUT folder and
writes ``RUN/search/result.json`` and ``RUN/search/best_space.yaml``.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import optuna
import yaml

from spaceevo import __version__
from spaceevo.errors import SpaceEvoError, UsageError
from spaceevo.interrupts import recorded_interrupts
from spaceevo.io import atomic_write_json, atomic_write_text, check_writable
from spaceevo.search.evolution import (
    STUDY_NAME,
    EvolutionResult,
    evolution_sizes,
    open_search_study,
    open_storage,
    run_evolution,
    storage_url,
)
from spaceevo.search.lut import BlockLUT, load_block_lut
from spaceevo.search.qt_score import FixedStageMs, QTScorer, SpaceScore, auto_constraints, check_constraints
from spaceevo.space import CandidateSpace, Hyperspace, load_hyperspace

Constraints = Sequence[float] | Literal["auto"]


def parse_latency_constraints(texts: Sequence[str]) -> list[float] | Literal["auto"]:
    """``["auto"]`` or positive numbers of ms, as given on the command line."""
    if list(texts) == ["auto"]:
        return "auto"
    try:
        values = [float(t) for t in texts]
    except ValueError:
        raise UsageError(f"--latency-constraints takes 'auto' or numbers of ms, got {' '.join(texts)}") from None
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise UsageError(f"latency constraints must be positive numbers of ms, got {' '.join(texts)}")
    return values


def parse_fixed_stage_ms(texts: Sequence[str]) -> FixedStageMs:
    """One number of ms for every resolution, or ``RESOLUTION=MS`` pairs (``160=1.2 224=2.0``)."""
    value: FixedStageMs | None = None
    if len(texts) == 1 and "=" not in texts[0]:
        try:
            value = float(texts[0])
        except ValueError:
            pass
    else:
        try:
            value = {int(r): float(ms) for r, ms in (t.split("=", 1) for t in texts)}
        except ValueError:
            pass
    if value is not None:
        if min(value.values() if isinstance(value, dict) else [value]) < 0:
            raise UsageError(f"--fixed-stage-ms must not be negative, got {' '.join(texts)}")
        return value
    raise UsageError(f"--fixed-stage-ms takes one number of ms or RESOLUTION=MS pairs, got {' '.join(texts)}")


def _hyperspace(hyperspace: str | Path | Hyperspace) -> Hyperspace:
    return hyperspace if isinstance(hyperspace, Hyperspace) else load_hyperspace(hyperspace)


def _constraints(
    lut: BlockLUT,
    latency_constraints_ms: Constraints,
    fixed_stage_ms: FixedStageMs,
    seed: int,
    what: str,
    among: Sequence[CandidateSpace] | None = None,
) -> list[float]:
    """The constraints given, checked, or with 'auto' spread over the latencies of the spaces
    ``among`` (default: a sample of the hyperspace's spaces)."""
    if latency_constraints_ms == "auto":
        return auto_constraints(lut, fixed_stage_ms, seed=seed, among=among)
    constraints = [float(c) for c in latency_constraints_ms]
    if not constraints:
        raise UsageError("give at least one latency constraint (ms) or 'auto'")
    check_constraints(lut, constraints, fixed_stage_ms, what)
    return constraints


def score_spaces(
    block_lut_dir: str | Path,
    hyperspace: str | Path | Hyperspace,
    latency_constraints_ms: Constraints,
    spaces: Sequence[str | CandidateSpace],
    fixed_stage_ms: FixedStageMs = 0.0,
    samples: int = 100_000,
    seed: int = 0,
) -> list[SpaceScore]:
    """Q-T scores of the given spaces, in order (only their LUT files need to exist; 'auto'
    constraints are spread over these spaces' latencies). Raises :class:`UsageError` if a
    constraint is below the smallest latency any of them can reach."""
    hyper = _hyperspace(hyperspace)
    if not spaces:
        raise UsageError("give at least one candidate space to score")
    candidates = [s if isinstance(s, CandidateSpace) else hyper.candidate_space(s) for s in spaces]
    lut = load_block_lut(block_lut_dir, hyper, candidates)
    constraints = _constraints(lut, latency_constraints_ms, fixed_stage_ms, seed, "any of the given spaces", candidates)
    scorer = QTScorer(lut, constraints, fixed_stage_ms, samples=samples)
    return [scorer.score(space, seed) for space in candidates]


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a space search: the best space, the top spaces and where the artifacts are."""

    best_space: str
    qt_score: float
    latency_constraints_ms: list[float]
    top: list[SpaceScore]
    evaluated: int
    evaluated_here: int
    storage: str
    result_path: Path
    best_space_path: Path

    def summary(self) -> dict:
        return {
            "best_space": self.best_space,
            "qt_score": self.qt_score,
            "latency_constraints_ms": self.latency_constraints_ms,
            "evaluated": self.evaluated,
            "evaluated_here": self.evaluated_here,
            "storage": self.storage,
            "result": str(self.result_path),
            "best_space_yaml": str(self.best_space_path),
        }


def lut_digest(lut: BlockLUT) -> str:
    """Content hash of the loaded LUT (loss and latency arrays): a resumed search must use the same."""
    digest = hashlib.sha256()
    for key in sorted(lut.tables):
        table = lut.tables[key]
        digest.update(repr(key).encode())
        for array in (table.nsr_loss, table.latency_ms, table.counts):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def _fixed_json(fixed_stage_ms: FixedStageMs) -> float | dict[str, float]:
    if isinstance(fixed_stage_ms, (int, float)):
        return float(fixed_stage_ms)
    return {str(r): float(ms) for r, ms in sorted(fixed_stage_ms.items())}


def search_block_lut(
    block_lut_dir: str | Path,
    hyperspace: str | Path | Hyperspace,
    latency_constraints_ms: Constraints,
    run_dir: str | Path,
    storage: str | None = None,
    preset: str = "default",
    seed: int = 0,
    fixed_stage_ms: FixedStageMs = 0.0,
    samples: int = 100_000,
    workers: int = 1,
    progress: bool = True,
    top: int = 10,
) -> SearchResult:
    """Aging evolution over the hyperspace's candidate spaces, scored on an existing block LUT folder.

    The study lives in ``storage`` (default: SQLite ``run_dir/search/study.db``); running the same
    call again resumes it, and ``workers`` > 1 starts that many processes on it (other machines can
    join with the same storage URL and settings). Writes ``run_dir/search/result.json`` and
    ``run_dir/search/best_space.yaml`` atomically; an unwritable ``run_dir`` raises
    :class:`~spaceevo.errors.ArtifactError` before any work."""
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    hyper = _hyperspace(hyperspace)
    sizes = evolution_sizes(preset, hyper)
    check_writable(Path(run_dir) / "search", "--run")
    url = storage_url(storage, run_dir)
    opened = open_storage(url, heartbeat=True)  # an unreachable storage fails before the LUT is read
    lut = load_block_lut(block_lut_dir, hyper)
    constraints = _constraints(lut, latency_constraints_ms, fixed_stage_ms, seed, f"any space of '{hyper.name}'")
    if latency_constraints_ms == "auto" and progress:
        print(f"spaceevo: latency constraints (auto): {', '.join(f'{c:g}' for c in constraints)} ms", file=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one progress bar, not a line (and traceback) per trial
    config = _search_config(hyper, lut, constraints, fixed_stage_ms, samples, seed)
    study = open_search_study(url, config, hyper, sizes, seed, storage=opened)  # a foreign study is refused before any helper starts
    helpers = _start_workers(workers - 1, block_lut_dir, hyper.source or hyper.name, constraints, url, preset, seed, fixed_stage_ms, samples)
    try:
        result = _evolve(study, lut, constraints, seed, fixed_stage_ms, samples, progress)
    except BaseException:  # interrupted or failed: the helpers stop too (their trials fail, not left RUNNING)
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            helper.join()
        raise
    for helper in helpers:
        helper.join()
    failed = [h.exitcode for h in helpers if h.exitcode != 0]
    if failed:
        raise SpaceEvoError(f"{len(failed)} search worker process(es) failed (exit codes {failed}); run the same command again to resume")
    ranked = sorted(result.scores, key=lambda s: -s.qt_score)
    best = ranked[0]
    search_dir = Path(run_dir) / "search"
    result_path = atomic_write_json(
        search_dir / "result.json",
        {
            "best_space": best.space,
            "qt_score": best.qt_score,
            "latency_constraints_ms": constraints,
            "top": [s.to_dict() for s in ranked[:top]],
            "evaluated": len(result.scores),
            "preset": {"name": preset, **sizes.__dict__},
            "block_lut": str(Path(block_lut_dir).resolve()),
            "storage": url,
            "study": STUDY_NAME,
            **{k: v for k, v in config.items() if k != "latency_constraints_ms"},
            "versions": {"spaceevo": __version__, "optuna": optuna.__version__, "numpy": np.__version__},
        },
    )
    best_space_path = atomic_write_text(search_dir / "best_space.yaml", best_space_yaml(hyper.candidate_space(best.space), best))
    return SearchResult(
        best.space, best.qt_score, constraints, ranked[:top], len(result.scores), result.evaluated_here,
        url, result_path, best_space_path,
    )


def best_space_yaml(space: CandidateSpace, score: SpaceScore) -> str:
    """The best space as YAML: its encoding (``load_space`` rebuilds it) and what each stage allows."""
    stages = [
        {
            "name": s.name,
            "searchable": s.searchable,
            "block_type": s.block_type.name,
            "widths": list(s.widths),
            "depths": list(s.depths),
            "kernels": list(s.kernels),
            "expand_ratios": [float(e) for e in s.expand_ratios],
            "stride": s.stride,
        }
        for s in space.stages
    ]
    data = {
        "space": space.encoding,
        "hyperspace": space.hyperspace.name,
        "hyperspace_digest": space.hyperspace.digest,
        "qt_score": score.qt_score,
        "stages": stages,
    }
    header = f"# Best candidate space of the search; rebuild it with spaceevo.space.load_space('{space.encoding}')\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def _start_workers(
    count: int,
    block_lut_dir: str | Path,
    hyperspace: str,
    constraints: list[float],
    url: str,
    preset: str,
    seed: int,
    fixed_stage_ms: FixedStageMs,
    samples: int,
) -> list[multiprocessing.process.BaseProcess]:
    context = multiprocessing.get_context("spawn")
    helpers = []
    for _ in range(count):
        helper = context.Process(
            target=_worker_main,
            args=(str(block_lut_dir), hyperspace, constraints, url, preset, seed, fixed_stage_ms, samples),
        )
        helper.start()
        helpers.append(helper)
    return helpers


def _worker_main(
    block_lut_dir: str,
    hyperspace: str,
    constraints: list[float],
    url: str,
    preset: str,
    seed: int,
    fixed_stage_ms: FixedStageMs,
    samples: int,
) -> None:
    """A helper process of ``search_block_lut``: the same loop on the same study, without a bar. It
    ends with the process that started it, also when that one is killed (``kill -9``), and quietly on
    Ctrl-C (the starting process reports it)."""
    _exit_with_parent()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with recorded_interrupts():
            hyper = load_hyperspace(hyperspace)
            lut = load_block_lut(block_lut_dir, hyper)
            config = _search_config(hyper, lut, constraints, fixed_stage_ms, samples, seed)
            study = open_search_study(url, config, hyper, evolution_sizes(preset, hyper), seed)
            _evolve(study, lut, constraints, seed, fixed_stage_ms, samples, progress=False)
    except KeyboardInterrupt:
        sys.exit(130)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this process as soon as its parent is gone (a thread polls the parent's id): an orphaned
    helper would otherwise search on alone. Its running trial is failed by the heartbeat check of
    the next worker on the study (:mod:`spaceevo.storage`)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _search_config(
    hyper: Hyperspace, lut: BlockLUT, constraints: list[float], fixed_stage_ms: FixedStageMs, samples: int, seed: int
) -> dict:
    """What a study's trials depend on; a study holding other settings is not resumed."""
    return {
        "hyperspace": hyper.name,
        "hyperspace_digest": hyper.digest,
        "block_lut_digest": lut_digest(lut),
        "latency_constraints_ms": constraints,
        "fixed_stage_ms": _fixed_json(fixed_stage_ms),
        "samples": samples,
        "seed": seed,
    }


def _evolve(
    study: optuna.Study,
    lut: BlockLUT,
    constraints: list[float],
    seed: int,
    fixed_stage_ms: FixedStageMs,
    samples: int,
    progress: bool,
) -> EvolutionResult:
    scorer = QTScorer(lut, constraints, fixed_stage_ms, samples=samples)
    return run_evolution(study, lambda space: scorer.score(space, seed), progress=progress)
