"""Block LUTs in the published SpaceEvo CSV format.

A block LUT folder holds one file ``stage{i}_{block}_{window}.csv`` per (searchable stage, block type
digit, width window digit); ``i`` counts the *searchable* stages from 1 (``stage1`` .. ``stage6`` in
onnxw, after the fixed stem and stage0). Every line is one sampled sub-stage, no header::

    3#48#4.0_5#48#6.0,1x32x80x80,0.2581,120.3343,0.0421,1.2873

fields: the sub-stage configuration (``kernel#width#expand`` per block, ``_``-joined), the stage's
input shape ``1xCxHxW``, the NSR loss, MFLOPs, MParams and the INT8 latency in ms. The published files
write the expand ratio of a block without expansion (MBv1-dual) as ``None`` and other ratios as
integers or floats (``4``, ``1.0``); we read all three and write ``0`` for none, as in subnet encodings.

This matches the published implementation (github.com/xudoong/SpaceEvo): ``eval_block_kd.py`` writes
``f'{kwe},{"x".join(shape)},{loss:.4f},{mflops:.4f},{mparams:.4f},{latency:.4f}'`` to
``{stage}_{block}_{window}.csv`` with stages ``stage1``..``stage6``; ``modules/block_kd/search_v2/lut.py``
reads each line with ``line.split(',')`` and maps the input height ``H`` back to the input resolution
(``H = resolution / cumulative stride``). We do the same mapping from the hyperspace's strides, so a
row belongs to every resolution whose stage input is ``H`` (in onnxw, stage6 sees H=6 at both 176 and
192). Rows whose ``H`` fits no resolution of the hyperspace are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from spaceevo.errors import ArtifactError
from spaceevo.io import atomic_write_text
from spaceevo.blocks import conv_output_size, format_number
from spaceevo.space import BlockChoice, CandidateSpace, Hyperspace


@dataclass(frozen=True)
class LutRow:
    """One sampled sub-stage of one LUT file: its configuration, input shape and measured figures."""

    config: str
    input_shape: tuple[int, int, int, int]
    nsr_loss: float
    mflops: float
    mparams: float
    latency_ms: float

    @property
    def input_size(self) -> int:
        """Spatial input size H (= W) of the stage; with the hyperspace's strides it gives the resolution."""
        return self.input_shape[2]

    def to_line(self) -> str:
        shape = "x".join(str(v) for v in self.input_shape)
        return (
            f"{self.config},{shape},{self.nsr_loss:.6f},{self.mflops:.4f},"
            f"{self.mparams:.4f},{self.latency_ms:.6f}"
        )


def lut_filename(stage_index: int, block_digit: int, window: int) -> str:
    """File name of one (searchable stage, block type, width window); ``stage_index`` counts from 1."""
    return f"stage{stage_index}_{block_digit}_{window}.csv"


def format_stage_config(blocks: Sequence[BlockChoice]) -> str:
    """The config field: ``kernel#width#expand`` per block, ``_``-joined (``3#48#4.0_5#48#6.0``)."""
    return "_".join(f"{b.kernel}#{b.width}#{format_number(b.expand)}" for b in blocks)


#: How the published LUTs write the expand ratio of a block without expansion.
NO_EXPANSION = "None"


def parse_stage_config(text: str) -> tuple[BlockChoice, ...]:
    """Inverse of :func:`format_stage_config`, also reading the published ``None`` for no expansion;
    raises ``ValueError`` saying which block is malformed and why."""
    blocks = []
    for number, part in enumerate(text.split("_"), start=1):
        fields = part.split("#")
        if len(fields) != 3:
            raise ValueError(f"block {number} '{part}' has {len(fields)} '#'-separated field(s), expected kernel#width#expand")
        kernel, width, expand = fields
        try:
            choice = BlockChoice(int(kernel), int(width), 0.0 if expand == NO_EXPANSION else float(expand))
        except ValueError:
            raise ValueError(
                f"block {number} '{part}': kernel and width must be integers, expand a number or {NO_EXPANSION}"
            ) from None
        if choice.kernel < 1 or choice.width < 1 or not np.isfinite(choice.expand) or choice.expand < 0:
            raise ValueError(
                f"block {number} '{part}': kernel and width must be at least 1, expand finite and not negative"
            )
        blocks.append(choice)
    return tuple(blocks)


