"""Files of spaceevo: atomic writes, writable folders and a lock between processes.

Every artifact is written to a temporary file and renamed into place, so a killed process never
leaves a half-written file behind; the file gets the permissions any new file gets (0666 masked by
the umask), not the temporary file's 0600. A folder that cannot be created or written is a
:class:`~spaceevo.errors.UsageError` naming it (the user chose it), never an ``OSError`` traceback.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterator

from spaceevo.errors import ArtifactError, UsageError


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions of a newly created file: 0666 masked by the process's umask."""
    return 0o666 & ~_umask()


class UnwritableError(UsageError):
    """A file or folder the user chose cannot be written; ``reason`` is the system's."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def unwritable(path: str | Path, error: OSError, purpose: str = "") -> UsageError:
    """The error for a file or folder that cannot be written: its path, what it was for, the reason."""
    reason = error.strerror or type(error).__name__
    return UnwritableError(f"cannot write {path}{f' ({purpose})' if purpose else ''}: {reason}; choose a folder you can write to", reason)


def writable_folder(folder: str | Path, purpose: str = "") -> Path:
    """Create ``folder`` (with its parents) and check that files can be created in it, before any
    work whose results would go there; a :class:`UsageError` naming it (and ``purpose``) otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".spaceevo-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise unwritable(f"files in {folder}", error, purpose) from None
    return folder


STALE_TEMP_S = 60.0
"""A temporary file of a process that no longer exists is removed once it is this old (s)."""


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files that killed writers of ``path`` left (``.NAME.PID.*.tmp`` of a
    process that is gone, untouched for :data:`STALE_TEMP_S`); another host's live writer is safe
    unless it has not written for that long."""
    for temp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = temp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if time.time() - temp.stat().st_mtime > STALE_TEMP_S:
                temp.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename); removes
    the temporary files of writers that were killed before their rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as error:
        raise unwritable(path, error) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise unwritable(path, error) from None
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
    except (OSError, UnwritableError) as error:
        reason = error.reason if isinstance(error, UnwritableError) else (error.strerror or str(error))
        raise ArtifactError(f"{folder}: cannot write {what} ({reason}){'; ' + hint if hint else ''}") from None


@contextmanager
def exclusive_lock(path: str | Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) between processes and threads.

    ``fcntl.flock``: the kernel releases it when the holder exits, even by ``kill -9``, so a lock
    is never stale. ``waiting()`` is called once when another holder makes this one wait.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    except OSError as error:
        raise unwritable(path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
