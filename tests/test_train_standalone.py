"""scripts/train_standalone.py: a stand-alone subnet trained with the supernet recipe (smoke preset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_standalone.py"


def test_train_standalone_reports_the_subnet_and_its_accuracy():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--space", "tiny-1111-0000", "--subnet", "min", "--preset", "smoke"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["space"] == "tiny-1111-0000"
    assert report["subnet"].endswith("_r24")  # the smallest subnet at the smallest resolution
    assert report["steps"] == 3  # smoke: one epoch of 3 steps
    for key in ("heldout_fp32_top1", "test_fp32_top1"):
        assert 0.0 <= report[key] <= 100.0
