"""``spaceevo search --device cpu``: the whole space search from nothing, resumable at every step.

0. this device's latency table for the hyperspace (:func:`spaceevo.latency.api.build_table`; a
   complete table is only loaded);
1. block LUTs (:func:`spaceevo.search.lut_build.build_block_luts`: teacher, block-wise distillation,
   sampled sub-stages with NSR loss and INT8 latency from this device's latency table);
2. aging evolution over candidate spaces by Q-T score (:func:`spaceevo.search.api.search_block_lut`),
   with the fixed-stage latency (stem, fixed stages, head) per resolution from the same table;
3. ``RUN/search/subnets.png``: sampled subnets (INT8 latency vs summed NSR loss) of the best space,
   of the MobileNetV3 space of the hyperspace (MBv3+SE blocks everywhere) and of the best
   homogeneous space, with the latency constraints marked.

With ``shard=(i, n)`` only this shard's distillation jobs and LUT files are built; the evolution runs
in the call that finds every LUT file present.
"""

from __future__ import annotations

import json
from pathlib import Path

from spaceevo.errors import ArtifactError
from spaceevo.plot import PALETTE, Figure, Series, write_png
from spaceevo.search.api import Constraints, SearchResult, search_block_lut
from spaceevo.search.lut import load_block_lut
from spaceevo.search.lut_build import LUT_RECORD, build_block_luts
from spaceevo.search.qt_score import QTScorer, space_rng
from spaceevo.search.teacher import load_teacher
from spaceevo.space import CandidateSpace, Hyperspace, load_hyperspace
from spaceevo.train.checkpoint import require_writable

PLOT_SAMPLES = 1500
MBV3_BLOCK = "mbv3_se"


def fixed_stage_ms_of(run_dir: str | Path) -> dict[int, float]:
    """The fixed-stage latency per resolution recorded with the LUTs of a run directory."""
    path = Path(run_dir) / "search" / LUT_RECORD
    try:
        record = json.loads(path.read_text())
        return {int(r): float(ms) for r, ms in record["fixed_stage_ms"].items()}
    except (OSError, ValueError, KeyError) as error:
        raise ArtifactError(f"{path} is missing or unreadable ({error}); run spaceevo search again to rebuild it") from None


def comparison_spaces(hyperspace: Hyperspace, scorer: QTScorer, best: str, seed: int) -> dict[str, CandidateSpace]:
    """``{label: space}``: the best space, the MobileNetV3 space, the best homogeneous space."""
    homogeneous = hyperspace.homogeneous_spaces()
    scores = {s.encoding: scorer.score(s, seed).qt_score for s in homogeneous}
    best_homogeneous = max(homogeneous, key=lambda s: scores[s.encoding])
    spaces = {f"searched {best}": hyperspace.candidate_space(best)}
    mbv3_digit = hyperspace.block_types[MBV3_BLOCK].digit if MBV3_BLOCK in hyperspace.block_types else None
    mbv3 = [s for s in homogeneous if mbv3_digit is not None and set(s.block_digits) == {mbv3_digit}]
    if mbv3:
        spaces[f"MobileNetV3 {mbv3[0].encoding}"] = mbv3[0]
    if best_homogeneous.encoding == best:
        spaces = {f"searched = best homogeneous {best}": spaces[f"searched {best}"], **{k: v for k, v in spaces.items() if k != f"searched {best}"}}
    else:
        spaces[f"best homogeneous {best_homogeneous.encoding}"] = best_homogeneous
    return spaces


def write_subnet_plot(
    path: Path, hyperspace: Hyperspace, lut_dir: Path, constraints: list[float], fixed: dict[int, float], best: str, seed: int
) -> Path:
    """PNG of sampled subnets (latency, NSR loss) of the comparison spaces."""
    lut = load_block_lut(lut_dir, hyperspace)
    ranking = QTScorer(lut, constraints, fixed)  # the search's own N, so "best homogeneous" agrees with it
    scorer = QTScorer(lut, constraints, fixed, samples=PLOT_SAMPLES)
    series = []
    for index, (label, space) in enumerate(comparison_spaces(hyperspace, ranking, best, seed).items()):
        loss, latency_ms = scorer.sample(space, space_rng(seed, space))
        points = list(zip(latency_ms.tolist(), loss.tolist()))
        series.append(Series(label, points, PALETTE[index % len(PALETTE)], radius=2.0))
    return write_png(
        path,
        Figure(series, "predicted INT8 latency (ms)", "summed NSR loss (lower is better)",
               f"{hyperspace.name}: {PLOT_SAMPLES} sampled subnets per space", vlines=constraints),
    )


def search_space(
    run_dir: str | Path,
    hyperspace: str | Hyperspace = "tiny",
    *,
    data: str = "embedded",
    preset: str = "default",
    latency_constraints_ms: Constraints = "auto",
    storage: str | None = None,
    seed: int = 0,
    teacher_path: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    tables: str | Path | None = None,
    workers: int = 1,
    samples: int = 100_000,
    show_progress: bool = True,
) -> SearchResult | None:
    """Build what is missing (LUTs), then search; None when other shards' LUTs are still missing."""
    from spaceevo.latency.api import build_table

    hyper = load_hyperspace(hyperspace) if isinstance(hyperspace, str) else hyperspace
    require_writable(Path(run_dir) / "search", "--run directory")
    if teacher_path is not None:
        load_teacher(teacher_path, hyper)  # a missing, corrupt or unfitting --teacher fails before the latency table
    lut_preset = "default" if preset == "full" else preset
    build_table(hyper, device, 1, tables, show_progress=show_progress)  # loads a complete table at once
    lut_dir = build_block_luts(
        run_dir, hyper, data, lut_preset, teacher_path, shard, device, seed, show_progress, tables=tables
    )
    if shard[1] > 1:
        try:
            load_block_lut(lut_dir, hyper)
        except ArtifactError:
            return None
    fixed = fixed_stage_ms_of(run_dir)
    result = search_block_lut(
        lut_dir, hyper, latency_constraints_ms, run_dir, storage=storage, preset=preset, seed=seed,
        fixed_stage_ms=fixed, samples=samples, workers=workers, progress=show_progress,
    )
    write_subnet_plot(
        Path(run_dir) / "search" / "subnets.png", hyper, lut_dir, result.latency_constraints_ms, fixed, result.best_space, seed
    )
    return result


__all__ = ["search_space", "fixed_stage_ms_of", "comparison_spaces", "write_subnet_plot"]

