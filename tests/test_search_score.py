"""Block LUTs in the published SpaceEvo CSV format and the Q-T score: a hand computation, a plain
Python reference with the same random draws, bad input (missing files, malformed lines,
constraints no space can meet) and the `spaceevo score` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spaceevo.cli import main
from spaceevo.errors import ArtifactError, UsageError
from spaceevo.search.api import score_spaces
from spaceevo.search.lut import (
    LutRow,
    load_block_lut,
    lut_filename,
    parse_stage_config,
    read_lut_csv,
    required_files,
    stage_input_sizes,
    write_lut_csv,
)
from spaceevo.search.qt_score import (
    QTScorer,
    auto_constraints,
    smallest_latency_ms,
    space_min_latency_ms,
    space_rng,
)
from spaceevo.space import BlockChoice, load_hyperspace

TINY = load_hyperspace("tiny")
PUBLISHED = Path(__file__).parent / "data" / "published_lut_sample"
STAGE_LOSS = [0.1, 0.2, 0.3, 0.4]
STAGE_LATENCY_MS = [1.0, 2.0, 3.0, 4.0]


def write_one_row_lut(directory, resolution=24):
    """Every file of tiny holds one row, measured at ``resolution``: every sampled subnet is the same."""
    sizes = stage_input_sizes(TINY)
    for stage, block, window in required_files(TINY):
        h = sizes[stage - 1][resolution]
        row = LutRow("3#16#0", (1, 16, h, h), STAGE_LOSS[stage - 1], 1.0, 0.1, STAGE_LATENCY_MS[stage - 1])
        write_lut_csv(directory / lut_filename(stage, block, window), [row])


def write_random_lut(directory, rows=7, seed=0):
    """Files with ``rows`` random rows at each of tiny's resolutions."""
    rng = np.random.default_rng(seed)
    sizes = stage_input_sizes(TINY)
    for stage, block, window in required_files(TINY):
        lut_rows = [
            LutRow("3#16#0_5#24#0", (1, 16, h, h), float(rng.uniform(0.1, 1.0)), 1.0, 0.1, float(rng.uniform(0.2, 2.0)))
            for h in sizes[stage - 1].values()
            for _ in range(rows)
        ]
        write_lut_csv(directory / lut_filename(stage, block, window), lut_rows)


# ---- the published format ----------------------------------------------------------------------


def test_lut_file_names_and_input_sizes_follow_the_published_layout():
    assert lut_filename(1, 5, 0) == "stage1_5_0.csv"
    onnxw = load_hyperspace("onnxw")
    assert len(required_files(onnxw)) == 6 * (2 + 4 + 4 + 4 + 4 + 4)
    sizes = stage_input_sizes(onnxw)
    assert sizes[0][224] == 112 and sizes[1][224] == 56 and sizes[5][160] == 5  # as in SpaceEvo's LUTs
    assert sizes[5][176] == sizes[5][192] == 6  # one input size, two resolutions


def test_published_lines_read_and_ours_round_trip(tmp_path):
    published = "3#48#4_5#48#6,1x32x112x112,0.2581,120.3343,0.0421,1.2873\n"
    (tmp_path / "stage1_1_0.csv").write_text(published * 2)
    rows = read_lut_csv(tmp_path / "stage1_1_0.csv")
    assert rows[0] == LutRow("3#48#4_5#48#6", (1, 32, 112, 112), 0.2581, 120.3343, 0.0421, 1.2873)
    write_lut_csv(tmp_path / "copy.csv", rows)
    line = (tmp_path / "copy.csv").read_text().splitlines()[0]
    assert line.split(",")[:2] == ["3#48#4_5#48#6", "1x32x112x112"] and len(line.split(",")) == 6
    assert read_lut_csv(tmp_path / "copy.csv") == rows


