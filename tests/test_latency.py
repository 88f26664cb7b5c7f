"""Tests of the latency engine (spaceevo.latency): fingerprint, measurement protocol, segments,
tables (persistence, resumption, device checks), the calibrated predictor and validation.

No test compares a measured time with an absolute threshold: timing on a shared machine moves by
30% or more. Measured figures are only checked for being positive and well-formed, and the one
end-to-end test (marked slow) compares two predictors relatively.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import statistics

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from spaceevo.errors import ArtifactError, DeviceMismatchError, UsageError
from spaceevo.latency import build as build_module
from spaceevo.latency.build import build_latency_table
from spaceevo.latency.fingerprint import OVERRIDE_ENV, DeviceFingerprint, device_fingerprint
from spaceevo.latency.engines import timer
from spaceevo.latency.measure import LatencyStats, MeasureConfig, measure_interleaved
from spaceevo.latency.predictor import (
    BoundaryModel,
    Calibration,
    CalibrationSample,
    LatencyPredictor,
)
from spaceevo.latency.segments import Segment, network_segments, required_segments, segment_model
from spaceevo.latency.table import TABLE_FILE, GROUP_SIZE, LatencyTable, TableEntry, default_tables, measure_segments
from spaceevo.latency.validate import validate_predictor
from spaceevo.blocks import conv_output_size
from spaceevo.space import load_hyperspace, load_space


def fake_fingerprint(cpu: str = "Test CPU 9000", isa=("avx2",), machine: str = "x86_64", threads: int = 1):
    return DeviceFingerprint(
        cpu_model=cpu, isa=tuple(isa), machine=machine, engine="cpu",
        engine_version="1.32.0", threads=threads,
    )


@pytest.fixture(scope="module")
def tiny():
    return load_hyperspace("tiny")


@pytest.fixture(scope="module")
def tiny_required(tiny) -> list[Segment]:
    return required_segments(tiny)


# ---------------------------------------------------------------------------------------------
# Device fingerprint


@pytest.mark.parametrize(
    "isa,machine,expected",
    [
        (("avx2",), "x86_64", True),
        (("avx", "avx2"), "AMD64", True),
        (("avx2", "avx512"), "x86_64", True),  # AVX-512 without VNNI still saturates
        (("avx2", "avx512", "avx512_vnni"), "x86_64", False),
        (("avx2", "avx_vnni"), "x86_64", False),
        (("amx_int8", "avx2", "avx512", "avx512_vnni"), "x86_64", False),
        (("amx_int8",), "x86_64", False),
        (("neon", "neon_dotprod"), "aarch64", False),
        ((), "aarch64", False),
    ],
)
def test_reduce_range_follows_isa(isa, machine, expected):
    assert fake_fingerprint(isa=isa, machine=machine).reduce_range is expected


def test_slug_is_stable_and_depends_on_every_field():
    fp = fake_fingerprint("AMD EPYC 7B13 64-Core Processor")
    # the folder name of existing tables: it must not change between runs or releases
    assert fp.slug == "amd-epyc-7b13-64-core-processor_avx2_ort1.32.0_t1_d34c6113"
    assert fake_fingerprint("AMD EPYC 7B13 64-Core Processor").slug == fp.slug
    assert re.fullmatch(r"[a-z0-9._-]+", fp.slug)
    others = [
        fake_fingerprint("AMD EPYC 7B13 64-Core Processor", threads=2),
        fake_fingerprint("AMD EPYC 7B13 64-Core Processor", isa=("avx2", "avx512")),
        fake_fingerprint("Another CPU"),
        fake_fingerprint("AMD EPYC 7B13 64-Core Processor", machine="AMD64"),
    ]
    slugs = {fp.slug} | {o.slug for o in others}
    assert len(slugs) == 1 + len(others)
    assert "_t2_" in others[0].slug


def test_fingerprint_dict_round_trip():
    fp = fake_fingerprint(isa=("avx2", "avx512", "avx512_vnni"), threads=4)
    data = fp.to_dict()
    assert data["slug"] == fp.slug and data["reduce_range"] is False and data["isa"] == list(fp.isa)
    again = DeviceFingerprint.from_dict(json.loads(json.dumps(data)))
    assert again == fp and again.slug == fp.slug


def test_this_host_fingerprint():
    fp = device_fingerprint("cpu", 1)
    assert fp.engine == "cpu" and fp.threads == 1
    assert device_fingerprint("cpu", 1) == fp  # deterministic
    assert device_fingerprint("cpu", 2).slug != fp.slug
    assert fp.describe().startswith(fp.cpu_model)


def test_fingerprint_rejects_bad_device_and_threads():
    with pytest.raises(UsageError, match=r"unknown device 'gpu'.*allowed: cpu, openvino"):
        device_fingerprint("gpu")
    with pytest.raises(UsageError, match="threads"):
        device_fingerprint("cpu", 0)


def test_fingerprint_override_replaces_cpu_model_and_isa(monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    here = device_fingerprint("cpu", 1)
    monkeypatch.setenv(OVERRIDE_ENV, "cpu_model=CI Test CPU;isa=avx2")
    fp = device_fingerprint("cpu", 1)
    assert fp == dataclasses.replace(here, cpu_model="CI Test CPU", isa=("avx2",)) and fp.slug != here.slug
    assert fp.reduce_range is (fp.machine in ("x86_64", "AMD64"))  # reduce_range follows the ISA given
    monkeypatch.setenv(OVERRIDE_ENV, " isa=avx512_vnni, avx2 ; ")
    vnni = device_fingerprint("cpu", 1)
    assert vnni.cpu_model == here.cpu_model and vnni.isa == ("avx2", "avx512_vnni") and not vnni.reduce_range
    monkeypatch.setenv(OVERRIDE_ENV, "isa=")
    assert device_fingerprint("cpu", 1).isa == ()
    monkeypatch.setenv(OVERRIDE_ENV, "")
    assert device_fingerprint("cpu", 1) == here


@pytest.mark.parametrize(
    "value, message",
    [
        ("cpu=x", r"bad field 'cpu=x'.*fields cpu_model, isa"),
        ("ci-host", r"bad field 'ci-host'.*'cpu_model=NAME;isa=FLAG,FLAG'"),
        ("cpu_model=a;cpu_model=b", r"bad field 'cpu_model=b'.*at most once"),
        ("cpu_model= ;isa=avx2", r"cpu_model must not be empty"),
        ("isa=avx2,sse4", r"unknown isa flag\(s\) sse4; allowed: amx_int8, avx2, avx512, "),
    ],
)
def test_bad_fingerprint_override_is_a_usage_error(monkeypatch, capsys, value, message):
    from spaceevo.cli import main

    monkeypatch.setenv(OVERRIDE_ENV, value)
    with pytest.raises(UsageError, match=message) as info:
        device_fingerprint("cpu", 1)
    assert str(info.value).startswith(f"${OVERRIDE_ENV}=")
    assert main(["latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min"]) == 2
    err = capsys.readouterr().err
    assert OVERRIDE_ENV in err and "Traceback" not in err


def test_the_suites_table_is_the_default_complete_and_a_fixed_point_of_build(latency_tables, tiny, tmp_path, monkeypatch):
    """The synthetic table of tests/conftest.py: where every test looks by default, complete for
    ``tiny`` under this host's fingerprint, and a build over it measures nothing and changes no
    prediction (so a test that builds, like the pipeline's, never times anything)."""
    assert default_tables() == latency_tables
    fp = device_fingerprint("cpu", 1)
    before = LatencyPredictor.load(LatencyTable.open(latency_tables, fp), tiny)
    assert before.table.missing(required_segments(tiny)) == [] and before.regressor is None
    root = tmp_path / "copy"
    shutil.copytree(latency_tables, root)

    def no_timing(*args, **kwargs):
        raise AssertionError("the synthetic table made a build time something")

    monkeypatch.setattr(build_module, "stable_meter", lambda *args, **kwargs: None)
    monkeypatch.setattr(build_module, "measure_models", no_timing)
    monkeypatch.setattr(build_module, "measure_segments", lambda table, missing, **kwargs: missing and no_timing())
    after, report = build_latency_table(tiny, fp, root, show_progress=False)
    assert report.segments_measured_now == 0 and report.calibration_samples == len(before.calibration.samples) > 0
    for arch in build_module.sample_architectures(tiny, 20, seed=5):
        assert after.predict_ms(arch) == pytest.approx(before.predict_ms(arch), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Measurement protocol


def tiny_model(op: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])
    inputs = ["x"] if op != "Add" else ["x", "x"]
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_measure_interleaved_returns_sane_stats():
    fp = device_fingerprint("cpu", 1)
    config = MeasureConfig(warmup=2, rounds=4, runs_per_round=3, min_round_s=0.0)
    timers = [timer(tiny_model("Relu"), fp), timer(tiny_model("Add"), fp)]
    stats = measure_interleaved(timers, config)
    assert len(stats) == 2
    for st in stats:
        assert isinstance(st, LatencyStats)
        assert len(st.round_medians_ms) == config.rounds
        assert st.ms > 0 and 0 < st.min_ms <= st.ms
        assert st.ms == statistics.median(st.round_medians_ms)
        assert st.spread >= 0


def test_spread_definition():
    st = LatencyStats(ms=2.0, min_ms=1.0, round_medians_ms=(1.0, 2.0, 2.0, 3.0, 5.0))
    # inclusive quartiles of (1, 2, 2, 3, 5) are 2 and 3: IQR 1 over median 2
    assert st.spread == pytest.approx(0.5)
    assert LatencyStats(0.0, 0.0, (0.0,)).spread == 0.0
    assert LatencyStats(1.0, 1.0, (1.0,)).spread == 0.0


# ---------------------------------------------------------------------------------------------
# Segments


def test_required_segments_cover_random_subnets(tiny, tiny_required):
    keys = [s.key for s in tiny_required]
    assert len(keys) == len(set(keys)), "required segments must be unique"
    assert keys == sorted(keys)
    required = set(keys)
    rng = random.Random(7)
    for _ in range(200):
        space = tiny.random_candidate_space(rng)
        arch = space.resolve(space.random_subnet(rng))
        segments = network_segments(arch)
        assert len(segments) == len(arch.blocks) + 1
        assert segments[0].first and not any(s.first for s in segments[1:])
        assert segments[-1].last and not any(s.last for s in segments[:-1])
        for segment in segments:
            assert segment.key in required, f"{space.encoding} {arch.subnet.encode()}: {segment.key}"


def test_required_segments_heads_and_first(tiny, tiny_required):
    final_sizes = set()
    for resolution in tiny.resolutions:
        size = resolution
        for stage in tiny.stages:
            size = conv_output_size(size, stage.stride)
        final_sizes.add(size)
    heads = [s for s in tiny_required if s.head is not None]
    expected = {(w, size) for w in tiny.stages[-1].widths for size in final_sizes}
    assert sorted((h.in_channels, h.input_size) for h in heads) == sorted(expected)  # exactly one each
    assert all(h.last and not h.first and h.key.endswith(":u8in") for h in heads)

    first = [s for s in tiny_required if s.first]
    # only the stem's block at each resolution sees the float image
    assert sorted(s.input_size for s in first) == sorted(tiny.resolutions)
    for s in first:
        assert s.block is not None and s.block.block_type == "conv"
        assert s.in_channels == tiny.in_channels and s.key.endswith(":f32in")
    assert all(s.key.endswith(":u8in") for s in tiny_required if not s.first)


def input_dtype(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.elem_type


def output_dtype(model: onnx.ModelProto) -> int:
    return model.graph.output[0].type.tensor_type.elem_type


def test_segment_models_have_quantized_boundaries(tiny_required):
    from spaceevo.latency.engines.ort_session import make_session, random_feed

    by_key = {s.key: s for s in tiny_required}
    first = by_key["conv:i1:o16:k3:e0:s1:h24:none:f32in"]
    block = by_key["mbv2:i16:o16:k3:e3.0:s1:h12:identity:u8in"]
    head = next(s for s in tiny_required if s.head is not None and s.input_size == 3 and s.in_channels == 96)
    for segment in (first, block, head):
        model = onnx.load_from_string(segment_model(segment, reduce_range=True))
        onnx.checker.check_model(model)
        assert input_dtype(model) == (TensorProto.FLOAT if segment.first else TensorProto.UINT8), segment.key
        assert output_dtype(model) == (TensorProto.FLOAT if segment.last else TensorProto.UINT8), segment.key
        session = make_session(model, 1)
        (out,) = session.run(None, random_feed(session))
        if segment.last:
            assert out.shape == (1, 10) and out.dtype == np.float32
        else:
            b = segment.block
            assert out.shape == (1, b.out_channels, b.output_size, b.output_size) and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Latency tables


def entries(n: int, prefix: str = "seg") -> list[TableEntry]:
    # values with at most 6 decimals: the file stores ms rounded to the nanosecond
    return [TableEntry(f"{prefix}{i:03d}", round(0.1 + i / 7, 6), i / 100) for i in range(n)]


def test_table_create_append_load(tmp_path):
    fp = fake_fingerprint()
    table = LatencyTable.create(tmp_path, fp)
    assert table.path == tmp_path / fp.slug / TABLE_FILE
    table.append(entries(3))
    table.append(entries(5)[3:])
    loaded = LatencyTable.load(table.path, expected=fp)
    assert loaded.fingerprint == fp
    assert loaded.entries == table.entries and len(loaded) == 5
    assert loaded.ms("seg002") == pytest.approx(0.1 + 2 / 7, rel=1e-5)
    assert LatencyTable.open(tmp_path, fp).entries == table.entries
    header = json.loads(table.path.read_text().splitlines()[0])
    assert header["fingerprint"]["slug"] == fp.slug and "onnxruntime" in header["versions"]


def test_truncated_last_line_is_dropped_and_appends_continue(tmp_path):
    fp = fake_fingerprint()
    table = LatencyTable.create(tmp_path, fp)
    table.append(entries(4))
    with open(table.path, "a") as handle:  # a build killed while writing
        handle.write('{"key": "seg004", "ms": 0.6')
    loaded = LatencyTable.load(table.path, expected=fp)
    assert sorted(loaded.entries) == [f"seg{i:03d}" for i in range(4)]

    loaded.append([TableEntry("late", 1.5, 0.0)])
    again = LatencyTable.load(table.path, expected=fp)
    assert sorted(again.entries) == ["late"] + [f"seg{i:03d}" for i in range(4)]
    assert again.ms("late") == 1.5

    again.compact()
    lines = again.path.read_text().splitlines()
    assert len(lines) == 1 + 5
    for line in lines:
        json.loads(line)  # every line parses after compaction
    compacted = LatencyTable.load(again.path, expected=fp)
    assert compacted.entries == again.entries and compacted.header == again.header


def test_table_of_another_device_is_refused(tmp_path):
    mine, theirs = fake_fingerprint("My CPU"), fake_fingerprint("Their CPU")
    table = LatencyTable.create(tmp_path, theirs)
    table.append(entries(2))
    with pytest.raises(DeviceMismatchError) as info:
        LatencyTable.load(table.path, expected=mine)
    message = str(info.value)
    assert "My CPU" in message and "Their CPU" in message and "spaceevo latency build" in message
    # the same table under this device's folder is refused too
    target = tmp_path / mine.slug / TABLE_FILE
    target.parent.mkdir(parents=True)
    target.write_text(table.path.read_text())
    with pytest.raises(DeviceMismatchError):
        LatencyTable.open(tmp_path, mine)


def test_missing_table_tells_how_to_build_one(tmp_path):
    fp = fake_fingerprint()
    with pytest.raises(ArtifactError, match="spaceevo latency build"):
        LatencyTable.open(tmp_path, fp)
    LatencyTable.create(tmp_path, fake_fingerprint("Other"))
    with pytest.raises(ArtifactError, match="other devices"):
        LatencyTable.open(tmp_path, fp)
    created = LatencyTable.open(tmp_path, fp, create=True)
    assert created.path.exists() and len(created) == 0


def test_unreadable_table_is_an_artifact_error(tmp_path):
    path = tmp_path / "x" / TABLE_FILE
    path.parent.mkdir()
    path.write_text("not json\n")
    with pytest.raises(ArtifactError, match="not a spaceevo latency table"):
        LatencyTable.load(path)
    with pytest.raises(ArtifactError, match="cannot read"):
        LatencyTable.load(tmp_path / "missing.jsonl")


def cheap_segments(required: list[Segment], count: int) -> list[Segment]:
    def cost(s: Segment) -> float:
        b = s.block
        width = max(b.mid_channels, b.out_channels)
        return s.input_size**2 * (b.in_channels * width + b.out_channels * width) * b.kernel**2 / b.stride**2

    return sorted((s for s in required if s.block is not None), key=lambda s: (cost(s), s.key))[:count]


def test_killed_build_resumes_without_remeasuring(tmp_path, tiny_required):
    fp = device_fingerprint("cpu", 1)
    segments = cheap_segments(tiny_required, GROUP_SIZE + 4)
    table = LatencyTable.open(tmp_path, fp, create=True)
    calls: list[int] = []

    def interrupt_after_first_group(n: int) -> None:
        calls.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_segments(table, segments, workers=1, progress=interrupt_after_first_group)
    assert calls == [GROUP_SIZE]
    first_group = {s.key for s in segments[:GROUP_SIZE]}
    lines = table.path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]  # no corrupt rows
    assert {r["key"] for r in rows} == first_group and len(rows) == GROUP_SIZE
    assert all(r["ms"] > 0 and r["spread"] >= 0 for r in rows)

    resumed = LatencyTable.open(tmp_path, fp)
    assert set(resumed.entries) == first_group
    missing = resumed.missing(segments)
    assert [s.key for s in missing] == [s.key for s in segments[GROUP_SIZE:]]
    measured: list[int] = []
    measure_segments(resumed, missing, workers=1, progress=measured.append)
    assert sum(measured) == len(segments) - GROUP_SIZE

    final_rows = [json.loads(line)["key"] for line in table.path.read_text().splitlines()[1:]]
    assert sorted(final_rows) == sorted(s.key for s in segments)  # every key exactly once
    final = LatencyTable.open(tmp_path, fp)
    assert final.missing(segments) == [] and all(e.ms > 0 for e in final.entries.values())


# ---------------------------------------------------------------------------------------------
# Predictor


def test_calibration_fit_recovers_boundary_model():
    truth = BoundaryModel(scale=0.93, per_cut_ms=0.021, per_element_ms=3.5e-6, intercept_ms=0.13)
    rng = random.Random(3)
    calibration = Calibration(hyperspace="tiny")
    for i in range(12):
        cuts = rng.randint(4, 14)
        elements = rng.randint(5_000, 80_000)
        segments_ms = rng.uniform(1.0, 5.0)
        measured = truth.apply(segments_ms, cuts, elements)
        calibration.samples.append(CalibrationSample("tiny-1111-0000", f"s{i}", measured, segments_ms, cuts, elements))
    fitted = calibration.fit()
    assert calibration.model == fitted
    np.testing.assert_allclose(
        [fitted.scale, fitted.intercept_ms, fitted.per_cut_ms, fitted.per_element_ms],
        [truth.scale, truth.intercept_ms, truth.per_cut_ms, truth.per_element_ms],
        rtol=1e-6,
    )


def test_small_calibration_fits_only_cut_cost_and_intercept():
    truth = BoundaryModel(per_cut_ms=0.01, intercept_ms=0.05)
    calibration = Calibration(hyperspace="tiny")
    for i, (cuts, segments_ms) in enumerate([(4, 1.0), (7, 2.5), (10, 1.7), (13, 3.1)]):
        measured = truth.apply(segments_ms, cuts, 50_000)
        calibration.samples.append(CalibrationSample("tiny-1111-0000", f"s{i}", measured, segments_ms, cuts, 50_000))
    fitted = calibration.fit()
    assert fitted.scale == 1.0 and fitted.per_element_ms == 0.0
    np.testing.assert_allclose([fitted.intercept_ms, fitted.per_cut_ms], [0.05, 0.01], rtol=1e-6)


def test_calibration_with_too_few_samples_is_identity():
    calibration = Calibration(hyperspace="tiny", samples=[CalibrationSample("a", "b", 2.0, 3.0, 4, 100)])
    assert calibration.fit() == BoundaryModel()


def synthetic_predictor(tmp_path, arch) -> tuple[LatencyPredictor, dict[str, float], BoundaryModel]:
    table = LatencyTable.create(tmp_path, fake_fingerprint())
    made_up = {s.key: 0.05 + 0.01 * i for i, s in enumerate(network_segments(arch))}
    table.append([TableEntry(k, ms, 0.0) for k, ms in made_up.items()])
    model = BoundaryModel(scale=0.95, per_cut_ms=0.004, per_element_ms=2e-7, intercept_ms=0.03)
    calibration = Calibration(hyperspace="tiny", model=model)
    calibration.save(Calibration.path_for(table, arch.space.hyperspace))
    return LatencyPredictor(table, calibration), made_up, model


def test_predictor_sums_segments_minus_boundary_cost(tmp_path):
    space = load_space("tiny-3152-1010")
    arch = space.resolve(space.random_subnet(random.Random(5)))
    predictor, made_up, model = synthetic_predictor(tmp_path, arch)
    blocks = arch.blocks
    cuts = len(blocks)  # between consecutive blocks and before the head
    elements = sum(b.out_channels * b.output_size * b.output_size for b in blocks)
    expected = (
        model.scale * sum(made_up.values())
        + model.intercept_ms
        - model.per_cut_ms * cuts
        - model.per_element_ms * elements
    )

    prediction = predictor.predict(arch)
    assert prediction.cuts == cuts and prediction.cut_elements == elements
    assert prediction.segments_ms == pytest.approx(sum(made_up.values()), rel=1e-9)
    assert prediction.int8_ms == pytest.approx(expected, rel=1e-9)
    assert predictor.predict_ms(arch) == prediction.int8_ms

    loaded = LatencyPredictor.load(LatencyTable.load(predictor.table.path), arch.space.hyperspace)
    assert loaded.calibration.model == model
    assert loaded.predict_ms(arch) == pytest.approx(expected, rel=1e-5)


def test_predictor_refuses_incomplete_table_and_missing_calibration(tmp_path):
    space = load_space("tiny-1111-0000")
    arch = space.resolve(space.max_subnet())
    predictor, made_up, _ = synthetic_predictor(tmp_path, arch)
    other = space.resolve(space.min_subnet())
    with pytest.raises(ArtifactError, match="spaceevo latency build"):
        predictor.predict(other)

    dropped = sorted(made_up)[0]
    del predictor.table.entries[dropped]
    with pytest.raises(ArtifactError, match="spaceevo latency build") as info:
        predictor.predict(arch)
    assert dropped in str(info.value)

    bare = LatencyTable.create(tmp_path / "bare", fake_fingerprint())
    with pytest.raises(ArtifactError, match="spaceevo latency build"):
        LatencyPredictor.load(bare, space.hyperspace)


# ---------------------------------------------------------------------------------------------
# End to end (slow): build a table for a very small hyperspace, calibrate, validate

MICRO_YAML = """\
name: micro
input: {channels: 1, resolutions: [16]}
num_classes: 10
block_types:
  mbv2:   {digit: 1, kernels: [3], expand_ratios: [3]}
  resnet: {digit: 3, kernels: [3], expand_ratios: [1]}
stages:
  - {name: stem, block: conv, widths: [8], depths: [1], stride: 1, kernels: [3]}
  - name: stage1
    block_types: [mbv2, resnet]
    widths: [8, 16]
    window: 1
    depths: [1, 2]
    stride: 2
head:
  widths: [16, 32]
  activation: relu
"""


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "openvino"])
def test_build_calibrate_and_validate_end_to_end(tmp_path, device):
    if device == "openvino":
        pytest.importorskip("openvino")
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_YAML)
    hyperspace = load_hyperspace(path)
    fp = device_fingerprint(device, 1)
    root = tmp_path / "tables"
    predictor, report = build_latency_table(hyperspace, fp, root, workers=1, calibration_samples=8, show_progress=False)
    required = required_segments(hyperspace)
    assert report.segments_required == len(required) == report.segments_measured_now
    assert report.calibration_samples == 8
    table = LatencyTable.open(root, fp)
    assert table.missing(required) == []

    # a re-run measures nothing and keeps the calibration
    _, again = build_latency_table(hyperspace, fp, root, workers=1, calibration_samples=8, show_progress=False)
    assert again.segments_measured_now == 0 and again.calibration_samples == 8

    predictor = LatencyPredictor.load(table, hyperspace)
    result = validate_predictor(hyperspace, predictor, fp, samples=6, show_progress=False)
    assert result.samples == len(result.rows) == 6
    for fraction in (result.within_5pct, result.within_10pct, result.noise_within_10pct):
        assert 0.0 <= fraction <= 1.0
    assert result.rmspe >= 0 and result.noise_rms >= 0 and result.median_int8_ms > 0

    calibrated, uncalibrated = [], []
    for row in result.rows:
        assert row.measured_ms > 0 and row.remeasured_ms > 0 and row.predicted_ms > 0
        arch = hyperspace.candidate_space(row.space).resolve(hyperspace.candidate_space(row.space).subnet(row.subnet))
        truth = (row.measured_ms + row.remeasured_ms) / 2
        segments_ms, _, _ = predictor.segment_features(arch)
        assert predictor.predict_ms(arch) == pytest.approx(row.predicted_ms)
        calibrated.append(abs(row.predicted_ms - truth) / truth)
        uncalibrated.append(abs(segments_ms - truth) / truth)
    assert statistics.fmean(calibrated) <= statistics.fmean(uncalibrated), (calibrated, uncalibrated)


