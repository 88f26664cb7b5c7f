"""The reliability sweep of supernet training, the teacher and block-KD jobs and the space search:
bad inputs and broken artifacts give a named message and exit code 2 (usage) or 3 (artifact), never
a traceback; interrupted runs (SIGINT, ``kill -9``) resume on re-run without losing finished work."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spaceevo.cli import main
from spaceevo.errors import ArtifactError, RunMismatchError
from spaceevo.search import blockkd
from spaceevo.search.blockkd import KDConfig, kd_jobs, train_job
from spaceevo.search.teacher import Teacher, TeacherArch, TeacherConfig, load_teacher, train_teacher
from spaceevo.space import load_hyperspace
from spaceevo.train.checkpoint import load_checkpoint, save_checkpoint
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import load_data
from spaceevo.train.loop import train_supernet

SPACE = "tiny-1111-0000"
TINY = load_hyperspace("tiny")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- read-only run folders ----------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder. Its mode is 0555; since root ignores modes, creating a file or a folder
    below it also fails here as the kernel fails it for other users (EACCES), at the os level."""
    folder = (tmp_path / "read-only").resolve()
    folder.mkdir()
    folder.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).resolve().is_relative_to(folder)

    def refuse(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def guarded_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if inside(path):
            raise refuse(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    yield folder
    folder.chmod(0o755)


def test_train_in_a_read_only_folder_is_named_before_any_work(read_only, capsys):
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(read_only / "run"), "--preset", "smoke")
    assert code == 3 and out == "" and "Traceback" not in err
    assert err.startswith(f"spaceevo: error: cannot write to {read_only / 'run'} (in {read_only}): Permission denied")
    assert "choose another --run directory" in err
    assert not (read_only / "run").exists()
    # an existing run folder that became read-only: refused before an epoch is trained, not after
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(read_only), "--preset", "smoke", "--resume")
    assert code == 3 and f"cannot write to {read_only}: Permission denied" in err


@pytest.mark.parametrize("block_lut", [True, False])
def test_search_in_a_read_only_folder_is_named_before_any_work(read_only, capsys, tmp_path, block_lut):
    lut = ["--block-lut", str(tmp_path / "no-lut-needed"), "--hyperspace", "tiny"] if block_lut else []
    code, out, err = run_cli(capsys, "search", *lut, "--run", str(read_only / "run"), "--preset", "smoke",
                             "--tables", str(tmp_path / "tables"))
    assert code == 3 and out == "" and "Traceback" not in err
    assert f"cannot write to {read_only / 'run' / 'search'} (in {read_only}): Permission denied" in err


# ---- corrupt checkpoints --------------------------------------------------------------------------