@pytest.mark.parametrize("path", sorted(PUBLISHED.glob("*/*.csv")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_rows_of_both_hyperspaces_read(path):
    lines = [line for line in path.read_text().splitlines() if line]
    rows = read_lut_csv(path)
    assert len(rows) == len(lines) > 0
    for line, row in zip(lines, rows):
        assert line.startswith(row.config + ",") and row.input_shape[0] == 1
        blocks = parse_stage_config(row.config)
        assert len(blocks) == row.config.count("_") + 1
        assert all(b.kernel in (3, 5, 7) and b.width >= 16 and b.expand >= 0 for b in blocks)
        assert row.latency_ms > 0 and row.mflops > 0 and 0 < row.nsr_loss < 2


def test_published_expand_ratios_none_integers_and_floats():
    assert parse_stage_config("3#48#None_5#32#None") == (BlockChoice(3, 48, 0.0), BlockChoice(5, 32, 0.0))
    assert parse_stage_config("5#48#1_5#48#2") == (BlockChoice(5, 48, 1.0), BlockChoice(5, 48, 2.0))
    assert parse_stage_config("7#48#1.0_7#48#0.5") == (BlockChoice(7, 48, 1.0), BlockChoice(7, 48, 0.5))
    first = read_lut_csv(PUBLISHED / "onnxw" / "stage1_0_0.csv")[0]
    assert first == LutRow("3#48#None_5#32#None", (1, 32, 80, 80), 0.3918, 19.5072, 0.0130, 0.9899)
    mobile = read_lut_csv(PUBLISHED / "mobilew" / "stage1_0_0.csv")[1]
    assert [b.expand for b in parse_stage_config(mobile.config)] == [0.0] * 4


def test_published_onnxw_rows_map_to_the_hyperspace_resolutions(tmp_path):
    """The published files hold rows at 160, 192 and 224 (SpaceEvo's resolution list); an input size
    shared by two of onnxw's resolutions (stage6: H=6 at 176 and 192) serves both."""
    onnxw = load_hyperspace("onnxw")
    lut = load_block_lut(PUBLISHED / "onnxw", onnxw, [onnxw.candidate_space("onnxw-000000-000000")])
    counts = {key: dict(zip(onnxw.resolutions, table.counts.tolist())) for key, table in lut.tables.items()}
    assert all(c[160] and c[192] and c[224] for key, c in counts.items() if key[0] > 1)
    assert counts[(6, 0, 0)][176] == counts[(6, 0, 0)][192] and counts[(1, 0, 0)][176] == 0


def test_published_mobilew_rows_map_to_the_hyperspace_resolutions():
    """mobilew's stage inputs are resolution / 2, 4, 8, 16, 16, 32: the published rows at 160, 192
    and 224 land there, and every stage-2..6 file of block type 0 covers all three."""
    mobilew = load_hyperspace("mobilew")
    sizes = stage_input_sizes(mobilew)
    assert [sizes[i][224] for i in range(6)] == [112, 56, 28, 14, 14, 7]
    lut = load_block_lut(PUBLISHED / "mobilew", mobilew, [mobilew.candidate_space("mobilew-000000-000000")])
    counts = {key: dict(zip(mobilew.resolutions, table.counts.tolist())) for key, table in lut.tables.items()}
    assert all(c[160] and c[192] and c[224] for key, c in counts.items() if key[0] > 1)
    assert counts[(1, 0, 0)] == {160: 0, 176: 0, 192: 0, 208: 0, 224: 3}


@pytest.mark.parametrize("name, block_types, constraints", [("onnxw", 6, ("5", "7")), ("mobilew", 7, ("15", "20"))])
def test_score_command_on_a_published_lut_folder(capsys, tmp_path, name, block_types, constraints):
    """A block LUT folder assembled from published rows: every stage1 block type in window 0 (for
    mobilew the K3 types and FusedMBConv-SE too), stages 2-6 of block type 0
    (tests/data/published_lut_sample/README.md); mobilew at the published constraints 15 and 20 ms."""
    folder = tmp_path / f"{name}_lut"
    shutil.copytree(PUBLISHED / name, folder)
    spaces = [f"{name}-{block}00000-000000" for block in range(block_types)]
    code, out, err = run_cli(
        capsys, "score", "--block-lut", str(folder), "--hyperspace", name, "--latency-constraints", *constraints,
        "--spaces", *spaces, "--samples", "2000", "--json",
    )
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert [s["space"] for s in scores] == spaces
    assert all(np.isfinite(s["qt_score"]) and s["qt_score"] > 0 for s in scores)
    assert all(s["feasible_fraction"][0] <= s["feasible_fraction"][1] for s in scores)
    assert any(s["feasible_fraction"][1] > 0 for s in scores)


def test_score_auto_constraints_spread_over_the_given_spaces_of_a_partial_lut_folder(capsys, tmp_path):
    """The published sample holds only the files of the given spaces: 'auto' used to pool a random
    sample of the hyperspace's spaces, found none loaded and failed with 'no candidate space has all
    its LUT files loaded'."""
    folder = tmp_path / "onnxw_lut"
    shutil.copytree(PUBLISHED / "onnxw", folder)
    spaces = ["onnxw-000000-000000", "onnxw-500000-000000"]
    code, out, err = run_cli(
        capsys, "score", "--block-lut", str(folder), "--hyperspace", "onnxw", "--latency-constraints", "auto",
        "--spaces", *spaces, "--samples", "2000", "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    constraints = result["latency_constraints_ms"]
    assert len(constraints) == 4 and constraints == sorted(constraints)
    assert all(0 < s["feasible_fraction"][-1] for s in result["scores"][:1])
    assert [s["space"] for s in result["scores"]] == spaces


def test_nan_in_the_mflops_column_names_that_column(tmp_path):
    lines = (PUBLISHED / "onnxw" / "stage1_1_0.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[3] = "nan"
    lines[1] = ",".join(fields)
    path = tmp_path / "stage1_1_0.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError) as info:
        read_lut_csv(path)
    message = str(info.value)
    assert f"{path}, line 2, column 4 (MFLOPs): 'nan'" in message and "finite" in message
    assert "latency" not in message and "nsr loss" not in message


@pytest.mark.parametrize(
    "config, fragments",
    [
        ("3#48#Nonee_5#32#None", ["block 1 '3#48#Nonee'", "None"]),
        ("3#48#None_5#32", ["block 2 '5#32'", "kernel#width#expand"]),
        ("3#0#None", ["block 1", "at least 1"]),
        ("", ["block 1 ''"]),
    ],
)
def test_corrupt_config_column_names_file_line_column_and_block(tmp_path, config, fragments):
    path = tmp_path / "stage1_0_0.csv"
    path.write_text(f"3#48#None,1x32x80x80,0.39,19.5,0.01,0.99\n{config},1x32x80x80,0.39,19.5,0.01,0.99\n")
    with pytest.raises(ArtifactError) as info:
        read_lut_csv(path)
    message = str(info.value)
    assert f"{path}, line 2, column 1 (config)" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("column, name", [(3, "nsr loss"), (5, "MParams"), (6, "latency ms")])
def test_bad_number_names_its_column(tmp_path, column, name):
    fields = ["3#48#None", "1x32x80x80", "0.39", "19.5", "0.01", "0.99"]
    fields[column - 1] = "-1" if column == 6 else "x"
    path = tmp_path / "stage1_0_0.csv"
    path.write_text(",".join(fields) + "\n")
    with pytest.raises(ArtifactError, match=rf"line 1, column {column} \({name}\): '{fields[column - 1]}'"):
        read_lut_csv(path)


def test_binary_lut_file_is_an_artifact_error(tmp_path):
    path = tmp_path / "stage1_0_0.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match=rf"{path}: cannot read block LUT file"):
        read_lut_csv(path)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "stage1_0_0.csv"
    path.write_text("3#16#0,1x16x24x24,0.1,1,0.1,1.0\n3#16#0,1x16x24,0.1,1,0.1,1.0\n")
    with pytest.raises(ArtifactError, match=r"stage1_0_0.csv, line 2, column 2 \(input shape\): '1x16x24'"):
        read_lut_csv(path)


def test_missing_files_are_all_named(tmp_path):
    write_one_row_lut(tmp_path)
    gone = ["stage1_0_0.csv", "stage3_4_1.csv", "stage4_5_0.csv"]
    for name in gone:
        (tmp_path / name).unlink()
    with pytest.raises(ArtifactError) as error:
        load_block_lut(tmp_path, TINY)
    assert "3 of the 48" in str(error.value)
    assert all(name in str(error.value) for name in gone)


def test_row_of_an_input_size_no_resolution_has_is_refused(tmp_path):
    write_one_row_lut(tmp_path)
    write_lut_csv(tmp_path / "stage2_0_0.csv", [LutRow("3#32#0", (1, 16, 13, 13), 0.1, 1, 0.1, 1.0)])
    with pytest.raises(ArtifactError, match=r"stage2_0_0.csv, line 1, column 2 \(input shape\): input size 13"):
        load_block_lut(tmp_path, TINY)


def test_rows_are_grouped_by_resolution(tmp_path):
    write_random_lut(tmp_path, rows=3)
    lut = load_block_lut(tmp_path, TINY)
    stages = lut.stage_rows(TINY.candidate_space("tiny-0123-0101"))
    assert len(stages) == 4
    for per_resolution in stages:
        assert sorted(per_resolution) == [24, 28, 32]
        assert all(rows.nsr_loss.shape == rows.latency_ms.shape == (3,) for rows in per_resolution.values())


# ---- the score -------------------------------------------------------------------------------


def test_score_matches_a_hand_computation(tmp_path):
    write_one_row_lut(tmp_path)
    # every subnet: loss 0.1+0.2+0.3+0.4 = 1.0, latency 1+2+3+4 + 0.5 fixed = 10.5 ms
    scorer = QTScorer(load_block_lut(tmp_path, TINY), [11.0, 10.0], fixed_stage_ms=0.5, samples=1000)
    score = scorer.score(TINY.candidate_space("tiny-1111-0000"))  # score_spaces refuses 10 ms: see below
    met, missed = score.constraints
    assert met.feasible_fraction == 1.0 and met.top_tier_loss == pytest.approx(1.0)
    assert met.score == pytest.approx(1.0)  # L_lat = max(1, (0.1 / 1.00001)^0.01) = 1
    assert missed.feasible_fraction == 0.0 and missed.top_tier_loss == 1e5
    latency_loss = (0.1 / 1e-5) ** 0.01  # p = 0 + 1e-5
    assert missed.score == pytest.approx(1 / (latency_loss * 1e5))
    assert score.qt_score == pytest.approx(1.0 + 1 / (latency_loss * 1e5))


def reference_score(scorer, space, seed):
    """The Q-T score written plainly, sample by sample, on the scorer's own random draws."""
    resolution, rows = scorer.draw_indices(space, space_rng(seed, space))
    tables = scorer.lut.stage_tables(space)
    samples = []
    for j in range(scorer.samples):
        loss = sum(float(t.nsr_loss[rows[s][j]]) for s, t in enumerate(tables))
        latency = sum(float(t.latency_ms[rows[s][j]]) for s, t in enumerate(tables)) + scorer.fixed_ms[resolution[j]]
        samples.append((loss, latency))
    total, parts = 0.0, []
    for constraint in scorer.latency_constraints_ms:
        feasible = sorted(loss for loss, latency in samples if latency <= constraint)
        p = len(feasible) / len(samples) + 1e-5
        top = sum(feasible[:50]) / len(feasible[:50]) if feasible else 1e5
        score = 1 / (max(1.0, (0.1 / p) ** 0.01) * top)
        parts.append((len(feasible) / len(samples), top))
        total += score
    return total, parts


def test_vectorised_score_equals_the_plain_reference(tmp_path):
    write_random_lut(tmp_path)
    lut = load_block_lut(tmp_path, TINY)
    fixed = {24: 0.1, 28: 0.2, 32: 0.3}
    scorer = QTScorer(lut, [2.5, 3.5, 5.0], fixed_stage_ms=fixed, samples=1700, batch_size=100)
    for encoding in ("tiny-0123-0101", "tiny-5555-1111"):
        space = TINY.candidate_space(encoding)
        expected, parts = reference_score(scorer, space, seed=7)
        got = scorer.score(space, seed=7)
        assert got.qt_score == pytest.approx(expected, rel=1e-12)
        for part, (fraction, top) in zip(got.constraints, parts):
            assert part.feasible_fraction == fraction and part.top_tier_loss == pytest.approx(top, rel=1e-12)


def test_draws_use_every_row_and_one_resolution_per_batch(tmp_path):
    write_random_lut(tmp_path, rows=4)
    lut = load_block_lut(tmp_path, TINY)
    scorer = QTScorer(lut, [3.0], samples=5000, batch_size=500)
    resolution, rows = scorer.draw_indices(TINY.candidate_space("tiny-0000-0000"), np.random.default_rng(1))
    assert all(len(set(batch)) == 1 for batch in resolution.reshape(10, 500))
    table = lut.stage_tables(TINY.candidate_space("tiny-0000-0000"))[0]
    for index in range(3):
        chosen = rows[0][resolution == index]
        assert set(chosen) == set(range(table.offsets[index], table.offsets[index] + 4))


def test_same_seed_same_score_other_seed_other_samples(tmp_path):
    write_random_lut(tmp_path)
    args = (tmp_path, "tiny", [3.0, 4.0], ["tiny-0123-0101"])
    assert score_spaces(*args, samples=3000, seed=1) == score_spaces(*args, samples=3000, seed=1)
    assert score_spaces(*args, samples=3000, seed=1) != score_spaces(*args, samples=3000, seed=2)


def test_impossible_constraints_state_the_smallest_latency(tmp_path):
    write_one_row_lut(tmp_path)
    lut = load_block_lut(tmp_path, TINY)
    assert smallest_latency_ms(lut, 0.5) == (10.5, 24)
    assert space_min_latency_ms(lut, TINY.candidate_space("tiny-1111-0000"), 0.5) == 10.5
    with pytest.raises(UsageError, match=r"constraint\(s\) 9 ms .* smallest achievable latency is 10.5 ms"):
        score_spaces(tmp_path, "tiny", [9.0, 12.0], ["tiny-1111-0000"], fixed_stage_ms=0.5)


def test_auto_constraints_lie_in_the_latency_range(tmp_path):
    write_random_lut(tmp_path)
    lut = load_block_lut(tmp_path, TINY)
    constraints = auto_constraints(lut, 0.2, samples=500)
    assert len(constraints) == 4 and constraints == sorted(constraints)
    assert smallest_latency_ms(lut, 0.2)[0] < constraints[0] and constraints[-1] < 4 * 2.0 + 0.2


def test_fixed_stage_ms_must_cover_every_resolution(tmp_path):
    write_one_row_lut(tmp_path)
    with pytest.raises(UsageError, match=r"missing for resolution\(s\) \[32\]"):
        score_spaces(tmp_path, "tiny", [20.0], ["tiny-1111-0000"], fixed_stage_ms={24: 0.1, 28: 0.1})


def test_fixed_stage_ms_given_must_not_be_negative_but_a_tables_remainder_may(tmp_path, capsys):
    from spaceevo.search.api import parse_fixed_stage_ms
    from spaceevo.search.qt_score import fixed_stage_array

    for texts in (["-0.5"], ["24=0.1", "28=-0.1", "32=0.1"]):
        with pytest.raises(UsageError, match="--fixed-stage-ms must not be negative"):
            parse_fixed_stage_ms(texts)
    # the remainder of a table's boundary model (negative intercept) shifts the sum of the LUT rows
    assert fixed_stage_array(TINY, {24: -0.06, 28: -0.05, 32: -0.04}).tolist() == [-0.06, -0.05, -0.04]
    with pytest.raises(UsageError, match="finite"):
        fixed_stage_array(TINY, float("nan"))


@pytest.mark.slow
def test_throughput_onnxw_sized_lut(tmp_path):
    """The issue's requirement, on one core of this host: >= 20 spaces/s with N = 100,000."""
    import random
    import time

    onnxw = load_hyperspace("onnxw")
    sizes = stage_input_sizes(onnxw)
    rng = np.random.default_rng(0)
    for stage, block, window in required_files(onnxw):
        hs = list(sizes[stage - 1].values())
        rows = [LutRow("3#64#4.0", (1, 64, h, h), float(x), 1.0, 0.1, float(y))
                for h, x, y in zip(rng.choice(hs, 1000), rng.uniform(0.1, 1, 1000), rng.uniform(0.5, 3, 1000))]
        write_lut_csv(tmp_path / lut_filename(stage, block, window), rows)
    scorer = QTScorer(load_block_lut(tmp_path, onnxw), [8.0, 10.0, 12.0, 14.0])
    spaces = [onnxw.random_candidate_space(random.Random(i)) for i in range(40)]
    start = time.perf_counter()
    for space in spaces:
        scorer.score(space)
    assert len(spaces) / (time.perf_counter() - start) >= 20


# ---- spaceevo score --------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_command_prints_json(capsys, tmp_path):
    write_one_row_lut(tmp_path)
    code, out, err = run_cli(
        capsys, "score", "--block-lut", str(tmp_path), "--hyperspace", "tiny", "--latency-constraints", "11", "12",
        "--spaces", "tiny-1111-0000", "tiny-0505-1010", "--fixed-stage-ms", "0.5", "--samples", "500", "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["latency_constraints_ms"] == [11.0, 12.0]
    assert [s["space"] for s in data["scores"]] == ["tiny-1111-0000", "tiny-0505-1010"]
    first = data["scores"][0]
    assert first["feasible_fraction"] == [1.0, 1.0] and first["qt_score"] == pytest.approx(2.0)
    assert set(first) == {"space", "qt_score", "feasible_fraction", "top_tier_loss"}


def test_score_command_bad_input_gives_messages_not_tracebacks(capsys, tmp_path):
    write_one_row_lut(tmp_path)
    (tmp_path / "stage2_1_0.csv").unlink()
    base = ["score", "--block-lut", str(tmp_path), "--hyperspace", "tiny", "--samples", "100"]
    code, _, err = run_cli(capsys, *base, "--latency-constraints", "20", "--spaces", "tiny-1111-0000")
    assert code == 3 and "stage2_1_0.csv" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, *base, "--latency-constraints", "5", "--spaces", "tiny-0000-0000")
    assert code == 2 and "smallest achievable latency is 10 ms" in err
    code, _, err = run_cli(capsys, *base, "--latency-constraints", "fast", "--spaces", "tiny-0000-0000")
    assert code == 2 and "--latency-constraints" in err
    code, _, err = run_cli(capsys, *base, "--latency-constraints", "20", "--spaces", "tiny-9999-0000")
    assert code == 2 and "block type digit 9" in err
