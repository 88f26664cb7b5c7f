"""A tiny static training for the engine's tests (tests/test_engine.py), in its own light module so
that a killed subprocess can build the same training."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from spaceevo.nn import Supernet
from spaceevo.quant.qat import prepare_qat
from spaceevo.space import load_space
from spaceevo.train.data import load_data, make_loader
from spaceevo.train.engine import EngineConfig, Phase
from spaceevo.train.evaluate import top1
from spaceevo.train.optim import make_optimizer
from spaceevo.train.static import StaticTask
from spaceevo.train.weights import initialize_weights

SPACE = "tiny-1111-0000"


def tiny_static(qat_epochs: int = 1, distill: bool = False) -> StaticTask:
    """The smallest subnet of ``tiny-1111-0000`` as a static network (seeded), on the embedded data
    at 24 px, batches of 16; distilled from the (untrained) largest subnet when ``distill``."""
    torch.manual_seed(0)
    supernet = Supernet(load_space(SPACE))
    initialize_weights(supernet)
    space = supernet.space
    model = supernet.extract(space.min_subnet())
    teacher = supernet.extract(space.max_subnet(24)) if distill else None
    datasets = load_data("embedded", 24, seed=0)
    heldout = make_loader(datasets.heldout, 64, False, workers=0)

    def evaluate(net: torch.nn.Module) -> dict[str, Any]:
        return {"heldout_top1": top1(net.eval(), heldout, max_images=64)}

    return StaticTask(
        model, make_loader(datasets.train, 16, True, seed=0, drop_last=True), label_smoothing=0.1, teacher=teacher,
        prepare_qat=partial(prepare_qat, reduce_range=True) if qat_epochs else None, evaluate=evaluate,
    )


def static_config(run: Path | None, fp32_epochs: int = 2, qat_epochs: int = 1, **changes: Any) -> EngineConfig:
    """Two FP32 epochs of 3 steps, then ``qat_epochs`` QAT epochs of 2 steps at a lower rate."""
    phases = (
        Phase("fp32", fp32_epochs, 3, partial(make_optimizer, lr=0.05, momentum=0.9, weight_decay=5e-5), warmup_steps=1),
        Phase("qat", qat_epochs, 2, partial(make_optimizer, lr=0.005, momentum=0.9, weight_decay=5e-5)),
    )
    where = {} if run is None else {"checkpoint": run / "last.pt", "log": run / "log.jsonl"}
    return EngineConfig(phases=phases, name="static", progress=False, meta={"what": "tiny static"}, **where, **changes)
