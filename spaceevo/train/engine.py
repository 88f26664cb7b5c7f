"""The one training engine of spaceevo: epochs, phases, checkpoints, resume, divergence, logging.

Every training in spaceevo (the supernet's FP32 and QAT phases, the block-KD teacher, the block-KD
jobs, stand-alone static networks) is a :class:`Task` run by :class:`Engine` under an
:class:`EngineConfig`. The task says *what* is trained: its model, the batches of an epoch, one
optimizer step (:meth:`Task.make_step`), what to measure after an epoch, its random generators and
how its model changes between phases (e.g. LSQ+ quantizers before QAT). The engine owns *how*:

- **phases** (:class:`Phase`), each with its own optimizer, warm-up + cosine schedule per step
  (:func:`~spaceevo.train.optim.make_scheduler`), steps per epoch and mixed precision; epochs are
  numbered from 1 across all phases;
- **mixed precision**: CUDA autocast in phases with ``amp`` (bfloat16, or float16 with a gradient
  scaler: :func:`autocast_dtype`), handed to the step as an :class:`Optimization`, which also
  finishes every step (:meth:`Optimization.update`);
- **checkpoints**: after every epoch the model, optimizer, schedule, scaler, every RNG state (Python's
  ``random``, torch's CPU and CUDA generators and the task's own: its subnet sampler, its
  DataLoader's generator), the task's extra state, the history and the task's ``meta`` (what the run
  trains) go into one file, written atomically (:mod:`spaceevo.io`): a process killed at any point
  leaves the previous epoch's checkpoint intact;
- **bit-identical resume**: :meth:`Engine.run` with that checkpoint continues at the next epoch and
  computes the same weights as an uninterrupted run (same host, thread count and software);
- **divergence**: a step whose loss or gradient is not finite stops training with
  :class:`~spaceevo.errors.TrainingDivergedError` naming the epoch, the step and what the checkpoint
  still holds; nothing is saved;
- **logging**: a progress bar per epoch on stderr, one JSON line per epoch in ``log.jsonl``
  (rewritten atomically from the checkpoint's history), TensorBoard scalars when the ``tensorboard``
  package is installed (none otherwise);
- **torchrun**: only rank 0 writes; BatchNorm buffers are broadcast from rank 0 before every step
  and the model after every (re)build; gradients are averaged once per step by
  :func:`~spaceevo.train.distributed.all_reduce_gradients` in :meth:`Optimization.update`, see
  :mod:`spaceevo.train.distributed`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.nn.utils import get_total_norm
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from spaceevo.errors import ArtifactError, RunMismatchError, TrainingDivergedError
from spaceevo.interrupts import raise_if_interrupted
from spaceevo.train import distributed as ddp
from spaceevo.train.allocator import keep_freed_memory
from spaceevo.train.checkpoint import save_state, write_log
from spaceevo.train.optim import make_scheduler

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
RandomSource = random.Random | torch.Generator

_ENGINE_RNGS = ("python", "torch", "cuda")
_REQUIRED = ("epoch", "phase", "model", "optimizer", "scheduler", "rng", "history")


@dataclass(frozen=True)
class Phase:
    """A stretch of ``epochs`` epochs of ``steps`` optimizer steps with its own optimizer.

    ``optimizer(model)`` builds the optimizer when the phase starts (after :meth:`Task.prepare`);
    the learning rate warms up over ``warmup_steps`` and decays to zero at the phase's last step.
    ``amp``: CUDA autocast in this phase. ``snapshot``: a file that also receives the weights after
    the phase's last epoch (e.g. the FP32 weights before QAT)."""

    name: str
    epochs: int
    steps: int
    optimizer: OptimizerFactory
    warmup_steps: int = 0
    amp: bool = False
    snapshot: Path | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How a task is trained: its phases (those without epochs are skipped) and where it writes.

    ``checkpoint`` (None: nothing is kept) holds the state after the last finished epoch in
    ``checkpoint_format`` (:func:`~spaceevo.train.checkpoint.save_state`), together with ``meta``,
    the task's identity (space, data, config, ...) that its caller checks before resuming.
    ``log``: the ``log.jsonl`` to rewrite after every epoch; ``tensorboard``: the folder of
    TensorBoard event files (used only when TensorBoard is installed). ``name`` heads progress bars
    and errors; ``leave_progress`` keeps finished bars on screen. ``on_epoch_end(record)`` runs after
    each epoch's files are written."""

    phases: tuple[Phase, ...]
    name: str = "training"
    checkpoint: Path | None = None
    checkpoint_format: int | str = 1
    meta: Mapping[str, Any] = field(default_factory=dict)
    log: Path | None = None
    tensorboard: Path | None = None
    progress: bool = True
    leave_progress: bool = True
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(p for p in self.phases if p.epochs > 0))
        if not self.phases:
            raise ValueError("a training needs at least one phase with epochs")
        clash = sorted(set(self.meta) & {*_REQUIRED, "scaler", "task"})
        if clash:
            raise ValueError(f"meta keys {clash} are the engine's own checkpoint keys")

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def phase_of(self, epoch: int) -> Phase:
        """The phase of 1-based ``epoch``."""
        for phase in self.phases:
            if epoch <= phase.epochs:
                return phase
            epoch -= phase.epochs
        raise ValueError(f"epoch beyond the {self.total_epochs} epochs of this training")

    def last_epoch_of(self, phase: Phase) -> int:
        return sum(p.epochs for p in self.phases[: self.phases.index(phase) + 1])


