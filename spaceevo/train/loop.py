"""Quantized-for-all supernet training: an FP32 sandwich phase, then an LSQ+ QAT phase.

:func:`train_supernet` trains the supernet of one candidate space in a run directory
(:mod:`spaceevo.train.checkpoint`): ``epochs`` FP32 epochs of sandwich steps
(:mod:`spaceevo.train.sandwich`; the first ``largest_epochs`` of them train the largest subnet
alone), then ``qat_epochs`` epochs with LSQ+ fake quantization
(:func:`spaceevo.quant.qat.prepare_qat`, quantizers initialised from one training batch, lower
learning rate, quantizer parameters optimised too). After every epoch the largest and the smallest
subnet are evaluated on the held-out split, each after BatchNorm recalibration, without disturbing
the training state; then the checkpoint and the log are written. :class:`SupernetTask` is this
training as a task of the training engine (:mod:`spaceevo.train.engine`), which runs the epochs and
phases, checkpoints, resumes, detects divergence and logs. A run is resumable at epoch granularity
and the resumed run computes the same weights as an uninterrupted one (same seed, same hardware and
thread count): the checkpoint holds the RNG states of the subnet sampler, of torch (augmentation)
and of the training loader's shuffling.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its shard of each epoch and the
gradients are averaged once per sandwich step (:mod:`spaceevo.train.distributed` says why not DDP);
only rank 0 writes. On CUDA the FP32 phase runs under autocast (bfloat16 where supported, else
float16 with a gradient scaler); the QAT phase runs in float32 so that the fake quantization computes
exactly what ONNX Runtime computes. On CUDA the supernet stays in NCHW memory format and cuDNN's
autotuner stays off: every sandwich step brings convolution shapes not seen before (elastic widths,
kernels and resolutions), and both NHWC and autotuning make cuDNN build or time kernels for each new
shape, which made steps over 5x slower on an H100 (``scripts/bench_sandwich.py``, README).

Measured throughput (sandwich step, ``tiny-1111-0000``, batch 64, images at 24-32 px, training
images per second; each image runs through four subnets) and the ``default`` preset sized from it:
see :data:`spaceevo.train.config.PRESETS`.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from spaceevo.errors import ArtifactError, DataError, UsageError
from spaceevo.io import check_writable
from spaceevo.nn import Supernet
from spaceevo.space import CandidateSpace, Hyperspace, load_space, require_candidate_space
from spaceevo.train import distributed as ddp
from spaceevo.train.bn import preserved_bn_state, recalibrate_bn
from spaceevo.train.checkpoint import (
    CHECKPOINT_FORMAT,
    RunDir,
    check_run_record,
    check_space,
    load_checkpoint,
    read_run_record,
    run_record,
    write_config,
)
from spaceevo.train.config import CUDA_BATCH_FACTOR, FITTED_FIELDS, TrainConfig, fit_to_cuda
from spaceevo.train.data import DataSpec, Datasets, InMemorySplit, load_data, make_loader, resize_batch
from spaceevo.train.engine import (
    Engine,
    EngineConfig,
    Optimization,
    Phase,
    StepFn,
    StepOutput,
    Task,
    autocast_dtype,
    loader_batches,
    process_group,
    training_device,
)
from spaceevo.train.evaluate import evaluate
from spaceevo.train.optim import make_optimizer
from spaceevo.train.sandwich import SandwichStep, memory_format
from spaceevo.train.weights import initialize_weights

HELDOUT_SEED = 0
"""Seed of the train / held-out split, fixed so that search and training share one held-out split."""

EVAL_SEED = 0
"""Seed of the (fixed) order in which held-out images are drawn for recalibration and evaluation."""


def load_space_data(hyperspace: Hyperspace, spec: DataSpec) -> Datasets:
    """The splits of ``spec`` for training or evaluating networks of ``hyperspace`` (held-out split
    seeded by :data:`HELDOUT_SEED`); :class:`DataError` if its classes or channels do not fit."""
    datasets = load_data(spec, max(hyperspace.resolutions), seed=HELDOUT_SEED)
    if datasets.num_classes != hyperspace.num_classes or datasets.in_channels != hyperspace.in_channels:
        raise DataError(
            f"data '{spec}' has {datasets.num_classes} classes and {datasets.in_channels} "
            f"channel(s); hyperspace '{hyperspace.name}' ({hyperspace.source}) is built for "
            f"{hyperspace.num_classes} classes and {hyperspace.in_channels} channel(s)"
        )
    # In-memory images load at their stored size and are resized per subnet, which equals loading
    # them at the subnet's resolution (spaceevo.train.data); folder images decode at the largest.
    if isinstance(datasets.train, InMemorySplit):
        height, width = datasets.train.images.shape[-2:]
        if height == width:
            datasets = datasets.with_resolution(int(height))
    return datasets


@dataclass(frozen=True)
class TrainResult:
    """What a :func:`train_supernet` call did. Accuracies are held-out top-1 (%) after the last
    finished epoch; ``wall_s``, ``train_images`` and ``train_s`` count this call only. ``supernet``
    is the trained supernet (QAT-prepared after a QAT phase), in evaluation mode, its BatchNorm
    statistics those of training: recalibrate them per subnet before evaluating."""

    run_dir: Path
    space: str
    epochs_done: int
    total_epochs: int
    resumed_from: int
    top1_max: float | None
    top1_min: float | None
    wall_s: float
    train_images: int
    train_s: float
    history: tuple[dict[str, Any], ...] = field(repr=False)
    supernet: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def images_per_s(self) -> float | None:
        """Training images per second of this call (all ranks; evaluation excluded)."""
        return self.train_images / self.train_s if self.train_s > 0 else None

    def summary(self) -> dict[str, Any]:
        return {
            "run": str(self.run_dir),
            "space": self.space,
            "epochs": f"{self.epochs_done}/{self.total_epochs}",
            "resumed_from_epoch": self.resumed_from,
            "heldout_top1_max": _round(self.top1_max),
            "heldout_top1_min": _round(self.top1_min),
            "wall_s": round(self.wall_s, 1),
            "images_per_s": _round(self.images_per_s),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def train_supernet(
    space: str | CandidateSpace,
    run: str | Path,
    *,
    data: str | DataSpec = "embedded",
    config: TrainConfig | None = None,
    preset: str = "default",
    epochs: int | None = None,
    qat_epochs: int | None = None,
    largest_epochs: int | None = None,
    seed: int | None = None,
    eval_every: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume training) the supernet of candidate space ``space`` in run directory ``run``.

    ``config`` (default: the ``preset`` preset) with ``epochs``, ``qat_epochs``, ``largest_epochs``,
    ``seed`` and ``eval_every`` overriding it when given (:meth:`TrainConfig.override`). A run directory that
    already holds a checkpoint is continued only with ``resume=True`` and only for the same space,
    hyperspace YAML, data and config, compared with the checkpoint itself
    (:class:`~spaceevo.errors.RunMismatchError` naming each differing field otherwise); a finished
    run returns at once. An unwritable ``run`` raises :class:`~spaceevo.errors.ArtifactError` before
    any work.
    On CUDA the ``default`` preset (``config`` None) is fitted to the device: batch size, learning
    rates and epochs from :func:`~spaceevo.train.config.fit_to_cuda` and a timed probe
    (:func:`probe_step_s`), recorded as ``cuda_fit`` in ``config.json`` and the checkpoint, the flags
    above applied on top; a resumed run takes them from its checkpoint, on any device.
    ``threads`` sets torch's intra-op threads for this process (None: leave them). ``progress``
    shows a progress bar per epoch on stderr (rank 0 only), and the fitted settings;
    ``on_epoch_end(record)`` is called after each epoch's checkpoint and log are written. A NaN or
    infinite loss raises :class:`~spaceevo.errors.TrainingDivergedError` naming the epoch and the step, and
    leaves the last checkpoint as it was.
    """
    started = time.perf_counter()
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    candidate = require_candidate_space(load_space(space) if isinstance(space, str) else space, "training")
    spec = DataSpec.parse(data) if isinstance(data, str) else data
    spec.check()
    changes = {"epochs": epochs, "qat_epochs": qat_epochs, "largest_epochs": largest_epochs, "seed": seed,
               "eval_every": eval_every}
    fitted_changes = changes if config is None and preset == "default" else None  # may be fitted to a GPU
    config = (config or TrainConfig.preset(preset)).override(**changes)
    run_dir = RunDir(Path(run))
    for folder in (run_dir.path, run_dir.checkpoint.parent):
        check_writable(folder, "--run")
    if config.reduce_range is None:
        from spaceevo.latency.fingerprint import device_fingerprint

        config = config.replace(reduce_range=device_fingerprint("cpu").reduce_range)
    with process_group():
        return _train(candidate, spec, config, fitted_changes, run_dir, resume, progress, on_epoch_end, started)


