"""Fixtures shared by the test modules.

No test reads the committed ``latency_tables/`` or measures a table it does not own: the
session-wide :func:`latency_tables` fixture writes a synthetic table for this host's fingerprint
(as ``$SPACEEVO_FINGERPRINT_OVERRIDE`` may change it) and points ``$SPACEEVO_LATENCY_TABLES`` at
it, so the suite behaves the same on every CPU. See DEVELOPERS.md.
"""

from __future__ import annotations

import contextlib
import io
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from spaceevo.latency.build import CALIBRATION_SEED, sample_architectures
from spaceevo.latency.fingerprint import device_fingerprint
from spaceevo.latency.predictor import BoundaryModel, Calibration, CalibrationSample, LatencyPredictor
from spaceevo.latency.regression import segment_features
from spaceevo.latency.segments import Segment, required_segments
from spaceevo.latency.table import DEFAULT_ROOT_ENV, LatencyTable, TableEntry
from spaceevo.space import Hyperspace, load_hyperspace

# A test run started in the background of a non-interactive shell (``nohup pytest &``, some CI runners)
# inherits SIGINT ignored, and so would every process a test starts: the tests that press Ctrl-C
# (SIGINT) would see it ignored. A handler in this process makes the kernel give its children the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: ms per unit of :data:`spaceevo.latency.regression.FEATURES` (intercept, dense MMACs, depthwise
#: MMACs, input/output/activation Melements): rounded from a fit to a real AVX2 table, so the
#: synthetic ``tiny`` subnets span a realistic ~0.1-0.6 ms and the tests' budgets fall inside.
SYNTHETIC_COST = np.array([0.02, 0.011, 0.05, 0.035, 0.0, 0.35])
SYNTHETIC_BOUNDARY = BoundaryModel(scale=0.93, per_cut_ms=0.0125, per_element_ms=1e-7, intercept_ms=-0.012)
SYNTHETIC_REFERENCE_MS = 0.065
SYNTHETIC_HYPERSPACES = ("tiny",)
CALIBRATION_SAMPLES = 30  # what 'spaceevo latency build' takes by default: a build finds nothing to do


def synthetic_ms(segment: Segment) -> float:
    """A segment's synthetic latency: a fixed linear cost of its work, deterministic everywhere."""
    return float(segment_features(segment) @ SYNTHETIC_COST)


def write_synthetic_table(root: Path, hyperspaces: tuple[Hyperspace, ...]) -> LatencyTable:
    """A complete, calibrated table for ``hyperspaces`` under this host's fingerprint in ``root``.

    Every required segment gets :func:`synthetic_ms`; the calibration holds the subnets ``latency
    build`` would measure, with the latency :data:`SYNTHETIC_BOUNDARY` gives them, so its fit is
    that model again and a ``latency build`` over this table measures nothing and changes nothing.
    """
    table = LatencyTable.create(root, device_fingerprint("cpu", 1))
    table.header["reference_ms"] = SYNTHETIC_REFERENCE_MS
    for hyperspace in hyperspaces:
        table.entries.update(
            (s.key, TableEntry(s.key, round(synthetic_ms(s), 6), 0.0)) for s in required_segments(hyperspace)
        )
    table.compact()
    for hyperspace in hyperspaces:
        calibration = Calibration(hyperspace.name, model=SYNTHETIC_BOUNDARY)
        predictor = LatencyPredictor(table, calibration)
        for arch in sample_architectures(hyperspace, CALIBRATION_SAMPLES, CALIBRATION_SEED):
            prediction = predictor.predict(arch)
            calibration.samples.append(
                CalibrationSample(
                    arch.space.encoding, arch.subnet.encode(), prediction.int8_ms,
                    prediction.segments_ms, prediction.cuts, prediction.cut_elements,
                )
            )
        calibration.save(Calibration.path_for(table, hyperspace))
    return table


@pytest.fixture(scope="session", autouse=True)
def latency_tables(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder of the session's synthetic latency table (see :func:`write_synthetic_table`),
    also the default folder (``$SPACEEVO_LATENCY_TABLES``) for the whole session, subprocesses
    included."""
    root = tmp_path_factory.mktemp("latency_tables")
    write_synthetic_table(root, tuple(load_hyperspace(name) for name in SYNTHETIC_HYPERSPACES))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEFAULT_ROOT_ENV, str(root))
        yield root


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-trained supernet of tiny-1111-0000 with its QAT phase, shared by the modules that only
    read it (copy it before writing into it)."""
    from spaceevo.cli import main

    run = tmp_path_factory.mktemp("smoke_run") / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--space", "tiny-1111-0000", "--run", str(run), "--preset", "smoke", "--json"]) == 0
    return run


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a whole module: tiny convs gain nothing from threads, and on a busy
    2-core host they thrash (5x slower). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
