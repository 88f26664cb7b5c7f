"""The Optuna storage of an extraction, with Optuna's own crash handling.

An RDB URL (default: SQLite ``RUN/extract/study.db``) is opened with a heartbeat: every running
trial's worker writes a heartbeat every :data:`HEARTBEAT_INTERVAL_S`; a trial whose heartbeat is
older than :data:`GRACE_PERIOD_S` (its worker was killed) is failed by ``optuna.storages.fail_stale_trials``
(which ``study.optimize`` calls before every trial) and retried with the same subnet by
``RetryHeartbeatStaleTrialCallback`` (the new name of ``RetryFailedTrialCallback``). Optuna's
journal storage (``journal:PATH``) has no heartbeat: a killed worker's trial stays RUNNING there and
its subnet is not evaluated by that study.
"""

from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path
from typing import NoReturn

import optuna
import sqlalchemy

from spaceevo.errors import ArtifactError, UsageError

HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 30
MAX_RETRY = 2
ATTEMPTS = 5
STORAGE_FORMS = "sqlite:////ABSOLUTE/PATH.db, another RDB URL such as postgresql://USER@HOST/DB, or journal:PATH"


def default_url(extract_dir: Path) -> str:
    return f"sqlite:///{(extract_dir / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage of ``url``; a :class:`UsageError` saying why it cannot be opened, an
    :class:`ArtifactError` naming a SQLite file that holds no readable study."""
    scheme, sep, rest = url.partition("://")
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        if not path.name or not path.parent.is_dir():
            raise UsageError(f"cannot open Optuna storage '{url}': folder {path.parent} does not exist (allowed: {STORAGE_FORMS})")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if not sep:
        raise UsageError(f"--storage '{url}' is not a storage URL; allowed: {STORAGE_FORMS}")
    sqlite = scheme.partition("+")[0] == "sqlite"
    if sqlite and (not rest.startswith("/") or rest[1:].partition("?")[0] in ("", ":memory:")):
        raise UsageError(f"--storage '{url}' names no database file; allowed: {STORAGE_FORMS}")
    for attempt in range(ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental; it has been in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = _rdb(url, sqlite)
            break
        except Exception as error:  # drivers raise many types; the user needs the reason, not a traceback
            if attempt + 1 < ATTEMPTS and (isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)):
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables right now
                continue
            _raise_for(url, sqlite, rest, error)
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()  # later connections get the pragmas
    return storage


def _raise_for(url: str, sqlite: bool, rest: str, error: Exception) -> NoReturn:
    """The :class:`ArtifactError` (a corrupt SQLite file) or :class:`UsageError` for ``error``."""
    orig = getattr(error, "orig", None)
    if sqlite and isinstance(error, sqlalchemy.exc.DatabaseError) and type(orig) is sqlite3.DatabaseError:
        raise ArtifactError(
            f"{rest[1:].partition('?')[0]}: not a readable Optuna study ({orig}); restore it, or delete it to "
            f"start the extraction over"
        ) from None
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UsageError(f"cannot open Optuna storage '{url}': {reason} (allowed: {STORAGE_FORMS})") from None


def _rdb(url: str, sqlite: bool) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
        heartbeat_interval=HEARTBEAT_INTERVAL_S,
        grace_period=GRACE_PERIOD_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
    )


def _sqlite_wal(connection: object, _record: object) -> None:
    """Write-ahead log, so that several worker processes on one host share the file."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
