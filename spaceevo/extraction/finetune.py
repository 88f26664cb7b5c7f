"""Optional short fine-tuning of an extracted subnet, then its INT8 export.

SpaceEvo deploys subnets with the supernet's weights, without retraining; weight sharing at a small
training budget costs a subnet a few points against the same network trained alone. This stage
measures, and removes, part of that cost at a small price:

1. **FP32 phase** (``epochs``): the subnet's static network, initialised from the FP32 supernet
   (BatchNorm recalibrated for it), is trained on the run's training split by distillation from the
   supernet's largest subnet at the largest subnet's own resolution: the sandwich rule's loss (KL at
   temperature 1) and targets. The largest subnet at the student's resolution gives targets twice as
   far from what the student learnt (KL 0.16 against 0.08 on the default run's smallest subnet) and
   cost it a point in the first epoch. SGD with a cosine schedule from ``lr``, by default a hundredth
   of the supernet's peak: the weights are already trained.
2. **QAT phase** (``qat_epochs``): LSQ+ quantizers are put at the network's quantization points
   (initialised from its first batch, ``reduce_range`` as the run's) and it is trained on, still
   distilled, at ``qat_lr`` for at most ``qat_steps_per_epoch`` steps per epoch (the run's QAT recipe).
3. BatchNorm statistics are recalibrated on held-out images, as for every subnet taken from the
   supernet (:meth:`~spaceevo.deploy.trained.TrainedRun.calibrated`), so that both are measured
   alike. The result is exported as FP32 ONNX (the final weights, quantizers off) and INT8 QDQ ONNX
   (the learned scales; with ``qat_epochs`` 0, ONNX Runtime's post-training quantization of the FP32
   model, as ``spaceevo export --ptq``), and its INT8 top-1 measured in ONNX Runtime on the held-out
   and the test split.

Training runs on the training engine (:mod:`spaceevo.train.engine`): a checkpoint after every epoch,
bit-identical resume after an interruption, ``log.jsonl``. Everything lives in
``RUN/extract/finetune/<key>/``, where the key digests the supernet, the subnet and the config, so a
re-run reuses a finished fine-tuning (``result.json``) and any other config starts its own folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from spaceevo.deploy.trained import TrainedRun
from spaceevo.errors import UsageError
from spaceevo.io import atomic_write_bytes, atomic_write_json
from spaceevo.space import Subnet
from spaceevo.train.bn import preserved_bn_state
from spaceevo.train.checkpoint import load_state
from spaceevo.train.data import Datasets, make_loader
from spaceevo.train.engine import Engine, EngineConfig, Phase
from spaceevo.train.evaluate import top1
from spaceevo.train.optim import make_optimizer
from spaceevo.train.static import StaticTask

if TYPE_CHECKING:
    from spaceevo.extraction.results import BudgetResult

FINETUNE_DIR = "finetune"
CHECKPOINT_FORMAT = "spaceevo-finetune-1"
RESULT_FILE = "result.json"
LR_FRACTION = 0.01
"""Default peak learning rate of the FP32 phase, as a fraction of the supernet's."""


