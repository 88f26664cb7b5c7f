"""Latency tables: measured INT8 latency of every segment a hyperspace needs, per device and engine.

One table per device fingerprint, shared by all hyperspaces (keys describe the computation, not the
space it came from), stored as ``<tables>/<fingerprint slug>/segments.jsonl``: a header line with the
fingerprint and versions, then one line per measured segment. Building is resumable: each finished
batch is appended and fsynced, a killed build leaves at most one truncated last line (dropped on
load), and a re-run measures only the keys that are missing. Compaction rewrites the file atomically.
Any other unreadable row (bad JSON, ``ms`` missing, NaN or not positive) is corruption: loading the
table refuses it, naming the file and line, and ``spaceevo latency build`` drops such rows and
measures their segments again (:meth:`LatencyTable.load` with ``repair``).

Figures are in the scale of the reference model (:mod:`spaceevo.latency.reference`): the header's
``reference_ms`` is the reference's undisturbed latency when the table was started (the fast tail
of its runs, :mod:`spaceevo.latency.measure`), and every entry, calibration sample and validation
measurement made against this table is expressed on it.
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import platform
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from spaceevo.errors import ArtifactError, DeviceMismatchError
from spaceevo.io import atomic_write_text, writing
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.engines import get_engine, timer
from spaceevo.latency.measure import MeasureConfig, Meter, Timer
from spaceevo.latency.segments import Segment, segment_model

FORMAT = "spaceevo-latency-table/2"
"""Version 2: every subject run is bracketed by reference runs (:meth:`StableMeter.measure`);
version-1 tables were normalised per round and are on another scale, so they are not read."""
TABLE_FILE = "segments.jsonl"
DEFAULT_ROOT_ENV = "SPACEEVO_LATENCY_TABLES"

#: How segments are timed in a table build: interleaved in groups, many short rounds per segment
#: so each figure spans the whole group's timing window, each round in reference units.
TABLE_MEASURE = MeasureConfig(warmup=5, rounds=10, runs_per_round=4, min_round_s=0.0)
GROUP_SIZE = 16
CHUNK_SIZE = 64
#: Relative difference between two passes above which a segment is timed a third time.
DISAGREEMENT = 0.05
REBUILD_HINT = (
    "run 'spaceevo latency build' again for your hyperspace (same --tables and --threads): it drops corrupt rows "
    "and measures them again"
)
WRITE_HINT = "make the folder writable or choose another with --tables or $SPACEEVO_LATENCY_TABLES"


def default_tables() -> Path:
    """Where tables live: ``$SPACEEVO_LATENCY_TABLES`` or ``./latency_tables``."""
    return Path(os.environ.get(DEFAULT_ROOT_ENV, "latency_tables"))


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from spaceevo import __version__

    return {
        "spaceevo": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@dataclass
class TableEntry:
    key: str
    ms: float
    spread: float

    @classmethod
    def parse(cls, line: str) -> "TableEntry":
        """One row of the table file; ``ValueError`` says what is wrong with it."""
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError("not a JSON object") from None
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        key = row.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError("no segment key")
        ms, spread = row.get("ms"), row.get("spread")
        if not _is_number(ms) or not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"ms must be a finite number > 0, got {json.dumps(ms) if 'ms' in row else 'none'}")
        if not _is_number(spread) or not math.isfinite(spread) or spread < 0:
            raise ValueError(f"spread must be a finite number >= 0, got {json.dumps(spread) if 'spread' in row else 'none'}")
        return cls(key, float(ms), float(spread))

    def stored(self) -> "TableEntry":
        """The entry as the file holds it (ms to the nanosecond, spread to 4 digits), so a table in
        memory predicts exactly what the same table read back does."""
        return TableEntry(self.key, round(self.ms, 6), round(self.spread, 4))

    def to_line(self) -> str:
        stored = self.stored()
        return json.dumps({"key": stored.key, "ms": stored.ms, "spread": stored.spread})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LatencyTable:
    """Segment latencies (ms) of one device, backed by a JSONL file."""

    path: Path
    fingerprint: DeviceFingerprint
    entries: dict[str, TableEntry] = field(default_factory=dict)
    header: dict = field(default_factory=dict)
    #: Lines of the file that were not read (a truncated last line, or with ``repair`` corrupt rows):
    #: :meth:`compact` drops them from the file.
    dropped: list[int] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def ms(self, key: str) -> float:
        return self.entries[key].ms

    @property
    def reference_ms(self) -> float | None:
        """The reference model's undisturbed latency: the scale every figure of this table is on."""
        value = self.header.get("reference_ms")
        return float(value) if value else None

    def set_reference(self, reference_ms: float) -> None:
        """Fix the table's scale (once, when it is started) and persist it."""
        self.header["reference_ms"] = round(reference_ms, 6)
        self.compact()

    def missing(self, segments: Iterable[Segment]) -> list[Segment]:
        return [s for s in segments if s.key not in self.entries]

    # ---- persistence -------------------------------------------------------------------------
    @classmethod
    def create(cls, tables: Path, fingerprint: DeviceFingerprint) -> "LatencyTable":
        path = Path(tables) / fingerprint.slug / TABLE_FILE
        header = {
            "format": FORMAT,
            "fingerprint": fingerprint.to_dict(),
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        with writing(path.parent, "a latency table", WRITE_HINT):
            atomic_write_text(path, json.dumps(header) + "\n")
        return cls(path=path, fingerprint=fingerprint, header=header)

    @classmethod
    def load(cls, path: Path, expected: DeviceFingerprint | None = None, *, repair: bool = False) -> "LatencyTable":
        """Read a table; refuse it if it was measured on another fingerprint than ``expected``.

        A truncated last line (a killed build) is dropped; any other corrupt row raises
        :class:`ArtifactError` naming the file and line, unless ``repair`` (the build, which
        measures the dropped rows' segments again) lists it in :attr:`dropped` instead."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ArtifactError(f"{path}: cannot read latency table ({reason})") from None
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])
            if header.get("format") != FORMAT:
                if str(header.get("format", "")).startswith("spaceevo-latency-table/"):
                    raise ArtifactError(
                        f"{path} is a latency table of format {header['format']!r}, measured with an "
                        f"older protocol; this spaceevo reads {FORMAT!r}. Delete it and run "
                        f"'spaceevo latency build' to measure it again."
                    )
                raise ValueError(f"format {header.get('format')!r}")
            fingerprint = DeviceFingerprint.from_dict(header["fingerprint"])
        except (IndexError, ValueError, KeyError, TypeError) as error:
            raise ArtifactError(f"{path}: not a spaceevo latency table ({error})") from None
        if expected is not None and fingerprint != expected:
            raise DeviceMismatchError(
                f"{path} was measured on another device and is not used here.\n"
                f"  table:  {fingerprint.describe()}\n"
                f"  here:   {expected.describe()}\n"
                f"Build a table for this device with 'spaceevo latency build'."
            )
        # ``expected`` equals the header's and also knows how to reach the device (``device``)
        table = cls(path=Path(path), fingerprint=expected or fingerprint, header=header)
        corrupt: list[tuple[int, str]] = []
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                entry = TableEntry.parse(line)
            except ValueError as error:
                table.dropped.append(number)
                if number < len(lines) or text.endswith("\n"):  # not a line cut by a killed build
                    corrupt.append((number, str(error)))
                continue
            table.entries[entry.key] = entry
        if corrupt and not repair:
            first, reason = corrupt[0]
            more = f" (and {len(corrupt) - 1} more corrupt row(s), lines {_line_list(corrupt[1:])})" if len(corrupt) > 1 else ""
            raise ArtifactError(f"{path}, line {first}: corrupt latency table row: {reason}{more}; {REBUILD_HINT}")
        return table

    @classmethod
    def open(
        cls, tables: Path, fingerprint: DeviceFingerprint, create: bool = False, *, repair: bool = False
    ) -> "LatencyTable":
        """The table of ``fingerprint`` under ``tables``: loaded (``repair``: see :meth:`load`), or
        created when ``create``."""
        path = Path(tables) / fingerprint.slug / TABLE_FILE
        if path.exists():
            return cls.load(path, expected=fingerprint, repair=repair)
        if create:
            return cls.create(tables, fingerprint)
        others = sorted(p.parent.name for p in Path(tables).glob(f"*/{TABLE_FILE}"))
        hint = f" (tables exist for other devices: {', '.join(others)})" if others else ""
        raise ArtifactError(
            f"no latency table for this device under {tables}{hint}.\n"
            f"  device: {fingerprint.describe()}\n"
            f"Build one with 'spaceevo latency build --space SPACE --device {fingerprint.option}'."
        )

    def append(self, entries: Sequence[TableEntry]) -> None:
        """Append finished entries durably (one write, flush, fsync)."""
        text = "".join(e.to_line() + "\n" for e in entries)
        with writing(self.folder, "the latency table", WRITE_HINT):
            self._cut_truncated_tail()
            with open(self.path, "a") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        for entry in entries:
            self.entries[entry.key] = entry.stored()

    def check_writable(self) -> None:
        """Raise the error an append would raise, before minutes of measuring rather than after."""
        with writing(self.folder, "the latency table", WRITE_HINT):
            with open(self.path, "a"):
                pass

    def _cut_truncated_tail(self) -> None:
        """A killed build can leave a last line without newline: cut it off, so the next append
        starts on a line of its own and the cut line does not become a corrupt row mid-file."""
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            handle.truncate(handle.read().rfind(b"\n") + 1)

    def compact(self) -> None:
        """Rewrite the file atomically: header plus one valid line per entry, sorted by key."""
        lines = [json.dumps(self.header)] + [self.entries[key].to_line() for key in sorted(self.entries)]
        with writing(self.folder, "the latency table", WRITE_HINT):
            atomic_write_text(self.path, "\n".join(lines) + "\n")
        self.dropped = []


def _line_list(rows: Sequence[tuple[int, str]], shown: int = 10) -> str:
    numbers = ", ".join(str(number) for number, _ in rows[:shown])
    return numbers + (", ..." if len(rows) > shown else "")


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _worker_init() -> None:
    """Run in every build worker: die with the build and leave Ctrl-C to it.

    A killed build (``kill -9``) must not leave workers blocked forever on a queue nobody writes to:
    on Linux the kernel kills them with their parent (``PR_SET_PDEATHSIG``); a thread waiting on the
    parent's sentinel also ends them elsewhere, and under any start method. SIGINT is ignored here:
    the parent stops its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


MANAGER_EXIT_S = 10.0
"""How long a stopped pool's manager thread may take to notice its killed workers and end."""


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool at once (an interrupt or error): drop queued work and kill the workers instead
    of waiting for the models they are building; then let the pool's manager thread end.

    Waiting for it matters at exit: Python 3.11's ``concurrent.futures`` exit hook wakes every live
    manager thread through a pipe that the thread closes when it ends, without a lock (locked since
    CPython gh-125451), so a build stopped by Ctrl-C could end with an "Exception ignored ... Bad
    file descriptor" traceback printed by the interpreter's shutdown."""
    processes = list((pool._processes or {}).values())  # no public way before Python 3.14
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    if manager is not None:
        manager.join(MANAGER_EXIT_S)


def _worker_context(fingerprint: DeviceFingerprint) -> multiprocessing.context.BaseContext | None:
    """How build workers start: forked (the default) for the ONNX engines; started fresh for an engine
    that converts, because a process forked after its converter ran (the reference model is
    converted before the workers start) inherits the converter's locks held by threads that do not
    exist in the child, and hangs (seen with LiteRT: workers blocked at 0 % CPU)."""
    return multiprocessing.get_context("spawn") if get_engine(fingerprint.engine).converts else None


def _build_models(args: tuple[list[Segment], bool, str]) -> list[bytes]:
    import torch

    torch.set_num_threads(1)
    segments, reduce_range, device = args
    return [segment_model(s, reduce_range=reduce_range, device=device) for s in segments]


def _timed_passes(timers: Sequence[Timer], meter: Meter) -> list[tuple[float, float]]:
    """(ms, disagreement) per timer from two passes with different group compositions, plus a
    third pass for the timers whose first two figures disagree by more than :data:`DISAGREEMENT`.

    Groups are timed in windows of a fraction of a second; two differently composed passes make a
    figure depend on two such windows, and a third settles the cases they disagree on.
    """
    count = len(timers)
    groups = max(1, -(-count // GROUP_SIZE))
    figures: list[list[float]] = [[] for _ in timers]
    for layout in (
        [list(range(g * GROUP_SIZE, min(count, (g + 1) * GROUP_SIZE))) for g in range(groups)],
        [list(range(g, count, groups)) for g in range(groups)],
    ):
        for members in layout:
            for i, stats in zip(members, meter.measure([timers[i] for i in members], TABLE_MEASURE)):
                figures[i].append(stats.ms)
    disputed = [i for i, f in enumerate(figures) if abs(f[0] - f[1]) / min(f) > DISAGREEMENT]
    for start in range(0, len(disputed), GROUP_SIZE):
        members = disputed[start : start + GROUP_SIZE]
        for i, stats in zip(members, meter.measure([timers[i] for i in members], TABLE_MEASURE)):
            figures[i].append(stats.ms)
    return [(statistics.median(f), (max(f) - min(f)) / statistics.median(f)) for f in figures]


def measure_segments(
    table: LatencyTable,
    segments: Sequence[Segment],
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    meter: Meter | None = None,
) -> None:
    """Export, quantize (or convert, :func:`segment_model`) and time ``segments``, appending to
    ``table`` as they finish.

    Models are built in ``workers`` processes a chunk at a time; timing happens while the workers
    are idle (:func:`_timed_passes`, on the table's reference scale), so building never disturbs a
    measurement. Entries are appended a group at a time.
    """
    from spaceevo.latency.reference import stable_meter

    fingerprint = table.fingerprint
    chunks = [list(segments[i : i + CHUNK_SIZE]) for i in range(0, len(segments), CHUNK_SIZE)]
    if not chunks:
        return
    if meter is None:
        meter = stable_meter(fingerprint, table.reference_ms)
        if table.reference_ms is None:
            table.set_reference(meter.baseline_ms)
    pool = ProcessPoolExecutor(max_workers=max(1, workers), initializer=_worker_init, mp_context=_worker_context(fingerprint))
    try:
        for chunk in chunks:
            per_worker = max(1, -(-len(chunk) // max(1, workers)))
            parts = [chunk[i : i + per_worker] for i in range(0, len(chunk), per_worker)]
            models = [m for built in pool.map(_build_models, [(p, fingerprint.reduce_range, fingerprint.engine) for p in parts]) for m in built]
            figures = _timed_passes([timer(m, fingerprint) for m in models], meter)
            for start in range(0, len(chunk), GROUP_SIZE):
                group = chunk[start : start + GROUP_SIZE]
                table.append(
                    [TableEntry(s.key, ms, spread) for s, (ms, spread) in zip(group, figures[start : start + GROUP_SIZE])]
                )
                if progress is not None:
                    progress(len(group))
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()