def write_lut_csv(path: str | Path, rows: Iterable[LutRow]) -> Path:
    """Write rows in the published format (no header), atomically."""
    return atomic_write_text(path, "".join(row.to_line() + "\n" for row in rows))


def read_lut_csv(path: str | Path) -> list[LutRow]:
    """Read one LUT file; a malformed line raises :class:`ArtifactError` naming the file, line and column."""
    return [row for _, row in _read_numbered(Path(path))]


#: Column names of a LUT line, in order, as error messages name them.
COLUMNS = ("config", "input shape", "nsr loss", "MFLOPs", "MParams", "latency ms")


def _read_numbered(path: Path) -> list[tuple[int, LutRow]]:
    """The rows of one LUT file with their 1-based line numbers (blank lines skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ArtifactError(f"{path}: cannot read block LUT file ({reason})") from None
    rows = [(number, _parse_line(path, number, line)) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not rows:
        raise ArtifactError(f"{path}: block LUT file has no rows")
    return rows


def _parse_line(path: Path, number: int, line: str) -> LutRow:
    fields = [f.strip() for f in line.split(",")]
    where = f"{path}, line {number}"
    if len(fields) != len(COLUMNS):
        raise ArtifactError(
            f"{where}: expected {len(COLUMNS)} comma-separated columns ({', '.join(COLUMNS)}), got {len(fields)}"
        )
    config, shape_text, *numbers = fields
    try:
        parse_stage_config(config)
    except ValueError as error:
        raise ArtifactError(
            f"{where}, column 1 (config): '{config}' is not kernel#width#expand per block, '_'-joined: {error}"
        ) from None
    try:
        shape = tuple(int(v) for v in shape_text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ArtifactError(f"{where}, column 2 (input shape): '{shape_text}' is not 1xCxHxW with positive sizes")
    values = []
    for column, (name, text) in enumerate(zip(COLUMNS[2:], numbers), start=3):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value) or value < 0:
            raise ArtifactError(f"{where}, column {column} ({name}): '{text}' is not a finite number >= 0")
        values.append(value)
    loss, mflops, mparams, latency = values
    return LutRow(config, shape, loss, mflops, mparams, latency)  # type: ignore[arg-type]


def stage_input_sizes(hyperspace: Hyperspace) -> list[dict[int, int]]:
    """Per searchable stage (in order), resolution -> spatial size H of the stage's input."""
    result = []
    for resolution in hyperspace.resolutions:
        size, sizes = resolution, []
        for stage in hyperspace.stages:
            if stage.searchable:
                sizes.append(size)
            size = conv_output_size(size, stage.stride)
        result.append(sizes)
    return [
        {resolution: per_resolution[i] for resolution, per_resolution in zip(hyperspace.resolutions, result)}
        for i in range(len(hyperspace.searchable_stages))
    ]


@dataclass(frozen=True)
class StageRows:
    """Loss and latency of the rows of one LUT file that were measured at one resolution."""

    nsr_loss: np.ndarray
    latency_ms: np.ndarray


@dataclass(frozen=True)
class StageTable:
    """One LUT file as arrays: rows concatenated per hyperspace resolution (a row whose input size
    fits several resolutions appears under each), ``offsets``/``counts`` indexed like
    ``hyperspace.resolutions`` (count 0 where the file has no row at that resolution)."""

    path: Path
    nsr_loss: np.ndarray
    latency_ms: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray

    def rows_at(self, resolution_index: int) -> StageRows:
        start, count = int(self.offsets[resolution_index]), int(self.counts[resolution_index])
        return StageRows(self.nsr_loss[start : start + count], self.latency_ms[start : start + count])

    def min_latency_ms(self) -> np.ndarray:
        """Smallest latency per resolution index (``inf`` where the file has no row)."""
        return np.array(
            [self.rows_at(i).latency_ms.min() if c else np.inf for i, c in enumerate(self.counts)]
        )


