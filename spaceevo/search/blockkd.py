"""Block-wise knowledge distillation: one elastic student stage per (searchable stage, block type).

For every searchable stage of the hyperspace and every block type it offers, a *job* trains a
:class:`StageStudent`: the stage's elastic blocks (:class:`~spaceevo.nn.elastic.ElasticBlock`, every
width of the stage, every depth, kernel and expand ratio of the block type) between two elastic 1x1
projections, fed the teacher's previous-stage feature map and trained to reproduce the teacher's
feature map of this stage under the NSR loss (:func:`nsr_loss`). The input projection maps the
teacher's width onto the sub-stage's input width (one of the previous stage's widths); the output
projection maps any student width back to the teacher's.

Per step a sandwich of sub-stages (the largest, the smallest, ``num_random`` random ones, each random
one inside a random width window) shares one batch at one random hyperspace resolution; their
gradients accumulate before one Adam step. An FP32 phase comes first, then an LSQ+ QAT phase
(:func:`spaceevo.quant.qat.prepare_qat` on the student, quantizers initialised like
:func:`~spaceevo.quant.qat.initialize_quantizers`): the projections stay in float, the stage
input and everything inside the blocks are fake-quantized as ONNX Runtime runs them, so the loss a
block LUT records is the *quantized* one.

Teacher features of a fixed set of training (and held-out) images are computed once per process and
resolution and kept in memory (:class:`FeatureCache`, float16), so the teacher never runs in a step.

Jobs are independent. ``RUN/search/blockkd/stage{i}_{block digit}.pt`` (``i`` counts searchable
stages from 1, as LUT file names do) is the job's checkpoint after every finished epoch (atomic),
resumed from there; ``stage{i}_{block digit}.done`` (atomic JSON) marks
a finished job, which is then skipped. :func:`jobs_of_shard` gives shard ``(i, n)`` every job ``j``
with ``j % n == i``, so processes or machines sharing the run directory split the work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from spaceevo.errors import ArtifactError, RunMismatchError, UsageError
from spaceevo.io import atomic_write_json
from spaceevo.train.checkpoint import load_state
from spaceevo.nn.elastic import ElasticBlock
from spaceevo.nn.layers import QuantPoint
from spaceevo.quant.lsq import LsqActivationQuantizer, LsqWeightQuantizer, set_quant_mode
from spaceevo.quant.qat import prepare_qat
from spaceevo.search.lut import format_stage_config
from spaceevo.search.teacher import Teacher, teacher_features
from spaceevo.blocks import BlockSpec, conv_output_size
from spaceevo.space import BlockChoice, BlockTypeSpec, Hyperspace, StageChoices
from spaceevo.train.bn import batchnorms
from spaceevo.train.data import ImageSplit, make_loader, resize_batch
from spaceevo.train.engine import Engine, EngineConfig, Optimization, Phase, StepFn, StepOutput, Task

KD_FORMAT = "spaceevo-blockkd/1"

#: Variance floor of the NSR loss, relative to the batch's mean teacher variance. The ReLU teacher's
#: 3x3 and 4x4 maps of ``tiny``'s last stage are nearly constant for 3-10% of (sample, channel) pairs
#: (variance below 5% of the mean); without a floor those few pairs dominate a stage's loss.
NSR_FLOOR = 1e-2


# --------------------------------------------------------------------------------------------
# NSR loss


def nsr_loss(student: torch.Tensor, teacher: torch.Tensor, floor: float = NSR_FLOOR) -> torch.Tensor:
    """Noise-to-signal ratio of ``student`` against ``teacher`` feature maps (N, C, H, W).

    ``mean over samples and channels of mean_hw (S - T)^2 / var_hw(T)``: the error is divided by the
    **teacher's** per-sample, per-channel spatial variance (population variance), never the student's,
    which the student could inflate. ``floor`` times the batch's mean teacher variance is added to
    every variance (:data:`NSR_FLOOR`), so a channel that is (nearly) constant over one sample's map
    stays finite; it is detached, so it only scales.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} do not match the teacher's {tuple(teacher.shape)}")
    teacher = teacher.float()
    variance = teacher.var(dim=(2, 3), unbiased=False)
    variance = variance + floor * variance.mean().detach()
    error = (student.float() - teacher).pow(2).mean(dim=(2, 3))
    return (error / variance).mean()


