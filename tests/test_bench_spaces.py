"""Fast checks of scripts/bench_spaces.py's pure parts: the comparison, the section replacement,
the torchvision adaptations. (The script itself trains and measures: run it with --preset smoke.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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


def test_top1_at_interpolates_holds_and_refuses(bench):
    curve = [(1.0, 70.0), (2.0, 80.0)]
    assert bench.top1_at(curve, 1.5) == (75.0, "interpolated")
    assert bench.top1_at(curve, 3.0)[0] == 80.0
    assert bench.top1_at(curve, 0.5)[0] is None


def test_ms_at(bench):
    curve = [(1.0, 70.0), (2.0, 80.0)]
    assert bench.ms_at(curve, 75.0) == (1.5, "interpolated")
    assert bench.ms_at(curve, 85.0)[0] is None
    assert bench.ms_at(curve, 60.0)[0] == 1.0


def test_compare_meets_target_by_accuracy_or_speed(bench):
    reference = [{"budget_ms": b, "int8_ms": ms, "top1": t} for b, ms, t in ((1, 1.0, 70.0), (2, 2.0, 80.0))]
    better = [{"budget_ms": b, "int8_ms": ms, "top1": t} for b, ms, t in ((1, 1.0, 72.0), (2, 2.0, 81.0))]
    c = bench.compare(better, reference, "a", "b")
    assert c["mean_top1_difference"] == 1.5 and c["meets_issue_target"]
    worse = [{"budget_ms": 1, "int8_ms": 1.5, "top1": 74.0}]
    c = bench.compare(worse, reference, "a", "b")
    assert c["mean_top1_difference"] == -1.0 and not c["meets_issue_target"]
    assert "does NOT meet" in bench.comparison_text(c)
    c = bench.compare(better, reference, "a", "b", test_images=2000)
    # points at 72 % and 81 %: sqrt(2 * (0.72 * 0.28 + 0.81 * 0.19) / 2000) * 100 / 2 = 0.94 points
    assert c["standard_error_points"] == pytest.approx(0.94, abs=0.005)
    assert "+1.6 standard errors" in bench.comparison_text(c) and "within two standard errors" in bench.comparison_text(c)
    c = bench.compare(better, reference, "a", "b", test_images=200_000)
    assert c["standard_error_points"] < 0.1 and "within two" not in bench.comparison_text(c)
    faster = [{"budget_ms": 1, "int8_ms": 1.0, "top1": 78.0}]  # reference needs 1.8 ms for 78%
    c = bench.compare(faster, reference, "a", "b")
    assert c["geomean_speed_ratio_at_equal_top1"] == pytest.approx(1.8) and c["meets_issue_target"]


def test_fixed_points_are_set_against_the_best_space_subnet_at_most_as_slow(bench):
    points = [{"int8_ms": 0.5, "top1": 85.0}, {"int8_ms": 0.7, "top1": 86.0}, {"int8_ms": 0.9, "top1": 87.5}]
    report = {
        "spaces": [{"space": "tiny-1144-1101", "points": points}],
        "fixed_points": [
            {"model": "torchvision mobilenet_v3_small", "int8_ms": 0.8, "test_ort_int8_top1": 88.0},
            {"model": "tiny net", "int8_ms": 0.4, "test_ort_int8_top1": 80.0},
        ],
    }
    first, second = bench.fixed_point_lines(report)
    assert "+2.00 points" in first and "(tiny-1144-1101, 0.700 ms, 86.00 %)" in first
    assert second.endswith("no space subnet is as fast.")


def test_write_section_keeps_other_sections(bench, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# r\n\n<!-- reference-models:start -->\nREF\n<!-- reference-models:end -->\n")
    bench.write_section(path, f"{bench.SECTION[0]}\nONE\n{bench.SECTION[1]}\n", "spaces")
    bench.write_section(path, f"{bench.SECTION[0]}\nTWO\n{bench.SECTION[1]}\n", "spaces")
    text = path.read_text()
    assert "REF" in text and "TWO" in text and "ONE" not in text and text.count(bench.SECTION[0]) == 1


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_adaptation_keeps_a_4x4_map_at_28px(bench, name):
    torch.set_num_threads(1)
    model = bench.adapt_torchvision(name, 10, 1).eval()
    x = torch.zeros(1, 1, 28, 28)
    if name == "resnet18":
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, part)(x)
    else:
        x = model.features(x)
    assert x.shape[-2:] == (4, 4)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_jobs_run_inline_or_in_worker_processes(bench):
    with bench.executor(1) as pool:
        assert isinstance(pool, bench.InlineExecutor)
        assert pool.submit(divmod, 17, 5).result() == (3, 2)
    with bench.executor(2) as pool:
        assert pool.submit(divmod, 17, 5).result() == (3, 2)
