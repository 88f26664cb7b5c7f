"""Latency tables: measured INT8 latency of every segment a hyperspace needs, per device.

One table per device fingerprint, shared by all hyperspaces (keys describe the computation, not the
space it came from), stored as ``<root>/<fingerprint slug>/segments.jsonl``: a header line with the
fingerprint and versions, then one line per measured segment. Building is resumable: each finished
batch is appended and fsynced, a killed build leaves at most one truncated last line (dropped on
load), and a re-run measures only the keys that are missing. Compaction rewrites the file atomically.
"""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from spaceevo.errors import ArtifactError, DeviceMismatchError
from spaceevo.io import atomic_write_text
from spaceevo.latency.fingerprint import DeviceFingerprint
from spaceevo.latency.measure import MeasureConfig, Timer, measure_interleaved
from spaceevo.latency.segments import Segment, segment_model

FORMAT = "spaceevo-latency-table/1"
TABLE_FILE = "segments.jsonl"
DEFAULT_ROOT_ENV = "SPACEEVO_LATENCY_TABLES"

#: How segments are timed in a table build: short, interleaved in groups, robust medians.
TABLE_MEASURE = MeasureConfig(warmup=5, rounds=5, runs_per_round=10, min_round_s=0.005)
GROUP_SIZE = 8
CHUNK_SIZE = 64


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


def measure_segments(
    table: LatencyTable,
    segments: Sequence[Segment],
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Export, quantize and time ``segments``, appending to ``table`` as batches finish.

    Models are built in ``workers`` processes a chunk at a time; timing happens while the workers
    are idle, in interleaved groups, so building never disturbs a measurement.
    """
    fingerprint = table.fingerprint
    chunks = [list(segments[i : i + CHUNK_SIZE]) for i in range(0, len(segments), CHUNK_SIZE)]
    if not chunks:
        return
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk in chunks:
            per_worker = max(1, -(-len(chunk) // max(1, workers)))
            parts = [chunk[i : i + per_worker] for i in range(0, len(chunk), per_worker)]
            models = [m for built in pool.map(_build_models, [(p, fingerprint.reduce_range) for p in parts]) for m in built]
            for start in range(0, len(chunk), GROUP_SIZE):
                group = chunk[start : start + GROUP_SIZE]
                timers = [Timer(m, fingerprint) for m in models[start : start + GROUP_SIZE]]
                stats = measure_interleaved(timers, TABLE_MEASURE)
                table.append([TableEntry(s.key, st.median_ms, st.spread) for s, st in zip(group, stats)])
                if progress is not None:
                    progress(len(group))