class SupernetTask(Task):
    """The supernet of one candidate space trained by sandwich steps
    (:class:`~spaceevo.train.sandwich.SandwichStep`; largest-only in the first ``largest_epochs``),
    LSQ+ quantizers added before the ``qat`` phase, the largest and the smallest subnet evaluated on
    the held-out split after the epochs :meth:`TrainConfig.evaluates_after` names."""

    def __init__(self, space: CandidateSpace, config: TrainConfig, datasets: Datasets, device: torch.device):
        self.space, self.config, self.datasets, self.device = space, config, datasets, device
        self.loader = make_loader(
            datasets.train, config.batch_size, True, workers=config.workers, seed=config.seed, drop_last=True
        )
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        supernet = Supernet(space)
        initialize_weights(supernet, zero_init_residual=config.zero_init_residual)
        self.model: nn.Module = supernet.to(device, memory_format=memory_format(config, device))

    def phases(self, checkpoint: Path | None) -> tuple[Phase, ...]:
        """The FP32 and the QAT phase; ``checkpoint`` (the FP32 weights file) keeps the weights
        after the last FP32 epoch when a QAT phase follows."""
        config, batches = self.config, len(self.loader)

        def phase(name: str, epochs: int, lr: float, warmup: float, amp: bool, snapshot: Path | None) -> Phase:
            steps = config.steps_in(name, batches)
            return Phase(
                name, epochs, steps, partial(make_optimizer, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay),
                warmup_steps=round(warmup * steps), amp=amp, snapshot=snapshot,
            )

        return (
            phase("fp32", config.epochs, config.lr, config.warmup_epochs, config.amp, checkpoint if config.qat_epochs else None),
            phase("qat", config.qat_epochs, config.qat_lr, config.qat_warmup_epochs, False, None),
        )

    def prepare(self, phase: Phase, *, restoring: bool) -> None:
        from spaceevo.quant.qat import initialize_quantizers, prepare_qat

        if phase.name != "qat":
            return
        self.model = prepare_qat(self.model, reduce_range=bool(self.config.reduce_range))  # quantizers on its device
        if not restoring:
            loader = make_loader(
                self.datasets.train.with_augment(False), self.config.batch_size, True, seed=EVAL_SEED,
                workers=self.config.workers, distributed=False,
            )
            images, _ = next(iter(loader))
            self.model.set_max()
            self.model.train()
            initialize_quantizers(self.model, resize_batch(images.to(self.device), max(self.space.hyperspace.resolutions)))

    def make_step(self, phase: Phase, optimization: Optimization) -> StepFn:
        sandwich = SandwichStep(self.model, optimization, self.config, self.rng)

        def step(batch: tuple[torch.Tensor, torch.Tensor], epoch: int) -> StepOutput:
            images, labels = batch
            largest_only = self.config.largest_only(epoch)
            result = sandwich(images, labels, largest_only=largest_only)
            random_loss = sum(result.random) / len(result.random) if result.random else None
            metrics = {
                "loss": result.max + (result.min or 0.0) + (random_loss or 0.0),
                "loss_max": result.max,
                "loss_min": result.min,
                "loss_random": random_loss,
                "grad_norm": result.grad_norm,
            }
            return StepOutput(metrics, int(labels.shape[0]), None if result.finite else result.first_non_finite())

        return step

    def batches(self, epoch: int) -> Iterable[Any]:
        return loader_batches(self.loader, epoch)

    def evaluate(self, epoch: int, phase: Phase) -> dict[str, Any]:
        """The subnets per step, and held-out top-1 of the largest and the smallest subnet, each after
        BatchNorm recalibration, without disturbing the training state (None after epochs that are
        not evaluated)."""
        config, supernet = self.config, self.model
        results: dict[str, Any] = {
            "subnets_per_step": 1 if config.largest_only(epoch) else 2 + config.num_random_subnets,
            "heldout_top1_max": None,
            "heldout_top1_min": None,
        }
        if not config.evaluates_after(epoch):
            return results
        batch = min(config.batch_size, config.calibration_images)
        with preserved_bn_state(supernet):
            for name, subnet in (("max", self.space.max_subnet()), ("min", self.space.min_subnet())):
                calibration = self._heldout_loader(subnet.resolution, batch)
                recalibrate_bn(supernet, subnet, calibration, math.ceil(config.calibration_images / batch))
                results[f"heldout_top1_{name}"] = evaluate(
                    supernet, subnet, self._heldout_loader(subnet.resolution, 256), config.eval_images
                )
        return results

    def _heldout_loader(self, resolution: int, batch_size: int) -> DataLoader:
        return make_loader(
            self.datasets.heldout.with_resolution(resolution), batch_size, True, seed=EVAL_SEED,
            workers=self.config.workers, distributed=False,
        )

    def generators(self) -> dict[str, random.Random | torch.Generator]:
        return {"subnets": self.rng, "loader": self.loader.generator}