@dataclass(frozen=True)
class Update:
    """What :meth:`Optimization.update` did: the step's losses (averaged over ranks), the gradient
    norm (NaN when a loss was not finite) and, when it did not step, what was not finite first."""

    losses: tuple[float, ...]
    grad_norm: float
    non_finite: str | None


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype of a phase with ``amp`` on ``device``: bfloat16 on CUDA where the GPU has it,
    else float16 (which needs a gradient scaler); None (no autocast) on CPU or when ``enabled`` is False."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Optimization:
    """The optimizer, schedule (None: a constant learning rate, as in benchmarks) and mixed precision
    of the current phase, as a step uses them."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def on(
        cls, device: torch.device, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, amp: bool = True,
    ) -> Optimization:
        """The optimization of a phase on ``device``: autocast at :func:`autocast_dtype` when ``amp``,
        with a gradient scaler under float16."""
        amp_dtype = autocast_dtype(device, amp)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(optimizer, scheduler, amp_dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        """CUDA autocast at the phase's dtype; nothing when the phase runs in float32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled under a float16 gradient scaler)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self, model: nn.Module, losses: torch.Tensor, names: Sequence[str]) -> Update:
        """Finish a step whose ``losses`` (named by ``names``) were backpropagated: average gradients
        and losses over ranks, then one optimizer and one schedule step if everything is finite,
        else discard the gradients."""
        values = ddp.all_reduce_gradients(model, losses.detach().float())
        listed = tuple(values.tolist())
        bad = next((name for name, value in zip(names, listed) if not math.isfinite(value)), None)
        grad_norm = float("nan")
        if bad is None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float(get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            if self.scaler is None and not math.isfinite(grad_norm):  # a scaler skips such steps itself
                bad = "gradient (the losses were finite)"
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return Update(listed, grad_norm, bad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return Update(listed, grad_norm, None)


@dataclass(frozen=True)
class StepOutput:
    """One step's figures: ``metrics`` (averaged over the epoch's steps into its record; None where
    a step has no such figure), the ``images`` it trained on (this rank) and, when the step was not
    taken, what was not finite."""

    metrics: Mapping[str, float | None]
    images: int
    non_finite: str | None = None


StepFn = Callable[[Any, int], StepOutput]
"""``step(batch, epoch)``: one optimizer step on a batch of :meth:`Task.batches`."""


class Task(Protocol):
    """What one kind of training trains; subclass it to get the defaults of the optional hooks."""

    model: nn.Module

    def make_step(self, phase: Phase, optimization: Optimization) -> StepFn:
        """The step function of ``phase``, which steps ``optimization`` (called once per phase)."""
        ...

    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of 1-based ``epoch``; the engine takes the phase's ``steps`` of them."""
        ...

    def prepare(self, phase: Phase, *, restoring: bool) -> None:
        """Make ``model`` what ``phase`` trains (e.g. add quantizers), before its optimizer is built.
        ``restoring``: a checkpoint of this phase will be loaded into it, so skip initialisation that
        the checkpoint holds (e.g. quantizer ranges from a batch)."""

    def evaluate(self, epoch: int, phase: Phase) -> dict[str, Any]:
        """Figures for the epoch's record (e.g. held-out top-1) after its steps, measured without
        changing the training state."""
        return {}

    def generators(self) -> Mapping[str, RandomSource]:
        """The task's own random generators (checkpointed and restored by the engine)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint besides the model and the generators."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class EngineResult:
    """What :meth:`Engine.run` did: the whole history (resumed epochs included); ``resumed_from``
    epochs came from the checkpoint; ``train_images`` (all ranks) and ``train_s`` count this call."""

    history: tuple[dict[str, Any], ...]
    resumed_from: int
    total_epochs: int
    train_images: int
    train_s: float

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def loader_batches(loader: DataLoader, epoch: int) -> DataLoader:
    """``loader`` ready for ``epoch``: a distributed sampler shuffles anew each epoch."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    return loader


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the ``torchrun`` process group for the duration (nothing without ``WORLD_SIZE`` > 1)."""
    created = ddp.init_from_env()
    try:
        yield
    finally:
        ddp.shutdown(created)


def training_device() -> torch.device:
    """This process's device: its local GPU under ``torchrun``, the first GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if ddp.world_size() > 1 else 0)
    return torch.device("cpu")


class Engine:
    """Runs a :class:`Task` under an :class:`EngineConfig` (see the module doc)."""

    def __init__(self, task: Task, config: EngineConfig):
        self.task, self.config = task, config
        self.rank, self.world = ddp.rank(), ddp.world_size()

    # ---- state -----------------------------------------------------------------------------------
    def _generators(self) -> Mapping[str, RandomSource]:
        generators = dict(self.task.generators())
        clash = sorted(set(generators) & set(_ENGINE_RNGS))
        if clash:
            raise ValueError(f"task generator names {clash} are reserved by the engine")
        return generators

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        for name, generator in self._generators().items():
            state[name] = generator.getstate() if isinstance(generator, random.Random) else generator.get_state()
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        random.setstate(_as_tuple(state["python"]))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        for name, generator in self._generators().items():
            if isinstance(generator, random.Random):
                generator.setstate(_as_tuple(state[name]))
            else:
                generator.set_state(state[name])

    def _check(self, checkpoint: Mapping[str, Any]) -> tuple[int, Phase]:
        """The epoch and phase a checkpoint ends with; :class:`ArtifactError` when it lacks what the
        engine writes (another spaceevo version), :class:`RunMismatchError` when it does not fit
        this training's phases."""
        where = self.config.checkpoint or "the checkpoint"
        rng = checkpoint.get("rng")
        missing = [key for key in _REQUIRED if key not in checkpoint]
        if "rng" in checkpoint and not isinstance(rng, Mapping):
            missing.append("rng (a mapping)")
        elif isinstance(rng, Mapping):
            missing += [f"rng.{key}" for key in ("python", "torch", *self._generators()) if key not in rng]
        if missing:
            raise ArtifactError(
                f"{where} cannot be resumed: it lacks {', '.join(missing)} (written by another spaceevo "
                f"version); delete it to train again"
            )
        epoch, name = checkpoint["epoch"], checkpoint["phase"]
        total = self.config.total_epochs
        if not isinstance(epoch, int) or not 0 < epoch <= total or self.config.phase_of(epoch).name != name:
            plan = " + ".join(f"{p.epochs} {p.name}" for p in self.config.phases)
            raise RunMismatchError(
                f"{where} holds epoch {epoch!r} ({name!r}), which this training ({plan} epochs) does not have; "
                f"use the settings it was started with, or another run directory"
            )
        return epoch, self.config.phase_of(epoch)

    def _restore(self, checkpoint: Mapping[str, Any]) -> int:
        epoch, phase = self._check(checkpoint)
        self.task.prepare(phase, restoring=True)
        with self._incompatible("model"):
            self.task.model.load_state_dict(checkpoint["model"])
        with self._incompatible("task state"):
            self.task.load_state_dict(checkpoint.get("task") or {})
        with self._incompatible("random generator states"):
            self._set_rng_state(checkpoint["rng"])
        return epoch

    @contextlib.contextmanager
    def _incompatible(self, what: str) -> Iterator[None]:
        """Report a checkpoint part that does not fit this training as :class:`ArtifactError`."""
        try:
            yield
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
            raise ArtifactError(
                f"{self.config.checkpoint or 'the checkpoint'} does not hold this training's {what} ({reason}); "
                f"delete it to train again"
            ) from None

    def _optimization(self, phase: Phase, checkpoint: Mapping[str, Any] | None) -> Optimization:
        model = self.task.model
        optimizer = phase.optimizer(model)
        scheduler = make_scheduler(optimizer, phase.epochs * phase.steps, phase.warmup_steps)
        optimization = Optimization.on(next(model.parameters()).device, optimizer, scheduler, phase.amp)
        if checkpoint is not None:
            with self._incompatible("optimizer state"):
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                if optimization.scaler is not None and checkpoint.get("scaler"):
                    optimization.scaler.load_state_dict(checkpoint["scaler"])
        return optimization

    def _save(self, epoch: int, phase: Phase, optimization: Optimization, history: list[dict[str, Any]]) -> None:
        config = self.config
        weights = {key: value.detach().cpu() for key, value in self.task.model.state_dict().items()}
        if config.checkpoint is not None:
            state = {
                **config.meta,
                "epoch": epoch,
                "phase": phase.name,
                "model": weights,
                "optimizer": optimization.optimizer.state_dict(),
                "scheduler": optimization.scheduler.state_dict(),
                "scaler": optimization.scaler.state_dict() if optimization.scaler is not None else None,
                "rng": self._rng_state(),
                "task": self.task.state_dict(),
                "history": history,
            }
            save_state(config.checkpoint, state, config.checkpoint_format)
        if phase.snapshot is not None and epoch == config.last_epoch_of(phase):
            save_state(phase.snapshot, {**config.meta, "epoch": epoch, "phase": phase.name, "model": weights},
                       config.checkpoint_format)
        if config.log is not None:
            write_log(config.log, history)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, checkpoint: Mapping[str, Any] | None = None) -> EngineResult:
        """Train every epoch after ``checkpoint`` (None: from the start); returns at once when the
        checkpoint already holds the last epoch (its weights loaded into the task's model)."""
        config, task = self.config, self.task
        keep_freed_memory()  # activations reused without page faults (spaceevo.train.allocator)
        start, history = 0, []
        if checkpoint is not None:
            start, history = self._restore(checkpoint), list(checkpoint["history"])
        ddp.broadcast_state(task.model)
        writer = _tensorboard(config.tensorboard) if self.rank == 0 and start < config.total_epochs else None
        phase: Phase | None = None
        optimization: Optimization | None = None
        step: StepFn | None = None
        images_done, train_s = 0, 0.0
        try:
            for epoch in range(start + 1, config.total_epochs + 1):
                if config.phase_of(epoch) is not phase:
                    phase = config.phase_of(epoch)
                    resumed = checkpoint if epoch == start + 1 and start > 0 and checkpoint["phase"] == phase.name else None
                    if resumed is None:
                        task.prepare(phase, restoring=False)
                        ddp.broadcast_state(task.model)
                    optimization = self._optimization(phase, resumed)
                    step = task.make_step(phase, optimization)
                record, epoch_s = self._epoch(epoch, phase, step, optimization)
                images_done, train_s = images_done + record["images"], train_s + epoch_s
                history.append(record)
                if self.rank == 0:
                    self._save(epoch, phase, optimization, history)
                    if writer is not None:
                        _write_scalars(writer, record)
                ddp.barrier()
                if config.on_epoch_end is not None:
                    config.on_epoch_end(dict(record))
        finally:
            if writer is not None:
                writer.close()
        return EngineResult(tuple(history), start, config.total_epochs, images_done, train_s)

    def _epoch(self, epoch: int, phase: Phase, step: StepFn, optimization: Optimization) -> tuple[dict[str, Any], float]:
        config, task = self.config, self.task
        sums: dict[str, float | None] = {}
        images = 0
        bar = tqdm(
            total=phase.steps, desc=f"{config.name}: epoch {epoch}/{config.total_epochs} {phase.name}", unit="step",
            file=sys.stderr, disable=not config.progress or self.rank != 0, dynamic_ncols=True,
            leave=config.leave_progress,
        )
        started = time.perf_counter()
        with bar:
            for index, batch in enumerate(itertools.islice(task.batches(epoch), phase.steps), 1):
                raise_if_interrupted()
                if self.world > 1:
                    ddp.broadcast_state(task.model, buffers_only=True)
                output = step(batch, epoch)
                if output.non_finite is not None:
                    raise TrainingDivergedError(self._diverged(epoch, index, phase, output.non_finite))
                for key, value in output.metrics.items():
                    total = sums.get(key, 0.0)
                    sums[key] = None if value is None or total is None else total + value
                images += output.images
                loss = output.metrics.get("loss")
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update(1)
        epoch_s = time.perf_counter() - started
        if self.world > 1:
            ddp.broadcast_state(task.model, buffers_only=True)
        images *= self.world
        evaluated = time.perf_counter()
        record: dict[str, Any] = {
            "epoch": epoch,
            "phase": phase.name,
            "steps": phase.steps,
            "images": images,
            **{key: None if value is None else value / phase.steps for key, value in sums.items()},
            "lr_end": optimization.optimizer.param_groups[0]["lr"],
        }
        record.update(task.evaluate(epoch, phase))
        record.update(
            train_s=round(epoch_s, 3),
            eval_s=round(time.perf_counter() - evaluated, 3),
            images_per_s=round(images / epoch_s, 2) if epoch_s > 0 else None,
        )
        return record, epoch_s

    def _diverged(self, epoch: int, step: int, phase: Phase, what: str) -> str:
        checkpoint = self.config.checkpoint
        if checkpoint is None:
            saved = "this training keeps no checkpoint"
        elif epoch == 1:
            saved = "no checkpoint was written yet"
        else:  # written after the previous epoch, by this call or by the one resumed
            saved = f"{checkpoint} still holds epoch {epoch - 1}"
        return (
            f"{self.config.name} diverged: non-finite {what} at epoch {epoch}, step {step} of {phase.steps} "
            f"({phase.name}); stopped without saving, {saved}; lower the learning rate or check the data, then "
            f"start again in a new run directory"
        )


def _tensorboard(folder: Path | None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``folder``, or None without a folder or without TensorBoard."""
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _write_scalars(writer: Any, record: Mapping[str, Any]) -> None:
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


def _as_tuple(value: Any) -> Any:
    """``random.Random.setstate`` needs tuples; a checkpoint hands back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
