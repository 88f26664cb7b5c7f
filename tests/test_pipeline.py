"""``spaceevo run``: search -> train -> extract -> export in one resumable command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spaceevo.cli import main
from spaceevo.errors import UsageError
from spaceevo.pipeline import run_pipeline


def test_negative_budget_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import spaceevo.latency.api as latency_api

    monkeypatch.setattr(latency_api, "build_table", lambda *_, **__: pytest.fail("the first step started"))
    code = main(["run", "--latency-budget", "-1", "--preset", "smoke", "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--latency-budget must be positive finite numbers of ms" in err and "got -1" in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="smoke, default"):
        run_pipeline(tmp_path, [1.0], preset="huge")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_pipeline_deploys_one_verified_model_per_budget_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--num-budgets", "2", "--run", str(run), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    chosen = report["latency_budgets"]["latency_budgets_ms"]
    assert report["latency_budgets"]["auto"] and len(chosen) == 2
    assert [r["budget_ms"] for r in report["results"]] == chosen
    for result in report["results"]:
        assert Path(result["onnx_int8"]).exists() and Path(result["onnx_fp32"]).exists()
        assert result["predicted_int8_ms"] <= result["budget_ms"] and result["measured_int8_ms"] > 0
    assert Path(report["pareto_png"]).exists() and json.loads((run / "report.json").read_text())["best_space"]
    assert main(argv) == 0  # everything done: the second call only reloads and re-verifies
    assert json.loads(capsys.readouterr().out)["evaluated_here"] == 0
