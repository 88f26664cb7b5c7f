"""The ``default`` preset fitted to a CUDA device (spaceevo.train.config.fit_to_cuda): tested without a
GPU, on a pretended CUDA device whose probe is a given step time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spaceevo.cli import main
from spaceevo.space import load_space
from spaceevo.train import config as train_config
from spaceevo.train import loop
from spaceevo.train.checkpoint import load_checkpoint
from spaceevo.train.config import CPU_DEFAULT_WALL_S, PRESETS, TrainConfig, fit_to_cuda
from spaceevo.train.loop import probe_step_s, train_supernet

SPACE = "tiny-1111-0000"
DEFAULT = PRESETS["default"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fit_scales_the_learning_rates_with_the_batch() -> None:
    fields = fit_to_cuda(DEFAULT, 0.15, 9000)["fields"]
    assert fields["batch_size"] == DEFAULT.batch_size * train_config.CUDA_BATCH_FACTOR
    assert fields["lr"] / fields["batch_size"] == pytest.approx(DEFAULT.lr / DEFAULT.batch_size)
    assert fields["qat_lr"] / fields["batch_size"] == pytest.approx(DEFAULT.qat_lr / DEFAULT.batch_size)
    # a QAT epoch trains on as many images as before, in fewer, larger steps
    qat_images = fields["qat_steps_per_epoch"] * fields["batch_size"]
    cpu_qat_images = DEFAULT.qat_steps_per_epoch * DEFAULT.batch_size
    assert cpu_qat_images <= qat_images < cpu_qat_images + fields["batch_size"]


@pytest.mark.parametrize("step_s", [0.05, 0.15, 0.5])
def test_fit_fills_the_cpu_defaults_wall_clock_time(step_s: float) -> None:
    fit = fit_to_cuda(DEFAULT, step_s, 9000)
    fields = fit["fields"]
    config = DEFAULT.replace(**fields)
    steps = fit["steps_per_epoch"]
    assert steps == 9000 // fields["batch_size"]
    largest_share = DEFAULT.largest_epochs / DEFAULT.epochs
    fp32_epoch_s = steps * step_s * (1 - largest_share * (1 - train_config.LARGEST_STEP_COST))
    # as many FP32 epochs as fit: one more would overrun the target
    assert fit["target_s"] == CPU_DEFAULT_WALL_S
    assert CPU_DEFAULT_WALL_S - fp32_epoch_s < fit["estimated_s"] <= CPU_DEFAULT_WALL_S
    assert config.epochs > DEFAULT.epochs
    # largest-only epochs and evaluations keep their share
    assert config.largest_epochs / config.epochs == pytest.approx(largest_share, abs=1 / config.epochs)
    evaluations = sum(config.evaluates_after(e) for e in range(1, config.total_epochs + 1))
    cpu_evaluations = sum(DEFAULT.evaluates_after(e) for e in range(1, DEFAULT.total_epochs + 1))
    assert abs(evaluations - cpu_evaluations) <= 2


def test_fit_cost_model_reproduces_the_cpu_default() -> None:
    """At the CPU's own batch and step time (sandwich epochs of about 87 s on 2 cores, 140 steps)
    the cost model chooses the CPU default's 17 epochs for its 19m39s."""
    fields = fit_to_cuda(DEFAULT, 87 / 140, 9000, batch_factor=1)["fields"]
    assert DEFAULT.replace(**fields) == DEFAULT


def test_fit_never_trains_fewer_epochs_and_keeps_a_qat_only_config() -> None:
    assert fit_to_cuda(DEFAULT, 100.0, 9000)["fields"]["epochs"] == DEFAULT.epochs
    qat_only = TrainConfig(epochs=0, qat_epochs=2)
    assert fit_to_cuda(qat_only, 0.01, 9000)["fields"]["epochs"] == 0


def test_probe_times_a_sandwich_step_and_leaves_the_random_state() -> None:
    before = torch.get_rng_state()
    seconds = probe_step_s(load_space(SPACE), TrainConfig(batch_size=8), torch.device("cpu"), steps=1)
    assert seconds > 0 and math.isfinite(seconds)
    assert torch.equal(before, torch.get_rng_state())


