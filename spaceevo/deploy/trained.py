"""A finished (or partly finished) supernet training run, opened for deployment.

:func:`open_run` reads a run directory written by ``spaceevo train``
(:mod:`spaceevo.train.checkpoint`) and gives back what deployment needs: the candidate space, the
data set it was trained on, the training config, and the supernets to deploy: the final one (LSQ+
quantization-aware after a QAT phase) and the FP32 one of the end of the FP32 phase, the model that
QAT and post-training quantization are compared against. :meth:`TrainedRun.calibrated` recalibrates
BatchNorm for one subnet on the held-out split, as training does before every evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from spaceevo.errors import ArtifactError, SpaceEvoError
from spaceevo.nn import Supernet
from spaceevo.space import CandidateSpace, Subnet, load_space, require_candidate_space
from spaceevo.train.bn import recompute_bn_statistics
from spaceevo.train.checkpoint import RunDir, check_space, load_checkpoint, read_run_record
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import DataSpec, Datasets, make_loader
from spaceevo.train.loop import EVAL_SEED, load_space_data

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class TrainedRun:
    """What a training run directory holds. ``phase`` is that of its last finished epoch."""

    run: RunDir
    space: CandidateSpace
    data: DataSpec
    config: TrainConfig
    epoch: int
    phase: str
    history: tuple[dict[str, Any], ...]

    @property
    def quantization_aware(self) -> bool:
        """True when the final supernet was trained with LSQ+ fake quantization."""
        return self.phase == "qat"

    def subnet(self, text: str | Subnet) -> Subnet:
        """A subnet string, ``max`` or ``min``, checked against the run's space."""
        return text if isinstance(text, Subnet) else self.space.subnet(text)

    def supernet(self) -> Supernet:
        """The final supernet on the CPU in eval mode (QAT-prepared after a QAT phase)."""
        return self._load(self.run.checkpoint, self.quantization_aware)

    def fp32_supernet(self) -> tuple[Supernet, str]:
        """The FP32 supernet and where it comes from.

        The weights after the last FP32 epoch (``checkpoints/fp32.pt``) when the run kept them;
        otherwise the final weights with the quantizers switched off (said so in the second value).
        """
        if self.run.fp32_checkpoint.exists():
            return self._load(self.run.fp32_checkpoint, False), "fp32 phase"
        if self.quantization_aware:
            return self.float_supernet(), "final weights, quantizers off"
        return self.supernet(), "fp32 phase"

    def float_supernet(self) -> Supernet:
        """The final supernet with every quantizer off: the QAT phase's weights run in float, which
        tells how far that phase moved them apart from what quantization costs."""
        supernet = self.supernet()
        if self.quantization_aware:
            from spaceevo.quant.lsq import set_quant_mode

            set_quant_mode(supernet, False)
        return supernet

    def _load(self, path: Path, quantization_aware: bool) -> Supernet:
        state = load_checkpoint(path)
        check_space(path, state.get("space"), state.get("hyperspace_digest"), self.space.encoding, self.space.hyperspace.digest)
        supernet: nn.Module = Supernet(self.space)
        if quantization_aware:
            from spaceevo.quant.qat import prepare_qat

            supernet = prepare_qat(supernet, reduce_range=bool(self.config.reduce_range))
        weights = state.get("model")
        expected = supernet.state_dict()
        missing = sorted(set(expected) - set(weights)) if isinstance(weights, dict) else list(expected)
        unexpected = sorted(set(weights) - set(expected)) if isinstance(weights, dict) else []
        reason = ""
        if missing or unexpected:
            reason = f"{len(missing)} missing and {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}"
        else:
            try:
                supernet.load_state_dict(weights)
            except RuntimeError as error:  # shapes that do not fit
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                reason = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
        if reason:
            raise ArtifactError(
                f"{path} does not hold the weights of a {self.space.encoding} supernet ({reason}); use another --run "
                f"directory or train it again"
            )
        return supernet.eval()

    def load_data(self, data: str | DataSpec | None = None) -> Datasets:
        """The run's data set (or ``data``) split as in training: the held-out split is the same."""
        spec = self.data if data is None else (DataSpec.parse(data) if isinstance(data, str) else data)
        spec.check()
        return load_space_data(self.space.hyperspace, spec)

    def calibrated(self, supernet: Supernet, subnet: Subnet, datasets: Datasets) -> Supernet:
        """``supernet`` with ``subnet`` active and its BatchNorm statistics recalibrated on the
        held-out split (the training run's number of calibration images), in eval mode."""
        supernet.set_active(subnet)
        return self.calibrated_static(supernet, subnet.resolution, datasets)

    def calibrated_static(self, model: M, resolution: int, datasets: Datasets) -> M:
        """``model`` (a static network, or a supernet with its subnet active) with its BatchNorm
        statistics recalibrated as :meth:`calibrated` does, at ``resolution``, in eval mode."""
        batch = min(self.config.batch_size, self.config.calibration_images)
        loader = make_loader(
            datasets.heldout.with_resolution(resolution), batch, True, seed=EVAL_SEED, workers=0, distributed=False,
        )
        recompute_bn_statistics(model, loader, resolution, math.ceil(self.config.calibration_images / batch))
        return model


