"""Block LUTs of a hyperspace, built from scratch: teacher, block-wise distillation, sampled sub-stages.

Entry point::

    build_block_luts(run_dir, hyperspace="tiny", data="embedded", preset="smoke" | "default",
                     teacher_path=None, shard=(0, 1), device="cpu", seed=0, show_progress=True) -> Path

runs whatever is missing, each step resumable, and returns ``RUN/search/lut/``:

1. the teacher (:mod:`spaceevo.search.teacher`), trained into ``RUN/search/teacher.pt`` unless
   ``teacher_path`` names a teacher checkpoint to use;
2. the block-wise distillation jobs of this shard (:mod:`spaceevo.search.blockkd`) in
   ``RUN/search/blockkd/``;
3. per job and width window, ``lut_samples`` sub-stage configurations (the smallest and the largest
   of the window included), each evaluated at every hyperspace resolution: NSR loss of the
   *quantized* sub-stage on held-out images after BatchNorm recalibration on training images,
   MFLOPs and MParams (:mod:`spaceevo.nn.cost`), and INT8 latency from this device's latency table,
   written as ``RUN/search/lut/stage{i}_{block}_{window}.csv`` in the published format
   (:mod:`spaceevo.search.lut`);
4. ``RUN/search/lut_record.json``: what produced the LUTs (hyperspace digest, device, teacher,
   preset) and the fixed-stage latency per resolution (:func:`fixed_stage_latency_ms`).

``device`` is the latency target (the inference engine, as ``--device``); training runs
on ``torch_device`` (default: CUDA when available, else the CPU). With ``shard=(i, n)`` only jobs
``j % n == i`` and their LUT files are built, so ``n`` processes or machines sharing the run
directory split the work; for several machines train the teacher once first (or pass the same
``teacher_path`` everywhere), since jobs record the teacher they distilled from.

Latency. Inside a whole INT8 network the latency predictor (:mod:`spaceevo.latency.predictor`)
predicts ``scale * sum(segment ms) - per_cut * cuts - per_element * elements at cuts + intercept``
over its block and head segments, with one cut after every block. That sum splits exactly per block,
so a LUT row holds the sub-stage's blocks' share, ``sum(scale * ms - per_cut - per_element *
output elements)``, and :func:`fixed_stage_latency_ms` the rest (fixed stages, head, intercept): a
subnet assembled from LUT rows gets the predictor's whole-network figure. The fixed stages are taken
at their largest choices and the head at the mean over the last searchable stage's widths (its input
width is not known before a subnet is drawn), the only approximation.

Timing (``tiny``, embedded data, 2 cores shared with another run, everything ``nice``-d): see
:data:`LUT_PRESETS`.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from spaceevo.errors import ArtifactError, RunMismatchError, UsageError
from spaceevo.io import atomic_write_json
from spaceevo.latency.api import load_predictor
from spaceevo.latency.predictor import LatencyPredictor
from spaceevo.latency.segments import Segment
from spaceevo.nn.cost import block_cost
from spaceevo.search.blockkd import (
    FeatureCache,
    KDConfig,
    KDJob,
    StageStudent,
    SubStage,
    build_feature_cache,
    file_digest,
    jobs_of_shard,
    kd_config,
    kd_jobs,
    nsr_per_sample,
    train_job,
)
from spaceevo.search.lut import LutRow, lut_filename, write_lut_csv
from spaceevo.search.teacher import TEACHER_FILE, TeacherConfig, load_teacher, teacher_config, train_teacher
from spaceevo.blocks import BlockSpec, conv_output_size
from spaceevo.space import Hyperspace, load_hyperspace
from spaceevo.train.bn import batchnorms
from spaceevo.train.loop import load_space_data
from spaceevo.train.checkpoint import versions
from spaceevo.train.data import DataSpec

LUT_RECORD = "lut_record.json"


@dataclass(frozen=True)
class LutPreset:
    """Teacher and block-KD settings of one preset."""

    teacher: TeacherConfig
    kd: KDConfig


#: ``smoke``: one step per phase and job, two sub-stages per file (31 s for ``tiny``). ``default``
#: (``tiny``): 14.6 min in all, measured with 1 thread, ``nice``-d, on 2 cores shared with another
#: training run: teacher 185 s, teacher features 20 s, 24 jobs 392 s of training, 48 LUT files of
#: 6 sub-stages x 3 resolutions about 280 s.
LUT_PRESETS: dict[str, LutPreset] = {
    name: LutPreset(teacher_config(name), kd_config(name)) for name in ("smoke", "default")
}


# --------------------------------------------------------------------------------------------
# Latency


def block_share_ms(predictor: LatencyPredictor, spec: BlockSpec, first: bool = False) -> float:
    """A block's share of the predicted whole-network INT8 latency (see the module doc).

    ``first``: the block takes the float image (the network's first block), which pays the input
    QuantizeLinear.
    """
    model = predictor.calibration.model
    segment = Segment(in_channels=spec.in_channels, input_size=spec.input_size, first=first, block=spec)
    return model.scale * predictor.segment_ms(segment) - model.per_cut_ms - model.per_element_ms * segment.output_elements


def stage_latency_ms(predictor: LatencyPredictor, specs: Sequence[BlockSpec], first_in_network: bool = False) -> float:
    """INT8 latency share of a sub-stage: the sum of its blocks' shares."""
    return sum(block_share_ms(predictor, spec, first_in_network and i == 0) for i, spec in enumerate(specs))


def fixed_stage_latency_ms(hyperspace: Hyperspace, predictor: LatencyPredictor) -> dict[int, float]:
    """Per resolution, the latency a block LUT does not cover: fixed stages, head and intercept.

    Fixed stages run at their largest choices; the head at the mean over the last searchable stage's
    widths. Added to the sum of one LUT row per stage, it gives the predicted whole-network latency.
    """
    model = predictor.calibration.model
    result = {}
    for resolution in hyperspace.resolutions:
        total, size, channels, first = model.intercept_ms, resolution, hyperspace.in_channels, True
        for stage in hyperspace.stages:
            if stage.searchable:
                size, channels, first = conv_output_size(size, stage.stride), max(stage.widths), False
                continue
            block = stage.fixed_block
            for position in range(max(stage.depths)):
                stride = stage.stride if position == 0 else 1
                width = max(stage.widths)
                spec = block.variant.spec(
                    channels, width, max(block.kernels), max(block.expand_ratios), stride, size, position
                )
                total += block_share_ms(predictor, spec, first)
                size, channels, first = spec.output_size, width, False
        last = hyperspace.stages[-1]
        heads = [
            predictor.segment_ms(
                Segment(in_channels=w, input_size=size, first=False, head=hyperspace.head, num_classes=hyperspace.num_classes)
            )
            for w in last.widths
        ]
        result[resolution] = total + model.scale * statistics.fmean(heads)
    return result


# --------------------------------------------------------------------------------------------
# Evaluating sub-stages


@torch.no_grad()
def evaluate_sub_stage(
    student: StageStudent,
    sub: SubStage,
    resolution: int,
    train_cache: FeatureCache,
    heldout_cache: FeatureCache,
    calibration_images: int,
    device: torch.device,
    batch_size: int = 256,
) -> float:
    """Held-out NSR loss of one sub-stage (quantized if the student is), after BN recalibration.

    BatchNorm statistics are recomputed from ``calibration_images`` cached training images
    (cumulative averages, training mode, no gradients), as :func:`spaceevo.train.bn.recalibrate_bn`
    does for subnets; the student is left in evaluation mode.
    """
    job = student.job
    student.set_active(sub, resolution)
    norms = batchnorms(student)
    momenta = [bn.momentum for bn in norms]
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
        student.train()
        count = min(calibration_images, len(train_cache))
        for start in range(0, count, batch_size):
            inputs, _ = train_cache.pair(job, resolution, slice(start, min(count, start + batch_size)), device)
            student(inputs)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        student.eval()
    total = 0.0
    for start in range(0, len(heldout_cache), batch_size):
        inputs, target = heldout_cache.pair(job, resolution, slice(start, start + batch_size), device)
        total += float(nsr_per_sample(student(inputs), target).sum())
    return total / len(heldout_cache)


def sample_sub_stages(job: KDJob, window: int, count: int, seed: int) -> list[SubStage]:
    """``count`` distinct sub-stages of one width window: the smallest, the largest, then random ones."""
    widths = job.hyperspace.stages[job.stage_index].windows[window]
    rng = random.Random(seed ^ zlib.crc32(f"{job.name}_{window}".encode()))
    found = [job.min_sub_stage(widths), job.max_sub_stage(widths)][:count]
    seen = set(found)
    for _ in range(50 * count):
        if len(found) >= count:
            break
        sub = job.random_sub_stage(rng, widths)
        if sub not in seen:
            seen.add(sub)
            found.append(sub)
    return found


def lut_rows(
    job: KDJob,
    window: int,
    student: StageStudent,
    train_cache: FeatureCache,
    heldout_cache: FeatureCache,
    predictor: LatencyPredictor,
    config: KDConfig,
    device: torch.device,
    show_progress: bool = True,
) -> list[LutRow]:
    """The rows of one LUT file: every sampled sub-stage at every resolution of the hyperspace."""
    subs = sample_sub_stages(job, window, config.lut_samples, config.seed)
    resolutions = job.hyperspace.resolutions
    first_in_network = job.stage_index == 0
    rows = []
    bar = tqdm(
        total=len(subs) * len(resolutions), desc=f"LUT {lut_filename(job.searchable_index, job.block.digit, window)}",
        unit="row", file=sys.stderr, disable=not show_progress, dynamic_ncols=True, leave=False,
    )
    with bar:
        for sub in subs:
            for resolution in resolutions:
                specs = job.resolve(sub, resolution)
                costs = [block_cost(spec) for spec in specs]
                size = job.input_size(resolution)
                rows.append(
                    LutRow(
                        config=sub.config,
                        input_shape=(1, sub.in_channels, size, size),
                        nsr_loss=evaluate_sub_stage(
                            student, sub, resolution, train_cache, heldout_cache, config.calibration_images, device
                        ),
                        mflops=sum(c.mflops for c in costs),
                        mparams=sum(c.mparams for c in costs),
                        latency_ms=stage_latency_ms(predictor, specs, first_in_network),
                    )
                )
                bar.update(1)
    return rows


# --------------------------------------------------------------------------------------------
# Entry point


def _lut_paths(lut_dir: Path, job: KDJob) -> list[Path]:
    windows = job.hyperspace.stages[job.stage_index].windows
    return [lut_dir / lut_filename(job.searchable_index, job.block.digit, w) for w in range(len(windows))]


def _check_lut_record(path: Path, wanted: dict) -> None:
    """Refuse to add to (or return) LUTs that another hyperspace YAML, preset, seed or device
    (its latencies) produced."""
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path} is unreadable ({error}); delete it") from None
    if "budget" in stored:  # records written before the compute preset was named "preset"
        stored.setdefault("preset", stored.pop("budget"))
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    if differing:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted[k]!r}" for k in differing)
        raise RunMismatchError(
            f"{path.parent} holds block LUTs of another {', '.join(differing)} ({details}); use another run directory"
        )


