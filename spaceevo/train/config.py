"""Hyper-parameters of supernet training (:class:`TrainConfig`) and the named budgets.

A budget is a preset of every field: ``smoke`` is a fraction of an epoch for tests and for checking
that a setup works; ``default`` trains a ``tiny`` candidate space on the embedded Fashion-MNIST
subset on 2 CPU cores in about 20 minutes (see :data:`PRESETS` for what was measured). Any field
can be overridden on top of a budget (:meth:`TrainConfig.preset`). On a GPU the ``default`` budget
is fitted to the device (:func:`fit_to_cuda`): a larger batch, and as many epochs as fit in the CPU
default's wall-clock time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from spaceevo.errors import UsageError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the weights a supernet training run produces, and how often it evaluates them.

    The first ``largest_epochs`` of the ``epochs`` FP32 epochs train the largest subnet alone (the
    first stage of Once-for-All's progressive shrinking); the others are sandwich epochs. The
    learning-rate schedule runs over all FP32 epochs. ``batch_size`` is per process (the global batch under ``torchrun`` is ``batch_size`` times the
    world size); ``lr`` and ``qat_lr`` are the peak learning rates of the FP32 and the QAT phase
    (cosine decay to zero within each phase, after ``warmup_epochs`` / ``qat_warmup_epochs`` of
    linear warm-up; fractions of an epoch are allowed). ``steps_per_epoch`` caps the optimizer steps
    of an epoch (None: one pass over the training split); ``qat_steps_per_epoch`` caps those of a QAT
    epoch further (None: as an FP32 epoch), since QAT steps cost about twice as much and start from
    trained weights. ``calibration_images`` held-out images
    recalibrate BatchNorm before each evaluation; ``eval_images`` caps the held-out images that are
    evaluated (None: all); ``eval_every`` evaluates after every N-th epoch and always after the
    last epoch of each phase (:meth:`evaluates_after`). ``reduce_range`` (7-bit weights in QAT, for x86 without VNNI) is decided
    from this host's CPU when None. ``workers``: DataLoader processes (None: automatic).
    ``amp``: autocast on CUDA in the FP32 phase. ``channels_last``: NHWC memory format for weights
    and activations; None (the default) uses it on CPU only (:meth:`uses_channels_last`). On CPU
    oneDNN runs sandwich steps 1.5x faster in NHWC. On CUDA (H100, bfloat16) NHWC made them
    over 10x slower (median 1.0 s against 74 ms at batch 64): cuDNN builds kernels for every new
    convolution shape, and each sandwich step brings new (elastic) shapes (``scripts/bench_sandwich.py``).
    """

    epochs: int = 2
    qat_epochs: int = 1
    largest_epochs: int = 0
    batch_size: int = 64
    lr: float = 0.1
    qat_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.2
    qat_warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    num_random_subnets: int = 2
    seed: int = 0
    workers: int | None = None
    steps_per_epoch: int | None = None
    qat_steps_per_epoch: int | None = None
    calibration_images: int = 256
    eval_images: int | None = None
    eval_every: int = 1
    reduce_range: bool | None = None
    zero_init_residual: bool = True
    amp: bool = True
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> UsageError:
            return UsageError(f"training config: {name}={getattr(self, name)!r} is not allowed; allowed: {allowed}")

        for name in ("epochs", "qat_epochs", "largest_epochs", "num_random_subnets", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise bad(name, "an integer >= 0")
        for name in ("batch_size", "calibration_images", "eval_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise bad(name, "an integer >= 1")
        for name in ("steps_per_epoch", "qat_steps_per_epoch", "eval_images", "workers"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < (0 if name == "workers" else 1)):
                raise bad(name, "None or an integer >= " + ("0" if name == "workers" else "1"))
        if self.epochs + self.qat_epochs < 1:
            raise UsageError("training config: epochs + qat_epochs must be at least 1")
        if self.largest_epochs > self.epochs:
            raise bad("largest_epochs", f"an integer from 0 to epochs ({self.epochs})")
        for name in ("lr", "qat_lr"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise bad(name, "a finite number > 0")
        for name in ("weight_decay", "warmup_epochs", "qat_warmup_epochs"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0 or not math.isfinite(value):
                raise bad(name, "a finite number >= 0")
        for name in ("momentum", "label_smoothing"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise bad(name, "a number in [0, 1)")
        for name in ("zero_init_residual", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise bad("channels_last", "None (on CPU only), true or false")
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise bad("reduce_range", "None (decide from this host's CPU), true or false")

    def uses_channels_last(self, device_type: str) -> bool:
        """Whether training on a ``device_type`` (``cpu``, ``cuda``) device runs in NHWC memory format."""
        return self.channels_last if self.channels_last is not None else device_type == "cpu"

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.qat_epochs

    def phase_of(self, epoch: int) -> str:
        """``fp32`` or ``qat``: the phase of 1-based ``epoch``."""
        return "fp32" if epoch <= self.epochs else "qat"

    def steps_in(self, phase: str, batches: int) -> int:
        """Optimizer steps of an epoch of ``phase`` (``fp32`` or ``qat``) over a loader of ``batches``."""
        steps = min(batches, self.steps_per_epoch or batches)
        if phase == "qat" and self.qat_steps_per_epoch is not None:
            steps = min(steps, self.qat_steps_per_epoch)
        return steps

    def evaluates_after(self, epoch: int) -> bool:
        """Whether held-out top-1 is measured after 1-based ``epoch``: every ``eval_every``-th epoch
        and the last epoch of each phase."""
        return epoch % self.eval_every == 0 or epoch in (self.epochs, self.total_epochs)

    def largest_only(self, epoch: int) -> bool:
        """Whether 1-based ``epoch`` trains the largest subnet alone (see ``largest_epochs``)."""
        return epoch <= self.largest_epochs

    def summary(self) -> str:
        """The length of training in words, e.g. ``16 FP32 epochs (the first 8 largest-only) + 1 QAT
        epoch of at most 70 steps, batch 64``."""

        def count(n: int, what: str) -> str:
            return f"{n} {what}" + ("" if n == 1 else "s")

        fp32 = count(self.epochs, "FP32 epoch")
        if self.largest_epochs:
            fp32 += f" (the first {self.largest_epochs} largest-only)"
        if self.steps_per_epoch is not None:
            fp32 += f" of at most {count(self.steps_per_epoch, 'step')}"
        qat = count(self.qat_epochs, "QAT epoch")
        qat_steps = min(filter(None, (self.steps_per_epoch, self.qat_steps_per_epoch)), default=None)
        if qat_steps is not None:
            qat += f" of at most {count(qat_steps, 'step')}"
        return f"{fp32} + {qat}, batch {self.batch_size}"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; unknown field names raise :class:`UsageError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UsageError(f"training config: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def override(
        self,
        *,
        epochs: int | None = None,
        qat_epochs: int | None = None,
        largest_epochs: int | None = None,
        seed: int | None = None,
        eval_every: int | None = None,
    ) -> TrainConfig:
        """A copy with the given (not None) command-line overrides; with ``epochs`` given and
        ``largest_epochs`` not, the largest-only epochs keep their share of the FP32 epochs (rounded
        down), so that a shorter run still has sandwich epochs."""
        if epochs is not None and largest_epochs is None:
            largest_epochs = self.largest_epochs * epochs // self.epochs if self.epochs else 0
        changes = {
            "epochs": epochs, "qat_epochs": qat_epochs, "largest_epochs": largest_epochs, "seed": seed,
            "eval_every": eval_every,
        }
        return self.replace(**{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def preset(cls, preset: str = "default", **overrides: Any) -> TrainConfig:
        """The named preset with ``overrides`` applied (``None`` values are ignored)."""
        if preset not in PRESETS:
            raise UsageError(f"unknown training preset {preset!r}; allowed: {', '.join(PRESETS)}")
        return PRESETS[preset].replace(**{k: v for k, v in overrides.items() if v is not None})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PRESETS: dict[str, TrainConfig] = {
    # A few steps of each phase: checks that training, QAT, checkpointing and evaluation work.
    # About 15-25 s on one CPU thread for tiny-1111-0000 (most of it is QAT and evaluation).
    "smoke": TrainConfig(
        epochs=1,
        qat_epochs=1,
        batch_size=32,
        lr=0.1,
        qat_lr=0.01,
        warmup_epochs=0.0,
        steps_per_epoch=3,
        calibration_images=64,
        eval_images=128,
    ),
    # tiny on the embedded data: 17 FP32 epochs, each a full pass over the 9,000 training images
    # (140 steps of 64), the first 9 of them largest-only (about half the cost of a sandwich epoch),
    # then one QAT epoch of 70 steps (a QAT step costs about twice an FP32 sandwich step); held-out
    # top-1 after every 4th epoch and at the end of each phase (an evaluation takes 3-5 s).
    # `spaceevo train --space tiny-1144-1101 --threads 2` on our 2-core VM, on a slow day (sandwich
    # epochs 83-96 s; 79-84 s on a quiet one): 19m39s; test ONNX Runtime INT8 top-1 of the largest /
    # smallest subnet 90.15 / 86.45 % (README, "Supernet training"). The same recipe with 16 epochs
    # (8 largest-only) and an evaluation after every epoch took 17m55s on a quiet day and reached
    # 89.7 / 86.55 %. QAT at 0.003 rather than 0.01: the smallest subnet lost 0.6 points against
    # FP32 at 0.01.
    # The first default, 8 sandwich epochs and a full QAT epoch, took 16m31s and reached
    # 86.95 / 84.1 %. BatchNorm is recalibrated on the whole held-out split (1,000 images): test
    # top-1 of the largest subnet was 87.40 with 256 calibration images and 87.75 with 1,000.
    "default": TrainConfig(
        epochs=17,
        qat_epochs=1,
        largest_epochs=9,
        eval_every=4,
        qat_steps_per_epoch=70,
        batch_size=64,
        lr=0.1,
        qat_lr=0.003,
        warmup_epochs=0.2,
        steps_per_epoch=None,
        calibration_images=1000,
        eval_images=None,
    ),
}
"""Named training budgets (``--preset``)."""

CUDA_BATCH_FACTOR = 4
"""How much larger the batch of the CUDA default is than the CPU default's (64 -> 256). On an H200 a
``tiny`` sandwich step took 0.14-0.17 s at any batch from 64 to 1,024 (issue 17: per-step overhead,
not arithmetic), so a larger batch trains more images in the same time; 4 keeps 35 steps in an epoch
of the 9,000 embedded training images."""

CPU_DEFAULT_WALL_S = 1180.0
"""The wall-clock time the CUDA default fills: the CPU default's (19m39s for ``tiny-1144-1101`` on
2 cores, see :data:`PRESETS`)."""

LARGEST_STEP_COST = 0.5
"""A largest-only step's time in sandwich steps (on CPU about half, see :data:`PRESETS`)."""

QAT_STEP_COST = 2.0
"""A QAT step's time in FP32 sandwich steps (on CPU about twice, see :data:`PRESETS`)."""

FITTED_FIELDS = ("epochs", "largest_epochs", "eval_every", "batch_size", "lr", "qat_lr", "qat_steps_per_epoch")
"""The fields :func:`fit_to_cuda` chooses."""


def fit_to_cuda(
    config: TrainConfig, step_s: float, train_images: int, *, world_size: int = 1,
    batch_factor: int | None = None, target_s: float | None = None,
) -> dict[str, Any]:
    """The CPU ``config`` fitted to a CUDA device whose sandwich step at the larger batch took
    ``step_s`` seconds (a probe), over ``train_images`` training images shared by ``world_size``
    processes; returns the record kept in ``config.json`` and the checkpoint: ``fields`` (the
    :data:`FITTED_FIELDS`, for :meth:`TrainConfig.replace`) and what they were derived from.

    - The batch grows by ``batch_factor`` (:data:`CUDA_BATCH_FACTOR`) and both learning rates with
      it: the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
      ImageNet in 1 Hour"); the warm-up stays as long in epochs, as there. QAT epochs keep their
      images (fewer, larger steps).
    - The FP32 epochs fill ``target_s`` (:data:`CPU_DEFAULT_WALL_S`) by a cost model in sandwich
      steps (largest-only steps :data:`LARGEST_STEP_COST`, QAT steps :data:`QAT_STEP_COST`; evaluation
      not counted), never fewer than ``config``'s; largest-only epochs and evaluations keep their
      share of them.
    """
    factor = CUDA_BATCH_FACTOR if batch_factor is None else batch_factor
    target = CPU_DEFAULT_WALL_S if target_s is None else target_s
    batch = config.batch_size * factor
    qat_steps = None if config.qat_steps_per_epoch is None else math.ceil(config.qat_steps_per_epoch / factor)
    scaled = config.replace(batch_size=batch, lr=config.lr * factor, qat_lr=config.qat_lr * factor,
                            qat_steps_per_epoch=qat_steps)
    steps = scaled.steps_in("fp32", max(1, train_images // (batch * world_size)))
    largest_share = config.largest_epochs / config.epochs if config.epochs else 0.0
    fp32_epoch_s = steps * step_s * (1 - largest_share * (1 - LARGEST_STEP_COST))
    qat_s = config.qat_epochs * scaled.steps_in("qat", steps) * step_s * QAT_STEP_COST
    fitted = scaled
    if config.epochs:  # a QAT-only config keeps its epochs
        epochs = max(config.epochs, math.floor((target - qat_s) / fp32_epoch_s))
        eval_every = max(config.eval_every, round(config.eval_every * epochs / config.epochs))
        fitted = scaled.override(epochs=epochs, eval_every=eval_every)
    return {
        "fields": {name: getattr(fitted, name) for name in FITTED_FIELDS},
        "batch_factor": factor,
        "probe_step_s": step_s,
        "steps_per_epoch": steps,
        "target_s": target,
        "estimated_s": round(fitted.epochs * fp32_epoch_s + qat_s, 1),
    }