def open_run(run_dir: str | Path) -> TrainedRun:
    """Open a training run directory; :class:`ArtifactError` naming the command that makes one
    when it holds no trained supernet, and naming the file and key when ``config.json`` or the
    checkpoint is missing, truncated or not what ``spaceevo train`` writes."""
    run = RunDir(Path(run_dir))
    if not run.checkpoint.exists():
        raise ArtifactError(
            f"no trained supernet in {run.path} (expected {run.checkpoint}); train one with "
            f"`spaceevo train --space ENC --run {run.path}`"
        )
    record = read_run_record(run)
    if record is None:
        raise ArtifactError(f"{run.config} is missing: {run.path} is not a complete spaceevo training run")
    space, data, config = _record_fields(run, record)
    state = load_checkpoint(run.checkpoint)
    check_space(run.config, record.get("space"), record.get("hyperspace_digest"), space.encoding, space.hyperspace.digest)
    epoch, phase = state.get("epoch"), state.get("phase")
    if not isinstance(epoch, int) or phase not in ("fp32", "qat"):
        raise ArtifactError(
            f"{run.checkpoint} has no valid epoch and phase (got {epoch!r}, {phase!r}; expected an integer and "
            f"'fp32' or 'qat'); use another --run directory"
        )
    return TrainedRun(
        run=run, space=space, data=data, config=config, epoch=epoch, phase=phase, history=tuple(state.get("history", ())),
    )


def _record_fields(run: RunDir, record: Any) -> tuple[CandidateSpace, DataSpec, TrainConfig]:
    """The space, data set and training config of ``config.json``; :class:`ArtifactError` naming the
    file and key for a missing or malformed one."""

    def broken(key: str, detail: str) -> ArtifactError:
        return ArtifactError(
            f"{run.config}: key '{key}' {detail}; it is not a config.json written by spaceevo train, use another "
            f"--run directory"
        )

    if not isinstance(record, dict):
        raise ArtifactError(f"{run.config} holds a JSON {type(record).__name__}, expected an object written by spaceevo train")
    for key, kind in (("space", str), ("data", str), ("config", dict)):
        if key not in record:
            raise broken(key, "is missing")
        if not isinstance(record[key], kind):
            raise broken(key, f"is a {type(record[key]).__name__}, expected a {kind.__name__}")
    try:
        source = record.get("hyperspace_source")
        named = f"{source}:{record['space']}" if isinstance(source, str) and Path(source).is_file() else record["space"]
        space = require_candidate_space(load_space(named), "deployment")
    except SpaceEvoError as error:
        raise broken("space", f"names '{record['space']}', which cannot be loaded ({error})") from None
    try:
        data = DataSpec.parse(record["data"])
    except SpaceEvoError as error:
        raise broken("data", f"is not a data set ({error})") from None
    try:
        config = TrainConfig.from_dict(record["config"])
    except (SpaceEvoError, TypeError, ValueError) as error:
        raise broken("config", f"is not a valid training config ({error})") from None
    return space, data, config
