"""Optuna storage of the space search and of the extraction: which URLs are accepted, how they are
opened, and the heartbeat that fails a killed worker's trial.

Any Optuna RDB URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``) or a journal file
(``journal:PATH``). SQLite gets a write-ahead log so that several processes on one host share it.

With ``heartbeat=True`` a running trial records a heartbeat every :data:`HEARTBEAT_S` seconds
(Optuna's mechanism, used by ``study.optimize``), and ``optuna.storages.fail_stale_trials`` fails a
RUNNING trial whose heartbeat is older than :data:`GRACE_S`: its worker was killed. Two additions to
Optuna's: journal files get a heartbeat too (Optuna has one only for RDB storage), and a RUNNING trial
that never recorded a heartbeat (its worker was killed between creating the trial and its first
heartbeat) is stale once it started more than :data:`GRACE_S` ago. A stale trial's parameters are
queued again (:func:`retry_stale_trial`) unless the study's sampler says the search is complete.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models as rdb_models
from optuna.trial import FrozenTrial, TrialState

from spaceevo.errors import ArtifactError, RunMismatchError, UsageError

HEARTBEAT_S = 1
"""Seconds between two heartbeats of a running trial."""
GRACE_S = 10
"""A RUNNING trial without a heartbeat for this long is failed (and its parameters retried)."""
MAX_RETRY = 2
"""How often the parameters of a stale trial are retried: a space that kills its worker every time
(out of memory, say) is given up after that."""

STORAGE_FORMS = (
    "sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db, another RDB URL such as "
    "postgresql://USER@HOST/DB, or journal:PATH"
)
"""The storage URLs a search or an extraction accepts, as messages name them."""


def storage_url(storage: str | None, run_dir: str | Path | None) -> str:
    """The storage a search uses: ``storage`` as given, or SQLite in ``run_dir/search/study.db``."""
    if storage:
        return storage
    if run_dir is None:
        raise UsageError("a search needs a run directory or an Optuna storage URL")
    path = Path(run_dir).resolve() / "search" / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str, *, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """Open any Optuna RDB URL or a journal file (``journal:PATH`` or ``journal:///abs/path``), with
    the heartbeat of the module docstring if ``heartbeat`` (only for ``study.optimize``: Optuna warns
    when a heartbeat storage is used with ``study.ask``). A storage that cannot be opened raises
    :class:`UsageError` saying why, a corrupt SQLite or journal file :class:`ArtifactError` naming it."""
    _check_storage_url(url)
    for attempt in range(5):
        try:
            return _open_storage(url, heartbeat)
        except Exception as error:  # drivers raise many types; the user needs the reason, not a traceback
            creating = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
            if creating and attempt < 4:
                time.sleep(0.2 * (attempt + 1))  # another worker is creating the tables right now
                continue
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            corrupt = _corrupt_file(url, error)
            if corrupt is not None:
                raise ArtifactError(
                    f"{corrupt}: not a readable Optuna study ({getattr(error, 'orig', None) or reason}); it is corrupt "
                    f"or another kind of file: restore it, or delete it to start over (its finished trials are lost)"
                ) from None
            raise UsageError(f"cannot open Optuna storage '{url}': {reason} (allowed: {STORAGE_FORMS})") from None
    raise AssertionError("unreachable")


def open_study(
    url: str,
    config: dict,
    study_name: str,
    storage: optuna.storages.BaseStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or load study ``study_name`` (maximized) in ``url`` (or the already opened ``storage``)
    and check that it holds a search with the same ``config``; ``sampler`` defaults to a seeded
    random sampler (for callers that choose every trial's parameters themselves)."""
    storage = storage or open_storage(url)
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
            sampler=sampler or optuna.samplers.RandomSampler(seed=0),
        )
    except Exception as error:
        raise UsageError(f"cannot open Optuna study '{study_name}' in '{url}': {error}") from None
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
    elif stored != config:
        differences = ", ".join(
            f"{key}: {stored.get(key)!r} there, {config.get(key)!r} now"
            for key in sorted(set(stored) | set(config))
            if stored.get(key) != config.get(key)
        )
        raise RunMismatchError(
            f"study '{study_name}' in {url} holds a search with other settings ({differences}); "
            f"use the same settings to resume it, or another run directory / --storage"
        )
    return study


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's ``fail_stale_trials`` (which ``study.optimize`` calls before each trial), without its
    experimental-feature warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """The heartbeat's callback for a trial it failed: queue its parameters again as a WAITING trial
    (Optuna's ``RetryHeartbeatStaleTrialCallback``, at most :data:`MAX_RETRY` times), unless the
    study's sampler has a ``search_complete(study)`` that says no more trials are needed."""
    complete = getattr(study.sampler, "search_complete", None)
    if complete is not None and complete(study):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


# ---- heartbeat storages ------------------------------------------------------------------------


def _end_orphaned_heartbeat() -> None:
    """End the calling heartbeat thread if the main thread has ended. Optuna starts a non-daemon thread
    per trial and stops it when the trial ends; Ctrl-C while Optuna is starting it skips the stop, and
    the thread would keep the process alive, beating, after its main thread has finished."""
    if not threading.main_thread().is_alive():
        raise SystemExit  # ends this thread quietly


