"""``spaceevo search`` from nothing (spaceevo.search.pipeline): the comparison plot, shard syntax,
and (slow) the whole smoke search: LUTs, evolution, result files, plot."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from spaceevo.cli import main
from spaceevo.search.lut import load_block_lut
from spaceevo.search.pipeline import comparison_spaces, write_subnet_plot
from spaceevo.search.qt_score import QTScorer
from test_search_score import TINY, write_random_lut


def test_plot_compares_the_searched_the_mobilenetv3_and_the_best_homogeneous_space(tmp_path):
    write_random_lut(tmp_path)
    fixed = {24: 0.1, 28: 0.1, 32: 0.1}
    scorer = QTScorer(load_block_lut(tmp_path, TINY), [3.0, 5.0], fixed, samples=500)
    spaces = comparison_spaces(TINY, scorer, "tiny-1320-0101", seed=0)
    labels = list(spaces)
    assert labels[0] == "searched tiny-1320-0101" and labels[1] == "MobileNetV3 tiny-2222-0000"
    assert labels[2].startswith("best homogeneous tiny-") and len(set(spaces[labels[2]].block_digits)) == 1
    png = write_subnet_plot(tmp_path / "p.png", TINY, tmp_path, [3.0, 5.0], fixed, "tiny-1320-0101", seed=0)
    assert Image.open(png).size == (800, 560)


def test_searched_space_equal_to_the_best_homogeneous_is_drawn_once(tmp_path):
    write_random_lut(tmp_path)
    scorer = QTScorer(load_block_lut(tmp_path, TINY), [3.0], 0.0, samples=500)
    homogeneous = max(TINY.homogeneous_spaces(), key=lambda s: scorer.score(s, 0).qt_score).encoding
    labels = list(comparison_spaces(TINY, scorer, homogeneous, seed=0))
    assert labels[0] == f"searched = best homogeneous {homogeneous}" and len(labels) in (2, 1 + (homogeneous != "tiny-2222-0000"))


@pytest.mark.parametrize("shard", ["2/2", "a/b", "1"])
def test_bad_shard_is_a_usage_error(shard, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["search", "--run", str(tmp_path), "--shard", shard])
    assert info.value.code == 2 and "i/n" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_search_from_nothing_writes_result_yaml_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", "--device", "cpu", "--preset", "smoke", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    result = json.loads((run / "search" / "result.json").read_text())
    assert out["best_space"] == result["best_space"] and result["top"][0]["space"] == result["best_space"]
    assert (run / "search" / "best_space.yaml").exists() and (run / "search" / "subnets.png").exists()
    record = json.loads((run / "search" / "lut_record.json").read_text())
    assert set(record["fixed_stage_ms"]) == {"24", "28", "32"}
    # a second call resumes: nothing is rebuilt or re-evaluated
    assert main(["search", "--device", "cpu", "--preset", "smoke", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluated_here"] == 0
