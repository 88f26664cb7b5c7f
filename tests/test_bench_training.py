"""Fast checks of scripts/bench_training.py: one step of each phase on a tiny space on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from spaceevo.space import load_space

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_training.py"
KEYS = {"space", "phase", "device", "batch", "elastic_images_per_s", "static_images_per_s", "ratio"}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its folder (bench_sandwich) is importable
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_training"] = module
    spec.loader.exec_module(module)
    return module


def test_one_step_per_phase_reports_both_throughputs_and_their_ratio(bench, capsys, tmp_path) -> None:
    profile = tmp_path / "profile.txt"
    bench.main([
        "--space", "tiny-1111-0000", "--device", "cpu", "--phase", "fp32", "qat",
        "--batch", "8", "--steps", "1", "--reps", "1", "--warmup", "0", "--json", "--profile", str(profile),
    ])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["phase"] for r in records] == ["fp32", "qat"]
    for record in records:
        assert KEYS <= record.keys()
        assert (record["space"], record["device"], record["batch"]) == ("tiny-1111-0000", "cpu", 8)
        assert record["elastic_images_per_s"] > 0 and record["static_images_per_s"] > 0
        assert record["ratio"] == pytest.approx(record["elastic_images_per_s"] / record["static_images_per_s"], rel=0.01)
        assert record["resolutions"] == [24, 28, 32] and record["data"] == "embedded"
        assert record["elastic_cpu_step_s"] > 0 and record["static_cpu_step_s"] > 0
        low, high = record["cpu_ratio_range"]
        assert low <= record["cpu_ratio"] <= high
    text = profile.read_text()
    assert text.count("--- elastic: ") == 2 and text.count("--- static: ") == 2


def test_resolution_restricts_the_space_or_names_the_allowed_ones(bench, capsys) -> None:
    space = load_space("tiny-1111-0000")
    fixed = bench.with_resolution(space, 28)
    assert fixed.hyperspace.resolutions == (28,) and fixed.encoding == space.encoding
    assert fixed.max_subnet().resolution == fixed.min_subnet().resolution == 28
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--space", "tiny-1111-0000", "--device", "cpu", "--resolution", "30"])
    assert stopped.value.code == 2
    assert "--resolution 30 is not a resolution of tiny-1111-0000; allowed: [24, 28, 32]" in capsys.readouterr().err