# ---------------------------------------------------------------------------------------------
# Regression for sampled tables


def test_segment_regressor_recovers_linear_latency_model():
    from spaceevo.latency.regression import FEATURES, SegmentRegressor, group_key, segment_features

    segments = required_segments(load_hyperspace("tiny"))
    truth = np.array([0.01, 0.8, 2.0, 0.5, 0.3, 0.1])
    assert len(truth) == len(FEATURES)
    measured = [(s, float(segment_features(s) @ truth)) for s in segments[::3]]
    model = SegmentRegressor.fit(measured)
    unseen = [s for s in segments[1::3] if model.covers(s)]
    assert unseen
    for segment in unseen[:200]:
        assert model.predict(segment) == pytest.approx(float(segment_features(segment) @ truth), rel=1e-6)
    assert all((coef >= 0).all() for coef in model.coefficients.values())
    assert {group_key(s) for s, _ in measured} >= set(model.coefficients)


def test_nnls_drops_negative_coefficients():
    from spaceevo.latency.regression import _nnls

    rng = np.random.default_rng(0)
    design = rng.uniform(0, 1, size=(50, 3))
    target = design @ np.array([1.0, -2.0, 0.5])
    coef = _nnls(design, target)
    assert (coef >= 0).all() and coef[1] == 0.0


