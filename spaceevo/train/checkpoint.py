"""The run directory of a supernet training run and its artifacts.

``RUN/config.json``         what the run trains: space encoding, hyperspace digest, data set,
                            training config, world size, package versions (written once, and
                            again from the checkpoint's request when it is missing).
``RUN/checkpoints/last.pt`` the state after the last finished epoch (:mod:`spaceevo.train.engine`):
                            model, optimizer, scheduler, epoch, phase, RNG states, per-epoch
                            history, and the space encoding, hyperspace digest, data set and
                            training config.
``RUN/checkpoints/fp32.pt`` the supernet weights after the last FP32 epoch of a run with a QAT
                            phase: the FP32 model that QAT and post-training quantization
                            (``spaceevo evaluate``) are compared against.
``RUN/log.jsonl``           one JSON line per finished epoch (the history of the checkpoint).
``RUN/tensorboard/``        the same figures as TensorBoard scalars, only where ``tensorboard`` is
                            installed.

Every file is written atomically (:mod:`spaceevo.io`), the checkpoint before the log, so a killed
run leaves the last finished epoch intact. A run is resumed only with the same space, hyperspace
YAML, data set and training config, compared with the checkpoint (which holds them, so a missing
``config.json`` accepts nothing else) and with ``config.json``; anything else raises
:class:`~spaceevo.errors.RunMismatchError` naming every differing field with both values.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import platform
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from spaceevo.errors import ArtifactError, RunMismatchError
from spaceevo.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from spaceevo.space import CandidateSpace
from spaceevo.train.config import PRESETS, TrainConfig

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoints/last.pt"
FP32_CHECKPOINT_FILE = "checkpoints/fp32.pt"
TENSORBOARD_FOLDER = "tensorboard"
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

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_FOLDER


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
    """``config.json`` of ``run`` (None if it is missing); :class:`ArtifactError` if it is unreadable
    or not a run record."""
    if not run.config.exists():
        return None
    try:
        record = json.loads(run.config.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{run.config} is unreadable ({error}); {_CONFIG_REMEDY}") from None
    missing = [key for key in ("space", "hyperspace_digest", "data", "config") if not isinstance(record, dict) or key not in record]
    if missing or not isinstance(record["config"], dict):
        what = f"lacks {', '.join(missing)}" if missing else "has no training config"
        raise ArtifactError(f"{run.config} is not a spaceevo run record (it {what}); {_CONFIG_REMEDY}")
    return record


_CONFIG_REMEDY = (
    "delete it and run the same `spaceevo train` command with --resume, which writes it again from the checkpoint"
)


def check_run_record(where: Path, stored: dict[str, Any], requested: dict[str, Any]) -> None:
    """Refuse to resume a run that trains something else than what is asked for now.

    ``stored`` is ``config.json`` or the checkpoint itself (both hold the space, the hyperspace
    digest and the training config; checkpoints of older versions lack the data set, which is then
    not compared); ``where`` names it in the message, which lists every differing field."""
    check_space(where, stored.get("space"), stored.get("hyperspace_digest"), requested["space"], requested["hyperspace_digest"])
    if "data" in stored and stored["data"] != requested["data"]:
        raise RunMismatchError(
            f"{where} trains on data '{stored['data']}', this command asks for "
            f"'{requested['data']}'; resume with --data {stored['data']} or use another --run directory"
        )
    old, new = stored.get("config") or {}, requested["config"]
    differing = [key for key in new if key in old and old[key] != new[key]]
    if differing:
        details = "; ".join(f"{key}: run {old[key]!r}, now {new[key]!r}" for key in differing)
        raise RunMismatchError(
            f"{where} was started with another training config ({details}); resume with "
            f"{_command_line(old)}, or use another --run directory"
        )


_FLAGS = {
    "epochs": "--epochs", "qat_epochs": "--qat-epochs", "largest_epochs": "--largest-epochs", "seed": "--seed",
    "eval_every": "--eval-every",
}
"""``spaceevo train`` flags of the training config fields they set on top of a ``--preset``."""


def _command_line(config: dict[str, Any]) -> str:
    """The ``spaceevo train`` options that give ``config``: its preset and flags, when a preset
    preset matches it apart from the flags' fields (and the host-decided ``reduce_range``)."""
    for name, preset in PRESETS.items():
        fields = preset.to_dict()
        if all(config.get(key, value) == value for key, value in fields.items() if key not in _FLAGS and key != "reduce_range"):
            flags = [f"{flag} {config[key]}" for key, flag in _FLAGS.items() if key in config and config[key] != fields[key]]
            return " ".join([f"--preset {name}", *flags])
    return "the run's settings (its training config matches no --preset preset)"


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


def require_writable(folder: Path, option: str) -> None:
    """Raise :class:`ArtifactError` naming ``folder`` (and ``option``, the flag that chose it) unless
    files can be created in it, or in its nearest existing parent while it does not exist yet: a
    read-only run folder is reported before any work, not as a traceback when the first file is
    written. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == folder else f" (in {existing})"
        raise ArtifactError(
            f"cannot write to {folder}{where}: {error.strerror or error}; make it writable or choose another {option}"
        ) from None


def save_state(path: Path, state: dict[str, Any], format_tag: int | str) -> None:
    """Serialise ``state`` with its format tag and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({"format": format_tag, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path, format_tag: int | str, what: str, remedy: str) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (onto the CPU); :class:`ArtifactError` saying that
    ``path`` is not a ``what`` and the ``remedy`` if it is unreadable or of another format."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError, FileNotFoundError) as error:
        raise ArtifactError(f"cannot read {path} ({error.strerror or error}): {remedy}") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile):
        # torch's own message advises weights_only=False (random bytes), is empty (0 bytes) or is
        # "Invalid argument" (truncated)
        raise ArtifactError(f"{path} is not a {what} (truncated or corrupt): {remedy}") from None
    if not isinstance(state, dict) or state.get("format") != format_tag:
        found = state.get("format") if isinstance(state, dict) else None
        raise ArtifactError(
            f"{path} is not a {what} (format {found!r}, expected {format_tag!r}): {remedy}"
        )
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` and write it atomically to ``path``."""
    save_state(path, state, CHECKPOINT_FORMAT)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (onto the CPU); :class:`ArtifactError` if it is unreadable."""
    return load_state(path, CHECKPOINT_FORMAT, "spaceevo training checkpoint", "delete it to start over or restore it")


def write_config(run: RunDir, record: dict[str, Any]) -> None:
    atomic_write_json(run.config, record)


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite a ``log.jsonl`` from the checkpoint's history (atomic, so it always matches it)."""
    atomic_write_text(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in history))