@dataclass(frozen=True)
class FinetuneConfig:
    """How an extracted subnet is fine-tuned (see the module doc): ``epochs`` FP32 epochs, then
    ``qat_epochs`` QAT epochs, of at most ``steps_per_epoch`` / ``qat_steps_per_epoch`` steps (None:
    one pass over the training split). None fields take the run's value (``lr``: :data:`LR_FRACTION`
    of the run's)."""

    epochs: int
    qat_epochs: int = 1
    lr: float | None = None
    qat_lr: float | None = None
    steps_per_epoch: int | None = None
    qat_steps_per_epoch: int | None = None
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "qat_epochs", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"fine-tuning {name} must be an integer >= 0, got {value!r}")
        if self.epochs + self.qat_epochs == 0:
            raise UsageError("fine-tuning needs at least one epoch (FP32 or QAT)")
        for name in ("lr", "qat_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"fine-tuning {name} must be > 0, got {value!r}")
        for name in ("steps_per_epoch", "qat_steps_per_epoch", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"fine-tuning {name} must be an integer >= 1 or None, got {value!r}")

    def resolved(self, run: TrainedRun) -> FinetuneConfig:
        """This config with every None replaced by the run's value."""
        trained = run.config
        return FinetuneConfig(
            epochs=self.epochs,
            qat_epochs=self.qat_epochs,
            lr=self.lr if self.lr is not None else trained.lr * LR_FRACTION,
            qat_lr=self.qat_lr if self.qat_lr is not None else trained.qat_lr,
            steps_per_epoch=self.steps_per_epoch if self.steps_per_epoch is not None else trained.steps_per_epoch,
            qat_steps_per_epoch=self.qat_steps_per_epoch if self.qat_steps_per_epoch is not None else trained.qat_steps_per_epoch,
            batch_size=self.batch_size if self.batch_size is not None else trained.batch_size,
            seed=self.seed,
        )


def check_finetune_epochs(epochs: Any) -> int:
    """``--finetune-epochs``: an integer >= 0 (0: no fine-tuning)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UsageError(f"--finetune-epochs must be an integer >= 0, got {epochs!r}")
    return epochs


@dataclass(frozen=True)
class FinetunedSubnet:
    """A fine-tuned subnet's INT8 top-1 (%) in ONNX Runtime on the held-out and the test split, its
    exported models, the training's wall time and epochs (FP32, QAT)."""

    subnet: str
    heldout_int8_top1: float
    test_ort_int8_top1: float
    onnx_int8: str
    onnx_fp32: str
    epochs: int
    qat_epochs: int
    train_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune_key(run: TrainedRun, subnet: Subnet, config: FinetuneConfig) -> dict[str, Any]:
    """What a fine-tuning's result depends on: the supernet checkpoint, the subnet and the config."""
    checkpoint = run.run.checkpoint
    stat = checkpoint.stat()
    return {
        "space": run.space.encoding, "supernet": str(checkpoint.resolve()), "supernet_mtime_ns": stat.st_mtime_ns,
        "supernet_bytes": stat.st_size, "epoch": run.epoch, "subnet": subnet.encode(), "data": str(run.data),
        "config": asdict(config),
    }


def finetune_folder(run: TrainedRun, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return run.run.path / "extract" / FINETUNE_DIR / digest


def _training_threads() -> int:
    """Every core this process may use: fine-tuning trains, unlike the timing, which uses the device's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def finetune_subnet(
    run: TrainedRun,
    subnet: Subnet,
    config: FinetuneConfig,
    datasets: Datasets,
    *,
    show_progress: bool = True,
) -> FinetunedSubnet:
    """Fine-tune ``subnet`` of ``run``'s supernet (see the module doc), export it and measure its
    INT8 top-1; a finished fine-tuning with the same key is read back, an unfinished one resumed."""
    from spaceevo.deploy.evaluate import engine_top1
    from spaceevo.deploy.models import ptq_int8_model, set_metadata
    from spaceevo.quant.export import export_fp32
    from spaceevo.quant.qat import export_int8, prepare_qat

    config = config.resolved(run)
    key = finetune_key(run, subnet, config)
    folder = finetune_folder(run, key)
    result_path = folder / RESULT_FILE
    finished = _read_result(result_path, key)
    if finished is not None:
        return finished
    folder.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(_training_threads())
    started = time.perf_counter()
    try:
        torch.manual_seed(config.seed)
        supernet, _ = run.fp32_supernet()
        largest = run.space.max_subnet()
        teacher = run.calibrated(supernet, largest, datasets).extract().eval()
        student = run.calibrated(supernet, subnet, datasets).extract().train()
        del supernet
        loader = make_loader(datasets.train, config.batch_size, True, seed=config.seed, drop_last=True)
        heldout = make_loader(datasets.heldout.with_resolution(subnet.resolution), 256, False, workers=0, distributed=False)
        steps = min(len(loader), config.steps_per_epoch or len(loader))
        if steps == 0:
            raise UsageError(f"the training split has fewer images than one batch of {config.batch_size}")

        def evaluate(model: nn.Module) -> dict[str, float]:
            with preserved_bn_state(model):
                return {"heldout_top1": top1(run.calibrated_static(model, subnet.resolution, datasets), heldout)}

        def quantization_aware(model: nn.Module) -> nn.Module:
            return prepare_qat(model, reduce_range=bool(run.config.reduce_range))

        task = StaticTask(
            student, loader, teacher=teacher, teacher_resolution=largest.resolution, resolutions=(subnet.resolution,),
            rng=random.Random(config.seed), prepare_qat=quantization_aware, evaluate=evaluate,
        )
        optimizer = partial(make_optimizer, momentum=run.config.momentum, weight_decay=run.config.weight_decay)
        qat_steps = min(steps, config.qat_steps_per_epoch or steps)
        checkpoint = folder / "checkpoint.pt"
        engine = Engine(task, EngineConfig(
            phases=(
                Phase("fp32", config.epochs, steps, partial(optimizer, lr=config.lr)),
                Phase("qat", config.qat_epochs, qat_steps, partial(optimizer, lr=config.qat_lr)),
            ),
            name=f"fine-tune {subnet.encode()}",
            checkpoint=checkpoint,
            checkpoint_format=CHECKPOINT_FORMAT,
            meta={"key": key},
            log=folder / "log.jsonl",
            progress=show_progress,
            leave_progress=False,
        ))
        state = None
        if checkpoint.exists():
            state = load_state(checkpoint, CHECKPOINT_FORMAT, "spaceevo fine-tuning checkpoint", "delete it to fine-tune again")
            if state.get("key") != key:
                state = None  # the key names the folder: only a digest collision gets here
        engine.run(state)
        model = run.calibrated_static(task.model, subnet.resolution, datasets)
        train_s = time.perf_counter() - started

        shape = (1, run.space.hyperspace.in_channels, subnet.resolution, subnet.resolution)
        fp32 = export_fp32(_float_copy(model), shape)
        if config.qat_epochs:
            int8 = export_int8(model, None, shape)
        else:
            int8 = ptq_int8_model(fp32, datasets.heldout, subnet.resolution, reduce_range=bool(run.config.reduce_range))
        heldout_int8 = round(engine_top1(int8, datasets.heldout, subnet.resolution), 2)
        test_int8 = round(engine_top1(int8, datasets.test, subnet.resolution), 2)
    finally:
        torch.set_num_threads(threads)
    metadata = {"space": run.space.encoding, "subnet": subnet.encode(), "data": str(run.data), "run": str(run.run.path),
                "finetune": json.dumps(asdict(config), sort_keys=True)}
    set_metadata(int8, {**metadata, "precision": "int8", "quantization": "qat", "heldout_top1": heldout_int8})
    set_metadata(fp32, {**metadata, "precision": "fp32"})
    int8_path, fp32_path = folder / "subnet.int8.onnx", folder / "subnet.fp32.onnx"
    atomic_write_bytes(int8_path, int8.SerializeToString())
    atomic_write_bytes(fp32_path, fp32.SerializeToString())
    result = FinetunedSubnet(
        subnet=subnet.encode(), heldout_int8_top1=heldout_int8, test_ort_int8_top1=test_int8, onnx_int8=str(int8_path),
        onnx_fp32=str(fp32_path), epochs=config.epochs, qat_epochs=config.qat_epochs, train_s=round(train_s, 1),
    )
    atomic_write_json(result_path, {"key": key, "result": result.to_dict()})
    return result


def _float_copy(model: nn.Module) -> nn.Module:
    """The fine-tuned network with every quantizer off: its FP32 model."""
    from spaceevo.quant.lsq import set_quant_mode

    float_model = copy.deepcopy(model).cpu().eval()
    set_quant_mode(float_model, False)
    return float_model


def _read_result(path: Path, key: dict[str, Any]) -> FinetunedSubnet | None:
    """The finished fine-tuning recorded at ``path`` for ``key`` (None: none, another key, or unreadable)."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") != key:
            return None
        result = FinetunedSubnet(**stored["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if Path(result.onnx_int8).is_file() and Path(result.onnx_fp32).is_file() else None


def finetune_answers(
    run: TrainedRun, results: Sequence[BudgetResult], config: FinetuneConfig, datasets: Datasets, *,
    show_progress: bool = True,
) -> None:
    """Fine-tune the subnet deployed for every budget (:meth:`BudgetResult.deployed`), each distinct
    subnet once, and record it in that result's ``finetuned``."""
    done: dict[str, FinetunedSubnet] = {}
    for result in results:
        answer = result.deployed()
        if answer.subnet not in done:
            if show_progress:
                print(f"spaceevo: fine-tuning the answer of {result.budget_ms:g} ms ({answer.subnet})", file=sys.stderr)
            done[answer.subnet] = finetune_subnet(run, run.subnet(answer.subnet), config, datasets, show_progress=show_progress)
        answer.finetuned = done[answer.subnet]