def _run_record(
    space: CandidateSpace, spec: DataSpec, config: TrainConfig, device: torch.device, fit: dict[str, Any] | None
) -> dict[str, Any]:
    amp = autocast_dtype(device, config.amp)
    return run_record(
        space, str(spec), config, heldout_seed=HELDOUT_SEED, world_size=ddp.world_size(), device=str(device),
        amp=str(amp).replace("torch.", "") if amp else None, **({} if fit is None else {"cuda_fit": fit}),
    )


PROBE_STEPS = 5
"""Timed sandwich steps of :func:`probe_step_s`."""


def probe_step_s(space: CandidateSpace, config: TrainConfig, device: torch.device, steps: int = PROBE_STEPS) -> float:
    """Median seconds of a sandwich step on ``device`` at ``config``'s batch size and precision: a
    fresh supernet of ``space`` on random images at its largest resolution, timed after two untimed
    steps (the first calls set kernels up); torch's random state is left as it was."""
    hyperspace = space.hyperspace
    size = max(hyperspace.resolutions)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        supernet = Supernet(space).to(device)
        optimizer = make_optimizer(supernet, config.lr, config.momentum, config.weight_decay)
        step = SandwichStep(supernet, Optimization.on(device, optimizer, amp=config.amp), config, random.Random(0))
        images = torch.randn(config.batch_size, hyperspace.in_channels, size, size)
        labels = torch.randint(hyperspace.num_classes, (config.batch_size,))
        times = []
        for _ in range(2 + steps):
            synchronize()
            begun = time.perf_counter()
            step(images, labels)
            synchronize()
            times.append(time.perf_counter() - begun)
    return statistics.median(times[2:])