class _HeartbeatRDBStorage(optuna.storages.RDBStorage):
    """RDB storage whose stale trials include RUNNING ones that never recorded a heartbeat: their
    start (the creating host's clock, in UTC) is then the last sign of life."""

    def record_heartbeat(self, trial_id: int) -> None:
        _end_orphaned_heartbeat()
        super().record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.grace_period is not None
        grace = timedelta(seconds=self.grace_period)
        trial, beat = rdb_models.TrialModel, rdb_models.TrialHeartbeatModel
        session = self.scoped_session()
        try:
            now = session.execute(sqlalchemy.func.now()).scalar_one().replace(tzinfo=None)  # the server's UTC clock
            running = (
                session.query(trial.trial_id, trial._datetime_start_utc, beat.heartbeat)  # both naive UTC
                .outerjoin(beat, beat.trial_id == trial.trial_id)
                .filter(trial.study_id == study_id, trial.state == TrialState.RUNNING)
                .all()
            )
            session.commit()
        finally:
            session.close()
        return [
            trial_id for trial_id, started, heartbeat in running
            if (heartbeat or started) is not None and now - (heartbeat or started) > grace
        ]


def _last_sign_of_life(trial: FrozenTrial) -> float:
    """Unix time of a journal trial's last heartbeat or of its start, whichever is later (a retried
    trial inherits the failed trial's system attributes, its old heartbeat included)."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(trial.system_attrs.get("heartbeat", 0.0)), started)


class _HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Journal storage with a heartbeat: the trial's system attribute ``heartbeat`` (Unix time of the
    worker's clock; hosts sharing a journal file need clocks that agree within :data:`GRACE_S`)."""

    def record_heartbeat(self, trial_id: int) -> None:
        _end_orphaned_heartbeat()
        try:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed as stale meanwhile: its worker was only slow

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [
            t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if now - _last_sign_of_life(t) > GRACE_S
        ]

    def get_heartbeat_interval(self) -> int | None:
        return HEARTBEAT_S

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return retry_stale_trial


# ---- opening -----------------------------------------------------------------------------------


def _corrupt_file(url: str, error: Exception) -> Path | None:
    """The SQLite or journal file of ``url`` if ``error`` says it exists but holds no readable study
    (the artifact's fault), else None (the URL's, the folder's or the server's)."""
    if url.startswith("journal:"):
        path = _journal_path(url)
        return path if path.is_file() and isinstance(error, ValueError) else None  # bad UTF-8 or JSON
    orig = getattr(error, "orig", None)
    if isinstance(error, sqlalchemy.exc.DatabaseError) and type(orig) is sqlite3.DatabaseError:
        return Path(url.partition(":///")[2].partition("?")[0])
    return None


def _check_storage_url(url: str) -> None:
    """:class:`UsageError` for a URL that names no shared, persistent study: no scheme, an empty
    journal path, or an SQLite URL without a file (in-memory, lost when the process ends)."""
    scheme, sep, rest = url.partition("://")
    if url.startswith("journal:"):
        if not url[len("journal:") :].removeprefix("//"):
            raise UsageError(f"--storage '{url}' names no journal file; allowed: {STORAGE_FORMS}")
    elif not sep:
        raise UsageError(f"--storage '{url}' is not a storage URL; allowed: {STORAGE_FORMS}")
    elif scheme.partition("+")[0] == "sqlite":
        path = rest.partition("?")[0]
        if not path.startswith("/") or path[1:] in ("", ":memory:"):
            raise UsageError(
                f"--storage '{url}' names no database file (SQLite would keep the study in memory, lost when "
                f"the process ends); allowed: {STORAGE_FORMS}"
            )


def _journal_path(url: str) -> Path:
    """The file of a ``journal:PATH`` or ``journal:///abs/path`` URL."""
    return Path(url[len("journal:") :].removeprefix("//"))


def _open_storage(url: str, heartbeat: bool) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        path = _journal_path(url)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist")
        journal = _HeartbeatJournalStorage if heartbeat else optuna.storages.JournalStorage
        return journal(optuna.storages.journal.JournalFileBackend(str(path)))
    beats = (
        {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S, "heartbeat_stale_trial_callback": retry_stale_trial}
        if heartbeat else {}
    )
    rdb = _HeartbeatRDBStorage if heartbeat else optuna.storages.RDBStorage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is experimental
        if not url.startswith("sqlite"):
            return rdb(url, **beats)
        storage = rdb(url, engine_kwargs={"connect_args": {"timeout": 60}}, **beats)
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
    storage.engine.dispose()  # later connections get the pragmas
    return storage


def _sqlite_wal(connection: object, _record: object) -> None:
    """Write-ahead log without an fsync per commit: a killed process loses nothing committed (a power
    cut may lose the last trials, which a resumed search evaluates again); several processes on one
    host share the file. Not for network file systems: use a server database or a journal there."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
