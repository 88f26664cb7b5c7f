"""Space search: block LUTs, the Q-T score and aging evolution over candidate spaces (on Optuna).
Subnet extraction from a trained supernet is another stage: :mod:`spaceevo.extraction`.

The names below are the Python API behind ``spaceevo score`` and ``spaceevo search --block-lut``
(:mod:`spaceevo.search.api`). They are imported on first use, so importing
:mod:`spaceevo.search.lut` does not load Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spaceevo.search.api import SearchResult, score_spaces, search_block_lut
    from spaceevo.search.lut import BlockLUT, LutRow, load_block_lut, read_lut_csv, write_lut_csv
    from spaceevo.search.qt_score import QTScorer, SpaceScore


_EXPORTS = {
    "BlockLUT": "spaceevo.search.lut",
    "LutRow": "spaceevo.search.lut",
    "load_block_lut": "spaceevo.search.lut",
    "read_lut_csv": "spaceevo.search.lut",
    "write_lut_csv": "spaceevo.search.lut",
    "SpaceScore": "spaceevo.search.qt_score",
    "QTScorer": "spaceevo.search.qt_score",
    "SearchResult": "spaceevo.search.api",
    "score_spaces": "spaceevo.search.api",
    "search_block_lut": "spaceevo.search.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spaceevo.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