def test_sampled_table_predicts_missing_segments_with_regression(tmp_path):
    from spaceevo.latency.predictor import fit_regressor
    from spaceevo.latency.regression import PER_GROUP, group_key, sample_segments, segment_features

    hyperspace = load_hyperspace("tiny")
    segments = required_segments(hyperspace)
    truth = np.array([0.02, 0.9, 1.5, 0.4, 0.2, 0.05])
    table = LatencyTable.create(tmp_path, fake_fingerprint())
    sample = sample_segments(segments, 1500)
    assert len(sample) == 1500 and sample == sample_segments(segments, 1500)
    sizes: dict[str, int] = {}
    for s in segments:
        sizes[group_key(s)] = sizes.get(group_key(s), 0) + 1
    for key, size in sizes.items():
        assert sum(group_key(s) == key for s in sample) >= min(size, PER_GROUP)
    table.append([TableEntry(s.key, float(segment_features(s) @ truth), 0.0) for s in sample])
    regressor = fit_regressor(table, hyperspace)
    assert regressor is not None
    predictor = LatencyPredictor(table, Calibration(hyperspace="tiny"), regressor)
    space = load_space("tiny-2135-1010")
    arch = space.resolve(space.max_subnet())
    expected = sum(float(segment_features(s) @ truth) for s in network_segments(arch))
    assert predictor.predict(arch).segments_ms == pytest.approx(expected, rel=1e-6)