def nsr_per_sample(student: torch.Tensor, teacher: torch.Tensor, floor: float = NSR_FLOOR) -> torch.Tensor:
    """:func:`nsr_loss` per sample (shape ``(N,)``, averaged over channels), the floor taken from the
    whole batch; evaluation sums it over batches of a fixed image order."""
    teacher = teacher.float()
    variance = teacher.var(dim=(2, 3), unbiased=False)
    variance = variance + floor * variance.mean()
    return ((student.float() - teacher).pow(2).mean(dim=(2, 3)) / variance).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Sub-stages


@dataclass(frozen=True)
class SubStage:
    """One path through a student stage: its input width and (kernel, width, expand) per block."""

    in_channels: int
    blocks: tuple[BlockChoice, ...]

    @property
    def config(self) -> str:
        """The published LUT encoding: ``k#w#e`` per block, ``_``-joined (``3#32#4.0_5#32#6.0``)."""
        return format_stage_config(self.blocks)


@dataclass(frozen=True)
class KDJob:
    """One block-wise distillation job: searchable stage ``stage_index`` (into ``hyperspace.stages``)
    with one block type."""

    hyperspace: Hyperspace
    stage_index: int
    block: BlockTypeSpec

    @property
    def searchable_index(self) -> int:
        """Position among the searchable stages, from 1 (the ``stage{i}`` of LUT file names)."""
        return sum(s.searchable for s in self.hyperspace.stages[: self.stage_index + 1])

    @property
    def name(self) -> str:
        return f"stage{self.searchable_index}_{self.block.digit}"

    @property
    def choices(self) -> StageChoices:
        """The stage with this block type and all of its widths (every window at once)."""
        stage = self.hyperspace.stages[self.stage_index]
        return StageChoices(
            name=stage.name,
            block_type=self.block,
            widths=stage.widths,
            depths=stage.depths,
            kernels=stage.kernels or self.block.kernels,
            expand_ratios=stage.expand_ratios or self.block.expand_ratios,
            stride=stage.stride,
            searchable=True,
        )

    @property
    def in_widths(self) -> tuple[int, ...]:
        """Widths the stage's input can have: the previous stage's widths (the image's channels first)."""
        if self.stage_index == 0:
            return (self.hyperspace.in_channels,)
        return self.hyperspace.stages[self.stage_index - 1].widths

    def input_size(self, resolution: int) -> int:
        """Spatial size of the stage's input at an input resolution."""
        size = resolution
        for stage in self.hyperspace.stages[: self.stage_index]:
            size = conv_output_size(size, stage.stride)
        return size

    def resolve(self, sub: SubStage, resolution: int) -> tuple[BlockSpec, ...]:
        """The concrete blocks of a sub-stage at ``resolution`` (as :meth:`CandidateSpace.resolve`)."""
        choices, block = self.choices, self.block
        specs, cin, size = [], sub.in_channels, self.input_size(resolution)
        for position, choice in enumerate(sub.blocks):
            stride = choices.stride if position == 0 else 1
            spec = block.variant.spec(cin, choice.width, choice.kernel, choice.expand, stride, size, position)
            specs.append(spec)
            cin, size = choice.width, spec.output_size
        return tuple(specs)

    # ---- sampling ------------------------------------------------------------------------------
    def max_sub_stage(self, widths: Sequence[int] | None = None) -> SubStage:
        c = self.choices
        block = BlockChoice(max(c.kernels), max(widths or c.widths), max(c.expand_ratios))
        return SubStage(max(self.in_widths), (block,) * max(c.depths))

    def min_sub_stage(self, widths: Sequence[int] | None = None) -> SubStage:
        c = self.choices
        block = BlockChoice(min(c.kernels), min(widths or c.widths), min(c.expand_ratios))
        return SubStage(min(self.in_widths), (block,) * min(c.depths))

    def random_sub_stage(self, rng: random.Random, widths: Sequence[int] | None = None) -> SubStage:
        """Uniform depth, and per block kernel, width (from ``widths``, default: a random window) and expand."""
        c = self.choices
        if widths is None:
            widths = rng.choice(self.hyperspace.stages[self.stage_index].windows)
        blocks = tuple(
            BlockChoice(rng.choice(c.kernels), rng.choice(widths), rng.choice(c.expand_ratios))
            for _ in range(rng.choice(c.depths))
        )
        return SubStage(rng.choice(self.in_widths), blocks)


