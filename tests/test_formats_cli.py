"""``spaceevo formats`` (spaceevo.deploy.formats): a trained subnet in several number formats."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from spaceevo.cli import build_parser, main
from spaceevo.deploy.formats import DEFAULT_FORMATS, VAN_BAALEN_2023, mac_cost, storage_bits
from spaceevo.quant.formats import get_format


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unknown_format_is_a_usage_error_listing_the_allowed_ones(capsys, tmp_path) -> None:
    code, out, err = run_cli(capsys, "formats", "--run", str(tmp_path), "--formats", "int8", "fp9")
    assert code == 2 and out == ""
    assert "unknown format 'fp9'" in err and "fp8_e4m3" in err and "mxfp4" in err and "Traceback" not in err


def test_negative_qat_steps_are_refused_by_the_parser(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["formats", "--run", str(tmp_path), "--qat-steps", "-1"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 0" in capsys.readouterr().err


def test_help_lists_the_library_defaults() -> None:
    parser = build_parser()
    text = next(a for a in parser._subparsers._group_actions[0].choices["formats"]._actions if a.dest == "formats").help
    assert " ".join(DEFAULT_FORMATS) in text


def test_bits_and_costs_are_the_published_ones_or_none() -> None:
    assert storage_bits(get_format("mxfp4")) == 4.25 and storage_bits(get_format("fp8_e5m2")) == 8
    assert mac_cost("int8") == (1.0, "the reference")
    assert mac_cost("fp8_e4m3") == ([1.5, 2.8], VAN_BAALEN_2023)
    assert mac_cost("mxfp4") == (None, "not published")


@pytest.mark.slow
def test_formats_reports_every_field_for_each_format(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--space", "tiny-1111-0000", "--run", str(run), "--preset", "smoke", "--json"]) == 0
    code, out, _ = run_cli(capsys, "formats", "--run", str(run), "--subnet", "min", "--formats", "int8", "fp8_e4m3",
                           "mxfp4", "--qat-steps", "2", "--json")
    assert code == 0
    report = json.loads(out)
    assert [row["format"] for row in report["formats"]] == ["int8", "fp8_e4m3", "mxfp4"]
    keys = {"format", "ptq_top1", "qat_top1", "weight_bits", "activation_bits", "relative_mac_cost", "native_on_device"}
    for row in report["formats"]:
        assert keys <= set(row) and 0 <= row["ptq_top1"] <= 100 and 0 <= row["qat_top1"] <= 100
    assert [row["native_on_device"] for row in report["formats"]] == [True, False, False]
    assert report["test_images"] == 2000 and report["qat_steps"] == 2
