"""The teacher of block-wise knowledge distillation: a ResNet whose stages line up with the hyperspace's.

Block-wise distillation (:mod:`spaceevo.search.blockkd`) trains every searchable stage of the
student to reproduce the teacher's feature map at the same place of the network, so the teacher must
have one stage per hyperspace stage producing a map of the same spatial size. :class:`Teacher` is
built from torchvision's ResNet pieces (:class:`torchvision.models.resnet.BasicBlock`, ResNet-18's
block, and torchvision's ResNet initialisation) with the stem adapted to small single-channel images:
a 3x3 stride-1 input conv without max pooling, then one layer of BasicBlocks per hyperspace stage,
the first with that stage's stride ('same' padding, so sizes follow
:func:`~spaceevo.blocks.conv_output_size` exactly as the student's), each as wide as the stage's
widest choice times ``width_multiplier``. No pretrained weights: :func:`train_teacher` trains it on the
data (label-smoothed cross-entropy, a random hyperspace resolution per batch, SGD with warm-up and
cosine decay; the training engine, :mod:`spaceevo.train.engine`) and keeps it in
``RUN/search/teacher.pt``, written atomically after every epoch and resumed from there. :func:`load_teacher` reads such a checkpoint (``--teacher PATH``).

Measured on the 2-core reference host (``nice``-d, beside another training run; embedded
Fashion-MNIST, ``tiny``): see :data:`TEACHER_PRESETS`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from spaceevo.errors import ArtifactError, RunMismatchError, UsageError
from spaceevo.space import Hyperspace
from spaceevo.train.checkpoint import load_state
from spaceevo.train.data import Datasets, make_loader
from spaceevo.train.engine import Engine, EngineConfig, Phase
from spaceevo.train.evaluate import top1
from spaceevo.train.optim import make_optimizer
from spaceevo.train.static import StaticTask

TEACHER_FORMAT = "spaceevo-teacher/1"
TEACHER_FILE = "teacher.pt"


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher is built and trained. ``steps_per_epoch`` None: one pass over the train split;
    ``eval_images``: held-out images scored after each epoch (None: all)."""

    epochs: int = 4
    steps_per_epoch: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.1
    width_multiplier: float = 2.0
    blocks_per_stage: int = 1
    eval_images: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.blocks_per_stage < 1 or self.width_multiplier <= 0:
            raise UsageError(f"teacher config: epochs, batch_size, blocks_per_stage and width_multiplier must be positive ({self})")


#: ``smoke`` runs a handful of steps; ``default`` (3 epochs, 210 steps of 128 images) took 185 s
#: for ``tiny`` on the embedded data (1 thread, ``nice``-d, 2 cores shared with another training
#: run) and reached 81.6% held-out top-1 at 32 px.
TEACHER_PRESETS: dict[str, TeacherConfig] = {
    "smoke": TeacherConfig(epochs=1, steps_per_epoch=3, batch_size=32, eval_images=128),
    "default": TeacherConfig(epochs=3, width_multiplier=1.5),
}