def kd_jobs(hyperspace: Hyperspace) -> list[KDJob]:
    """Every (searchable stage, block type) job, stages in order, block types by digit."""
    jobs = []
    for index, stage in enumerate(hyperspace.stages):
        if stage.searchable:
            for block in sorted(hyperspace.stage_block_types(stage), key=lambda b: b.digit):
                jobs.append(KDJob(hyperspace, index, block))
    return jobs


def jobs_of_shard(jobs: Sequence[KDJob], shard: tuple[int, int]) -> list[KDJob]:
    """The jobs shard ``(i, n)`` runs: job ``j`` belongs to shard ``j % n``."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index}/{count} is not valid: expected i/n with n >= 1 and 0 <= i < n")
    return [job for j, job in enumerate(jobs) if j % count == index]


# --------------------------------------------------------------------------------------------
# Student


class _Projection(nn.Module):
    """A float 1x1 conv with bias whose active input or output channels are leading slices."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 1)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        return F.conv2d(x, self.weight[:out_channels, : x.shape[1]], self.bias[:out_channels])


class StageStudent(nn.Module):
    """Input projection, the quantized stage input, the job's elastic blocks, output projection."""

    def __init__(self, job: KDJob, teacher_in: int, teacher_out: int):
        super().__init__()
        self.job = job
        choices = job.choices
        self.teacher_out = teacher_out
        self.in_proj = _Projection(teacher_in, max(job.in_widths))
        self.input_quant = QuantPoint()
        self.blocks = nn.ModuleList(
            ElasticBlock(choices, position, job.in_widths if position == 0 else choices.widths)
            for position in range(max(choices.depths))
        )
        self.out_proj = _Projection(max(choices.widths), teacher_out)
        for module in self.blocks.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.ndim == 4:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.active = job.max_sub_stage()
        self._specs = job.resolve(self.active, max(job.hyperspace.resolutions))

    def set_active(self, sub: SubStage, resolution: int) -> None:
        """Run ``sub`` on inputs of ``resolution`` from now on."""
        self.active = sub
        self._specs = self.job.resolve(sub, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(self.in_proj(x, self.active.in_channels))
        for block, spec in zip(self.blocks, self._specs):
            x = block(x, spec)
        return self.out_proj(x, self.teacher_out)


def _alternating(job: KDJob, start_wide: bool) -> SubStage:
    """Deepest sub-stage whose widths alternate, so every later block uses its projection shortcut."""
    c = job.choices
    low, high = min(c.widths), max(c.widths)
    widths = [high if (i % 2 == 0) == start_wide else low for i in range(max(c.depths))]
    return SubStage(max(job.in_widths), tuple(BlockChoice(max(c.kernels), w, max(c.expand_ratios)) for w in widths))


@torch.no_grad()
def initialize_student_quantizers(student: StageStudent, inputs: torch.Tensor, resolution: int) -> None:
    """Initialise every quantizer of a prepared student from one batch of teacher inputs.

    As :func:`spaceevo.quant.qat.initialize_quantizers`: weights from the full weights, activations
    from training-mode forwards of the largest sub-stage, then of sub-stages reaching what it does not
    (projection shortcuts, the smallest input width); BatchNorm statistics are restored afterwards.
    """
    job = student.job
    saved = [(b, b.clone()) for bn in batchnorms(student) for b in bn.buffers()]
    active, training = student.active, student.training
    try:
        set_quant_mode(student, True)
        student.train()
        for module in student.modules():
            quantizer = getattr(module, "weight_quant", None)
            if isinstance(quantizer, LsqWeightQuantizer):
                quantizer.initialize(module.weight)
        rng = random.Random(0)
        candidates = itertools.chain(
            [job.max_sub_stage(), _alternating(job, True), _alternating(job, False), job.min_sub_stage()],
            (job.random_sub_stage(rng) for _ in range(32)),
        )
        for sub in candidates:
            pending = [q for q in student.modules() if isinstance(q, LsqActivationQuantizer) and not bool(q.initialized)]
            if not pending:
                break
            student.set_active(sub, resolution)
            student(inputs)
        missing = [n for n, q in student.named_modules() if isinstance(q, LsqActivationQuantizer) and not bool(q.initialized)]
        if missing:
            raise RuntimeError(f"no sub-stage reached these quantizers: {', '.join(missing)}")
    finally:
        for buffer, value in saved:
            buffer.copy_(value)
        student.set_active(active, resolution)
        student.train(training)


# --------------------------------------------------------------------------------------------
# Teacher feature cache


@dataclass
class FeatureCache:
    """Teacher feature maps of a fixed list of images: ``features[r][k]`` is the (N, C, H, W) float16
    output of teacher stage ``k`` at input resolution ``r``."""

    features: dict[int, list[torch.Tensor]]

    def __len__(self) -> int:
        return next(iter(self.features.values()))[0].shape[0]

    def pair(self, job: KDJob, resolution: int, index: torch.Tensor | slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher input of the job's stage, teacher output of it) for images ``index``, float32."""
        maps = self.features[resolution]
        return maps[job.stage_index - 1][index].to(device).float(), maps[job.stage_index][index].to(device).float()


@torch.no_grad()
def build_feature_cache(
    teacher: Teacher,
    split: ImageSplit,
    count: int,
    resolutions: Sequence[int],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "teacher features",
    show_progress: bool = True,
) -> FeatureCache:
    """Run the teacher once over ``count`` images of ``split`` (seeded order, no augmentation) at
    every resolution and keep its stage outputs."""
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    loader = make_loader(split.with_augment(False), 256, True, seed=seed)
    batches = [images for images, _ in itertools.islice(loader, math.ceil(count / 256))]
    images = torch.cat(batches)[:count]
    features: dict[int, list[torch.Tensor]] = {}
    bar = tqdm(total=len(resolutions) * len(images), desc=desc, unit="img", file=sys.stderr, disable=not show_progress, dynamic_ncols=True)
    with bar:
        for resolution in resolutions:
            parts: list[list[torch.Tensor]] = []
            for start in range(0, len(images), 256):
                batch = resize_batch(images[start : start + 256].to(device), resolution)
                parts.append([f.to("cpu", torch.float16) for f in teacher_features(teacher, batch)])
                bar.update(len(batch))
            features[resolution] = [torch.cat(maps) for maps in zip(*parts)]
    return FeatureCache(features)


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class KDConfig:
    """Sizes and hyper-parameters of every distillation job and of the feature caches.

    ``epochs`` FP32 then ``qat_epochs`` QAT epochs of ``steps_per_epoch`` sandwich steps of
    ``batch_size`` cached images; Adam at ``lr`` / ``qat_lr`` with cosine decay per phase.
    ``train_images`` / ``heldout_images``: images whose teacher features are cached for training and
    for LUT evaluation; ``calibration_images`` (of the training cache) recalibrate BatchNorm before a
    sub-stage is evaluated; ``lut_samples``: sub-stage configurations per (stage, block, window),
    the smallest and largest included, each evaluated at every resolution.
    """

    epochs: int = 2
    qat_epochs: int = 1
    steps_per_epoch: int = 30
    batch_size: int = 32
    lr: float = 1e-2
    qat_lr: float = 1.5e-3
    num_random: int = 1
    weight_decay: float = 0.0
    train_images: int = 1024
    heldout_images: int = 256
    calibration_images: int = 128
    lut_samples: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps_per_epoch", "batch_size", "train_images", "heldout_images", "calibration_images", "lut_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"block KD config: {name} must be at least 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.qat_epochs < 0 or self.epochs + self.qat_epochs < 1:
            raise UsageError("block KD config: epochs and qat_epochs must be >= 0 with at least one epoch")
        if self.lut_samples < 2:
            raise UsageError("block KD config: lut_samples must be at least 2 (the smallest and the largest sub-stage)")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.qat_epochs


#: ``smoke``: one step per phase, tiny caches. ``default``: 60 FP32 + 30 QAT sandwich steps per job,
#: 2-20 s per job on the 2-core host (QAT of ``mbv3_se`` is the slowest); the learning rate was
#: picked from 2e-3 / 6e-3 / 1.5e-2 on two jobs (held-out-free training NSR after 60 steps:
#: 0.91 / 0.69 / 0.61 for stage2 resnet, 1.11 / 0.74 / 0.66 for stage3 mbv2).
KD_PRESETS: dict[str, KDConfig] = {
    "smoke": KDConfig(
        epochs=1, qat_epochs=1, steps_per_epoch=1, batch_size=8, num_random=1,
        train_images=32, heldout_images=16, calibration_images=8, lut_samples=2,
    ),
    "default": KDConfig(),
}


def kd_config(preset: str, **overrides: Any) -> KDConfig:
    """The :data:`KD_PRESETS` preset ``preset`` with ``overrides`` applied."""
    if preset not in KD_PRESETS:
        raise UsageError(f"unknown preset '{preset}'; allowed: {', '.join(KD_PRESETS)}")
    return replace(KD_PRESETS[preset], **overrides)


@dataclass(frozen=True)
class KDPaths:
    """Where a job's artifacts live under ``RUN/search/blockkd/``."""

    folder: Path
    name: str

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.name}.pt"

    @property
    def done(self) -> Path:
        return self.folder / f"{self.name}.done"


def file_digest(path: Path) -> str:
    """Short content hash of a file (the teacher checkpoint a job distils from)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _load(path: Path) -> dict[str, Any]:
    return load_state(path, KD_FORMAT, "spaceevo block-KD checkpoint", "delete it to retrain the job")


def _record(job: KDJob, config: KDConfig, teacher_digest: str) -> dict[str, Any]:
    return {
        "job": job.name,
        "hyperspace": job.hyperspace.name,
        "hyperspace_digest": job.hyperspace.digest,
        "teacher_digest": teacher_digest,
        "config": asdict(config),
    }


def _check_record(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    if differing:
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted[k]!r}" for k in differing)
        raise RunMismatchError(
            f"{path} was produced with other inputs ({details}); use another run directory or delete "
            f"{path.parent} to redo block-wise distillation"
        )


def is_done(paths: KDPaths, record: dict[str, Any]) -> bool:
    """Whether the job finished with these inputs (its done marker exists and matches)."""
    if not paths.done.exists():
        return False
    try:
        stored = json.loads(paths.done.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{paths.done} is unreadable ({error}); delete it to retrain the job") from None
    _check_record(paths.done, stored, record)
    return True


def build_student(job: KDJob, teacher: Teacher, *, qat: bool, reduce_range: bool) -> StageStudent:
    """A fresh student of ``job`` sized to the teacher (prepared for QAT when ``qat``)."""
    widths = teacher.arch.widths
    teacher_in = widths[job.stage_index - 1] if job.stage_index > 0 else teacher.arch.in_channels
    student = StageStudent(job, teacher_in, widths[job.stage_index])
    return prepare_qat(student, reduce_range=reduce_range) if qat else student


def load_student(paths: KDPaths, job: KDJob, teacher: Teacher, *, reduce_range: bool) -> StageStudent:
    """The trained (QAT-prepared when it had a QAT phase) student of a finished job, in eval mode."""
    state = _load(paths.checkpoint)
    student = build_student(job, teacher, qat=state["phase"] == "qat", reduce_range=reduce_range)
    student.load_state_dict(state["model"])
    return student.eval()


class JobTask(Task):
    """One distillation job as a task of the training engine: sandwich steps of sub-stages (the
    largest, the smallest, ``num_random`` random ones) on one batch of cached teacher features at
    one drawn resolution, NSR loss, gradients accumulated before one step; LSQ+ quantizers added
    before the ``qat`` phase and initialised from one batch."""

    def __init__(self, job: KDJob, teacher: Teacher, cache: FeatureCache, config: KDConfig, *,
                 reduce_range: bool, device: torch.device):
        self.job, self.cache, self.config, self.reduce_range, self.device = job, cache, config, reduce_range, device
        seed = config.seed ^ zlib.crc32(job.name.encode())
        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.model: nn.Module = build_student(job, teacher, qat=False, reduce_range=reduce_range).to(device)

    def phases(self) -> tuple[Phase, ...]:
        config = self.config

        def adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
            return lambda model: torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)

        return (
            Phase("fp32", config.epochs, config.steps_per_epoch, adam(config.lr)),
            Phase("qat", config.qat_epochs, config.steps_per_epoch, adam(config.qat_lr)),
        )

    def prepare(self, phase: Phase, *, restoring: bool) -> None:
        if phase.name != "qat":
            return
        self.model = prepare_qat(self.model, reduce_range=self.reduce_range)
        if not restoring:
            resolution = max(self.job.hyperspace.resolutions)
            inputs, _ = self.cache.pair(self.job, resolution, slice(0, self.config.batch_size), self.device)
            initialize_student_quantizers(self.model, inputs, resolution)

    def batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        while True:
            resolution = self.rng.choice(self.job.hyperspace.resolutions)
            index = torch.randint(len(self.cache), (self.config.batch_size,), generator=self.generator)
            yield (resolution, *self.cache.pair(self.job, resolution, index, self.device))

    def make_step(self, phase: Phase, optimization: Optimization) -> StepFn:
        job, student = self.job, self.model

        def step(batch: tuple[int, torch.Tensor, torch.Tensor], epoch: int) -> StepOutput:
            resolution, inputs, target = batch
            subs = [job.max_sub_stage(), job.min_sub_stage()] + [job.random_sub_stage(self.rng) for _ in range(self.config.num_random)]
            student.train()
            optimization.optimizer.zero_grad(set_to_none=True)
            losses = []
            for sub in subs:
                student.set_active(sub, resolution)
                with optimization.autocast():
                    loss = nsr_loss(student(inputs), target)
                optimization.backward(loss)
                losses.append(loss.detach())
            names = [f"NSR loss of sub-stage {sub.config}" for sub in subs]
            update = optimization.update(student, torch.stack(losses), names)
            return StepOutput({"nsr": sum(update.losses) / len(subs)}, int(inputs.shape[0]), update.non_finite)

        return step

    def generators(self) -> dict[str, random.Random | torch.Generator]:
        return {"sampler": self.rng, "batches": self.generator}


def train_job(
    job: KDJob,
    teacher: Teacher,
    teacher_digest: str,
    cache: FeatureCache,
    config: KDConfig,
    folder: Path,
    *,
    reduce_range: bool,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> StageStudent:
    """Train (or resume, or just load) one job; returns its student in eval mode.

    A job whose done marker matches these inputs is loaded without training; a checkpoint resumes at
    its last finished epoch; a marker or checkpoint from other inputs (hyperspace YAML, teacher,
    config) raises :class:`RunMismatchError`. Trained by the training engine as a :class:`JobTask`.
    """
    device = torch.device(device)
    paths = KDPaths(folder, job.name)
    record = _record(job, config, teacher_digest)
    if is_done(paths, record):
        return load_student(paths, job, teacher, reduce_range=reduce_range).to(device)
    task = JobTask(job, teacher, cache, config, reduce_range=reduce_range, device=device)
    state = None
    if paths.checkpoint.exists():
        state = _load(paths.checkpoint)
        _check_record(paths.checkpoint, state.get("record") or {}, record)
    engine = Engine(task, EngineConfig(
        phases=task.phases(),
        name=f"block KD {job.name}",
        checkpoint=paths.checkpoint,
        checkpoint_format=KD_FORMAT,
        meta={"record": record},
        progress=show_progress,
        leave_progress=False,
    ))
    result = engine.run(state)
    atomic_write_json(paths.done, {**record, "history": list(result.history)})
    return task.model.eval()