class ScriptedTimer:
    """Stands in for a Timer: returns scripted per-call latencies (the last one repeats)."""

    def __init__(self, script: list[float]):
        self.script = list(script)

    def run_once(self) -> float:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def round(self, runs: int, min_round_s: float) -> list[float]:
        return [self.run_once() for _ in range(runs)]


class PhasedTimer:
    """A model whose latency is ``base_ms`` times the phase factor of a simulated machine clock.

    Every run advances the shared clock by its latency; the machine is 1.7x slower during every
    third ``period_ms`` of time, so phases come and go within one round of a long model.
    """

    def __init__(self, base_ms: float, machine: dict):
        self.base_ms = base_ms
        self.machine = machine

    def run_once(self) -> float:
        machine = self.machine
        factor = 1.7 if (machine["clock_ms"] // machine["period_ms"]) % 3 == 2 else 1.0
        latency = self.base_ms * factor
        machine["clock_ms"] += latency
        return latency

    def round(self, runs: int, min_round_s: float) -> list[float]:
        return [self.run_once() for _ in range(runs)]


def _machine(period_ms: float) -> dict:
    return {"clock_ms": 0.0, "period_ms": period_ms}


@pytest.mark.parametrize("subject_ms", [0.5, 25.0])
def test_stable_meter_expresses_rounds_in_reference_units(subject_ms):
    from spaceevo.latency.measure import StableMeter, measure_interleaved

    config = MeasureConfig(warmup=0, rounds=15, runs_per_round=5, min_round_s=0.0)
    # slow phases last 6 subject runs: longer than one subject's round, shorter than a round of both
    raw = measure_interleaved([PhasedTimer(subject_ms, _machine(6 * subject_ms))], config)[0]
    machine = _machine(6 * subject_ms)
    meter = StableMeter(PhasedTimer(0.066, machine), canonical_ms=0.066)
    stats = meter.measure([PhasedTimer(subject_ms, machine), PhasedTimer(2 * subject_ms, machine)], config)
    assert stats[0].ms == pytest.approx(subject_ms, rel=0.02)
    assert stats[1].ms == pytest.approx(2 * subject_ms, rel=0.02)
    assert len(stats[1].round_medians_ms) == config.rounds
    # the slow phase does show in raw rounds: normalisation is what removes it
    assert max(raw.round_medians_ms) > 1.5 * subject_ms
    assert max(stats[0].round_medians_ms) < 1.2 * subject_ms


def test_stable_meter_settles_canonical_scale_once():
    from spaceevo.latency.measure import StableMeter

    machine = _machine(40.0)
    meter = StableMeter(PhasedTimer(0.2, machine))
    baseline = meter.settle(seconds=0.0)
    assert meter.canonical_ms == baseline and baseline in (pytest.approx(0.2), pytest.approx(0.34))
    fixed = StableMeter(PhasedTimer(0.2, machine), canonical_ms=0.25)
    fixed.settle(seconds=0.0)
    assert fixed.canonical_ms == 0.25
