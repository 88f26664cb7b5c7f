"""The reliability sweep of supernet training, the teacher and block-KD jobs and the space search:
bad inputs and broken artifacts give a named message and exit code 2 (usage) or 3 (artifact), never
a traceback; interrupted runs (SIGINT, ``kill -9``) resume on re-run without losing finished work."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spaceevo.cli import main
from spaceevo.errors import ArtifactError
from spaceevo.search import blockkd
from spaceevo.search.blockkd import KDConfig, kd_jobs, train_job
from spaceevo.search.teacher import Teacher, TeacherArch, TeacherConfig, load_teacher, train_teacher
from spaceevo.space import load_hyperspace
from spaceevo.train.checkpoint import save_checkpoint
from spaceevo.train.data import load_data

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
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(read_only / "run"), "--budget", "smoke")
    assert code == 3 and out == "" and "Traceback" not in err
    assert err.startswith(f"spaceevo: error: cannot write to {read_only / 'run'} (in {read_only}): Permission denied")
    assert "choose another --run directory" in err
    assert not (read_only / "run").exists()
    # an existing run folder that became read-only: refused before an epoch is trained, not after
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(read_only), "--budget", "smoke", "--resume")
    assert code == 3 and f"cannot write to {read_only}: Permission denied" in err


@pytest.mark.parametrize("block_lut", [True, False])
def test_search_in_a_read_only_folder_is_named_before_any_work(read_only, capsys, tmp_path, block_lut):
    lut = ["--block-lut", str(tmp_path / "no-lut-needed"), "--hyperspace", "tiny"] if block_lut else []
    code, out, err = run_cli(capsys, "search", *lut, "--run", str(read_only / "run"), "--budget", "smoke",
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
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(tmp_path / "run"), "--budget", "smoke",
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