@dataclass(frozen=True)
class TeacherArch:
    """Shape of a teacher: input channels, classes, and per hyperspace stage its width and stride."""

    in_channels: int
    num_classes: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    blocks_per_stage: int

    @classmethod
    def for_hyperspace(cls, hyperspace: Hyperspace, config: TeacherConfig) -> TeacherArch:
        """One teacher stage per hyperspace stage, as wide as its widest choice x ``width_multiplier``."""
        widths = tuple(max(8, int(round(max(s.widths) * config.width_multiplier / 8)) * 8) for s in hyperspace.stages)
        return cls(
            in_channels=hyperspace.in_channels,
            num_classes=hyperspace.num_classes,
            widths=widths,
            strides=tuple(s.stride for s in hyperspace.stages),
            blocks_per_stage=config.blocks_per_stage,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherArch:
        return cls(
            in_channels=int(data["in_channels"]),
            num_classes=int(data["num_classes"]),
            widths=tuple(int(w) for w in data["widths"]),
            strides=tuple(int(s) for s in data["strides"]),
            blocks_per_stage=int(data["blocks_per_stage"]),
        )


class Teacher(nn.Module):
    """ResNet of torchvision BasicBlocks with one stage per hyperspace stage (see the module doc)."""

    def __init__(self, arch: TeacherArch):
        super().__init__()
        self.arch = arch
        first = arch.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(arch.in_channels, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True)
        )
        stages, width_in = [], first
        for width, stride in zip(arch.widths, arch.strides):
            downsample = None
            if stride != 1 or width_in != width:
                downsample = nn.Sequential(conv1x1(width_in, width, stride), nn.BatchNorm2d(width))
            blocks = [BasicBlock(width_in, width, stride, downsample)]
            blocks += [BasicBlock(width, width) for _ in range(arch.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            width_in = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(width_in, arch.num_classes)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every teacher stage: ``[k]`` matches the output of hyperspace stage ``k``."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage_features(x)[-1]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def teacher_features(teacher: Teacher, images: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's feature maps at every stage boundary (evaluation mode, no gradients)."""
    teacher.eval()
    return teacher.stage_features(images)


def check_teacher_fits(teacher: Teacher, hyperspace: Hyperspace, source: str) -> None:
    """Raise :class:`RunMismatchError` unless the teacher's stages line up with ``hyperspace``'s."""
    arch = teacher.arch
    strides = tuple(s.stride for s in hyperspace.stages)
    if (arch.strides, arch.in_channels, arch.num_classes) != (strides, hyperspace.in_channels, hyperspace.num_classes):
        raise RunMismatchError(
            f"teacher {source} has stage strides {list(arch.strides)}, {arch.in_channels} input channel(s) and "
            f"{arch.num_classes} classes; hyperspace '{hyperspace.name}' needs strides {list(strides)}, "
            f"{hyperspace.in_channels} channel(s) and {hyperspace.num_classes} classes"
        )


def _read(path: Path) -> dict[str, Any]:
    return load_state(path, TEACHER_FORMAT, "spaceevo teacher checkpoint", "delete it to train the teacher again, or give another --teacher")


def load_teacher(path: str | Path, hyperspace: Hyperspace) -> Teacher:
    """The teacher stored at ``path`` (a ``teacher.pt`` of any run), checked against ``hyperspace``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"teacher checkpoint {path} does not exist")
    state = _read(path)
    teacher = Teacher(TeacherArch.from_dict(state["arch"]))
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ArtifactError(f"{path}: weights do not fit the stored teacher shape ({error})") from None
    check_teacher_fits(teacher, hyperspace, str(path))
    return teacher.eval()


def train_teacher(
    path: Path,
    hyperspace: Hyperspace,
    datasets: Datasets,
    config: TeacherConfig,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> Teacher:
    """Train the teacher into ``path`` (or finish a run stored there) and return it in eval mode.

    A finished checkpoint for the same hyperspace YAML and config is loaded without training; an
    unfinished one is resumed at its last finished epoch (same weights as an uninterrupted run on the
    same host and thread count). Another hyperspace or config raises :class:`RunMismatchError`.
    Trained by the training engine as a :class:`~spaceevo.train.static.StaticTask`: each batch at a
    resolution drawn from the hyperspace's.
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    arch = TeacherArch.for_hyperspace(hyperspace, config)
    teacher = Teacher(arch).to(device, memory_format=torch.channels_last)
    loader = make_loader(datasets.train, config.batch_size, True, seed=config.seed, drop_last=True)
    steps = min(len(loader), config.steps_per_epoch or len(loader))
    heldout = make_loader(datasets.heldout, 256, False)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"heldout_top1": top1(model.eval(), heldout, max(hyperspace.resolutions), config.eval_images)}

    task = StaticTask(
        teacher, loader, label_smoothing=config.label_smoothing, resolutions=hyperspace.resolutions,
        rng=random.Random(config.seed), memory_format=torch.channels_last, evaluate=evaluate,
    )
    optimizer = partial(make_optimizer, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    engine = Engine(task, EngineConfig(
        phases=(Phase("fp32", config.epochs, steps, optimizer, warmup_steps=round(config.warmup_epochs * steps)),),
        name="teacher training",
        checkpoint=path,
        checkpoint_format=TEACHER_FORMAT,
        meta={"hyperspace": hyperspace.name, "hyperspace_digest": hyperspace.digest, "arch": arch.to_dict(),
              "config": asdict(config)},
        progress=show_progress,
    ))
    state = None
    if path.exists():
        state = _read(path)
        stored, wanted = state.get("config") or {}, asdict(config)
        differing = [f"{key}: stored {stored.get(key)!r}, now {wanted[key]!r}" for key in wanted if stored.get(key) != wanted[key]]
        if state.get("hyperspace_digest") != hyperspace.digest:
            differing.insert(
                0, f"hyperspace YAML: stored {state.get('hyperspace')} (digest {state.get('hyperspace_digest')}), "
                f"now {hyperspace.name} (digest {hyperspace.digest})",
            )
        if differing:
            raise RunMismatchError(
                f"{path} holds a teacher trained with other settings ({'; '.join(differing)}); "
                f"use another run directory or pass it as --teacher"
            )
    engine.run(state)
    return task.model.eval()


def teacher_config(preset: str, **overrides: Any) -> TeacherConfig:
    """The :data:`TEACHER_PRESETS` preset ``preset`` with ``overrides`` applied."""
    if preset not in TEACHER_PRESETS:
        raise UsageError(f"unknown preset '{preset}'; allowed: {', '.join(TEACHER_PRESETS)}")
    return replace(TEACHER_PRESETS[preset], **overrides)
