"""scripts/bench_spaces.py: the comparisons with their bootstrap intervals, the stock models'
adaptations, the test-set check and (slow) the whole script end to end on tiny settings."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_spaces.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its folder is importable
    spec = importlib.util.spec_from_file_location("bench_spaces", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_spaces"] = module
    spec.loader.exec_module(module)
    return module


def test_front_drops_dominated_points(bench):
    assert bench.front([(2.0, 80.0), (1.0, 70.0), (1.5, 65.0), (3.0, 79.0)]) == [(1.0, 70.0), (2.0, 80.0)]


def test_curve_weights_interpolate_hold_and_refuse(bench):
    points = [(2.0, 80.0), (1.0, 70.0), (1.5, 65.0)]  # (1.5, 65) is dominated
    assert bench.curve_weights(points, 1.25) == {1: pytest.approx(0.75), 0: pytest.approx(0.25)}
    assert bench.curve_weights(points, 3.0) == {0: 1.0}
    assert bench.curve_weights(points, 0.5) is None


def _point(budget: float, ms: float, correct: np.ndarray) -> dict:
    return {"budget_ms": budget, "int8_ms": ms, "top1": 100.0 * correct.mean(), "correct": correct}


def test_compare_spaces_is_zero_for_identical_models_and_exact_for_a_known_gain(bench):
    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.8
    same = {s: [_point(0.3, 0.3, base), _point(0.6, 0.6, base)] for s in (0, 1)}
    c = bench.compare_spaces(same, same, "a", "b", resamples=200)
    assert c["mean_gain_points"] == 0 and c["ci95"] == [0, 0] and c["seeds"] == [0, 1] and c["budgets_ms"] == [0.3, 0.6]
    assert not c["meets_issue_target"]
    better = base.copy()
    better[np.flatnonzero(~base)[:30]] = True  # 30 more images right of 1,000: +3 points
    gained = {s: [_point(0.3, 0.3, better), _point(0.6, 0.6, better)] for s in (0, 1)}
    c = bench.compare_spaces(gained, same, "a", "b", resamples=500)
    assert c["mean_gain_points"] == pytest.approx(3.0) and 0 < c["ci95"][0] < 3.0 < c["ci95"][1]
    assert c["meets_issue_target"] and "MEETS" in bench.comparison_text(c)


def test_compare_spaces_interpolates_the_reference_per_image(bench):
    ones, zeros = np.ones(10, bool), np.zeros(10, bool)
    reference = {0: [_point(1, 1.0, zeros), _point(2, 2.0, ones)]}
    points = {0: [_point(1, 1.5, ones), _point(0.5, 0.5, ones)]}  # the second is faster than the reference curve
    c = bench.compare_spaces(points, reference, "a", "b", resamples=100)
    assert c["mean_gain_points"] == pytest.approx(50.0) and c["budgets_ms"] == [1]
    assert [r["difference"] for r in c["rows"]] == [50.0, None]


def test_compare_reference_takes_the_budgets_whose_subnet_is_at_least_as_slow(bench):
    rng = np.random.default_rng(1)
    ref = rng.random(2000) < 0.85
    deployed = {s: [_point(0.3, 0.3, ref), _point(0.7, 0.7, np.ones(2000, bool))] for s in (0, 1, 2)}
    reference = {s: {"int8_ms": 0.5, "correct": ref} for s in (0, 1, 2)}
    c = bench.compare_reference(deployed, reference, "tiny-x", "torchvision m", resamples=300)
    expected = 100 * (1 - ref.mean())
    assert c["kind"] == "at_most_as_slow" and c["budgets_ms"] == [0.7] and c["seeds"] == [0, 1, 2]
    assert c["mean_gain_points"] == pytest.approx(expected, abs=1e-3) and c["ci95"][0] <= c["mean_gain_points"] <= c["ci95"][1]
    assert [row["budget_ms"] for row in c["per_budget"]] == [0.7]
    slow = {s: {"int8_ms": 5.0, "correct": ref} for s in (0, 1, 2)}
    c = bench.compare_reference(deployed, slow, "tiny-x", "torchvision r", resamples=300)
    assert c["kind"] == "reference_slower" and c["budgets_ms"] == [0.7] and not c["meets_issue_target"]
    assert "not an equal-latency comparison" in bench.comparison_text(c)


def test_write_section_keeps_other_sections(bench, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# r\n\n<!-- reference-models:start -->\nREF\n<!-- reference-models:end -->\n")
    bench.write_section(path, f"{bench.SECTION[0]}\nONE\n{bench.SECTION[1]}\n", "spaces")
    bench.write_section(path, f"{bench.SECTION[0]}\nTWO\n{bench.SECTION[1]}\n", "spaces")
    text = path.read_text()
    assert "REF" in text and "TWO" in text and "ONE" not in text and text.count(bench.SECTION[0]) == 1


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "resnet18", "efficientnet_b0"])
def test_reference_adaptation_keeps_a_4x4_map_at_28px(bench, name):
    torch.set_num_threads(1)
    model = bench.adapt_torchvision(name, 10, 1).eval()
    shapes = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert shapes[0] == (28, 28) and min(s for s in shapes if s != (1, 1)) == (4, 4)  # (1, 1): squeeze-excitation
    # running statistics converge within the training: time constant 1 / momentum <= 100 steps of 2,520
    assert all(bn.momentum >= 0.01 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


def test_the_full_test_set_names_the_debian_package_when_missing(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "FASHION_MNIST_DEBIAN_DIR", Path("/nonexistent/fashion-mnist"))
    bench.load_test_split.cache_clear()
    assert bench.main(["--test-data", bench.FULL_TEST_DATA, "--no-write"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_jobs_run_inline_or_in_worker_processes(bench):
    with bench.executor(1) as pool:
        assert isinstance(pool, bench.InlineExecutor)
        assert pool.submit(divmod, 17, 5).result() == (3, 2)
    with bench.executor(2) as pool:
        assert pool.submit(divmod, 17, 5).result() == (3, 2)


@pytest.mark.slow
def test_the_whole_script_runs_on_tiny_settings(bench, tmp_path, latency_tables):
    """Smoke preset, the searched space given (no search), two seeds, one stock model, the embedded
    test set: every JSON comparison has the issue's fields and an interval around its mean."""
    torch.set_num_threads(1)
    out = tmp_path / "docs"
    code = bench.main([
        "--preset", "smoke", "--seeds", "0", "1", "--searched-space", "tiny-1144-1101", "--references", "mobilenet_v3_small",
        "--test-data", "embedded", "--resamples", "200", "--latency-budgets", "0.5",
        "--run-root", str(tmp_path / "runs"), "--tables", str(latency_tables), "--output", str(out),
    ])
    assert code == 0
    report = json.loads((out / "results" / "spaces.json").read_text())
    assert report["seeds"] == [0, 1] and report["test_images"] == 2000
    kinds = [c["kind"] for c in report["comparisons"]]
    assert kinds[0] == "space" and len(kinds) == 2
    for c in report["comparisons"]:
        assert {"reference", "mean_gain_points", "ci95", "budgets_ms", "seeds"} <= set(c)
        if c["mean_gain_points"] is not None:
            low, high = c["ci95"]
            assert low <= c["mean_gain_points"] <= high and set(c["seeds"]) <= {0, 1}
    text = (out / "RESULTS.md").read_text()
    assert "SMOKE-PRESET RUN" in text and "95 % interval" in text and (out / "results" / "spaces_pareto.png").exists()


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mnasnet0_5"])
def test_references_export_quantize_and_predict_one_image_per_run(bench, name, tmp_path):
    """Every stock model goes through the INT8 path (FP32 export, PTQ, ONNX Runtime); ShuffleNet's
    exported channel shuffle fixes batch 1, which REFERENCE_BATCH respects."""
    from spaceevo.deploy.evaluate import engine_predictions
    from spaceevo.quant.export import export_fp32, quantize_ptq
    from spaceevo.train.data import load_data

    torch.set_num_threads(1)
    model = bench.adapt_torchvision(name, 10, 1).eval()
    fp32 = export_fp32(model, (1, 1, 28, 28))
    int8 = quantize_ptq(fp32, [np.zeros((1, 1, 28, 28), np.float32)] * 4, reduce_range=True, work_dir=tmp_path)
    test = load_data("embedded", 28).test
    few = copy.copy(test)
    few.indices = test.indices[:20]
    assert engine_predictions(int8, few, 28, 1, batch_size=bench.REFERENCE_BATCH).shape == (20,)