def build_block_luts(
    run_dir: str | Path,
    hyperspace: str | Hyperspace = "tiny",
    data: str = "embedded",
    preset: str = "default",
    teacher_path: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
    *,
    torch_device: str | None = None,
    tables: str | Path | None = None,
) -> Path:
    """Build what is missing of this shard's block LUTs in ``RUN/search/`` and return the LUT folder.

    See the module doc for the steps and the layout. A finished shard returns at once (nothing is
    loaded). Raises :class:`~spaceevo.errors.ArtifactError` when this device has no calibrated latency
    table for the hyperspace, :class:`~spaceevo.errors.RunMismatchError` when the run directory holds
    artifacts of another hyperspace, teacher or preset.
    """
    if preset not in LUT_PRESETS:
        raise UsageError(f"unknown preset '{preset}' for block LUTs; allowed: {', '.join(LUT_PRESETS)}")
    space = load_hyperspace(hyperspace) if isinstance(hyperspace, str) else hyperspace
    settings = LUT_PRESETS[preset]
    teacher_cfg = TeacherConfig(**{**asdict(settings.teacher), "seed": seed})
    config = KDConfig(**{**asdict(settings.kd), "seed": seed})
    predictor = load_predictor(space, device, 1, tables)
    reduce_range = predictor.table.fingerprint.reduce_range
    search_dir = Path(run_dir) / "search"
    lut_dir, kd_dir = search_dir / "lut", search_dir / "blockkd"
    jobs = jobs_of_shard(kd_jobs(space), shard)
    started = time.perf_counter()

    _check_lut_record(
        search_dir / LUT_RECORD,
        {"hyperspace_digest": space.digest, "preset": preset, "kd_config": asdict(config),
         "device": predictor.table.fingerprint.slug},
    )
    pending = [job for job in jobs if not all(p.exists() for p in _lut_paths(lut_dir, job))]
    teacher_file = Path(teacher_path) if teacher_path is not None else search_dir / TEACHER_FILE
    if pending:
        compute = torch.device(torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        datasets = load_space_data(space, DataSpec.parse(data))
        if teacher_path is not None:
            teacher = load_teacher(teacher_file, space).to(compute)
        else:
            teacher = train_teacher(teacher_file, space, datasets, teacher_cfg, device=compute, show_progress=show_progress)
        digest = file_digest(teacher_file)
        train_cache = build_feature_cache(
            teacher, datasets.train, config.train_images, space.resolutions, seed=seed, device=compute,
            desc="teacher features (train)", show_progress=show_progress,
        )
        heldout_cache = build_feature_cache(
            teacher, datasets.heldout, config.heldout_images, space.resolutions, seed=seed, device=compute,
            desc="teacher features (held-out)", show_progress=show_progress,
        )
        bar = tqdm(total=len(pending), desc="block KD + LUTs", unit="job", file=sys.stderr, disable=not show_progress, dynamic_ncols=True)
        with bar:
            for job in pending:
                bar.set_postfix(job=job.name, refresh=True)
                student = train_job(
                    job, teacher, digest, train_cache, config, kd_dir, reduce_range=reduce_range, device=compute,
                    show_progress=show_progress,
                )
                for window, path in enumerate(_lut_paths(lut_dir, job)):
                    if not path.exists():
                        rows = lut_rows(job, window, student, train_cache, heldout_cache, predictor, config, compute, show_progress)
                        write_lut_csv(path, rows)
                bar.update(1)
    teacher_digest = file_digest(teacher_file) if teacher_file.exists() else None
    atomic_write_json(
        search_dir / LUT_RECORD,
        {
            "hyperspace": space.name,
            "hyperspace_digest": space.digest,
            "device": predictor.table.fingerprint.slug,
            "teacher": str(teacher_file),
            "teacher_digest": teacher_digest,
            "preset": preset,
            "teacher_config": asdict(teacher_cfg),
            "kd_config": asdict(config),
            "fixed_stage_ms": {str(r): round(ms, 6) for r, ms in fixed_stage_latency_ms(space, predictor).items()},
            "shard": list(shard),
            "last_call_s": round(time.perf_counter() - started, 1),
            "versions": versions(),
        },
    )
    return lut_dir
