"""The run directory of a supernet training run and its artifacts.

``RUN/config.json``         what the run trains: space encoding, hyperspace digest, data set,
                            training config, world size, package versions (written once).
``RUN/checkpoints/last.pt`` the state after the last finished epoch: model, optimizer, scheduler,
                            epoch, phase, RNG states, space encoding, per-epoch history.
``RUN/checkpoints/fp32.pt`` the supernet weights after the last FP32 epoch of a run with a QAT
                            phase: the FP32 model that QAT and post-training quantization
                            (``spaceevo evaluate``) are compared against.
``RUN/log.jsonl``           one JSON line per finished epoch (the history of the checkpoint).

Every file is written atomically (:mod:`spaceevo.io`), the checkpoint before the log, so a killed
run leaves the last finished epoch intact. A run is resumed only with the same space, hyperspace
YAML, data set and training config; anything else raises
:class:`~spaceevo.errors.RunMismatchError` naming both values.
"""

from __future__ import annotations

import io
import json
import pickle
import platform
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from spaceevo.errors import ArtifactError, RunMismatchError
from spaceevo.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from spaceevo.space import CandidateSpace
from spaceevo.train.config import TrainConfig

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoints/last.pt"
FP32_CHECKPOINT_FILE = "checkpoints/fp32.pt"
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class RunDir:
    """Paths of one training run's artifacts."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def fp32_checkpoint(self) -> Path:
        return self.path / FP32_CHECKPOINT_FILE


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the trained weights."""
    found = {"python": platform.python_version()}
    for package in ("spaceevo", "torch", "torchvision", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_record(space: CandidateSpace, data: str, config: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The content of ``config.json``."""
    return {
        "space": space.encoding,
        "hyperspace": space.hyperspace.name,
        "hyperspace_digest": space.hyperspace.digest,
        "hyperspace_source": space.hyperspace.source,
        "data": data,
        "config": config.to_dict(),
        "versions": versions(),
        **extra,
    }


def read_run_record(run: RunDir) -> dict[str, Any] | None:
    if not run.config.exists():
        return None
    try:
        return json.loads(run.config.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{run.config} is unreadable ({error}); use another --run directory") from None


def check_run_record(run: RunDir, stored: dict[str, Any], requested: dict[str, Any]) -> None:
    """Refuse to resume a run that trains something else than what is asked for now."""
    check_space(run.config, stored.get("space"), stored.get("hyperspace_digest"), requested["space"], requested["hyperspace_digest"])
    if stored.get("data") != requested["data"]:
        raise RunMismatchError(
            f"{run.config} trains on data '{stored.get('data')}', this command asks for "
            f"'{requested['data']}'; resume with --data {stored.get('data')} or use another --run directory"
        )
    old, new = stored.get("config", {}), requested["config"]
    differing = [key for key in new if key in old and old[key] != new[key]]
    if differing:
        details = ", ".join(f"{key}: run {old[key]!r}, now {new[key]!r}" for key in differing)
        raise RunMismatchError(
            f"{run.config} was started with another training config ({details}); resume with the "
            f"same budget and flags or use another --run directory"
        )


def check_space(where: Path, stored_space: Any, stored_digest: Any, space: str, digest: str) -> None:
    """Raise :class:`RunMismatchError` naming both encodings (or hyperspace digests) if they differ."""
    if stored_space != space:
        raise RunMismatchError(
            f"{where} belongs to a supernet of space {stored_space}, not {space}; resume it with "
            f"--space {stored_space} or use another --run directory"
        )
    if stored_digest != digest:
        raise RunMismatchError(
            f"{where} was trained on space {space} of a hyperspace YAML with digest {stored_digest}; "
            f"the YAML now has digest {digest} (it changed); use another --run directory"
        )


def save_state(path: Path, state: dict[str, Any], format_tag: int | str) -> None:
    """Serialise ``state`` with its format tag and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({"format": format_tag, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path, format_tag: int | str, what: str, remedy: str) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (onto the CPU); :class:`ArtifactError` naming
    ``what`` was expected and the ``remedy`` if it is unreadable or of another format."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ArtifactError(f"{path} is unreadable ({error}); {remedy}") from None
    if not isinstance(state, dict) or state.get("format") != format_tag:
        raise ArtifactError(f"{path} is not a {what} of format {format_tag}; {remedy}")
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` and write it atomically to ``path``."""
    save_state(path, state, CHECKPOINT_FORMAT)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (onto the CPU); :class:`ArtifactError` if it is unreadable."""
    return load_state(path, CHECKPOINT_FORMAT, "spaceevo training checkpoint", "use another --run directory")


def write_config(run: RunDir, record: dict[str, Any]) -> None:
    atomic_write_json(run.config, record)


def write_log(run: RunDir, history: list[dict[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` from the checkpoint's history (atomic, so it always matches it)."""
    atomic_write_text(run.log, "".join(json.dumps(record, sort_keys=True) + "\n" for record in history))
