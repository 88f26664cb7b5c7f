"""The fitness of a subnet: held-out top-1 of the trained supernet's subnet after BatchNorm
recalibration (INT8 fake-quant for a run with a QAT phase). The test split is never looked at."""

from __future__ import annotations

from typing import Any

from spaceevo.deploy.trained import TrainedRun
from spaceevo.nn import Supernet
from spaceevo.space import Subnet
from spaceevo.train.data import Datasets, make_loader
from spaceevo.train.evaluate import evaluate
from spaceevo.train.loop import EVAL_SEED


class HeldoutFitness:
    """Top-1 (%) of a subnet on the held-out split (its first ``heldout_images``, or all of it) after
    BatchNorm recalibration there. The supernet is loaded on first use, so an extraction whose
    subnets are all evaluated already never loads it. ``evaluations`` counts the calls."""

    def __init__(self, run: TrainedRun, heldout_images: int | None):
        self.run = run
        self.heldout_images = heldout_images
        self.evaluations = 0
        self._loaded: tuple[Supernet, Datasets] | None = None

    @property
    def precision(self) -> str:
        return "int8 fake-quant" if self.run.quantization_aware else "fp32 (the run has no QAT phase)"

    def _load(self) -> tuple[Supernet, Datasets]:
        if self._loaded is None:
            self._loaded = (self.run.supernet(), self.run.load_data())
        return self._loaded

    @property
    def datasets(self) -> Datasets:
        """The run's data splits (the test split is for verification only)."""
        return self._load()[1]

    def __call__(self, subnet: Subnet) -> float:
        supernet, datasets = self._load()
        self.run.calibrated(supernet, subnet, datasets)
        batch = min(256, self.heldout_images or 256)
        loader = make_loader(
            datasets.heldout.with_resolution(subnet.resolution), batch, True, seed=EVAL_SEED, workers=0, distributed=False
        )
        self.evaluations += 1
        return evaluate(supernet, subnet, loader, self.heldout_images)

    def key(self) -> dict[str, Any]:
        """What determines the fitness values: the supernet (run, epoch, phase, data) and the images."""
        run = self.run
        return {
            "space": run.space.encoding,
            "hyperspace_digest": run.space.hyperspace.digest,
            "run": str(run.run.path.resolve()),
            "epoch": run.epoch,
            "phase": run.phase,
            "data": str(run.data),
            "heldout_images": self.heldout_images,
        }
