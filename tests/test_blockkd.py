"""Teacher, block-wise distillation and block LUT building (spaceevo.search.teacher / blockkd / lut_build)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from spaceevo.errors import RunMismatchError
from spaceevo.latency.api import load_predictor
from spaceevo.latency.segments import Segment
from spaceevo.search import blockkd, lut_build, teacher as teacher_module
from spaceevo.search.blockkd import KDConfig, SubStage, jobs_of_shard, kd_jobs, nsr_loss, train_job
from spaceevo.search.lut import parse_stage_config, read_lut_csv, required_files, lut_filename
from spaceevo.search.lut_build import build_block_luts, fixed_stage_latency_ms, stage_latency_ms
from spaceevo.search.teacher import Teacher, TeacherArch, TeacherConfig, load_teacher, train_teacher
from spaceevo.space import load_hyperspace
from spaceevo.train import engine
from spaceevo.train.data import load_data

TINY = load_hyperspace("tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- NSR loss ---------------------------------------------------------------------------------


def test_nsr_loss_by_hand():
    # channel 0: T = [[0, 2], [0, 2]] (mean 1, variance 1), S = 0 -> mean (S-T)^2 = 2 -> ratio 2
    # channel 1: T = [[1, 3], [1, 3]] (variance 1), S = T + 1 -> mean (S-T)^2 = 1 -> ratio 1
    teacher = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]], [[1.0, 3.0], [1.0, 3.0]]]])
    student = torch.stack([torch.zeros(2, 2), teacher[0, 1] + 1])[None]
    assert nsr_loss(student, teacher, floor=0.0).item() == pytest.approx(1.5)
    # the floor adds floor * mean teacher variance (1 here) to every variance
    assert nsr_loss(student, teacher, floor=0.01).item() == pytest.approx((2 + 1) / 2 / 1.01)


def test_nsr_loss_divides_by_the_teacher_variance():
    torch.manual_seed(0)
    teacher = torch.randn(3, 4, 5, 5)
    student = 3 * teacher + 0.5  # larger variance than the teacher's
    error = (student - teacher).pow(2).mean(dim=(2, 3))
    by_teacher = (error / teacher.var(dim=(2, 3), unbiased=False)).mean()
    by_student = (error / student.var(dim=(2, 3), unbiased=False)).mean()
    got = nsr_loss(student, teacher, floor=0.0)
    assert got.item() == pytest.approx(by_teacher.item(), rel=1e-5)
    assert abs(got.item() - by_student.item()) > 1.0
    # inflating the student's variance makes the loss worse, not better
    assert nsr_loss(10 * teacher, teacher, floor=0.0) > nsr_loss(teacher * 1.1, teacher, floor=0.0)


# ---- teacher ----------------------------------------------------------------------------------


def test_teacher_stages_line_up_with_the_hyperspace():
    teacher = Teacher(TeacherArch.for_hyperspace(TINY, TeacherConfig())).eval()
    space = TINY.homogeneous_spaces()[0]
    for resolution in TINY.resolutions:
        arch = space.resolve(space.max_subnet(resolution))
        expected = [stage[-1].output_size for stage in arch.stages]
        features = teacher_module.teacher_features(teacher, torch.zeros(2, TINY.in_channels, resolution, resolution))
        assert [f.shape[-1] for f in features] == expected
        assert [f.shape[-2] for f in features] == expected
        assert [f.shape[1] for f in features] == list(teacher.arch.widths)


def test_teacher_resumes_per_epoch(tmp_path, monkeypatch):
    datasets = load_data("embedded", 28, seed=0)
    config = TeacherConfig(epochs=2, steps_per_epoch=2, batch_size=16, width_multiplier=0.5)
    whole = train_teacher(tmp_path / "whole.pt", TINY, datasets, config, show_progress=False)

    saves = []
    original = engine.save_state

    def save_then_die(path, state, format_tag):
        original(path, state, format_tag)
        saves.append(state["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tmp_path / "cut.pt", TINY, datasets, config, show_progress=False)
    monkeypatch.setattr(engine, "save_state", original)
    assert saves == [1]
    resumed = train_teacher(tmp_path / "cut.pt", TINY, datasets, config, show_progress=False)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    loaded = load_teacher(tmp_path / "cut.pt", TINY)
    assert torch.equal(loaded.fc.weight, whole.fc.weight)


# ---- jobs and shards --------------------------------------------------------------------------


def test_shards_partition_the_jobs():
    jobs = kd_jobs(TINY)
    assert len(jobs) == 4 * 6 and len({j.name for j in jobs}) == len(jobs)
    for count in (1, 2, 3, 5):
        shards = [jobs_of_shard(jobs, (i, count)) for i in range(count)]
        names = [j.name for shard in shards for j in shard]
        assert sorted(names) == sorted(j.name for j in jobs)
        assert len(names) == len(set(names))
    with pytest.raises(Exception, match="shard 2/2"):
        jobs_of_shard(jobs, (2, 2))


def test_sub_stages_resolve_like_candidate_spaces():
    space = TINY.candidate_space("tiny-3152-1010")
    rng = random.Random(1)
    jobs = {(j.stage_index, j.block.digit): j for j in kd_jobs(TINY)}
    for _ in range(5):
        subnet = space.random_subnet(rng)
        arch = space.resolve(subnet)
        for index, (digit, blocks) in enumerate(zip(space.block_digits, arch.stages[1:]), start=1):
            job = jobs[(index, digit)]
            sub = SubStage(blocks[0].in_channels, subnet.stages[index])
            assert job.resolve(sub, subnet.resolution) == blocks


# ---- resumable distillation jobs ----------------------------------------------------------------


def test_job_resumes_to_the_same_weights(tmp_path, monkeypatch):
    datasets = load_data("embedded", 28, seed=0)
    teacher = Teacher(TeacherArch.for_hyperspace(TINY, TeacherConfig(width_multiplier=0.5))).eval()
    cache = blockkd.build_feature_cache(teacher, datasets.train, 32, TINY.resolutions, show_progress=False)
    job = kd_jobs(TINY)[-6]  # stage4, mbv1_dual: the cheapest
    config = KDConfig(epochs=1, qat_epochs=1, steps_per_epoch=2, batch_size=8, train_images=32)
    whole = train_job(job, teacher, "t", cache, config, tmp_path / "whole", reduce_range=True, show_progress=False)

    original = blockkd.prepare_qat
    monkeypatch.setattr(blockkd, "prepare_qat", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed when the QAT phase starts, after epoch 1
        train_job(job, teacher, "t", cache, config, tmp_path / "cut", reduce_range=True, show_progress=False)
    monkeypatch.setattr(blockkd, "prepare_qat", original)
    assert not (tmp_path / "cut" / f"{job.name}.done").exists()
    assert torch.load(tmp_path / "cut" / f"{job.name}.pt", weights_only=True)["epoch"] == 1
    resumed = train_job(job, teacher, "t", cache, config, tmp_path / "cut", reduce_range=True, show_progress=False)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    done = json.loads((tmp_path / "cut" / f"{job.name}.done").read_text())
    assert [e["phase"] for e in done["history"]] == ["fp32", "qat"]

    with pytest.raises(Exception, match="other inputs"):  # another teacher: refused, not mixed
        train_job(job, teacher, "other", cache, config, tmp_path / "cut", reduce_range=True, show_progress=False)


# ---- the smoke build ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, latency_tables):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    lut_dir = build_block_luts(run, "tiny", preset="smoke", show_progress=False, tables=latency_tables)
    torch.set_num_threads(threads)
    return run, lut_dir


def test_smoke_build_writes_every_lut_in_the_published_format(smoke_run):
    run, lut_dir = smoke_run
    expected = {lut_filename(*key) for key in required_files(TINY)}
    assert {p.name for p in lut_dir.glob("*.csv")} == expected and len(expected) == 4 * 6 * 2
    config = lut_build.LUT_PRESETS["smoke"].kd
    for path in sorted(lut_dir.glob("*.csv")):
        rows = read_lut_csv(path)
        assert len(rows) == config.lut_samples * len(TINY.resolutions)
        for row in rows:
            assert all(math.isfinite(v) for v in (row.nsr_loss, row.mflops, row.mparams, row.latency_ms))
            assert row.nsr_loss >= 0 and row.mflops > 0 and row.mparams > 0 and row.latency_ms > 0
        fields = path.read_text().splitlines()[0].split(",")
        assert len(fields) == 6 and fields[1].startswith("1x")
    record = json.loads((run / "search" / "lut_record.json").read_text())
    assert set(record["fixed_stage_ms"]) == {str(r) for r in TINY.resolutions}
    assert record["hyperspace_digest"] == TINY.digest
    assert (run / "search" / "teacher.pt").exists()
    assert len(list((run / "search" / "blockkd").glob("*.done"))) == 24


def test_rerun_skips_finished_work(smoke_run, monkeypatch, latency_tables):
    run, lut_dir = smoke_run
    search = run / "search"
    artifacts = [search / "teacher.pt", *search.glob("blockkd/*"), *lut_dir.glob("*.csv")]
    mtimes = {p: p.stat().st_mtime_ns for p in artifacts}
    calls = []
    original = lut_build.train_job
    monkeypatch.setattr(lut_build, "train_job", lambda job, *a, **k: calls.append(job.name) or original(job, *a, **k))
    build_block_luts(run, "tiny", preset="smoke", show_progress=False, tables=latency_tables)
    assert calls == []  # everything present: not even data or the teacher is loaded
    assert {p: p.stat().st_mtime_ns for p in artifacts} == mtimes

    # a kill after a job finished but before its LUT files were written: only those files are made
    victim = lut_dir / "stage2_3_1.csv"
    victim.unlink()
    build_block_luts(run, "tiny", preset="smoke", show_progress=False, tables=latency_tables)
    assert calls == ["stage2_3"] and victim.exists()
    for path, mtime in mtimes.items():
        if path != victim:
            assert path.stat().st_mtime_ns == mtime, path  # the job was loaded, not retrained


def test_another_preset_is_refused(smoke_run, latency_tables):
    run, _ = smoke_run
    with pytest.raises(RunMismatchError, match="preset"):
        build_block_luts(run, "tiny", preset="default", show_progress=False, tables=latency_tables)


def test_luts_of_another_engine_are_refused(smoke_run, latency_tables, tmp_path):
    import shutil

    from spaceevo.latency.fingerprint import device_fingerprint
    from spaceevo.latency.table import TABLE_FILE

    pytest.importorskip("openvino")
    run, _ = smoke_run
    cpu, openvino = device_fingerprint("cpu", 1), device_fingerprint("openvino", 1)
    shutil.copytree(latency_tables / cpu.slug, tmp_path / openvino.slug)  # the same figures, another engine
    table = tmp_path / openvino.slug / TABLE_FILE
    header, *rows = table.read_text().splitlines()
    table.write_text("\n".join([json.dumps({**json.loads(header), "fingerprint": openvino.to_dict()}), *rows]) + "\n")
    with pytest.raises(RunMismatchError, match=r"another device.*_ort.*_ov"):
        build_block_luts(run, "tiny", preset="smoke", device="openvino", show_progress=False, tables=tmp_path)


def test_lut_latency_is_the_tables_sum(smoke_run, latency_tables):
    _, lut_dir = smoke_run
    predictor = load_predictor(TINY, "cpu", 1, latency_tables)
    model = predictor.calibration.model
    jobs = {(j.searchable_index, j.block.digit): j for j in kd_jobs(TINY)}
    for name in ("stage1_2_0.csv", "stage3_5_1.csv", "stage4_0_0.csv"):
        stage, digit, _ = (int(v) for v in name[len("stage"):-len(".csv")].split("_"))
        job = jobs[(stage, digit)]
        sizes = {job.input_size(r): r for r in TINY.resolutions}
        for row in read_lut_csv(lut_dir / name):
            specs = job.resolve(SubStage(row.input_shape[1], parse_stage_config(row.config)), sizes[row.input_size])
            expected = sum(
                model.scale * predictor.table.ms(Segment(s.in_channels, s.input_size, False, block=s).key)
                - model.per_cut_ms
                - model.per_element_ms * s.out_channels * s.output_size**2
                for s in specs
            )
            assert row.latency_ms == pytest.approx(expected, abs=2e-6)


def test_stage_latencies_add_up_to_the_predictor(latency_tables):
    predictor = load_predictor(TINY, "cpu", 1, latency_tables)
    fixed = fixed_stage_latency_ms(TINY, predictor)
    rng = random.Random(3)
    for encoding in ("tiny-1111-0000", "tiny-3052-1101"):
        space = TINY.candidate_space(encoding)
        for _ in range(3):
            arch = space.resolve(space.random_subnet(rng))
            stages = sum(stage_latency_ms(predictor, blocks) for blocks in arch.stages[1:])
            head = [
                predictor.segment_ms(Segment(w, arch.final_size, False, head=TINY.head, num_classes=TINY.num_classes))
                for w in TINY.stages[-1].widths
            ]
            actual_head = predictor.segment_ms(
                Segment(arch.final_channels, arch.final_size, False, head=TINY.head, num_classes=TINY.num_classes)
            )
            # exact but for the head, which the fixed part takes at its mean over the last widths
            correction = predictor.calibration.model.scale * (actual_head - sum(head) / len(head))
            assert stages + fixed[arch.resolution] + correction == pytest.approx(predictor.predict_ms(arch), abs=1e-9)
