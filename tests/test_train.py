"""Supernet training (spaceevo.train): sandwich steps, BN recalibration, run directory, resume,
divergence, two-process data parallelism and the ``spaceevo train`` command."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import random
import socket
from pathlib import Path

import pytest
import torch

from spaceevo.cli import main
from spaceevo.errors import RunMismatchError, TrainingDivergedError, UsageError
from spaceevo.nn import Supernet
from spaceevo.space import load_space
from spaceevo.train import sandwich
from spaceevo.train.bn import batchnorms, preserved_bn_state, recalibrate_bn
from spaceevo.train.checkpoint import load_checkpoint
from spaceevo.train.config import PRESETS, TrainConfig
from spaceevo.train.data import FASHION_MNIST_FILES, load_data, make_loader
from spaceevo.train.engine import Optimization
from spaceevo.train.evaluate import evaluate
from spaceevo.train.loop import train_supernet
from spaceevo.train.optim import WarmupCosine, make_optimizer, parameter_groups
from spaceevo.train.sandwich import SandwichStep
from spaceevo.train.weights import initialize_weights, residual_blocks

SPACE = "tiny-1111-0000"

# A few steps per epoch, small batches and evaluations: seconds per epoch on one thread.
# reduce_range is given, so these runs skip the device fingerprint (the smoke run decides it).
TINY = TrainConfig(
    epochs=2, qat_epochs=0, batch_size=16, lr=0.05, warmup_epochs=0.0, steps_per_epoch=2,
    calibration_images=32, eval_images=64, reduce_range=True,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_data("embedded", 28)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, int, str, str]:
    """``spaceevo train --preset smoke --json`` once (FP32 then QAT epochs)."""
    run = tmp_path_factory.mktemp("smoke") / "run"
    argv = ["train", "--space", SPACE, "--data", "embedded", "--run", str(run), "--preset", "smoke", "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return run, code, out.getvalue(), err.getvalue()


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# configuration, initialisation, optimizer


def test_config_budgets_and_validation() -> None:
    assert set(PRESETS) == {"smoke", "default"}
    smoke = TrainConfig.preset("smoke", epochs=3, seed=None)
    assert smoke.epochs == 3 and smoke.seed == 0 and smoke.num_random_subnets == 2
    assert "distill" not in smoke.to_dict()  # KL at temperature 1 is the only distillation loss, not a setting
    assert TrainConfig.from_dict(smoke.to_dict()) == smoke
    assert TrainConfig.from_dict({**smoke.to_dict(), "distill": "kl"}) == smoke  # a field of older runs
    with pytest.raises(UsageError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(UsageError, match="unknown training preset 'huge'.*smoke, default"):
        TrainConfig.preset("huge")
    with pytest.raises(UsageError, match="unknown field"):
        TrainConfig().replace(learning_rate=1.0)


def test_channels_last_is_used_on_cpu_only_unless_set() -> None:
    assert TrainConfig().channels_last is None
    assert TrainConfig().uses_channels_last("cpu") and not TrainConfig().uses_channels_last("cuda")
    assert TrainConfig(channels_last=True).uses_channels_last("cuda")
    assert not TrainConfig(channels_last=False).uses_channels_last("cpu")
    with pytest.raises(UsageError, match="channels_last='yes'.*None \\(on CPU only\\), true or false"):
        TrainConfig(channels_last="yes")


def test_sandwich_step_memory_format_follows_the_config(data) -> None:
    x, y = next(iter(make_loader(data.train, 8, True, seed=0)))
    for channels_last, expected in ((None, torch.channels_last), (False, torch.contiguous_format)):
        net = Supernet(load_space(SPACE))
        initialize_weights(net)
        config = TrainConfig(batch_size=8, channels_last=channels_last)
        step = SandwichStep(net, Optimization(make_optimizer(net, 0.1, 0.9, 0.0)), config, random.Random(0))
        seen = []
        hook = net.stages[1][0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        assert step(x, y).finite
        hook.remove()
        assert net.stages[0][0].body[0].conv.weight.is_contiguous(memory_format=expected)
        assert seen and all(t.is_contiguous(memory_format=expected) for t in seen), channels_last


def test_bench_sandwich_reports_the_step_time() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_sandwich.py"
    done = subprocess.run(
        [sys.executable, str(script), "--space", SPACE, "--device", "cpu", "--batch", "8", "--steps", "2", "--warmup", "0"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["device"] == "cpu (1 threads)" and report["channels_last"] is True and report["amp"] is None
    assert len(report["step_s_all"]) == 2 and all(t > 0 for t in report["step_s_all"])
    assert report["images_per_s"] == pytest.approx(8 / report["step_s_median"], rel=0.01)


def test_config_summary_says_how_long_training_is() -> None:
    assert TrainConfig(epochs=16, largest_epochs=8, qat_steps_per_epoch=70).summary() == (
        "16 FP32 epochs (the first 8 largest-only) + 1 QAT epoch of at most 70 steps, batch 64"
    )
    assert TrainConfig(epochs=1, qat_epochs=2, steps_per_epoch=3, batch_size=32).summary() == (
        "1 FP32 epoch of at most 3 steps + 2 QAT epochs of at most 3 steps, batch 32"
    )


def test_qat_epochs_can_take_fewer_steps() -> None:
    config = TrainConfig(steps_per_epoch=100, qat_steps_per_epoch=30)
    assert (config.steps_in("fp32", 140), config.steps_in("qat", 140)) == (100, 30)
    assert (config.steps_in("fp32", 20), config.steps_in("qat", 20)) == (20, 20)
    assert TrainConfig().steps_in("qat", 140) == 140
    with pytest.raises(UsageError, match=r"qat_steps_per_epoch=0 .*None or an integer >= 1"):
        TrainConfig(qat_steps_per_epoch=0)


def test_largest_epochs_are_validated_and_scaled_by_an_epochs_override() -> None:
    with pytest.raises(UsageError, match=r"largest_epochs=3 .*from 0 to epochs \(2\)"):
        TrainConfig(epochs=2, largest_epochs=3)
    config = TrainConfig(epochs=8, largest_epochs=4)
    assert config.override(epochs=2).largest_epochs == 1  # the preset's share, rounded down
    assert config.override(epochs=7).largest_epochs == 3
    assert config.override(epochs=16).largest_epochs == 8
    assert config.override(epochs=6, largest_epochs=0).largest_epochs == 0
    assert TrainConfig(epochs=0, qat_epochs=1).override(epochs=4).largest_epochs == 0
    assert config.override(seed=3) == config.replace(seed=3)
    assert [config.largest_only(epoch) for epoch in (1, 4, 5, 9)] == [True, True, False, False]


def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosine(total_steps=10, warmup_steps=2)
    factors = [schedule(t) for t in range(11)]
    assert factors[0] < factors[1] < factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[10] == pytest.approx(0.0, abs=1e-12)


def test_initialisation_and_parameter_groups() -> None:
    torch.manual_seed(0)
    net = Supernet(load_space(SPACE))
    initialize_weights(net, zero_init_residual=True)
    blocks = residual_blocks(net)
    assert blocks, "tiny-1111-0000 has residual blocks after the first block of each stage"
    for block in blocks:
        assert float(block.body[-1].bn.weight.detach().abs().sum()) == 0.0
    assert float(net.stages[1][0].body[-1].bn.weight.detach().min()) == 1.0, "no shortcut: must not start at zero"
    decay, no_decay = parameter_groups(net, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    bn = net.stages[1][0].body[0].bn
    assert any(p is bn.weight for p in no_decay["params"]) and any(p is bn.bias for p in no_decay["params"])


# ---------------------------------------------------------------------------------------------
# sandwich step


def test_sandwich_loss_decreases_on_embedded_data(data) -> None:
    torch.manual_seed(0)
    space = load_space(SPACE)
    net = Supernet(space)
    initialize_weights(net)
    config = TrainConfig(batch_size=16, lr=0.1)
    optimizer = make_optimizer(net, config.lr, config.momentum, config.weight_decay)
    step = SandwichStep(net, Optimization(optimizer), config, random.Random(0))
    loader = make_loader(data.train, 16, True, seed=0, drop_last=True)
    results = [step(x, y) for x, y in itertools.islice(loader, 24)]
    assert all(r.finite and math.isfinite(r.total) for r in results)
    assert [r.subnets[0] for r in results[:1]] == [space.max_subnet()]
    assert results[0].subnets[1] == space.min_subnet() and len(results[0].random) == 2
    resolutions = {s.resolution for r in results for s in r.subnets[2:]}
    assert len(resolutions) > 1, "random subnets draw their own resolutions"
    first = sum(r.max for r in results[:6]) / 6
    last = sum(r.max for r in results[-6:]) / 6
    assert first > math.log(10) - 0.1, "starts near chance (label-smoothed CE of 10 classes)"
    # seeds 0-2 on this host: 0.26-0.51 lower over 24 steps of batch 16; single batches vary by ~0.3
    assert last < first - 0.15, (first, last)


def test_sandwich_step_with_an_infinite_weight_does_not_step(data) -> None:
    torch.manual_seed(0)
    net = Supernet(load_space(SPACE))
    initialize_weights(net)
    config = TrainConfig(batch_size=8)
    step = SandwichStep(net, Optimization(make_optimizer(net, 0.1, 0.9, 0.0)), config, random.Random(0))
    with torch.no_grad():
        net.head.classifier.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    x, y = next(iter(make_loader(data.train, 8, True, seed=0)))
    result = step(x, y)
    assert not result.finite and "loss of the max subnet" in result.first_non_finite()
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "no optimizer step after a non-finite loss"


def test_grad_norm_under_a_gradient_scaler_is_the_unscaled_norm(data) -> None:
    """float16 autocast scales the loss; the logged norm is that of the true (unscaled) gradients.
    A CPU scaler runs the same code path as the CUDA one (autocast itself is CUDA only)."""
    x, y = next(iter(make_loader(data.train, 8, True, seed=0)))
    norms, grads = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        torch.manual_seed(0)
        net = Supernet(load_space(SPACE))
        initialize_weights(net)
        optimization = Optimization(make_optimizer(net, 0.1, 0.9, 0.0), scaler=scaler)
        step = SandwichStep(net, optimization, TrainConfig(batch_size=8), random.Random(0))
        result = step(x, y)
        assert result.finite
        norms.append(result.grad_norm)
        grads.append(float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])))
    assert norms[1] == pytest.approx(grads[1], rel=1e-6), "the norm of the gradients the optimizer stepped with"
    assert norms[1] == pytest.approx(norms[0], rel=1e-4), "the same norm as without a scaler"


def test_largest_only_step_trains_the_largest_subnet_alone(data) -> None:
    torch.manual_seed(0)
    space = load_space(SPACE)
    net = Supernet(space)
    initialize_weights(net)
    rng = random.Random(0)
    step = SandwichStep(net, Optimization(make_optimizer(net, 0.1, 0.9, 0.0)), TrainConfig(batch_size=8), rng)
    x, y = next(iter(make_loader(data.train, 8, True, seed=0)))
    before = net.head.classifier.weight.detach().clone()
    result = step(x, y, largest_only=True)
    assert result.finite and len(result.subnets) == 1
    assert result.min is None and result.random == () and result.total == result.max > 0
    assert not torch.equal(before, net.head.classifier.weight), "the optimizer stepped"
    # the largest architecture, at a resolution drawn from the space's (OFA's elastic resolution)
    largest = {space.max_subnet(r) for r in space.hyperspace.resolutions}
    drawn = [result.subnets[0]] + [step(x, y, largest_only=True).subnets[0] for _ in range(11)]
    assert set(drawn) == largest
    assert len(step(x, y).subnets) == 4


# ---------------------------------------------------------------------------------------------
# BN recalibration


def test_recalibrate_bn_resets_statistics_and_is_deterministic(data) -> None:
    torch.manual_seed(0)
    space = load_space(SPACE)
    net = Supernet(space)
    initialize_weights(net, zero_init_residual=False)
    subnet = space.min_subnet()
    bns = batchnorms(net)

    def loader():
        return make_loader(data.heldout.with_resolution(subnet.resolution), 32, True, seed=0)

    def stats() -> list[torch.Tensor]:
        return [t.clone() for bn in bns for t in (bn.running_mean, bn.running_var)]

    before = stats()
    assert recalibrate_bn(net, subnet, loader(), 3) == 96
    after = stats()
    assert not net.training and all(bn.momentum == 0.1 for bn in bns)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    active = [bn for bn in bns if int(bn.num_batches_tracked) == 3]
    assert active, "the active BNs saw three batches (cumulative average)"
    with torch.no_grad():  # garbage statistics must not leak into the next recalibration
        for bn in bns:
            bn.running_mean.uniform_(-5, 5)
            bn.running_var.uniform_(3, 9)
    recalibrate_bn(net, subnet, loader(), 3)
    assert all(torch.equal(a, b) for a, b in zip(after, stats()))
    top1 = evaluate(net, subnet, make_loader(data.heldout.with_resolution(subnet.resolution), 100, False), 200)
    assert 0.0 <= top1 <= 100.0

    net.train()
    saved = stats()
    with preserved_bn_state(net):
        recalibrate_bn(net, space.max_subnet(), loader(), 1)
        assert net.active_subnet == space.max_subnet()
    assert all(torch.equal(a, b) for a, b in zip(saved, stats()))
    assert net.training and net.active_subnet == subnet


# ---------------------------------------------------------------------------------------------
# run directory, resume, mismatch, divergence


def test_cli_smoke_training_writes_the_run(smoke_run) -> None:
    run, code, out, err = smoke_run
    assert code == 0, err
    summary = json.loads(out)
    total = PRESETS["smoke"].epochs + PRESETS["smoke"].qat_epochs
    assert summary["space"] == SPACE and summary["epochs"] == f"{total}/{total}"
    assert 0.0 <= summary["heldout_top1_max"] <= 100.0 and summary["images_per_s"] > 0
    assert "epoch 1/" in err, "a progress bar per epoch on stderr"

    config = json.loads((run / "config.json").read_text())
    space = load_space(SPACE)
    assert config["space"] == SPACE and config["hyperspace_digest"] == space.hyperspace.digest
    assert config["data"] == "embedded" and config["config"]["batch_size"] == PRESETS["smoke"].batch_size
    assert {"torch", "torchvision", "spaceevo", "python"} <= set(config["versions"])

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, total + 1))
    assert all(math.isfinite(r["loss"]) and 0 <= r["heldout_top1_min"] <= 100 for r in log)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == total and checkpoint["space"] == SPACE
    assert {"model", "optimizer", "scheduler", "rng", "phase", "history"} <= set(checkpoint)
    assert checkpoint["phase"] == "qat"
    assert not list(run.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_finished_run_resumes_at_once_and_needs_resume_flag(smoke_run, capsys) -> None:
    run, *_ = smoke_run
    before = (run / "checkpoints" / "last.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(run), "--preset", "smoke")
    assert code == 2 and "--resume" in err and "Traceback" not in err
    config = PRESETS["smoke"]
    result = train_supernet(SPACE, run, config=config, resume=True, progress=False)
    assert result.resumed_from == result.epochs_done == config.total_epochs and result.train_images == 0
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_checkpoint_of_another_space_is_refused(smoke_run) -> None:
    run, *_ = smoke_run
    with pytest.raises(RunMismatchError) as info:
        train_supernet("tiny-2222-0000", run, preset="smoke", resume=True, progress=False)
    assert "tiny-2222-0000" in str(info.value) and SPACE in str(info.value)


def test_resume_with_another_config_is_refused(smoke_run) -> None:
    run, *_ = smoke_run
    with pytest.raises(RunMismatchError, match="batch_size: run 32, now 8"):
        train_supernet(SPACE, run, config=PRESETS["smoke"].replace(batch_size=8), resume=True, progress=False)


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


def test_resume_without_config_json_compares_the_checkpoints_config(smoke_run, tmp_path, capsys) -> None:
    run = _copy_run(smoke_run[0], tmp_path / "run")
    (run / "config.json").unlink()
    files = {p: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    extra: list[str] = []
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--resume",
                           "--epochs", "3", "--seed", "1", *extra)
    assert code == 2 and "Traceback" not in err
    assert "last.pt was started with another training config (epochs: run 1, now 3; seed: run 0, now 1)" in err
    assert "resume with --preset smoke" in err
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == files
    assert not (run / "config.json").exists() and not (run / "log.jsonl").read_text().count('"epoch": 3')

    other = tmp_path / "other-data"  # the files exist (the check that runs first); the run is refused before reading them
    other.mkdir()
    for name in FASHION_MNIST_FILES:
        (other / name).touch()
    with pytest.raises(RunMismatchError, match="last.pt trains on data 'embedded', this command asks for 'fashion-mnist:"):
        train_supernet(SPACE, run, data=f"fashion-mnist:{other}", preset="smoke", resume=True, progress=False)

    # the same settings: nothing to train, says so, and config.json is written again
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--resume", *extra)
    assert code == 0 and "already holds all" in err and "nothing to do" in err
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == files
    assert json.loads((run / "config.json").read_text())["config"] == load_checkpoint(run / "checkpoints" / "last.pt")["config"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"space": "tiny-1111-0000"}'])
def test_corrupt_config_json_is_named_with_the_remedy(smoke_run, tmp_path, capsys, content) -> None:
    run = _copy_run(smoke_run[0], tmp_path / "run")
    (run / "config.json").write_text(content)
    extra: list[str] = []
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--resume", *extra)
    assert code == 3 and "Traceback" not in err
    assert f"{run / 'config.json'} is" in err and "delete it and run the same `spaceevo train` command with --resume" in err
    (run / "config.json").unlink()  # the remedy works
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(run), "--preset", "smoke", "--resume", *extra)
    assert code == 0 and "nothing to do" in err and (run / "config.json").exists()


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(epoch: int):
    def callback(record: dict) -> None:
        if record["epoch"] == epoch:
            raise _Interrupt

    return callback


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path) -> None:
    whole = train_supernet(SPACE, tmp_path / "whole", config=TINY, progress=False)
    assert whole.epochs_done == 2

    with pytest.raises(_Interrupt):
        train_supernet(SPACE, tmp_path / "split", config=TINY, progress=False, on_epoch_end=_interrupt_after(1))
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["epoch"] == 1
    assert len((tmp_path / "split" / "log.jsonl").read_text().splitlines()) == 1
    resumed = train_supernet(SPACE, tmp_path / "split", config=TINY, resume=True, progress=False)
    assert resumed.resumed_from == 1 and [r["epoch"] for r in resumed.history] == [1, 2]

    # bit-identical: same seed, same thread count, RNG states restored at the epoch boundary
    assert_same_state(state_of(tmp_path / "whole" / "checkpoints" / "last.pt"),
                      state_of(tmp_path / "split" / "checkpoints" / "last.pt"))
    assert [r["loss"] for r in whole.history] == [r["loss"] for r in resumed.history]
    assert [r["heldout_top1_max"] for r in whole.history] == [r["heldout_top1_max"] for r in resumed.history]


def test_largest_only_epochs_come_first_and_are_logged(tmp_path) -> None:
    result = train_supernet(SPACE, tmp_path / "run", config=TINY.replace(largest_epochs=1), progress=False)
    first, second = result.history
    assert first["subnets_per_step"] == 1 and first["loss_min"] is None and first["loss_random"] is None
    assert first["loss"] == first["loss_max"]
    assert second["subnets_per_step"] == 4 and second["loss_min"] > 0 and second["loss_random"] > 0


def test_eval_every_skips_evaluations_but_not_the_end_of_a_phase(tmp_path) -> None:
    config = TINY.replace(epochs=3, qat_epochs=0, eval_every=2)
    assert [config.evaluates_after(e) for e in (1, 2, 3)] == [False, True, True]
    assert [TINY.replace(epochs=4, qat_epochs=2, eval_every=3).evaluates_after(e) for e in range(1, 7)] == [
        False, False, True, True, False, True
    ]
    with pytest.raises(UsageError, match="eval_every=0"):
        TINY.replace(eval_every=0)
    assert TrainConfig.preset("smoke").override(eval_every=5).eval_every == 5
    result = train_supernet(SPACE, tmp_path / "run", config=config, progress=False)
    evaluated = [record["heldout_top1_max"] is not None for record in result.history]
    assert evaluated == [False, True, True]
    assert [record["heldout_top1_min"] is not None for record in result.history] == evaluated
    assert result.top1_max is not None and result.top1_max == result.history[-1]["heldout_top1_max"]
    # evaluating is read-only: the same run with an evaluation after every epoch ends with the same weights
    every = train_supernet(SPACE, tmp_path / "every", config=config.replace(eval_every=1), progress=False)
    assert all(record["heldout_top1_max"] is not None for record in every.history)
    assert every.top1_max == result.top1_max
    assert_same_state(state_of(tmp_path / "run" / "checkpoints" / "last.pt"), state_of(tmp_path / "every" / "checkpoints" / "last.pt"))


def test_resume_at_the_qat_boundary_matches_an_uninterrupted_run(tmp_path) -> None:
    config = TINY.replace(epochs=1, qat_epochs=1, qat_steps_per_epoch=1)  # a shorter QAT epoch too
    train_supernet(SPACE, tmp_path / "whole", config=config, progress=False)
    with pytest.raises(_Interrupt):
        train_supernet(SPACE, tmp_path / "split", config=config, progress=False, on_epoch_end=_interrupt_after(1))
    resumed = train_supernet(SPACE, tmp_path / "split", config=config, resume=True, progress=False)
    assert [(r["phase"], r["steps"]) for r in resumed.history] == [("fp32", 2), ("qat", 1)]
    assert_same_state(state_of(tmp_path / "whole" / "checkpoints" / "last.pt"),
                      state_of(tmp_path / "split" / "checkpoints" / "last.pt"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    saved: dict[str, bytes] = {}
    calls = {"n": 0}
    original = sandwich.distillation_loss
    # three distillation losses per step (min + two random), two steps per epoch:
    # call 10 is the smallest subnet of epoch 2, step 2
    poisoned_call = 3 * TINY.steps_per_epoch + 3 + 1

    def poisoned(student, teacher):
        calls["n"] += 1
        loss = original(student, teacher)
        return loss * float("nan") if calls["n"] == poisoned_call else loss

    def remember(record: dict) -> None:
        saved["checkpoint"] = (run / "checkpoints" / "last.pt").read_bytes()
        saved["log"] = (run / "log.jsonl").read_bytes()

    monkeypatch.setattr(sandwich, "distillation_loss", poisoned)
    with pytest.raises(TrainingDivergedError) as info:
        train_supernet(SPACE, run, config=TINY, progress=False, on_epoch_end=remember)
    message = str(info.value)
    assert "epoch 2, step 2" in message and "loss of the min subnet" in message, message
    assert "still holds epoch 1" in message
    assert (run / "checkpoints" / "last.pt").read_bytes() == saved["checkpoint"]
    assert (run / "log.jsonl").read_bytes() == saved["log"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


# ---------------------------------------------------------------------------------------------
# two processes (gloo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_end_with_identical_weights(tmp_path) -> None:
    import torch.multiprocessing as mp

    from _train_worker import train_rank

    run = tmp_path / "run"
    config = TINY.replace(epochs=1, batch_size=8, calibration_images=16, eval_images=32)
    mp.spawn(train_rank, args=(2, _free_port(), str(run), str(tmp_path), config.to_dict()), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["images"] == results[1]["images"] == 2 * 8 * 2, "two ranks x batch 8 x two steps"
    assert_same_state(results[0]["state"], results[1]["state"])  # parameters and buffers
    initial = Supernet(load_space(SPACE)).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in results[0]["state"].items() if k.endswith("weight"))
    for a, b in zip(results[0]["history"], results[1]["history"]):
        assert a["loss"] == b["loss"], "losses are averaged over the ranks"
        assert a["heldout_top1_max"] == b["heldout_top1_max"]
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    assert_same_state(load_checkpoint(run / "checkpoints" / "last.pt")["model"], results[0]["state"])


# ---------------------------------------------------------------------------------------------
# command line errors


def test_cli_missing_data_directory_exits_2_without_writing(capsys, tmp_path) -> None:
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--space", SPACE, "--data", "fashion-mnist:/nonexistent",
                             "--run", str(run), "--preset", "smoke")
    assert code == 2 and out == ""
    assert err.startswith("spaceevo: error:") and "/nonexistent" in err and "does not exist" in err
    assert "Traceback" not in err
    assert not run.exists(), "nothing is written before the data set is found"


def test_cli_train_needs_a_candidate_space(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "train", "--space", "tiny", "--run", str(tmp_path / "run"))
    assert code == 2 and "candidate space" in err and "--space tiny-" in err


def test_cli_interrupt_says_how_to_resume(capsys, tmp_path, monkeypatch) -> None:
    import spaceevo.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_supernet", interrupted)
    code, _, err = run_cli(capsys, "train", "--space", SPACE, "--run", str(tmp_path / "run"))
    assert code == 130 and "--resume" in err and "Traceback" not in err
