"""Quantized-for-all supernet training: an FP32 sandwich phase, then an LSQ+ QAT phase.

:func:`train_supernet` trains the supernet of one candidate space in a run directory
(:mod:`spaceevo.train.checkpoint`): ``epochs`` FP32 epochs of sandwich steps
(:mod:`spaceevo.train.sandwich`; the first ``largest_epochs`` of them train the largest subnet
alone), then ``qat_epochs`` epochs with LSQ+ fake quantization
(:func:`spaceevo.quant.qat.prepare_qat`, quantizers initialised from one training batch, lower
learning rate, quantizer parameters optimised too). After every epoch the largest and the smallest
subnet are evaluated on the held-out split, each after BatchNorm recalibration, without disturbing
the training state; then the checkpoint and the log are written. A run is resumable at epoch
granularity and the resumed run computes the same weights as an uninterrupted one (same seed, same
hardware and thread count): the checkpoint holds the RNG states of the subnet sampler, of torch
(augmentation) and of the training loader's shuffling.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its shard of each epoch and the
gradients are averaged once per sandwich step (:mod:`spaceevo.train.distributed` says why not DDP);
only rank 0 writes. On CUDA the FP32 phase runs under autocast (bfloat16 where supported, else
float16 with a gradient scaler); the QAT phase runs in float32 so that the fake quantization computes
exactly what ONNX Runtime computes. On CUDA the supernet stays in NCHW memory format and cuDNN's
autotuner stays off: every sandwich step brings convolution shapes not seen before (elastic widths,
kernels and resolutions), and both NHWC and autotuning make cuDNN build or time kernels for each new
shape, which made steps over 5x slower on an H100 (``scripts/bench_sandwich.py``, README).

Measured throughput (sandwich step, ``tiny-1111-0000``, batch 64, images at 24-32 px, training
images per second; each image runs through four subnets) and the ``default`` budget sized from it:
see :data:`spaceevo.train.config.BUDGETS`.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from spaceevo.errors import DataError, TrainingDivergedError, UsageError
from spaceevo.nn import Supernet
from spaceevo.space import CandidateSpace, Hyperspace, load_space, require_candidate_space
from spaceevo.train import distributed as ddp
from spaceevo.train.allocator import keep_freed_memory
from spaceevo.train.bn import preserved_bn_state, recalibrate_bn
from spaceevo.train.checkpoint import (
    RunDir,
    check_run_record,
    check_space,
    load_checkpoint,
    read_run_record,
    require_writable,
    run_record,
    save_checkpoint,
    write_config,
    write_log,
)
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import DataSpec, Datasets, ImageSplit, InMemorySplit, load_data, make_loader, resize_batch
from spaceevo.train.evaluate import evaluate
from spaceevo.train.optim import make_optimizer, make_scheduler
from spaceevo.train.sandwich import SandwichStep, autocast_dtype, memory_format
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
    budget: str = "default",
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

    ``config`` (default: the ``budget`` preset) with ``epochs``, ``qat_epochs``, ``largest_epochs``,
    ``seed`` and ``eval_every`` overriding it when given (:meth:`TrainConfig.override`). A run directory that
    already holds a checkpoint is continued only with ``resume=True`` and only for the same space,
    hyperspace YAML, data and config, compared with the checkpoint itself
    (:class:`~spaceevo.errors.RunMismatchError` naming each differing field otherwise); a finished
    run returns at once. An unwritable ``run`` raises :class:`~spaceevo.errors.ArtifactError` before
    any work.
    ``threads`` sets torch's intra-op threads for this process (None: leave them). ``progress``
    shows a progress bar per epoch on stderr (rank 0 only); ``on_epoch_end(record)`` is called after
    each epoch's checkpoint and log are written. A NaN or infinite
    loss raises :class:`~spaceevo.errors.TrainingDivergedError` naming the epoch and the step, and
    leaves the last checkpoint as it was.
    """
    started = time.perf_counter()
    if threads is not None:
        if threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    keep_freed_memory()
    candidate = require_candidate_space(load_space(space) if isinstance(space, str) else space, "training")
    spec = DataSpec.parse(data) if isinstance(data, str) else data
    spec.check()
    config = (config or TrainConfig.preset(budget)).override(
        epochs=epochs, qat_epochs=qat_epochs, largest_epochs=largest_epochs, seed=seed, eval_every=eval_every
    )
    run_dir = RunDir(Path(run))
    for folder in (run_dir.path, run_dir.checkpoint.parent):
        require_writable(folder, "--run directory")
    if config.reduce_range is None:
        from spaceevo.latency.fingerprint import device_fingerprint

        config = config.replace(reduce_range=device_fingerprint("cpu").reduce_range)
    created = ddp.init_from_env()
    try:
        trainer = _Trainer(candidate, spec, config, run_dir, progress, on_epoch_end)
        return trainer.run(resume, started)
    finally:
        ddp.shutdown(created)


