"""Tests of the command line (spaceevo.cli): user mistakes give exit code 2 and a message that says
what to do, missing or foreign artifacts exit 3, and no user mistake ends in a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spaceevo.cli import main
from spaceevo.latency.fingerprint import device_fingerprint
from spaceevo.latency.table import TABLE_FILE, LatencyTable
from spaceevo.space import available_hyperspaces


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_with_a_hyperspace_asks_for_a_candidate_space(capsys, tmp_path):
    code, out, err = run_cli(capsys, "latency", "predict", "--space", "tiny", "--subnet", "max", "--tables", str(tmp_path))
    assert code == 2
    assert out == ""
    assert err.startswith("spaceevo: error:")
    assert "candidate space" in err and "--space tiny-" in err
    assert "Traceback" not in err


def test_malformed_subnet_names_the_field(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "d1#1_k3_w16_e0_r32",
        "--tables", str(tmp_path),
    )
    assert code == 2
    # two depths for five stages: the depths are at fault, not the one kernel that follows them
    assert "field d" in err and "5 stages" in err and "field k" not in err


def test_subnet_outside_the_space_names_the_field(capsys, tmp_path):
    # a well-formed subnet of the wrong length: tiny has five stages (stem + 4)
    code, _, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "d1#1_k3#3_w16#16_e0#3.0_r32",
        "--tables", str(tmp_path),
    )
    assert code == 2 and "field d" in err


def test_unknown_hyperspace_lists_the_available_ones(capsys, tmp_path):
    code, _, err = run_cli(capsys, "latency", "predict", "--space", "nosuch", "--subnet", "max", "--tables", str(tmp_path))
    assert code == 2
    assert "nosuch" in err
    for name in available_hyperspaces():
        assert name in err


def test_malformed_yaml_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ninput:\n  channels: 1\n  resolutions: [16, 24\nnum_classes: 10\n")
    code, _, err = run_cli(capsys, "latency", "build", "--space", str(path), "--tables", str(tmp_path / "t"))
    assert code == 2
    assert str(path) in err and "line " in err
    assert not (tmp_path / "t").exists(), "nothing may be written for a malformed hyperspace"


def test_invalid_yaml_value_names_file_line_and_key(capsys, tmp_path):
    text = (Path(__file__).resolve().parents[1] / "search_spaces" / "tiny.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("stride: 1\n", "stride: 3\n", 1))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "stride: 3" in l)
    code, _, err = run_cli(capsys, "latency", "predict", "--space", str(path), "--subnet", "max",
                           "--tables", str(tmp_path / "t"))
    assert code == 2
    assert f"{path}, line {line}" in err and "stride" in err and "allowed" in err


def test_predict_without_table_says_how_to_build_one(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min", "--tables", str(tmp_path)
    )
    assert code == 3
    assert out == ""
    assert "spaceevo latency build" in err


def test_predict_refuses_a_table_of_another_device(capsys, tmp_path):
    here = device_fingerprint("cpu", 1)
    header = {
        "format": "spaceevo-latency-table/2",
        "fingerprint": dict(here.to_dict(), cpu_model="Some Other CPU 1234"),
        "versions": {},
    }
    path = tmp_path / here.slug / TABLE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(header) + "\n" + json.dumps({"key": "x", "ms": 1.0, "spread": 0.0}) + "\n")
    code, _, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min", "--tables", str(tmp_path)
    )
    assert code == 3
    assert "another device" in err
    assert "Some Other CPU 1234" in err and here.cpu_model in err


def test_predict_refuses_a_table_of_an_older_measurement_protocol(capsys, tmp_path):
    here = device_fingerprint("cpu", 1)
    header = {"format": "spaceevo-latency-table/1", "fingerprint": here.to_dict(), "versions": {}}
    path = tmp_path / here.slug / TABLE_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(header) + "\n" + json.dumps({"key": "x", "ms": 1.0, "spread": 0.0}) + "\n")
    code, out, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min", "--tables", str(tmp_path)
    )
    assert code == 3 and out == ""
    assert str(path) in err and "older protocol" in err and "spaceevo latency build" in err
    assert "Traceback" not in err


def test_predict_with_an_uncalibrated_table_says_how_to_build(capsys, tmp_path):
    LatencyTable.create(tmp_path, device_fingerprint("cpu", 1))
    code, _, err = run_cli(
        capsys, "latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min", "--tables", str(tmp_path)
    )
    assert code == 3 and "spaceevo latency build --space tiny" in err


def test_measure_prints_json(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "latency", "measure", "--space", "tiny-1111-0000", "--subnet", "min", "--json", "--tables", str(tmp_path)
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["space"] == "tiny-1111-0000"
    assert data["subnet"].endswith("_r24")
    assert data["fp32_ms"] > 0 and data["int8_ms"] > 0 and data["int8_speedup"] > 0
    assert data["int8_speedup"] == pytest.approx(data["fp32_ms"] / data["int8_ms"], rel=0.01)
    assert data["fp32_raw_ms"] > 0 and data["int8_raw_ms"] > 0 and data["int8_spread"] >= 0
    assert data["scale"] == "reference measured now"  # no table under --tables
    assert "reduce_range" in data["device"]


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_bad_threads_is_an_argparse_error(capsys, threads):
    with pytest.raises(SystemExit) as info:
        main(["latency", "predict", "--space", "tiny-1111-0000", "--subnet", "min", "--threads", threads])
    assert info.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_user_mistake_in_a_subprocess_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "spaceevo", "latency", "predict", "--space", "tiny", "--subnet", "max",
         "--tables", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "spaceevo: error:" in result.stderr and "candidate space" in result.stderr


def test_interrupt_exits_130_and_says_how_to_resume(capsys, monkeypatch, tmp_path):
    import spaceevo.latency

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spaceevo.latency, "build_table", interrupted)
    code, _, err = run_cli(capsys, "latency", "build", "--space", "tiny", "--tables", str(tmp_path))
    assert code == 130
    assert "resume" in err and "Traceback" not in err
