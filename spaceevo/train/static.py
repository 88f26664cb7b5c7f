"""A static network trained by the engine (:mod:`spaceevo.train.engine`): the task of every training
that is not a supernet's.

:class:`StaticTask` trains one ``nn.Module`` on labelled image batches: label-smoothed cross-entropy,
or, with a ``teacher``, distillation from the teacher's probabilities (KL at temperature 1, as the
sandwich rule's smaller subnets learn from the largest). Optionally every batch is resized to a
resolution drawn from ``resolutions`` (the block-KD teacher learns every hyperspace resolution), and a
``qat`` phase starts by ``prepare_qat(model)`` (e.g. LSQ+ quantizers, which initialise themselves
from the first training batch). Used by the block-KD teacher (:mod:`spaceevo.search.teacher`), the
stand-alone baselines of ``scripts/`` and the fine-tuning of extracted subnets.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from spaceevo.train.data import resize_batch
from spaceevo.train.engine import Optimization, Phase, StepFn, StepOutput, Task, loader_batches
from spaceevo.train.sandwich import distillation_loss


class StaticTask(Task):
    """One static ``model`` trained on the batches of ``loader`` (see the module doc).

    ``rng`` draws the resolution of each batch from ``resolutions`` (None: batches as loaded); the
    ``teacher`` sees each batch at ``teacher_resolution`` (None: as the student does), as the
    sandwich rule's largest subnet sees it at its own resolution;
    inputs are converted to ``memory_format`` (the model's). ``evaluate(model)`` gives the figures
    of each epoch's record (the model in whatever mode it leaves it; training sets it back).
    ``prepare_qat(model)`` returns the model the ``qat`` phase trains."""

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader,
        *,
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        teacher_resolution: int | None = None,
        resolutions: Sequence[int] | None = None,
        rng: random.Random | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        prepare_qat: Callable[[nn.Module], nn.Module] | None = None,
        evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    ):
        if resolutions and rng is None:
            raise ValueError("drawing resolutions needs an rng")
        self.model = model
        self.loader = loader
        self.label_smoothing = label_smoothing
        self.teacher = teacher.eval() if teacher is not None else None
        self.teacher_resolution = teacher_resolution
        self.resolutions = tuple(resolutions or ())
        self.rng = rng
        self.memory_format = memory_format
        self._prepare_qat = prepare_qat
        self._evaluate = evaluate

    def prepare(self, phase: Phase, *, restoring: bool) -> None:
        if phase.name == "qat":
            if self._prepare_qat is None:
                raise ValueError("a qat phase needs prepare_qat")
            self.model = self._prepare_qat(self.model)

    def make_step(self, phase: Phase, optimization: Optimization) -> StepFn:
        model = self.model
        device = next(model.parameters()).device

        def step(batch: tuple[torch.Tensor, torch.Tensor], epoch: int) -> StepOutput:
            loaded, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            images = resize_batch(loaded, self.rng.choice(self.resolutions)) if self.resolutions else loaded
            images = images.contiguous(memory_format=self.memory_format)
            teacher_images = images if self.teacher_resolution is None else (
                resize_batch(loaded, self.teacher_resolution).contiguous(memory_format=self.memory_format)
            )
            model.train()
            optimization.optimizer.zero_grad(set_to_none=True)
            with optimization.autocast():
                logits = model(images).float()
                if self.teacher is not None:
                    with torch.no_grad():
                        target = F.softmax(self.teacher(teacher_images).float(), dim=1)
            if self.teacher is not None:
                loss = distillation_loss(logits, target)
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            optimization.backward(loss)
            update = optimization.update(model, loss.reshape(1), ("loss",))
            return StepOutput({"loss": update.losses[0], "grad_norm": update.grad_norm}, int(labels.shape[0]), update.non_finite)

        return step

    def batches(self, epoch: int) -> Iterable[Any]:
        return loader_batches(self.loader, epoch)

    def evaluate(self, epoch: int, phase: Phase) -> dict[str, Any]:
        return self._evaluate(self.model) if self._evaluate is not None else {}

    def generators(self) -> Mapping[str, random.Random | torch.Generator]:
        generators: dict[str, random.Random | torch.Generator] = {"loader": self.loader.generator}
        if self.rng is not None:
            generators["resolutions"] = self.rng
        return generators