def _truncated_checkpoint(path: Path) -> None:
    save_checkpoint(path, {"epoch": 1, "model": {"weight": torch.zeros(4096)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "random bytes": lambda path: path.write_bytes(random.Random(0).randbytes(5000)),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncated_checkpoint,
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("resume", [True, False])
def test_corrupt_training_checkpoint_is_named_with_the_remedy(tmp_path, capsys, corruption, resume):
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    CORRUPTIONS[corruption](checkpoint)
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(tmp_path / "run"), "--preset", "smoke",
                             *(["--resume"] if resume else []))
    assert (code, out) == (3, "")
    assert err == (f"spaceevo: error: {checkpoint} is not a spaceevo training checkpoint (truncated or corrupt): "
                   "delete it to start over or restore it\n")


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_teacher_checkpoint_is_named_with_the_remedy(tmp_path, corruption):
    path = tmp_path / "teacher.pt"
    CORRUPTIONS[corruption](path)
    expected = f"{path} is not a spaceevo teacher checkpoint (truncated or corrupt): delete it to train the teacher again"
    with pytest.raises(ArtifactError) as info:
        load_teacher(path, TINY)  # --teacher PATH
    assert str(info.value).startswith(expected)
    datasets = load_data("embedded", 28, seed=0)
    with pytest.raises(ArtifactError) as info:
        train_teacher(path, TINY, datasets, TeacherConfig(epochs=1, steps_per_epoch=1, batch_size=8), show_progress=False)
    assert str(info.value).startswith(expected)


def test_corrupt_teacher_given_to_search_is_named_before_any_work(tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    CORRUPTIONS["empty"](teacher)
    code, out, err = run_cli(capsys, "search", "--space", "tiny", "--run", str(tmp_path / "run"), "--preset", "smoke",
                             "--teacher", str(teacher), "--tables", str(tmp_path / "tables"))
    assert (code, out) == (3, "") and "Traceback" not in err
    assert f"{teacher} is not a spaceevo teacher checkpoint (truncated or corrupt)" in err
    assert not (tmp_path / "tables").exists(), "refused before the latency table is built"


def test_corrupt_block_kd_checkpoint_is_named_with_the_remedy(tmp_path):
    datasets = load_data("embedded", 28, seed=0)
    teacher = Teacher(TeacherArch.for_hyperspace(TINY, TeacherConfig(width_multiplier=0.5))).eval()
    cache = blockkd.build_feature_cache(teacher, datasets.train, 16, TINY.resolutions, show_progress=False)
    job = kd_jobs(TINY)[-6]
    path = tmp_path / f"{job.name}.pt"
    CORRUPTIONS["truncated"](path)
    config = KDConfig(epochs=1, qat_epochs=0, steps_per_epoch=1, batch_size=8, train_images=16)
    with pytest.raises(ArtifactError, match=r"is not a spaceevo block-KD checkpoint \(truncated or corrupt\): delete it"):
        train_job(job, teacher, "t", cache, config, tmp_path, reduce_range=True, show_progress=False)


# ---- settings that differ from a stored run --------------------------------------------------------


def test_teacher_of_other_settings_names_each_differing_field(tmp_path):
    datasets = load_data("embedded", 28, seed=0)
    config = TeacherConfig(epochs=1, steps_per_epoch=1, batch_size=8, width_multiplier=0.5, eval_images=16)
    train_teacher(tmp_path / "teacher.pt", TINY, datasets, config, show_progress=False)
    other = TeacherConfig(epochs=1, steps_per_epoch=1, batch_size=8, width_multiplier=0.5, eval_images=16, lr=0.2, seed=1)
    with pytest.raises(RunMismatchError) as info:
        train_teacher(tmp_path / "teacher.pt", TINY, datasets, other, show_progress=False)
    assert "holds a teacher trained with other settings (lr: stored 0.1, now 0.2; seed: stored 0, now 1)" in str(info.value)


# ---- storage URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("sqlite://", "names no database file"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///:memory:", "names no database file"),
        ("journal:", "names no journal file"),
        ("study.db", "is not a storage URL"),
    ],
)
def test_storage_url_without_a_file_lists_the_allowed_forms(tmp_path, capsys, url, reason):
    code, out, err = run_cli(capsys, "search", "--block-lut", str(tmp_path / "lut"), "--hyperspace", "tiny",
                             "--run", str(tmp_path / "run"), "--storage", url)
    assert (code, out) == (2, "") and "Traceback" not in err
    assert err.startswith(f"spaceevo: error: --storage '{url}' {reason}")
    assert "allowed: sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db" in err and "journal:PATH" in err


# ---- interruptions: kill -9 at a point inside a run, then the re-run -------------------------------

KILL = "import os, signal\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"


def run_killed(script: str, *args: str) -> None:
    """Run ``script`` (which kills itself with SIGKILL at the point it chooses) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", KILL + textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


TRAIN = TrainConfig(
    epochs=2, qat_epochs=0, batch_size=16, lr=0.05, warmup_epochs=0.0, steps_per_epoch=2,
    calibration_images=32, eval_images=64, reduce_range=True,
)

TRAIN_KILLED = """
import json, os, sys, torch
torch.set_num_threads(1)
from spaceevo.train import sandwich
from spaceevo.train.config import TrainConfig
from spaceevo.train.loop import train_supernet

run, config, point = sys.argv[1], TrainConfig.from_dict(json.loads(sys.argv[2])), sys.argv[3]
if point == "mid-step":  # epoch 2, step 1, between two subnets' backward passes
    calls, loss = [], sandwich.distillation_loss
    def distillation_loss(*args):
        calls.append(1)
        if len(calls) == 3 * config.steps_per_epoch + 2:
            die()
        return loss(*args)
    sandwich.distillation_loss = distillation_loss
else:  # epoch 2's checkpoint written to its temporary file, not yet renamed
    renames, replace = [], os.replace
    def rename(src, dst):
        if str(dst).endswith("last.pt"):
            renames.append(1)
            if len(renames) == 2:
                die()
        return replace(src, dst)
    os.replace = rename
train_supernet("tiny-1111-0000", run, config=config, progress=False)
"""


@pytest.fixture(scope="module")
def whole_training(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("whole") / "run"
    train_supernet(SPACE, run, config=TRAIN, progress=False)
    return load_checkpoint(run / "checkpoints" / "last.pt")


@pytest.mark.parametrize("point", ["mid-step", "checkpoint-write"])
def test_training_killed_mid_run_resumes_to_the_same_weights(tmp_path, whole_training, point):
    run = tmp_path / "run"
    run_killed(TRAIN_KILLED, str(run), json.dumps(TRAIN.to_dict()), point)
    kept = load_checkpoint(run / "checkpoints" / "last.pt")  # intact: the last finished epoch
    assert kept["epoch"] == 1 and len((run / "log.jsonl").read_text().splitlines()) == 1
    resumed = train_supernet(SPACE, run, config=TRAIN, resume=True, progress=False)
    assert resumed.resumed_from == 1 and [r["epoch"] for r in resumed.history] == [1, 2]
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert_same_weights(final["model"], whole_training["model"])
    assert [r["loss"] for r in final["history"]] == [r["loss"] for r in whole_training["history"]]


TEACHER_KILLED = """
import sys, torch
torch.set_num_threads(1)
from spaceevo.search.teacher import TeacherConfig, train_teacher
from spaceevo.space import load_hyperspace
from spaceevo.train import engine, static
from spaceevo.train.data import load_data

saved, steps, save, resize = [], [], engine.save_state, static.resize_batch
def save_and_count(path, state, format_tag):
    save(path, state, format_tag)
    saved.append(state["epoch"])
def resize_or_die(images, resolution):
    if saved:
        steps.append(1)
        if len(steps) == 2:  # epoch 2, step 2: step 1 already changed the weights in memory
            die()
    return resize(images, resolution)
engine.save_state, static.resize_batch = save_and_count, resize_or_die
train_teacher(__import__("pathlib").Path(sys.argv[1]), load_hyperspace("tiny"), load_data("embedded", 28, seed=0),
              TeacherConfig(epochs=2, steps_per_epoch=2, batch_size=16, width_multiplier=0.5), show_progress=False)
"""


def test_teacher_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    config = TeacherConfig(epochs=2, steps_per_epoch=2, batch_size=16, width_multiplier=0.5)
    datasets = load_data("embedded", 28, seed=0)
    whole = train_teacher(tmp_path / "whole.pt", TINY, datasets, config, show_progress=False)
    run_killed(TEACHER_KILLED, str(tmp_path / "cut.pt"))
    resumed = train_teacher(tmp_path / "cut.pt", TINY, datasets, config, show_progress=False)
    assert_same_weights(resumed.state_dict(), whole.state_dict())


BLOCKKD_KILLED = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from spaceevo.search import blockkd
from spaceevo.search.blockkd import KDConfig, kd_jobs, train_job
from spaceevo.search.teacher import Teacher, TeacherArch, TeacherConfig
from spaceevo.space import load_hyperspace
from spaceevo.train import engine
from spaceevo.train.data import load_data

tiny = load_hyperspace("tiny")
torch.manual_seed(0)
teacher = Teacher(TeacherArch.for_hyperspace(tiny, TeacherConfig(width_multiplier=0.5))).eval()
cache = blockkd.build_feature_cache(teacher, load_data("embedded", 28, seed=0).train, 32, tiny.resolutions,
                                    show_progress=False)
saved, losses, save, loss = [], [], engine.save_state, blockkd.nsr_loss
def save_and_count(path, state, format_tag):
    save(path, state, format_tag)
    saved.append(state["epoch"])
def loss_or_die(student, target):
    if saved:
        losses.append(1)
        if len(losses) == 6:  # the QAT epoch, step 2, between two sub-stages' backward passes
            die()
    return loss(student, target)
engine.save_state, blockkd.nsr_loss = save_and_count, loss_or_die
config = KDConfig(epochs=1, qat_epochs=1, steps_per_epoch=2, batch_size=8, train_images=32)
train_job(kd_jobs(tiny)[-6], teacher, "t", cache, config, Path(sys.argv[1]), reduce_range=True, show_progress=False)
"""


def test_block_kd_job_killed_mid_qat_resumes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    teacher = Teacher(TeacherArch.for_hyperspace(TINY, TeacherConfig(width_multiplier=0.5))).eval()
    cache = blockkd.build_feature_cache(teacher, load_data("embedded", 28, seed=0).train, 32, TINY.resolutions,
                                        show_progress=False)
    job = kd_jobs(TINY)[-6]
    config = KDConfig(epochs=1, qat_epochs=1, steps_per_epoch=2, batch_size=8, train_images=32)
    whole = train_job(job, teacher, "t", cache, config, tmp_path / "whole", reduce_range=True, show_progress=False)
    run_killed(BLOCKKD_KILLED, str(tmp_path / "cut"))
    assert not (tmp_path / "cut" / f"{job.name}.done").exists()
    assert torch.load(tmp_path / "cut" / f"{job.name}.pt", weights_only=True)["epoch"] == 1
    resumed = train_job(job, teacher, "t", cache, config, tmp_path / "cut", reduce_range=True, show_progress=False)
    assert_same_weights(resumed.state_dict(), whole.state_dict())
    assert (tmp_path / "cut" / f"{job.name}.done").exists()


# ---- interruptions: SIGINT (Ctrl-C) ---------------------------------------------------------------


def interrupt_when(argv: list[str], ready) -> subprocess.CompletedProcess:
    """Run ``spaceevo ARGV`` in a fresh process and send it SIGINT once ``ready()`` holds."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; from spaceevo.cli import main; sys.exit(main())", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ready():
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def test_training_interrupted_by_sigint_exits_130_with_the_hint_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--epochs", "2", "--qat-epochs", "0",
            "--threads", "1"]
    log = run / "log.jsonl"
    done = interrupt_when(argv, lambda: log.exists() and log.read_text().count("\n") == 1)  # in epoch 2
    assert done.returncode == 130 and done.stdout == "" and "Traceback" not in done.stderr
    assert "spaceevo: interrupted; finished epochs are saved, run the same command with --resume to continue" in done.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    code, out, err = run_cli(capsys, *argv, "--resume", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == "2/2"