def _stage_table(
    path: Path, rows: list[tuple[int, LutRow]], sizes: dict[int, int], resolutions: Sequence[int]
) -> StageTable:
    by_size: dict[int, list[int]] = {}
    for index, resolution in enumerate(resolutions):
        by_size.setdefault(sizes[resolution], []).append(index)
    groups: list[list[LutRow]] = [[] for _ in resolutions]
    for number, row in rows:
        indices = by_size.get(row.input_size)
        if indices is None:
            allowed = ", ".join(f"{h} (r{r})" for r, h in sizes.items())
            raise ArtifactError(
                f"{path}, line {number}, column 2 (input shape): input size {row.input_size} fits no "
                f"resolution of the hyperspace at this stage; allowed input sizes: {allowed}"
            )
        for index in indices:
            groups[index].append(row)
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    flat = [row for group in groups for row in group]
    return StageTable(
        path=path,
        nsr_loss=np.array([r.nsr_loss for r in flat], dtype=np.float64),
        latency_ms=np.array([r.latency_ms for r in flat], dtype=np.float64),
        offsets=offsets,
        counts=counts,
    )


@dataclass(frozen=True)
class BlockLUT:
    """A block LUT folder loaded for a hyperspace: one :class:`StageTable` per
    (stage index from 1, block digit, window digit)."""

    directory: Path
    hyperspace: Hyperspace
    tables: dict[tuple[int, int, int], StageTable]

    def stage_tables(self, space: CandidateSpace) -> list[StageTable]:
        """The tables a candidate space uses, one per searchable stage."""
        keys = [(i, b, w) for i, (b, w) in enumerate(zip(space.block_digits, space.window_digits), start=1)]
        missing = [lut_filename(*key) for key in keys if key not in self.tables]
        if missing:
            raise ArtifactError(f"{self.directory}: {space.encoding} needs LUT file(s) that were not loaded: {', '.join(missing)}")
        return [self.tables[key] for key in keys]

    def stage_rows(self, space: CandidateSpace) -> list[dict[int, StageRows]]:
        """Per searchable stage, resolution -> the rows of the space's (block, window) file at it."""
        resolutions = self.hyperspace.resolutions
        return [
            {r: table.rows_at(i) for i, r in enumerate(resolutions) if table.counts[i]}
            for table in self.stage_tables(space)
        ]


def required_files(hyperspace: Hyperspace, spaces: Iterable[CandidateSpace] | None = None) -> list[tuple[int, int, int]]:
    """(stage index, block digit, window) keys a hyperspace needs, or only those the given spaces use."""
    if spaces is not None:
        keys = {
            (i, b, w)
            for space in spaces
            for i, (b, w) in enumerate(zip(space.block_digits, space.window_digits), start=1)
        }
        return sorted(keys)
    keys = []
    for i, stage in enumerate(hyperspace.searchable_stages, start=1):
        for block in hyperspace.stage_block_types(stage):
            keys.extend((i, block.digit, w) for w in range(len(stage.windows)))
    return sorted(keys)


def load_block_lut(
    directory: str | Path, hyperspace: Hyperspace, spaces: Iterable[CandidateSpace] | None = None
) -> BlockLUT:
    """Load every LUT file the hyperspace needs (or only the given spaces' files); raise
    :class:`ArtifactError` naming *all* missing files at once, so one fix-up pass suffices."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: block LUT folder does not exist")
    keys = required_files(hyperspace, spaces)
    missing = [lut_filename(*key) for key in keys if not (directory / lut_filename(*key)).is_file()]
    if missing:
        raise ArtifactError(
            f"{directory}: block LUT folder lacks {len(missing)} of the {len(keys)} file(s) that "
            f"'{hyperspace.name}' needs: {', '.join(missing)}"
        )
    sizes = stage_input_sizes(hyperspace)
    tables = {}
    for key in keys:
        path = directory / lut_filename(*key)
        tables[key] = _stage_table(path, _read_numbered(path), sizes[key[0] - 1], hyperspace.resolutions)
    return BlockLUT(directory, hyperspace, tables)