class _Trainer:
    """State of one :func:`train_supernet` call (one process)."""

    def __init__(
        self,
        space: CandidateSpace,
        spec: DataSpec,
        config: TrainConfig,
        run: RunDir,
        progress: bool,
        on_epoch_end: Callable[[dict[str, Any]], None] | None,
    ):
        self.space, self.spec, self.config, self.run_dir = space, spec, config, run
        self.progress, self.on_epoch_end = progress, on_epoch_end
        self.rank, self.world = ddp.rank(), ddp.world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device() if self.world > 1 else 0)
        else:
            self.device = torch.device("cpu")
        self.amp_dtype = autocast_dtype(self.device, config.amp)

    # ---- setup ---------------------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return run_record(
            self.space,
            str(self.spec),
            self.config,
            heldout_seed=HELDOUT_SEED,
            world_size=self.world,
            device=str(self.device),
            amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
        )

    def _open_run(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to continue from (None: a fresh run); checks that it, and ``config.json``
        where present, hold what this call asks for."""
        run = self.run_dir
        if not run.checkpoint.exists():
            return None
        checkpoint = load_checkpoint(run.checkpoint)
        check_space(
            run.checkpoint,
            checkpoint.get("space"),
            checkpoint.get("hyperspace_digest"),
            self.space.encoding,
            self.space.hyperspace.digest,
        )
        if not resume:
            raise UsageError(
                f"{run.path} already holds a training run ({run.checkpoint}, epoch "
                f"{checkpoint.get('epoch')}); add --resume to continue it or choose another --run directory"
            )
        requested = self._record()
        check_run_record(run.checkpoint, checkpoint, requested)  # the checkpoint holds its own config
        stored = read_run_record(run)
        if stored is not None:
            check_run_record(run.config, stored, requested)
        return checkpoint

    def _load_data(self) -> Datasets:
        return load_space_data(self.space.hyperspace, self.spec)

    def _prepare_qat(self, supernet: nn.Module) -> nn.Module:
        from spaceevo.quant.qat import prepare_qat

        return prepare_qat(supernet, reduce_range=bool(self.config.reduce_range))  # quantizers on its device

    def _initialize_quantizers(self, supernet: nn.Module, datasets: Datasets) -> None:
        from spaceevo.quant.qat import initialize_quantizers

        loader = make_loader(
            datasets.train.with_augment(False), self.config.batch_size, True, seed=EVAL_SEED,
            workers=self.config.workers, distributed=False,
        )
        images, _ = next(iter(loader))
        supernet.set_max()
        supernet.train()
        initialize_quantizers(supernet, resize_batch(images.to(self.device), max(self.space.hyperspace.resolutions)))
        ddp.broadcast_state(supernet)

    # ---- evaluation ----------------------------------------------------------------------------
    def _heldout_loader(self, split: ImageSplit, resolution: int, batch_size: int):
        return make_loader(
            split.with_resolution(resolution), batch_size, True, seed=EVAL_SEED,
            workers=self.config.workers, distributed=False,
        )

    def _evaluate(self, supernet: nn.Module, datasets: Datasets) -> dict[str, float]:
        config = self.config
        batch = min(config.batch_size, config.calibration_images)
        results = {}
        with preserved_bn_state(supernet):
            for name, subnet in (("max", self.space.max_subnet()), ("min", self.space.min_subnet())):
                calibration = self._heldout_loader(datasets.heldout, subnet.resolution, batch)
                recalibrate_bn(supernet, subnet, calibration, math.ceil(config.calibration_images / batch))
                loader = self._heldout_loader(datasets.heldout, subnet.resolution, 256)
                results[name] = evaluate(supernet, subnet, loader, config.eval_images)
        return results

    # ---- training ------------------------------------------------------------------------------
    def _phase_tools(self, supernet: nn.Module, phase: str, steps_per_epoch: int, rng: random.Random):
        config = self.config
        qat = phase == "qat"
        epochs = config.qat_epochs if qat else config.epochs
        warmup = config.qat_warmup_epochs if qat else config.warmup_epochs
        optimizer = make_optimizer(supernet, config.qat_lr if qat else config.lr, config.momentum, config.weight_decay)
        scheduler = make_scheduler(optimizer, epochs * steps_per_epoch, round(warmup * steps_per_epoch))
        amp_dtype = None if qat else self.amp_dtype
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        step = SandwichStep(supernet, optimizer, scheduler, config, rng, amp_dtype=amp_dtype, scaler=scaler)
        return optimizer, scheduler, scaler, step

    def run(self, resume: bool, started: float) -> TrainResult:
        config, run = self.config, self.run_dir
        checkpoint = self._open_run(resume)
        datasets = self._load_data()
        train_loader = make_loader(
            datasets.train, config.batch_size, True, workers=config.workers, seed=config.seed, drop_last=True
        )
        if len(train_loader) == 0:
            raise UsageError(
                f"the training split of '{self.spec}' has {len(datasets.train)} images per process, "
                f"fewer than one batch of {config.batch_size}"
            )
        phase_steps = {phase: config.steps_in(phase, len(train_loader)) for phase in ("fp32", "qat")}

        torch.manual_seed(config.seed)
        rng = random.Random(config.seed)
        supernet: nn.Module = Supernet(self.space)
        initialize_weights(supernet, zero_init_residual=config.zero_init_residual)
        supernet.to(self.device, memory_format=memory_format(config, self.device))
        start, history, qat_ready = 0, [], False
        if checkpoint is not None:
            start, history = int(checkpoint["epoch"]), list(checkpoint["history"])
            if checkpoint["phase"] == "qat":
                supernet, qat_ready = self._prepare_qat(supernet), True
            supernet.load_state_dict(checkpoint["model"])
            _set_rng_states(checkpoint["rng"], rng, train_loader)
        ddp.broadcast_state(supernet)
        if self.rank == 0 and (checkpoint is None or not run.config.exists()):
            write_config(run, self._record())

        total = config.total_epochs
        phase = None
        optimizer = scheduler = scaler = step = None
        images_done, train_s = 0, 0.0
        for epoch in range(start + 1, total + 1):
            if config.phase_of(epoch) != phase:
                phase = config.phase_of(epoch)
                if phase == "qat" and not qat_ready:
                    supernet, qat_ready = self._prepare_qat(supernet), True
                    self._initialize_quantizers(supernet, datasets)
                steps_per_epoch = phase_steps[phase]
                optimizer, scheduler, scaler, step = self._phase_tools(supernet, phase, steps_per_epoch, rng)
                if checkpoint is not None and epoch == start + 1 and checkpoint["phase"] == phase:
                    optimizer.load_state_dict(checkpoint["optimizer"])
                    scheduler.load_state_dict(checkpoint["scheduler"])
                    if scaler is not None and checkpoint.get("scaler"):
                        scaler.load_state_dict(checkpoint["scaler"])
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)

            largest_only = config.largest_only(epoch)
            losses = {"max": 0.0, "min": 0.0, "random": 0.0}
            grad_norms = 0.0
            bar = tqdm(
                total=steps_per_epoch, desc=f"epoch {epoch}/{total} {phase}", unit="step", file=sys.stderr,
                disable=not self.progress or self.rank != 0, dynamic_ncols=True,
            )
            epoch_start = time.perf_counter()
            with bar:
                for index, (images, labels) in enumerate(itertools.islice(train_loader, steps_per_epoch), 1):
                    if self.world > 1:
                        ddp.broadcast_state(supernet, buffers_only=True)
                    result = step(images, labels, largest_only=largest_only)
                    if not result.finite:
                        kept = (
                            f"{run.checkpoint} still holds epoch {epoch - 1}"
                            if epoch > start + 1 or checkpoint is not None
                            else "no checkpoint was written yet"
                        )
                        raise TrainingDivergedError(
                            f"training diverged: non-finite {result.first_non_finite()} at epoch {epoch}, "
                            f"step {index} of {steps_per_epoch} ({phase}); stopped without saving, {kept}; "
                            f"lower the learning rate or check the data, then start a new --run"
                        )
                    losses["max"] += result.max
                    losses["min"] += result.min or 0.0
                    losses["random"] += sum(result.random) / max(1, len(result.random))
                    grad_norms += result.grad_norm
                    bar.set_postfix(loss=f"{result.total:.3f}", refresh=False)
                    bar.update(1)
            epoch_s = time.perf_counter() - epoch_start
            epoch_images = steps_per_epoch * config.batch_size * self.world
            images_done, train_s = images_done + epoch_images, train_s + epoch_s

            if self.world > 1:
                ddp.broadcast_state(supernet, buffers_only=True)
            eval_start = time.perf_counter()
            top1 = self._evaluate(supernet, datasets) if config.evaluates_after(epoch) else {"max": None, "min": None}
            record = {
                "epoch": epoch,
                "phase": phase,
                "steps": steps_per_epoch,
                "images": epoch_images,
                "loss_max": losses["max"] / steps_per_epoch,
                "subnets_per_step": 1 if largest_only else 2 + config.num_random_subnets,
                "loss_min": None if largest_only else losses["min"] / steps_per_epoch,
                "loss_random": None if largest_only else losses["random"] / steps_per_epoch,
                "loss": sum(losses.values()) / steps_per_epoch,
                "grad_norm": grad_norms / steps_per_epoch,
                "lr_end": optimizer.param_groups[0]["lr"],
                "heldout_top1_max": top1["max"],
                "heldout_top1_min": top1["min"],
                "train_s": round(epoch_s, 3),
                "eval_s": round(time.perf_counter() - eval_start, 3),
                "images_per_s": round(epoch_images / epoch_s, 2) if epoch_s > 0 else None,
            }
            history.append(record)
            if self.rank == 0:
                save_checkpoint(
                    run.checkpoint,
                    {
                        "space": self.space.encoding,
                        "hyperspace_digest": self.space.hyperspace.digest,
                        "data": str(self.spec),
                        "epoch": epoch,
                        "phase": phase,
                        "model": supernet.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": _rng_states(rng, train_loader),
                        "history": history,
                        "config": config.to_dict(),
                    },
                )
                if phase == "fp32" and epoch == config.epochs and config.qat_epochs > 0:
                    save_checkpoint(
                        run.fp32_checkpoint,
                        {
                            "space": self.space.encoding,
                            "hyperspace_digest": self.space.hyperspace.digest,
                            "epoch": epoch,
                            "phase": phase,
                            "model": supernet.state_dict(),
                        },
                    )
                write_log(run, history)
            ddp.barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(dict(record))

        last = history[-1] if history else {}
        return TrainResult(
            run_dir=run.path,
            space=self.space.encoding,
            epochs_done=len(history),
            total_epochs=total,
            resumed_from=start,
            top1_max=last.get("heldout_top1_max"),
            top1_min=last.get("heldout_top1_min"),
            wall_s=time.perf_counter() - started,
            train_images=images_done,
            train_s=train_s,
            history=tuple(history),
            supernet=supernet.eval(),
        )


def _rng_states(rng: random.Random, loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    return {
        "subnets": rng.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": loader.generator.get_state() if loader.generator is not None else None,
    }


def _set_rng_states(states: dict[str, Any], rng: random.Random, loader: torch.utils.data.DataLoader) -> None:
    rng.setstate(_as_tuple(states["subnets"]))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if states.get("loader") is not None and loader.generator is not None:
        loader.generator.set_state(states["loader"])


def _as_tuple(value: Any) -> Any:
    """``random.Random.setstate`` needs tuples; a checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value

