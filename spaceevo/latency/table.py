"""Latency tables: measured INT8 latency of every segment a hyperspace needs, per device.

One table per device fingerprint, shared by all hyperspaces (keys describe the computation, not the
space it came from), stored as ``<root>/<fingerprint slug>/segments.jsonl``: a header line with the
fingerprint and versions, then one line per measured segment. Building is resumable: each finished
batch is appended and fsynced, a killed build leaves at most one truncated last line (dropped on
load), and a re-run measures only the keys that are missing. Compaction rewrites the file atomically.

Figures are in the scale of the reference model (:mod:`spaceevo.latency.reference`): the header's
``reference_ms`` is the reference's undisturbed latency when the table was started (the fast tail
of its runs, :mod:`spaceevo.latency.measure`), and every entry, calibration sample and validation
measurement made against this table is expressed on it.
"""

from __future__ import annotations

import json
import os
import statistics
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from spaceevo.errors import ArtifactError, DeviceMismatchError
from spaceevo.io import atomic_write_text
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.measure import MeasureConfig, StableMeter, Timer
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
DISAGREEMENT = 0.10


def default_root() -> Path:
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


@dataclass
class LatencyTable:
    """Segment latencies (ms) of one device, backed by a JSONL file."""

    path: Path
    fingerprint: DeviceFingerprint
    entries: dict[str, TableEntry] = field(default_factory=dict)
    header: dict = field(default_factory=dict)

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
    def create(cls, root: Path, fingerprint: DeviceFingerprint) -> "LatencyTable":
        path = Path(root) / fingerprint.slug / TABLE_FILE
        header = {
            "format": FORMAT,
            "fingerprint": fingerprint.to_dict(),
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(path, json.dumps(header) + "\n")
        return cls(path=path, fingerprint=fingerprint, header=header)

    @classmethod
    def load(cls, path: Path, expected: DeviceFingerprint | None = None) -> "LatencyTable":
        """Read a table; refuse it if it was measured on another fingerprint than ``expected``."""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise ArtifactError(f"{path}: cannot read latency table ({error.strerror})") from None
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
        table = cls(path=Path(path), fingerprint=fingerprint, header=header)
        for line in lines[1:]:
            try:
                row = json.loads(line)
                entry = TableEntry(key=str(row["key"]), ms=float(row["ms"]), spread=float(row["spread"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a killed build: its segment is measured again
            if entry.ms > 0:
                table.entries[entry.key] = entry
        return table

    @classmethod
    def open(cls, root: Path, fingerprint: DeviceFingerprint, create: bool = False) -> "LatencyTable":
        """The table of ``fingerprint`` under ``root``: loaded, or created when ``create``."""
        path = Path(root) / fingerprint.slug / TABLE_FILE
        if path.exists():
            return cls.load(path, expected=fingerprint)
        if create:
            return cls.create(root, fingerprint)
        others = sorted(p.parent.name for p in Path(root).glob(f"*/{TABLE_FILE}"))
        hint = f" (tables exist for other devices: {', '.join(others)})" if others else ""
        raise ArtifactError(
            f"no latency table for this device under {root}{hint}.\n"
            f"  device: {fingerprint.describe()}\n"
            f"Build one with 'spaceevo latency build --space SPACE --device cpu'."
        )

    def append(self, entries: Sequence[TableEntry]) -> None:
        """Append finished entries durably (one write, flush, fsync)."""
        text = "".join(json.dumps({"key": e.key, "ms": round(e.ms, 6), "spread": round(e.spread, 4)}) + "\n" for e in entries)
        self._repair_tail()
        with open(self.path, "a") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        for entry in entries:
            self.entries[entry.key] = entry

    def _repair_tail(self) -> None:
        """A killed build can leave a last line without newline: end it so appends stay parseable."""
        with open(self.path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
        if last != b"\n":
            with open(self.path, "a") as handle:
                handle.write("\n")

    def compact(self) -> None:
        """Rewrite the file atomically: header plus one valid line per entry, sorted by key."""
        lines = [json.dumps(self.header)]
        for key in sorted(self.entries):
            e = self.entries[key]
            lines.append(json.dumps({"key": e.key, "ms": round(e.ms, 6), "spread": round(e.spread, 4)}))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _build_models(args: tuple[list[Segment], bool]) -> list[bytes]:
    import torch

    torch.set_num_threads(1)
    segments, reduce_range = args
    return [segment_model(s, reduce_range=reduce_range) for s in segments]


def _timed_passes(timers: Sequence[Timer], meter: StableMeter) -> list[tuple[float, float]]:
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
                figures[i].append(stats.median_ms)
    disputed = [i for i, f in enumerate(figures) if abs(f[0] - f[1]) / min(f) > DISAGREEMENT]
    for start in range(0, len(disputed), GROUP_SIZE):
        members = disputed[start : start + GROUP_SIZE]
        for i, stats in zip(members, meter.measure([timers[i] for i in members], TABLE_MEASURE)):
            figures[i].append(stats.median_ms)
    return [(statistics.median(f), (max(f) - min(f)) / statistics.median(f)) for f in figures]


def measure_segments(
    table: LatencyTable,
    segments: Sequence[Segment],
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    meter: StableMeter | None = None,
) -> None:
    """Export, quantize and time ``segments``, appending to ``table`` as they finish.

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
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in chunks:
            per_worker = max(1, -(-len(chunk) // max(1, workers)))
            parts = [chunk[i : i + per_worker] for i in range(0, len(chunk), per_worker)]
            models = [m for built in pool.map(_build_models, [(p, fingerprint.reduce_range) for p in parts]) for m in built]
            figures = _timed_passes([Timer(m, fingerprint) for m in models], meter)
            for start in range(0, len(chunk), GROUP_SIZE):
                group = chunk[start : start + GROUP_SIZE]
                table.append(
                    [TableEntry(s.key, ms, spread) for s, (ms, spread) in zip(group, figures[start : start + GROUP_SIZE])]
                )
                if progress is not None:
                    progress(len(group))
