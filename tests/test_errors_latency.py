"""Reliability sweep of the latency table: corrupt rows are named errors that ``latency build``
repairs, a complete table is neither timed nor written (read-only folders work), an unwritable
folder is a named error, and an interrupted or killed build leaves no workers behind and resumes.

Tables here are synthetic (made-up figures under a fingerprint the test controls) except where a
build must measure: what is asserted are properties (rows kept, rows re-measured, nothing written),
never figures of this CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spaceevo.cli import main
from spaceevo.errors import ArtifactError
from spaceevo.latency import build as build_module
from spaceevo.latency import table as table_module
from spaceevo.latency.build import CALIBRATION_SEED, build_latency_table, sample_architectures
from spaceevo.latency.fingerprint import DeviceFingerprint, device_fingerprint
from spaceevo.latency.predictor import BoundaryModel, Calibration, CalibrationSample, LatencyPredictor
from spaceevo.latency.segments import network_segments, required_segments
from spaceevo.latency.table import TABLE_FILE, LatencyTable, TableEntry
from spaceevo.space import load_hyperspace
from test_latency import MICRO_YAML

CALIBRATION_SAMPLES = 4


@pytest.fixture
def micro(tmp_path):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_YAML)
    return load_hyperspace(path)


def fake_fingerprint() -> DeviceFingerprint:
    return DeviceFingerprint(
        cpu_model="Test CPU 9000", isa=("avx2",), machine="x86_64", engine="cpu",
        engine_version="1.32.0", threads=1,
    )


def synthetic_table(root: Path, fingerprint: DeviceFingerprint, hyperspace) -> LatencyTable:
    """A complete, calibrated table of made-up figures: what a finished build leaves."""
    table = LatencyTable.create(root, fingerprint)
    table.set_reference(1.0)
    segments = required_segments(hyperspace)
    table.append([TableEntry(s.key, round(0.05 + 0.01 * i, 6), 0.01) for i, s in enumerate(segments)])
    table.compact()
    calibration = Calibration(hyperspace=hyperspace.name)
    predictor = LatencyPredictor(table, calibration)
    for arch in sample_architectures(hyperspace, CALIBRATION_SAMPLES, CALIBRATION_SEED):
        total, cuts, elements = predictor.segment_features(arch)
        calibration.samples.append(
            CalibrationSample(arch.space.encoding, arch.subnet.encode(), 0.9 * total, total, cuts, elements)
        )
    calibration.fit()
    calibration.save(Calibration.path_for(table, hyperspace))
    return table


def line_of(table: LatencyTable, key: str) -> int:
    lines = table.path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, start=1) if f'"{key}"' in line)


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- corrupt rows ---------------------------------------------------------------------------


CORRUPTIONS = {
    "ms NaN": lambda key: json.dumps({"key": key, "ms": float("nan"), "spread": 0.01}),
    "ms zero": lambda key: json.dumps({"key": key, "ms": 0.0, "spread": 0.01}),
    "ms negative": lambda key: json.dumps({"key": key, "ms": -0.2, "spread": 0.01}),
    "ms missing": lambda key: json.dumps({"key": key, "spread": 0.01}),
    "ms text": lambda key: json.dumps({"key": key, "ms": "fast", "spread": 0.01}),
    "spread NaN": lambda key: json.dumps({"key": key, "ms": 0.3, "spread": float("nan")}),
    "cut mid-file": lambda key: json.dumps({"key": key, "ms": 0.3, "spread": 0.01})[:25],
    "not JSON": lambda key: "\x00\x00garbage",
    "JSON list": lambda key: "[1, 2]",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_row_is_an_error_naming_file_and_line(capsys, tmp_path, corruption):
    """A corrupt row used to be skipped and its segment filled in by the regression, silently."""
    fingerprint = device_fingerprint("cpu", 1)  # the CLI's device; the table's figures are made up
    space = load_hyperspace("tiny").candidate_space("tiny-1111-0000")
    hyperspace = space.hyperspace
    table = LatencyTable.create(tmp_path, fingerprint)
    table.set_reference(1.0)
    arch = space.resolve(space.max_subnet())
    keys = [s.key for s in required_segments(hyperspace)]
    table.append([TableEntry(k, 0.01 + i * 1e-5, 0.01) for i, k in enumerate(keys)])
    table.compact()
    Calibration(hyperspace="tiny").save(Calibration.path_for(table, hyperspace))
    broken = network_segments(arch)[1].key
    number = line_of(table, broken)
    replace_line(table.path, number, CORRUPTIONS[corruption](broken))

    code, out, err = run_cli(
        capsys, "latency", "predict", "--space", space.encoding, "--subnet", "max", "--tables", str(tmp_path)
    )
    assert code == 3 and out == ""
    assert f"{table.path}, line {number}: corrupt latency table row" in err
    assert "spaceevo latency build" in err and "Traceback" not in err
    with pytest.raises(ArtifactError, match=f"line {number}"):
        LatencyTable.load(table.path, fingerprint)


def test_many_corrupt_rows_are_counted_and_listed(tmp_path, micro):
    table = synthetic_table(tmp_path, fake_fingerprint(), micro)
    lines = table.path.read_text().splitlines()
    broken = list(range(3, len(lines) + 1))
    for number in broken:
        replace_line(table.path, number, "{}")
    with pytest.raises(ArtifactError) as info:
        LatencyTable.load(table.path)
    message = str(info.value)
    assert f"line {broken[0]}: corrupt latency table row: no segment key" in message
    assert f"and {len(broken) - 1} more corrupt row(s), lines {', '.join(map(str, broken[1:]))}" in message


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00binary", b'{"format": "something else"}\n'])
def test_unreadable_table_file_is_an_artifact_error(tmp_path, content):
    path = tmp_path / TABLE_FILE
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"{path}: (cannot read|not a spaceevo) latency table"):
        LatencyTable.load(path)


def test_truncated_last_line_is_dropped_without_error_and_cut_before_the_next_append(tmp_path):
    table = LatencyTable.create(tmp_path, fake_fingerprint())
    table.append([TableEntry("a", 0.5, 0.0), TableEntry("b", 0.6, 0.0)])
    with open(table.path, "a") as handle:  # a build killed while writing its last line
        handle.write('{"key": "c", "ms": 0.7')
    loaded = LatencyTable.load(table.path)
    assert sorted(loaded.entries) == ["a", "b"] and loaded.dropped == [4]
    loaded.append([TableEntry("d", 0.8, 0.0)])
    again = LatencyTable.load(table.path)  # strict: the cut line must not have become a corrupt row
    assert sorted(again.entries) == ["a", "b", "d"] and again.dropped == []


def test_build_drops_corrupt_rows_and_measures_them_again(tmp_path, micro):
    fingerprint = fake_fingerprint()
    table = synthetic_table(tmp_path, fingerprint, micro)
    before = dict(table.entries)
    keys = sorted(before)
    replace_line(table.path, line_of(table, keys[0]), CORRUPTIONS["ms NaN"](keys[0]))
    replace_line(table.path, line_of(table, keys[1]), CORRUPTIONS["not JSON"](keys[1]))
    with pytest.raises(ArtifactError):
        LatencyTable.load(table.path, fingerprint)

    predictor, report = build_latency_table(
        micro, fingerprint, tmp_path, workers=1, calibration_samples=CALIBRATION_SAMPLES, show_progress=False
    )
    assert report.corrupt_rows_dropped == 2 and report.segments_measured_now == 2
    repaired = LatencyTable.load(table.path, fingerprint)  # strict load passes again
    assert repaired.missing(required_segments(micro)) == [] and repaired.dropped == []
    assert {k: e for k, e in repaired.entries.items() if k not in keys[:2]} == {
        k: e for k, e in before.items() if k not in keys[:2]
    }, "rows that were fine are kept as they were"
    assert all(repaired.ms(k) > 0 for k in keys[:2])
    calibration = Calibration.load(Calibration.path_for(repaired, micro))
    fresh = LatencyPredictor(repaired, calibration)
    assert len(calibration.samples) == CALIBRATION_SAMPLES
    assert calibration.model == Calibration(micro.name, calibration.samples).fit()  # refitted to the new features
    for sample in calibration.samples:  # features recomputed from the repaired table
        space = micro.candidate_space(sample.space)
        total, _, _ = fresh.segment_features(space.resolve(space.subnet(sample.subnet)))
        assert sample.segments_ms == pytest.approx(total, rel=1e-12)


# ---- nothing to do, nowhere to write ----------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_complete_table_is_neither_timed_nor_written(tmp_path, micro, monkeypatch):
    """`latency build` on a finished table used to time the reference and rewrite the table and its
    calibration, so it failed on a read-only folder although there was nothing to do."""
    fingerprint = fake_fingerprint()
    synthetic_table(tmp_path, fingerprint, micro)
    before = snapshot(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # a read-only folder, also for root

    def no_timing(*args, **kwargs):
        raise AssertionError("a complete table must not be timed")

    monkeypatch.setattr("spaceevo.io.tempfile.mkstemp", refuse)
    monkeypatch.setattr(table_module, "open", refuse, raising=False)
    monkeypatch.setattr(build_module, "stable_meter", no_timing)
    _, report = build_latency_table(
        micro, fingerprint, tmp_path, workers=1, calibration_samples=CALIBRATION_SAMPLES, show_progress=False
    )
    assert report.segments_measured_now == 0 and report.corrupt_rows_dropped == 0
    assert report.calibration_samples == CALIBRATION_SAMPLES
    assert snapshot(tmp_path) == before


def test_read_only_table_with_work_to_do_fails_before_measuring(tmp_path, micro, monkeypatch):
    fingerprint = fake_fingerprint()
    table = synthetic_table(tmp_path, fingerprint, micro)
    lines = table.path.read_text().splitlines()
    table.path.write_text("\n".join(lines[:-1]) + "\n")  # one segment to measure

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_timing(*args, **kwargs):
        raise AssertionError("nothing may be measured when the result cannot be stored")

    monkeypatch.setattr(table_module, "open", refuse, raising=False)
    monkeypatch.setattr(build_module, "stable_meter", no_timing)
    with pytest.raises(ArtifactError, match=rf"{table.folder}: cannot write the latency table \(Permission denied\)"):
        build_latency_table(micro, fingerprint, tmp_path, workers=1, calibration_samples=1, show_progress=False)


def test_calibration_left_unfitted_by_a_killed_build_is_refitted(tmp_path, micro):
    fingerprint = fake_fingerprint()
    table = synthetic_table(tmp_path, fingerprint, micro)
    path = Calibration.path_for(table, micro)
    calibration = Calibration.load(path)
    fitted = calibration.model
    calibration.model = BoundaryModel()  # samples saved, the final fit not (killed in between)
    calibration.save(path)
    build_latency_table(micro, fingerprint, tmp_path, workers=1, calibration_samples=CALIBRATION_SAMPLES, show_progress=False)
    assert Calibration.load(path).model == fitted


def test_a_build_that_adds_calibration_samples_fits_them(tmp_path, micro):
    """A fresh build used to save its calibration without fitting it (the identity model) when it
    had measured calibration subnets: predictions were the plain sums of segments."""
    fingerprint = fake_fingerprint()
    table = synthetic_table(tmp_path, fingerprint, micro)
    path = Calibration.path_for(table, micro)
    calibration = Calibration.load(path)
    calibration.samples = calibration.samples[:1]  # the others are measured again
    calibration.model = BoundaryModel()
    calibration.save(path)
    build_latency_table(micro, fingerprint, tmp_path, workers=1, calibration_samples=CALIBRATION_SAMPLES, show_progress=False)
    saved = Calibration.load(path)
    assert len(saved.samples) > 1
    assert saved.model != BoundaryModel() and saved.model == Calibration(micro.name, saved.samples).fit()


def test_unwritable_tables_folder_is_an_artifact_error(capsys, tmp_path):
    (tmp_path / "micro.yaml").write_text(MICRO_YAML)
    blocked = tmp_path / "tables"
    blocked.write_text("a file where the tables folder should be\n")
    code, out, err = run_cli(
        capsys, "latency", "build", "--space", str(tmp_path / "micro.yaml"), "--tables", str(blocked),
        "--calibration-samples", "1",
    )
    assert code == 3 and out == ""
    assert f"spaceevo: error: {blocked}/" in err and "cannot write a latency table" in err
    assert "--tables" in err and "Traceback" not in err


def test_append_to_a_read_only_table_is_an_artifact_error(tmp_path, monkeypatch):
    table = LatencyTable.create(tmp_path, fake_fingerprint())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(table_module, "open", refuse, raising=False)
    with pytest.raises(ArtifactError, match=rf"{table.folder}: cannot write the latency table \(Permission denied\)"):
        table.append([TableEntry("a", 0.5, 0.0)])
    monkeypatch.setattr("spaceevo.io.tempfile.mkstemp", refuse)
    with pytest.raises(ArtifactError, match=rf"{table.folder}: cannot write the latency table"):
        table.compact()


# ---- interrupted and killed builds ------------------------------------------------------------

#: A build of micro one segment per chunk: the pool of workers lives through many small chunks.
BUILD = (
    "import sys, spaceevo.latency.table as t; t.CHUNK_SIZE = 1; "
    "from spaceevo.cli import main; sys.exit(main())"
)
STOP_WAITING_S = 120  # a guard against a hung test, not a timing assertion
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find worker processes")


class Build:
    """``spaceevo latency build`` of micro in a subprocess of its own session (like a terminal job),
    output to files: orphaned workers would keep pipes open."""

    def __init__(self, tmp_path: Path, name: str):
        (tmp_path / "micro.yaml").write_text(MICRO_YAML)
        self.root = tmp_path / "tables"
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BUILD, "latency", "build", "--space", str(tmp_path / "micro.yaml"),
                 "--tables", str(self.root), "--workers", "2", "--calibration-samples", "1", "--json"],
                stdout=out, stderr=err, start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
            )

    def wait(self) -> tuple[int, str, str]:
        code = self.process.wait(timeout=STOP_WAITING_S)
        return code, self.out.read_text(), self.err.read_text()

    def workers_once_rows_are_written(self) -> list[int]:
        deadline = time.monotonic() + STOP_WAITING_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.err.read_text()
            workers = children(self.process.pid)
            if len(workers) >= 2 and table_rows(self.root):
                return workers
            time.sleep(0.01)
        raise AssertionError("the build started no workers or wrote no row")


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + STOP_WAITING_S
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if alive(p)]
    for pid in survivors:  # do not leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return survivors


def table_rows(root: Path) -> dict[str, TableEntry]:
    paths = list(root.glob(f"*/{TABLE_FILE}"))
    return LatencyTable.load(paths[0], repair=True).entries if paths else {}


def stop(tmp_path: Path, how: str) -> dict[str, TableEntry]:
    """Stop a running build with ``kill -9`` or Ctrl-C; check it leaves no worker and a readable
    table; return the rows it finished."""
    build = Build(tmp_path, "stopped")
    workers = build.workers_once_rows_are_written()
    if how == "kill -9":
        os.kill(build.process.pid, signal.SIGKILL)
    else:
        os.killpg(build.process.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    code, out, err = build.wait()
    if how == "kill -9":
        assert code == -signal.SIGKILL
    else:
        assert code == 130, err
        assert "spaceevo: interrupted; finished work is saved, run the same command again to resume" in err
        assert "Traceback" not in err and out == ""
    assert wait_until_gone(workers) == [], f"workers outlived the build stopped with {how}"
    kept = table_rows(build.root)
    assert kept
    path = next(build.root.glob(f"*/{TABLE_FILE}"))
    LatencyTable.load(path)  # no corrupt row: at most a truncated last line
    return kept


def test_a_stopped_pool_has_closed_its_manager_wakeup_before_exit() -> None:
    """Python 3.11's exit hook writes to each live pool manager's wakeup pipe unlocked while the
    manager may be closing it ("Bad file descriptor" printed at exit after Ctrl-C, seen in CI):
    stopping a pool waits for its manager, so the pipe is closed before the hook runs."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=2)
    futures = [pool.submit(time.sleep, 30) for _ in range(4)]
    while not any(f.running() for f in futures):
        time.sleep(0.01)
    manager, wakeup = pool._executor_manager_thread, pool._executor_manager_thread_wakeup
    table_module._stop_workers(pool)
    assert manager is not None and not manager.is_alive() and wakeup._closed


@needs_proc
@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_stopped_build_leaves_no_workers(tmp_path, how):
    """``kill -9`` used to orphan the workers (reparented to PID 1, blocked forever); Ctrl-C made
    each worker print a KeyboardInterrupt traceback and left the build hanging."""
    stop(tmp_path, how)


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_stopped_build_resumes_keeping_finished_rows(tmp_path, how):
    kept = stop(tmp_path, how)
    code, out, err = Build(tmp_path, "resumed").wait()
    assert code == 0, err
    report = json.loads(out)
    final = table_rows(tmp_path / "tables")
    assert report["segments_measured_now"] == report["segments_required"] - len(kept)
    assert len(final) == report["segments_required"]
    assert all(final[key] == entry for key, entry in kept.items())