def _fits_device(device: torch.device) -> bool:
    """Whether a fresh run of the ``default`` preset is fitted to ``device``: on CUDA (the preset is
    sized for 2 CPU cores)."""
    return device.type == "cuda"


def _default_fit(
    space: CandidateSpace, config: TrainConfig, device: torch.device, datasets: Datasets
) -> dict[str, Any]:
    """:func:`fit_to_cuda` of ``config`` from a probe on ``device`` (rank 0's under ``torchrun``)."""
    probed = probe_step_s(space, config.replace(batch_size=config.batch_size * CUDA_BATCH_FACTOR), device)
    step_s = ddp.broadcast_object(probed)
    return fit_to_cuda(config, step_s, len(datasets.train), world_size=ddp.world_size())


def _recorded_fit(run: RunDir, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``cuda_fit`` a checkpoint holds (None: the run was not fitted); :class:`ArtifactError`
    when it is malformed."""
    fit = checkpoint.get("cuda_fit")
    if fit is None:
        return None
    fields = fit.get("fields") if isinstance(fit, dict) else None
    if not isinstance(fields, dict) or not set(fields) <= set(FITTED_FIELDS):
        raise ArtifactError(
            f"{run.checkpoint} holds a malformed cuda_fit (fields: a mapping of {', '.join(FITTED_FIELDS)}); "
            f"delete the run directory to train again"
        )
    return fit


def _describe_fit(config: TrainConfig, fit: dict[str, Any], device: torch.device, recorded: bool) -> str:
    factor = fit["batch_factor"]
    source = "recorded in the checkpoint" if recorded else f"probed on {device}"
    return (
        f"spaceevo: default preset fitted to CUDA: {config.summary()}, lr {config.lr:g} (QAT {config.qat_lr:g}); "
        f"batch and learning rates are the CPU default's x{factor} (linear scaling rule), the epochs fill about "
        f"{fit['target_s']:g} s (estimated {fit['estimated_s']:g} s) at {fit['probe_step_s']:.3g} s per sandwich "
        f"step ({source})"
    )


def _open_run(run: RunDir, space: CandidateSpace, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: a fresh run), checked to be of ``space`` and resumable."""
    if not run.checkpoint.exists():
        return None
    checkpoint = load_checkpoint(run.checkpoint)
    check_space(
        run.checkpoint, checkpoint.get("space"), checkpoint.get("hyperspace_digest"), space.encoding,
        space.hyperspace.digest,
    )
    if not resume:
        raise UsageError(
            f"{run.path} already holds a training run ({run.checkpoint}, epoch "
            f"{checkpoint.get('epoch')}); add --resume to continue it or choose another --run directory"
        )
    return checkpoint


def _check_run(run: RunDir, checkpoint: dict[str, Any], requested: dict[str, Any]) -> None:
    """Check that a checkpoint, and ``config.json`` where present, hold what this call asks for."""
    check_run_record(run.checkpoint, checkpoint, requested)  # the checkpoint holds its own config
    stored = read_run_record(run)
    if stored is not None:
        check_run_record(run.config, stored, requested)


def _train(
    space: CandidateSpace,
    spec: DataSpec,
    config: TrainConfig,
    changes: dict[str, Any] | None,
    run: RunDir,
    resume: bool,
    progress: bool,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    started: float,
) -> TrainResult:
    """``changes``: the flags applied on top of the ``default`` preset when it may be fitted to the
    device (None: not the default preset)."""
    device = training_device()
    checkpoint = _open_run(run, space, resume)
    datasets, fit = None, None
    if changes is not None:
        if checkpoint is not None:
            fit = _recorded_fit(run, checkpoint)
        elif _fits_device(device):
            datasets = load_space_data(space.hyperspace, spec)
            fit = _default_fit(space, config, device, datasets)
        if fit is not None:
            config = config.replace(**fit["fields"]).override(**changes)
            if progress and ddp.rank() == 0:
                print(_describe_fit(config, fit, device, checkpoint is not None), file=sys.stderr)
    requested = _run_record(space, spec, config, device, fit)
    if checkpoint is not None:
        _check_run(run, checkpoint, requested)
    if datasets is None:
        datasets = load_space_data(space.hyperspace, spec)
    task = SupernetTask(space, config, datasets, device)
    if len(task.loader) == 0:
        raise UsageError(
            f"the training split of '{spec}' has {len(datasets.train)} images per process, "
            f"fewer than one batch of {config.batch_size}"
        )
    if ddp.rank() == 0 and (checkpoint is None or not run.config.exists()):
        write_config(run, requested)
    engine_config = EngineConfig(
        phases=task.phases(run.fp32_checkpoint),
        name="training",
        checkpoint=run.checkpoint,
        checkpoint_format=CHECKPOINT_FORMAT,
        meta={"space": space.encoding, "hyperspace_digest": space.hyperspace.digest, "data": str(spec),
              "config": config.to_dict(), **({} if fit is None else {"cuda_fit": fit})},
        log=run.log,
        tensorboard=run.tensorboard,
        progress=progress,
        on_epoch_end=on_epoch_end,
    )
    result = Engine(task, engine_config).run(checkpoint)
    last = result.history[-1] if result.history else {}
    return TrainResult(
        run_dir=run.path,
        space=space.encoding,
        epochs_done=result.epochs_done,
        total_epochs=result.total_epochs,
        resumed_from=result.resumed_from,
        top1_max=last.get("heldout_top1_max"),
        top1_min=last.get("heldout_top1_min"),
        wall_s=time.perf_counter() - started,
        train_images=result.train_images,
        train_s=result.train_s,
        history=result.history,
        supernet=task.model.eval(),
    )