# A CPU-sized stand-in for the default preset; the pretended device's probe says a sandwich step at
# batch 16 takes 1 s and the target is 7 s: 2 steps per FP32 epoch, half of them largest-only
# (1.5 s per epoch), one QAT epoch of one step (2 s): floor((7 - 2) / 1.5) = 3 FP32 epochs.
SMALL_DEFAULT = TrainConfig(
    epochs=2, largest_epochs=1, qat_epochs=1, batch_size=4, lr=0.05, qat_lr=0.01, warmup_epochs=0.0,
    steps_per_epoch=2, qat_steps_per_epoch=4, calibration_images=32, eval_images=64, reduce_range=True,
)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """The ``default`` preset replaced by SMALL_DEFAULT and this CPU treated as a CUDA device whose
    probe returns 1 s (``probes`` counts the calls)."""
    probes = []

    def probe(space, config, device, steps=loop.PROBE_STEPS):
        probes.append(config.batch_size)
        return 1.0

    monkeypatch.setitem(PRESETS, "default", SMALL_DEFAULT)
    monkeypatch.setattr(train_config, "CPU_DEFAULT_WALL_S", 7.0)
    monkeypatch.setattr(loop, "_fits_device", lambda device: True)
    monkeypatch.setattr(loop, "probe_step_s", probe)
    return probes


class Stop(Exception):
    pass


def test_fitted_default_is_printed_recorded_and_reused_on_resume(tmp_path, pretend_cuda, monkeypatch, capsys) -> None:
    run = tmp_path / "run"

    def stop_after_epoch_1(record: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        train_supernet(SPACE, run, on_epoch_end=stop_after_epoch_1)
    assert pretend_cuda == [16], "one probe, at the scaled batch"
    printed = capsys.readouterr().err
    chosen = "3 FP32 epochs (the first 1 largest-only) of at most 2 steps + 1 QAT epoch of at most 1 step, batch 16"
    assert f"{chosen}, lr 0.2 (QAT 0.04)" in printed
    assert "probed on cpu" in printed

    record = json.loads((run / "config.json").read_text())
    assert {k: record["config"][k] for k in ("epochs", "batch_size", "lr", "qat_lr")} == {
        "epochs": 3, "batch_size": 16, "lr": 0.2, "qat_lr": 0.04,
    }
    assert record["cuda_fit"]["probe_step_s"] == 1.0 and record["cuda_fit"]["batch_factor"] == 4
    assert load_checkpoint(run / "checkpoints" / "last.pt")["cuda_fit"] == record["cuda_fit"]

    # resumed by the command line, on a device that would probe otherwise and on one that would not:
    # the checkpoint's values win, no probe runs
    monkeypatch.setattr(loop, "probe_step_s", lambda *args, **kwargs: pytest.fail("a resumed run probed"))
    monkeypatch.setattr(loop, "_fits_device", lambda device: False)
    assert main(["train", "--space", SPACE, "--run", str(run), "--resume", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["epochs"] == "4/4"
    assert "batch 16, lr 0.2 (QAT 0.04)" in err and "recorded in the checkpoint" in err
    assert json.loads((run / "config.json").read_text()) == record
    history = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["images"]) for r in history] == [("fp32", 32)] * 3 + [("qat", 16)]


def test_cpu_runs_and_explicit_configs_are_not_fitted(tmp_path, pretend_cuda, monkeypatch) -> None:
    monkeypatch.setattr(loop, "_fits_device", lambda device: device.type == "cuda")
    train_supernet(SPACE, tmp_path / "cpu", epochs=1, qat_epochs=0, progress=False)
    monkeypatch.setattr(loop, "_fits_device", lambda device: True)
    train_supernet(SPACE, tmp_path / "explicit", config=SMALL_DEFAULT, epochs=1, qat_epochs=0, progress=False)
    assert pretend_cuda == []
    for name in ("cpu", "explicit"):
        record = json.loads((tmp_path / name / "config.json").read_text())
        assert "cuda_fit" not in record
        assert record["config"] == SMALL_DEFAULT.replace(epochs=1, largest_epochs=0, qat_epochs=0).to_dict()
