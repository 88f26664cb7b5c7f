"""The training engine (spaceevo.train.engine) on a tiny static network and on the supernet:
bit-identical resume mid-phase, divergence, log.jsonl, a training without QAT, atomic checkpoints,
incompatible checkpoints and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from _engine_task import static_config, tiny_static
from spaceevo.errors import ArtifactError, RunMismatchError, TrainingDivergedError
from spaceevo.train.checkpoint import load_state
from spaceevo.train.config import TrainConfig
from spaceevo.train.engine import Engine, EngineConfig
from spaceevo.train.loop import train_supernet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS = Path(__file__).resolve().parent


class _Interrupt(KeyboardInterrupt):
    pass


def read(path: Path) -> dict:
    return load_state(path, 1, "test checkpoint", "")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def interrupt_at_step(task, count: int):
    """Make the task's steps raise :class:`_Interrupt` at its ``count``-th step of this call."""
    made, seen = task.make_step, []

    def make_step(phase, optimization):
        step = made(phase, optimization)

        def interrupted(batch, epoch):
            seen.append(1)
            if len(seen) == count:
                raise _Interrupt
            return step(batch, epoch)

        return interrupted

    task.make_step = make_step


@pytest.fixture(scope="module")
def whole_static(tmp_path_factory) -> tuple[Path, object]:
    """Two FP32 epochs distilled from the largest subnet, then one QAT epoch, uninterrupted."""
    run = tmp_path_factory.mktemp("whole")
    result = Engine(tiny_static(distill=True), static_config(run)).run()
    return run, result


@pytest.mark.parametrize("count", [5, 7, 8], ids=["mid-fp32-epoch", "fp32-qat-boundary", "mid-qat-epoch"])
def test_static_resume_after_an_interruption_is_bit_identical(tmp_path, whole_static, count):
    whole_run, whole = whole_static
    task = tiny_static(distill=True)
    interrupt_at_step(task, count)  # steps 1-3 epoch 1, 4-6 epoch 2, 7-8 the QAT epoch
    with pytest.raises(_Interrupt):
        Engine(task, static_config(tmp_path)).run()
    kept = read(tmp_path / "last.pt")
    assert kept["epoch"] == (count - 1) // 3
    resumed = Engine(tiny_static(distill=True), static_config(tmp_path)).run(kept)
    assert resumed.resumed_from == kept["epoch"] and resumed.epochs_done == 3
    final = read(tmp_path / "last.pt")
    assert final["phase"] == "qat" and any(k.endswith("weight_quant.scale") for k in final["model"])
    assert_same_weights(final["model"], read(whole_run / "last.pt")["model"])
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]


def test_log_jsonl_holds_one_record_per_epoch(whole_static):
    run, result = whole_static
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == list(result.history) == read(run / "last.pt")["history"]
    assert [(r["epoch"], r["phase"], r["steps"], r["images"]) for r in log] == [
        (1, "fp32", 3, 48), (2, "fp32", 3, 48), (3, "qat", 2, 32)
    ]
    for record in log:
        assert {"loss", "grad_norm", "lr_end", "train_s", "eval_s", "images_per_s", "heldout_top1"} <= set(record)
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0 and 0 <= record["heldout_top1"] <= 100
    assert log[1]["lr_end"] == pytest.approx(0.0, abs=1e-12) and log[2]["lr_end"] == pytest.approx(0.0, abs=1e-12)
    assert log[0]["lr_end"] > 0, "cosine decay over the whole phase, not per epoch"
    assert result.train_images == 48 + 48 + 32 and result.train_s > 0


def test_a_training_without_qat_never_prepares_quantizers(tmp_path):
    task = tiny_static(qat_epochs=0)
    config = static_config(tmp_path, qat_epochs=0)
    assert [p.name for p in config.phases] == ["fp32"] and config.total_epochs == 2
    result = Engine(task, config).run()
    assert [r["phase"] for r in result.history] == ["fp32", "fp32"]
    assert not any("quant" in key and "scale" in key for key in read(tmp_path / "last.pt")["model"])
    again = Engine(tiny_static(qat_epochs=0), config).run(read(tmp_path / "last.pt"))
    assert again.resumed_from == again.epochs_done == 2 and again.train_images == 0, "finished: nothing to do"
    with pytest.raises(ValueError, match="a qat phase needs prepare_qat"):
        Engine(tiny_static(qat_epochs=0), static_config(None, fp32_epochs=0)).run()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    task = tiny_static(qat_epochs=0)
    made = task.make_step

    def poisoned(phase, optimization):
        step = made(phase, optimization)

        def run(batch, epoch):
            if epoch == 2 and not hasattr(run, "done"):
                run.done = True
                with torch.no_grad():
                    task.model.head.classifier.weight.fill_(float("nan"))
            return step(batch, epoch)

        return run

    task.make_step = poisoned
    saved = {}
    config = static_config(tmp_path, qat_epochs=0, on_epoch_end=lambda r: saved.update(
        checkpoint=(tmp_path / "last.pt").read_bytes(), log=(tmp_path / "log.jsonl").read_bytes()))
    with pytest.raises(TrainingDivergedError) as info:
        Engine(task, config).run()
    message = str(info.value)
    assert message.startswith("static diverged: non-finite loss at epoch 2, step 1 of 3 (fp32)"), message
    assert f"{tmp_path / 'last.pt'} still holds epoch 1" in message
    assert (tmp_path / "last.pt").read_bytes() == saved["checkpoint"] and (tmp_path / "log.jsonl").read_bytes() == saved["log"]


KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from _engine_task import static_config, tiny_static
from spaceevo.train.engine import Engine

syncs, fsync = [], os.fsync
def fsync_or_die(fd):
    if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".last.pt."):
        syncs.append(1)
        if len(syncs) == 2:  # epoch 2's checkpoint written to its temporary file, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    return fsync(fd)
os.fsync = fsync_or_die
Engine(tiny_static(distill=True), static_config(Path(sys.argv[1]))).run()
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, whole_static):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED), str(tmp_path), str(TESTS)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(tmp_path.glob(".last.pt.*.tmp")), "killed while the temporary file was written"
    kept = read(tmp_path / "last.pt")
    assert kept["epoch"] == 1 and len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    Engine(tiny_static(distill=True), static_config(tmp_path)).run(kept)
    assert_same_weights(read(tmp_path / "last.pt")["model"], read(whole_static[0] / "last.pt")["model"])


def test_incompatible_checkpoints_are_named(tmp_path, whole_static):
    state = read(whole_static[0] / "last.pt")
    old = {**state, "rng": {k: v for k, v in state["rng"].items() if k != "python"}}
    with pytest.raises(ArtifactError, match=r"cannot be resumed: it lacks rng\.python .*delete it to train again"):
        Engine(tiny_static(distill=True), static_config(tmp_path)).run(old)
    with pytest.raises(RunMismatchError, match=r"holds epoch 3 \('qat'\), which this training \(2 fp32 epochs\)"):
        Engine(tiny_static(qat_epochs=0), static_config(tmp_path, qat_epochs=0)).run(state)
    fp32 = read(whole_static[0] / "last.pt")
    fp32["model"] = {k: v for k, v in fp32["model"].items() if "quant" not in k}
    with pytest.raises(ArtifactError, match="does not hold this training's model"):
        Engine(tiny_static(distill=True), static_config(tmp_path)).run(fp32)
    other = read(whole_static[0] / "last.pt")
    other["optimizer"]["param_groups"] = other["optimizer"]["param_groups"][:1]
    with pytest.raises(ArtifactError, match="does not hold this training's optimizer state"):
        Engine(tiny_static(distill=True), static_config(tmp_path, qat_epochs=2)).run(other)  # resumes inside QAT


def test_tensorboard_scalars_only_where_tensorboard_is_installed(tmp_path, monkeypatch):
    written = []

    class SummaryWriter:
        def __init__(self, folder):
            written.append(("open", folder))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            pass

        def close(self):
            written.append(("close", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    config = static_config(tmp_path, fp32_epochs=1, qat_epochs=0, tensorboard=tmp_path / "tb")
    Engine(tiny_static(qat_epochs=0), config).run()
    assert written[0] == ("open", str(tmp_path / "tb")) and written[-1] == ("close", None)
    assert ("loss", 1) in written and ("heldout_top1", 1) in written and ("lr_end", 1) in written
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: import fails
    Engine(tiny_static(qat_epochs=0), static_config(tmp_path / "none", fp32_epochs=1, qat_epochs=0,
                                                      tensorboard=tmp_path / "none" / "tb")).run()
    assert not (tmp_path / "none" / "tb").exists()


SUPERNET = TrainConfig(
    epochs=1, qat_epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.0, steps_per_epoch=2, qat_steps_per_epoch=1,
    calibration_images=32, eval_images=64, reduce_range=True,
)


def test_supernet_resume_inside_the_qat_phase_is_bit_identical(tmp_path):
    train_supernet("tiny-1111-0000", tmp_path / "whole", config=SUPERNET, progress=False)

    def stop(record: dict) -> None:
        if record["epoch"] == 2:  # the first of two QAT epochs
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_supernet("tiny-1111-0000", tmp_path / "split", config=SUPERNET, progress=False, on_epoch_end=stop)
    resumed = train_supernet("tiny-1111-0000", tmp_path / "split", config=SUPERNET, resume=True, progress=False)
    assert resumed.resumed_from == 2 and [r["phase"] for r in resumed.history] == ["fp32", "qat", "qat"]
    whole = read(tmp_path / "whole" / "checkpoints" / "last.pt")
    assert_same_weights(read(tmp_path / "split" / "checkpoints" / "last.pt")["model"], whole["model"])
    assert read(tmp_path / "split" / "checkpoints" / "fp32.pt")["epoch"] == 1
