"""Atomic file writes: every artifact is written to a temporary file and renamed into place, so a
killed process never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from spaceevo.errors import ArtifactError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def writing(folder: str | Path, what: str, hint: str = "") -> Iterator[None]:
    """Report an ``OSError`` raised while writing ``what`` into ``folder`` (read-only or missing
    folder, full disk) as an :class:`ArtifactError` naming the folder, not as a traceback."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise ArtifactError(f"{folder}: cannot write {what} ({reason}){'; ' + hint if hint else ''}") from None
