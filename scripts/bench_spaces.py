"""The searched space against the MobileNetV3 space and torchvision models: same data, recipe, device.

One run on one device (issue 7, part 1):

1. ``spaceevo search --device cpu`` for ``tiny`` (block LUTs + Q-T evolution, resumable) gives the
   *searched* space; the *MobileNetV3* space of tiny is ``tiny-2222-0000`` (MBv3+SE blocks in every
   stage, same stages, strides and resolutions); the *best homogeneous* space is the homogeneous
   space with the highest Q-T score on the search's own LUT, constraints and fixed-stage latency
   (skipped, and said so, when it equals one of the other two).
2. Each space's quantized-for-all supernet is trained with the same recipe and epochs
   (:func:`spaceevo.train.loop.train_supernet`, the same ``--preset``), then
   :func:`spaceevo.extraction.api.extract_subnets` finds its best subnet at the same latency budgets
   (verified: exported as INT8 ONNX, ONNX Runtime INT8 top-1 on the test split).
3. Fixed points: torchvision ``mobilenet_v3_small`` and ``resnet18`` adapted to 1-channel 28 px input
   (see :func:`adapt_torchvision`), trained on the same data for the same number of epochs with
   spaceevo's optimizer, schedule and loaders, then quantized by ONNX Runtime **post-training**
   static quantization (QDQ U8S8 per-channel, calibrated on held-out images) - not QAT: spaceevo's
   LSQ+ QAT works on spaceevo networks only.
4. Every exported model (INT8 and FP32) is timed in **one** interleaved
   :func:`spaceevo.latency.api.measure_onnx` call, then the comparison: at equal measured INT8
   latency, searched space vs MobileNetV3 space (mean top-1 difference over the budgets, MBv3 curve
   interpolated at the searched points' latencies) and the speed ratio at equal accuracy.

Everything lives under ``--run-root/<preset>/`` (one folder per training and extraction, skipped or
resumed when done). ``--jobs N`` runs the independent jobs (each space's training + extraction, each
torchvision model) in N worker processes of ``--threads`` threads each; the final measurement runs
alone, after all of them. Writes ``docs/results/spaces.json``, ``docs/results/spaces_pareto.png`` and the
section between the ``spaces`` markers of ``docs/RESULTS.md`` (``--no-write`` only prints).

    nice -n 19 python scripts/bench_spaces.py --preset smoke          # minutes: checks the pipeline
    nice -n 19 python scripts/bench_spaces.py --preset default --jobs 2   # the evidence (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import shlex
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_doc import markers, write_section  # noqa: E402
from spaceevo.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from spaceevo.latency.api import load_predictor, measure_onnx  # noqa: E402
from spaceevo.latency.fingerprint import device_fingerprint  # noqa: E402
from spaceevo.plot import PALETTE, Figure, Series, write_png  # noqa: E402
from spaceevo.space import CandidateSpace, Hyperspace, load_hyperspace  # noqa: E402
from spaceevo.train.config import TrainConfig  # noqa: E402

SECTION = markers("spaces")
HYPERSPACE = "tiny"
MBV3_SPACE = "tiny-2222-0000"
TORCHVISION_MODELS = ("mobilenet_v3_small", "resnet18")
TORCHVISION_RESOLUTION = 28  # the data's native size; the middle of tiny's resolutions (24, 28, 32)
TARGET_POINTS = 1.0  # the issue's bar: >= 1.0 point top-1 at equal latency ...
TARGET_SPEEDUP = 1.3  # ... or >= 1.3x faster at equal accuracy
PLOT_CLIP = 4.0  # fixed points slower than 4x the slowest space point are left out of the PNG (listed)
FRACTIONS = (0.125, 0.375, 0.625, 0.875)  # default budgets: these points of the common latency range


def log(message: str) -> None:
    print(f"[bench_spaces] {message}", file=sys.stderr, flush=True)


# ---- the spaces --------------------------------------------------------------------------------


def run_search(search_dir: Path, preset: str, seed: int, tables: str | None) -> dict[str, Any]:
    """``spaceevo search --device cpu`` for tiny in ``search_dir`` (resumed; skipped when done)."""
    result_path = search_dir / "search" / "result.json"
    reused = result_path.exists()
    if reused:
        log(f"search: done already ({result_path})")
    else:
        from spaceevo.search.pipeline import search_space

        log(f"search: spaceevo search --device cpu --space {HYPERSPACE} --preset {preset} --run {search_dir}")
        search_space(search_dir, HYPERSPACE, preset=preset, seed=seed, device="cpu", tables=tables)
    return {**json.loads(result_path.read_text()), "reused": reused}


def homogeneous_scores(search_dir: Path, hyper: Hyperspace, result: dict[str, Any]) -> dict[str, float]:
    """Q-T score of every homogeneous space on the search's LUT, constraints and fixed stages."""
    from spaceevo.search.lut import load_block_lut
    from spaceevo.search.pipeline import fixed_stage_ms_of
    from spaceevo.search.qt_score import QTScorer

    lut = load_block_lut(search_dir / "search" / "lut", hyper)
    scorer = QTScorer(lut, result["latency_constraints_ms"], fixed_stage_ms_of(search_dir), samples=int(result.get("samples", 100_000)))
    seed = int(result.get("seed", 0))
    return {s.encoding: scorer.score(s, seed).qt_score for s in hyper.homogeneous_spaces()}


def compared_spaces(hyper: Hyperspace, best: str, homogeneous: dict[str, float]) -> tuple[dict[str, CandidateSpace], dict[str, list[str]], list[str]]:
    """The distinct spaces among (searched, mbv3, best_homogeneous): ``{role: space}``, ``{role: the
    roles it also plays}`` and a note per duplicate (trained once)."""
    best_homogeneous = max(homogeneous, key=homogeneous.get)
    roles = {"searched": best, "mbv3": MBV3_SPACE, "best_homogeneous": best_homogeneous}
    spaces: dict[str, CandidateSpace] = {}
    aliases: dict[str, list[str]] = {}
    notes = []
    for role, encoding in roles.items():
        same = [r for r, s in spaces.items() if s.encoding == encoding]
        if same:
            aliases[same[0]].append(role)
            notes.append(f"the {ROLE_NAMES[role]} ({encoding}) is the {ROLE_NAMES[same[0]]}: trained and extracted once, not duplicated")
            continue
        spaces[role] = hyper.candidate_space(encoding)
        aliases[role] = []
    return spaces, aliases, notes


ROLE_NAMES = {"searched": "searched space", "mbv3": "MobileNetV3 space", "best_homogeneous": "best homogeneous space"}


def predicted_range(space: CandidateSpace, threads: int, tables: str | None) -> tuple[float, float]:
    """Predicted INT8 ms of the smallest and the largest subnet over the resolutions."""
    predictor = load_predictor(space, "cpu", threads, tables)

    def ms(subnet) -> float:
        return predictor.predict(space.resolve(subnet)).int8_ms

    resolutions = space.hyperspace.resolutions
    return min(ms(space.min_subnet(r)) for r in resolutions), max(ms(space.max_subnet(r)) for r in resolutions)


def default_budgets(ranges: dict[str, tuple[float, float]]) -> list[float]:
    """Four budgets spread over the predicted latency range every compared space can reach."""
    low = max(lo for lo, _ in ranges.values())
    high = min(hi for _, hi in ranges.values())
    if high <= low * 1.05:
        high = max(hi for _, hi in ranges.values())
    return [float(f"{low + f * (high - low):.3g}") for f in FRACTIONS]


# ---- supernets and extraction ---------------------------------------------------------------------


def train_space(space: CandidateSpace, run_dir: Path, preset: str, seed: int, threads: int) -> dict[str, Any]:
    from spaceevo.train.loop import train_supernet

    log(f"train {space.encoding}: {run_dir} (preset {preset})")
    result = train_supernet(space, run_dir, preset=preset, seed=seed, resume=True, threads=threads)
    return result.summary()


def extract_space(
    run_dir: Path, budgets: Sequence[float], low_ms: float, preset: str, seed: int, threads: int, tables: str | None,
) -> dict[str, Any]:
    """Extraction at ``budgets`` (those below the space's smallest subnet are skipped and noted);
    cached in ``RUN/bench_extract.json`` for the same budgets, search size and seed."""
    from spaceevo.extraction.api import extract_subnets

    cache = run_dir / "bench_extract.json"
    key = {"budgets_ms": list(budgets), "preset": preset, "seed": seed}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            log(f"extract {run_dir.name}: done already ({cache})")
            return stored
    feasible = [b for b in budgets if b >= low_ms]
    skipped = [b for b in budgets if b < low_ms]
    log(f"extract {run_dir.name}: budgets {' '.join(f'{b:g}' for b in feasible)} ms")
    found = extract_subnets(run_dir, feasible, preset=preset, seed=seed, verify=True, device="cpu", threads=threads, tables=tables)
    data = {
        "key": key,
        "skipped_budgets_ms": skipped,
        "skipped_note": (f"below the smallest subnet's predicted INT8 latency ({low_ms:.4g} ms)" if skipped else None),
        **found.to_dict(),
    }
    atomic_write_json(cache, data)
    return data


def space_job(
    encoding: str, run_dir: Path, budgets: Sequence[float], low_ms: float, preset: str, seed: int, threads: int, tables: str | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """One space's training then extraction (runs in a worker process under ``--jobs``):
    ``(train summary, extraction, {step: seconds})``."""
    torch.set_num_threads(threads)
    space = load_hyperspace(HYPERSPACE).candidate_space(encoding)
    t = time.perf_counter()
    train = train_space(space, run_dir, preset, seed, threads)
    timings = {f"train_{encoding}_s": time.perf_counter() - t}
    t = time.perf_counter()
    extracted = extract_space(run_dir, budgets, low_ms, preset, seed, threads, tables)
    timings[f"extract_{encoding}_s"] = time.perf_counter() - t
    return train, extracted, timings


def torchvision_job(name: str, run_dir: Path, preset: str, seed: int, threads: int) -> tuple[dict[str, Any], dict[str, float]]:
    """One torchvision fixed point (runs in a worker process under ``--jobs``): ``(result, {step: seconds})``."""
    t = time.perf_counter()
    result = train_torchvision(name, run_dir, preset, seed, threads)
    return result, {f"torchvision_{name}_s": time.perf_counter() - t}


class InlineExecutor:
    """``--jobs 1``: run each submitted job at once, in this process (same interface as the pool)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def executor(jobs: int) -> InlineExecutor | ProcessPoolExecutor:
    """Where the jobs run: in this process (``jobs == 1``) or in ``jobs`` spawned worker processes."""
    if jobs == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


# ---- torchvision fixed points ------------------------------------------------------------------------

ADAPTATIONS = {
    "mobilenet_v3_small": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); the first "
        "inverted-residual block's depthwise conv stride 1 (was 2); 10 classes. Total stride 8 like "
        "tiny (28 px -> 4x4 final feature map; unchanged it would be 1x1 after 4 of 5 downsamplings)"
    ),
    "resnet18": (
        "first conv 3x3, 1 input channel, stride 1 (was 7x7, 3 channels, stride 2); max-pool removed; "
        "10 classes. Total stride 8 like tiny (28 px -> 4x4 final feature map)"
    ),
}


def adapt_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ``name`` (random init) for small grayscale images; see :data:`ADAPTATIONS`."""
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if name == "mobilenet_v3_small":
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
        depthwise = model.features[1].block[0][0]
        assert depthwise.groups == depthwise.in_channels and depthwise.stride == (2, 2)
        depthwise.stride = (1, 1)
    elif name == "resnet18":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    else:
        raise ValueError(f"no adaptation for {name}")
    return model


def train_torchvision(name: str, run_dir: Path, preset: str, seed: int, threads: int) -> dict[str, Any]:
    """Train, export FP32, PTQ to INT8 and evaluate one fixed point in ``run_dir`` (trained by the
    training engine as a :class:`~spaceevo.train.static.StaticTask`, resumable per epoch; skipped when ``result.json`` exists). Same data, batch size, epochs (FP32 + QAT epochs of
    the preset, in one phase), SGD, peak LR, warm-up, weight decay and label smoothing as the supernets."""
    from spaceevo.deploy.evaluate import ort_top1
    from spaceevo.quant.export import export_fp32, quantize_ptq
    from spaceevo.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from spaceevo.train.data import load_data, make_loader
    from spaceevo.train.engine import Engine, EngineConfig, Phase
    from spaceevo.train.loop import EVAL_SEED, HELDOUT_SEED
    from spaceevo.train.optim import make_optimizer
    from spaceevo.train.sandwich import memory_format
    from spaceevo.train.static import StaticTask

    done = run_dir / "result.json"
    if done.exists():
        log(f"torchvision {name}: done already ({done})")
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(threads)
    config = TrainConfig.preset(preset, seed=seed)
    datasets = load_data("embedded", TORCHVISION_RESOLUTION, seed=HELDOUT_SEED)
    torch.manual_seed(config.seed)
    model = adapt_torchvision(name, datasets.num_classes, datasets.in_channels)
    train_format = memory_format(config, torch.device("cpu"))
    model = model.to(memory_format=train_format)
    loader = make_loader(datasets.train, config.batch_size, True, seed=config.seed, workers=config.workers, drop_last=True)
    steps = config.steps_in("fp32", len(loader))
    epochs = config.total_epochs
    task = StaticTask(model, loader, label_smoothing=config.label_smoothing, memory_format=train_format)
    optimizer = partial(make_optimizer, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    checkpoint_path = run_dir / "checkpoint.pt"

    def report(record: dict[str, Any]) -> None:
        log(f"torchvision {name}: epoch {record['epoch']}/{epochs} loss {record['loss']:.3f} ({record['train_s']} s)")

    engine = Engine(task, EngineConfig(
        phases=(Phase("fp32", epochs, steps, optimizer, warmup_steps=round(config.warmup_epochs * steps)),),
        name=f"torchvision {name}",
        checkpoint=checkpoint_path,
        checkpoint_format=CHECKPOINT_FORMAT,
        meta={"torchvision": name, "config": config.to_dict()},
        progress=False,
        on_epoch_end=report,
    ))
    state = None
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        log(f"torchvision {name}: resuming after epoch {state.get('epoch')}")
    history = list(engine.run(state).history)
    model = task.model
    model = model.to(memory_format=torch.contiguous_format).eval()
    shape = (1, datasets.in_channels, TORCHVISION_RESOLUTION, TORCHVISION_RESOLUTION)
    fp32 = export_fp32(model, shape)
    calibration = []
    for images, _ in make_loader(datasets.heldout, 1, True, seed=EVAL_SEED, workers=0, distributed=False):
        calibration.append(images.numpy().astype(np.float32))
        if len(calibration) >= config.calibration_images:
            break
    with tempfile.TemporaryDirectory() as work_dir:
        int8 = quantize_ptq(fp32, calibration, reduce_range=device_fingerprint("cpu", threads).reduce_range, work_dir=work_dir)
    atomic_write_bytes(run_dir / "fp32.onnx", fp32.SerializeToString())
    atomic_write_bytes(run_dir / "int8.onnx", int8.SerializeToString())
    result = {
        "model": f"torchvision {name}",
        "adaptation": ADAPTATIONS[name],
        "resolution": TORCHVISION_RESOLUTION,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "int8_method": f"ONNX Runtime PTQ (quantize_static QDQ U8S8 per-channel, {len(calibration)} held-out calibration images)",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "test_ort_fp32_top1": round(ort_top1(fp32, datasets.test, TORCHVISION_RESOLUTION, threads), 2),
        "test_ort_int8_top1": round(ort_top1(int8, datasets.test, TORCHVISION_RESOLUTION, threads), 2),
        "onnx_fp32": str(run_dir / "fp32.onnx"),
        "onnx_int8": str(run_dir / "int8.onnx"),
        "history": history,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(done, result)
    log(f"torchvision {name}: ORT test top-1 FP32 {result['test_ort_fp32_top1']} INT8 {result['test_ort_int8_top1']}")
    return result


# ---- measurement -------------------------------------------------------------------------------------


def measure_all(paths: Sequence[str], threads: int, tables: str | None) -> tuple[dict[str, Any], str]:
    """Time every distinct ONNX file (by content) in one interleaved measurement: ``{path: stats}``."""
    blobs = {p: Path(p).read_bytes() for p in paths}
    unique: dict[str, bytes] = {}
    for blob in blobs.values():
        unique.setdefault(hashlib.sha256(blob).hexdigest(), blob)
    log(f"measure: {len(unique)} distinct models, interleaved, 1 call")
    stats, scale = measure_onnx(list(unique.values()), "cpu", threads, tables)
    by_hash = dict(zip(unique, stats))
    return {p: by_hash[hashlib.sha256(b).hexdigest()] for p, b in blobs.items()}, scale


# ---- comparison ----------------------------------------------------------------------------------------


def front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front (latency up, top-1 up) of (ms, top-1) points, sorted by latency."""
    kept = []
    for ms, top1 in sorted(points, key=lambda p: (p[0], -p[1])):
        if not kept or top1 > kept[-1][1]:
            kept.append((ms, top1))
    return kept


def top1_at(curve: Sequence[tuple[float, float]], ms: float) -> tuple[float | None, str]:
    """Top-1 of a Pareto front at latency ``ms``: linear between its points, its best point beyond its
    slowest one (the most accurate point at most that slow), None below its fastest one."""
    if ms < curve[0][0]:
        return None, "faster than every point of the reference curve"
    if ms >= curve[-1][0]:
        return curve[-1][1], ("held at the reference's slowest point" if ms > curve[-1][0] else "exact")
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= ms <= x1:
            return y0 + (y1 - y0) * (ms - x0) / (x1 - x0), "interpolated"
    raise AssertionError


def ms_at(curve: Sequence[tuple[float, float]], top1: float) -> tuple[float | None, str]:
    """Latency at which a Pareto front first reaches ``top1`` (linear between its points); None when
    it never does; its fastest point when that one already does (an upper bound)."""
    if top1 > curve[-1][1]:
        return None, "the reference never reaches this top-1"
    if top1 <= curve[0][1]:
        return curve[0][0], "the reference's fastest point already reaches it (upper bound)"
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 <= top1 <= y1:
            return x0 + (x1 - x0) * (top1 - y0) / (y1 - y0), "interpolated"
    raise AssertionError


def compare(
    points: Sequence[dict], reference: Sequence[dict], name: str, ref_name: str, test_images: int | None = None
) -> dict[str, Any]:
    """``name``'s points against ``ref_name``'s curve at equal measured INT8 latency and equal top-1.

    With ``test_images`` (the size of the test split) the mean top-1 difference gets a binomial
    standard error that treats the two models' test errors as independent. Both are scored on the
    same images, which correlates their errors, so the true error is smaller: this is an upper bound.
    """
    curve = front([(p["int8_ms"], p["top1"]) for p in reference])
    rows, diffs, ratios = [], [], []
    for p in points if curve else []:
        ref_top1, how = top1_at(curve, p["int8_ms"])
        ref_ms, how_ms = ms_at(curve, p["top1"])
        row = {
            "budget_ms": p["budget_ms"], "int8_ms": p["int8_ms"], "top1": p["top1"],
            "reference_top1_at_same_ms": None if ref_top1 is None else round(ref_top1, 2), "how": how,
            "top1_difference": None if ref_top1 is None else round(p["top1"] - ref_top1, 2),
            "reference_ms_at_same_top1": None if ref_ms is None else round(ref_ms, 4), "how_ms": how_ms,
            "speed_ratio": None if ref_ms is None else round(ref_ms / p["int8_ms"], 3),
        }
        rows.append(row)
        if row["top1_difference"] is not None:
            diffs.append(row["top1_difference"])
        if row["speed_ratio"] is not None and how_ms == "interpolated":
            ratios.append(row["speed_ratio"])
    mean_diff = round(float(np.mean(diffs)), 2) if diffs else None
    standard_error = None
    if diffs and test_images:
        compared = [row["top1"] / 100 for row in rows if row["top1_difference"] is not None]
        variance = sum(2 * p * (1 - p) / test_images for p in compared) * 100**2
        standard_error = round(math.sqrt(variance) / len(compared), 2)
    mean_ratio = round(float(np.exp(np.mean(np.log(ratios)))), 3) if ratios else None
    meets = (mean_diff is not None and mean_diff >= TARGET_POINTS) or (mean_ratio is not None and mean_ratio >= TARGET_SPEEDUP)
    return {
        "space": name, "reference": ref_name, "rows": rows,
        "mean_top1_difference": mean_diff, "compared_points": len(diffs), "standard_error_points": standard_error,
        "geomean_speed_ratio_at_equal_top1": mean_ratio, "speed_ratio_points": len(ratios),
        "meets_issue_target": bool(meets),
        "target": f">= {TARGET_POINTS} point mean top-1 at equal measured INT8 latency, or >= {TARGET_SPEEDUP}x faster at equal top-1",
    }


def comparison_text(c: dict[str, Any]) -> str:
    if c["compared_points"] == 0:
        return (f"{c['space']} vs {c['reference']}: no point of {c['space']} lies at a latency the reference reaches; "
                "no comparison at equal latency.")
    diff = c["mean_top1_difference"]
    text = (f"{c['space']} vs {c['reference']}: mean INT8 top-1 difference at equal measured INT8 latency "
            f"{diff:+.2f} points over {c['compared_points']} budget(s)")
    se = c.get("standard_error_points")
    if se:
        text += f" (standard error at most {se:.2f} points, so {diff / se:+.1f} standard errors)"
    if c["geomean_speed_ratio_at_equal_top1"] is not None:
        text += (f"; speed ratio at equal top-1 {c['geomean_speed_ratio_at_equal_top1']:.2f}x "
                 f"(geometric mean over {c['speed_ratio_points']} interpolated point(s))")
    else:
        text += "; no speed ratio at equal top-1 (no point inside the reference's top-1 range)"
    verdict = "MEETS" if c["meets_issue_target"] else "does NOT meet"
    text += f". This {verdict} the issue's target ({c['target']})"
    if c["meets_issue_target"] and se and diff < 2 * se:
        text += ", but the accuracy difference is within two standard errors: one seed of this run alone does not establish it"
    return text + "."


def fixed_point_lines(report: dict[str, Any]) -> list[str]:
    """Each torchvision fixed point against the most accurate subnet of any space that is at most as slow."""
    lines = []
    for f in report["fixed_points"]:
        faster = [(p["top1"], p["int8_ms"], e["space"]) for e in report["spaces"] for p in e["points"] if p["int8_ms"] <= f["int8_ms"]]
        head = f"{f['model']} (INT8 by PTQ, {f['int8_ms']:.3f} ms, {f['test_ort_int8_top1']:.2f} %)"
        if not faster:
            lines.append(f"{head}: no space subnet is as fast.")
            continue
        top1, ms, space = max(faster)
        lines.append(
            f"{head}: {f['test_ort_int8_top1'] - top1:+.2f} points against the most accurate space subnet at most as slow "
            f"({space}, {ms:.3f} ms, {top1:.2f} %)."
        )
    return lines


# ---- report ---------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def tables_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    for entry in report["spaces"]:
        lines += [
            f"**{entry['label']}** `{entry['space']}` (Q-T score {fmt(entry.get('qt_score'), '.4g')}; supernet held-out "
            f"top-1 after training: max {fmt(entry['train'].get('heldout_top1_max'))}, min {fmt(entry['train'].get('heldout_top1_min'))})",
            "",
            "| budget ms | subnet | predicted INT8 ms | measured INT8 ms | spread | measured FP32 ms | held-out top-1 (fake-quant) | ORT INT8 test top-1 |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in entry["points"]:
            lines.append(
                f"| {p['budget_ms']:g} | `{p['subnet']}` | {fmt(p['predicted_int8_ms'], '.3f')} | {fmt(p['int8_ms'], '.3f')} | "
                f"{fmt(p['int8_spread'], '.1%')} | {fmt(p['fp32_ms'], '.3f')} | {fmt(p['heldout_int8_top1'])} | {fmt(p['top1'])} |"
            )
        for b in entry.get("skipped_budgets_ms") or []:
            lines.append(f"| {b:g} | (skipped: {entry['skipped_note']}) | | | | | | |")
        notes = [p["note"] for p in entry["points"] if p.get("note")]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if report["fixed_points"]:
        lines += [
            "**Fixed points** (torchvision, adapted to 1x28x28; INT8 by ONNX Runtime post-training quantization, **not QAT**)",
            "",
            "| model | params M | measured INT8 ms | spread | measured FP32 ms | INT8 speed-up | ORT FP32 test top-1 | ORT INT8 test top-1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in report["fixed_points"]:
            lines.append(
                f"| {f['model']} | {f['params_m']:.2f} | {fmt(f['int8_ms'], '.3f')} | {fmt(f['int8_spread'], '.1%')} | "
                f"{fmt(f['fp32_ms'], '.3f')} | {fmt(f['int8_speedup'], '.2f')}x | {fmt(f['test_ort_fp32_top1'])} | {fmt(f['test_ort_int8_top1'])} |"
            )
        lines.append("")
        for f in report["fixed_points"]:
            lines.append(f"- {f['model']}: {f['adaptation']}.")
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    smoke = report["preset"] == "smoke"
    title = "## Searched space vs MobileNetV3 space vs torchvision, INT8 on this device"
    lines = [SECTION[0], title + (f" - SMOKE-PRESET RUN (`--preset {report['preset']}`), NOT EVIDENCE" if smoke else ""), ""]
    if smoke:
        lines += [
            "> **This is a `--preset smoke` run: a few training steps per space, a tiny search. It shows that the "
            "pipeline runs end to end; its accuracies are near chance and its comparison means nothing. "
            "Run `--preset default` for evidence.**",
            "",
        ]
    lines += [
        f"Device: `{report['device']['describe']}`. Date: {report['date']}. Wall time: {report['wall_s'] / 60:.1f} min "
        f"(this invocation; finished steps are skipped). Preset: `{report['preset']}` (training: {report['train_recipe']}; "
        f"same recipe and epochs for every space and model). Seed {report['seed']}.",
        "",
        "Step times (s; a step finished by an earlier invocation is skipped and counts ~0): "
        + ", ".join(f"{k.removesuffix('_s')} {v:g}" for k, v in report["timings_s"].items())
        + (" - the search was reused from an earlier invocation." if report["search"].get("reused") else "."),
        "",
        f"Search: `{report['search']['best_space']}` found by `spaceevo search --device cpu` (Q-T score "
        f"{report['search']['qt_score']:.4g}, latency constraints {', '.join(f'{c:g}' for c in report['search']['latency_constraints_ms'])} ms). "
        f"Latency budgets: {', '.join(f'{b:g}' for b in report['latency_budgets_ms'])} ms ({report['budgets_how']}).",
        "",
    ]
    lines += [f"- {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += ["### Comparison", ""]
    lines += [f"- {c['text']}" for c in report["comparisons"]]
    lines += [f"- {line}" for line in fixed_point_lines(report)]
    lines += [
        "",
        "Method: every exported model (INT8 and FP32) timed in one interleaved measurement (medians of 15 rounds on "
        f"the {report['latency_scale']} scale; spread = interquartile range / median). Top-1 = ONNX Runtime INT8 on the "
        "test split (2,000 images: one image is 0.05 points, the binomial standard error near 85% is about 0.8 points). "
        "The reference curve is the Pareto front of the reference's points (measured INT8 ms, top-1), linear between "
        "points and held at its best point beyond its slowest one; points faster than the reference's fastest are not compared. "
        "Speed ratio = latency at which the reference curve reaches the point's top-1 / the point's latency "
        "(only points inside the reference's top-1 range).",
        "",
        "![INT8 top-1 vs measured INT8 latency](results/spaces_pareto.png)",
        "",
    ]
    if report.get("plot_left_out"):
        lines += [f"Left out of the plot (slower than {PLOT_CLIP:g}x the slowest space point; see the table): "
                  + ", ".join(report["plot_left_out"]) + ".", ""]
    lines += ["### Tables", ""] + tables_markdown(report)
    lines += [
        "### Caveats",
        "",
        "- torchvision fixed points are INT8 by **post-training quantization** (ONNX Runtime `quantize_static`), not QAT: "
        "spaceevo's LSQ+ QAT acts on spaceevo networks (QuantPoints). Their INT8 top-1 can be lower than QAT would give; their latency is unaffected.",
        "- torchvision models train as plain supervised nets (one phase, FP32+QAT epochs of the preset, the same SGD, "
        "peak LR, warm-up, weight decay, label smoothing, batch size, data and augmentation); supernet subnets are trained "
        "by the sandwich rule with in-place distillation and LSQ+ QAT, then BN-recalibrated.",
        "- One seed, one machine shared with other jobs; latency on the latency table's reference scale.",
        "",
        "Reproduce:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"All numbers: `docs/results/spaces.json`. Run folders: `{report['run_root']}`.",
        SECTION[1],
    ]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, report: dict[str, Any]) -> list[str]:
    """The Pareto PNG; returns the fixed points left out of it."""
    series, left_out = [], []
    slowest = max((p["int8_ms"] for e in report["spaces"] for p in e["points"]), default=0.0)
    for index, entry in enumerate(report["spaces"]):
        points = [(p["int8_ms"], p["top1"]) for p in entry["points"]]
        series.append(Series(f"{entry['label']} {entry['space']}", points, PALETTE[index % len(PALETTE)], radius=4.0, line=True))
    for offset, f in enumerate(report["fixed_points"]):
        if slowest and f["int8_ms"] > PLOT_CLIP * slowest:
            left_out.append(f"{f['model']} ({f['int8_ms']:.3g} ms, top-1 {f['test_ort_int8_top1']:.2f})")
            continue
        color = PALETTE[(len(report["spaces"]) + offset) % len(PALETTE)]
        series.append(Series(f"{f['model']} (PTQ)", [(f["int8_ms"], f["test_ort_int8_top1"])], color, radius=6.0, outline=True))
    title = "ORT INT8 test top-1 vs measured INT8 latency" + (" (SMOKE preset: not evidence)" if report["preset"] == "smoke" else "")
    write_png(path, Figure(series, "measured INT8 latency (ms, 1 thread)", "ONNX Runtime INT8 test top-1 (%)", title,
                           vlines=report["latency_budgets_ms"]))
    return left_out


# ---- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["smoke", "default"],
                        help="size of search, training (same for every space and model) and extraction (default: default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of search, training and extraction (default: 0)")
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench_spaces"),
                        help="run folders go to RUN_ROOT/<preset>/ (default: runs/bench_spaces)")
    parser.add_argument("--latency-budgets", type=float, nargs="+", default=None, metavar="MS",
                        help="predicted INT8 latency budgets (default: 4 spread over the latency range all compared spaces reach)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads per job (default: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes for the independent trainings and extractions (default: 1, in this process)")
    parser.add_argument("--tables", default=None, help="latency table root (default: ./latency_tables)")
    parser.add_argument("--no-torchvision", action="store_true", help="leave out the torchvision fixed points")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    root = args.run_root / args.preset
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = device_fingerprint("cpu", args.threads)
    hyper = load_hyperspace(HYPERSPACE)
    notes: list[str] = []
    timings: dict[str, float] = {}

    # (a) the search
    t = time.perf_counter()
    search_dir = root / "search"
    search = run_search(search_dir, args.preset, args.seed, args.tables)
    homogeneous = homogeneous_scores(search_dir, hyper, search)
    spaces, aliases, duplicate_notes = compared_spaces(hyper, search["best_space"], homogeneous)
    notes += duplicate_notes
    timings["search_s"] = time.perf_counter() - t
    log(f"spaces: {', '.join(f'{r}={s.encoding}' for r, s in spaces.items())}")

    ranges = {role: predicted_range(space, args.threads, args.tables) for role, space in spaces.items()}
    if args.latency_budgets:
        budgets, how = sorted(args.latency_budgets), "given with --latency-budgets"
    else:
        budgets = default_budgets(ranges)
        how = ("default: 4 budgets at 1/8, 3/8, 5/8, 7/8 of the predicted INT8 latency range every compared space reaches, "
               + ", ".join(f"{spaces[r].encoding} {lo:.3g}-{hi:.3g} ms" for r, (lo, hi) in ranges.items()))
    log(f"latency budgets: {' '.join(f'{b:g}' for b in budgets)} ms")

    # (b) training and extraction, space by space, and (c) the torchvision fixed points: independent jobs
    names = [] if args.no_torchvision else list(TORCHVISION_MODELS)
    log(f"{len(spaces) + len(names)} jobs on {args.jobs} worker(s) of {args.threads} thread(s)")
    with executor(args.jobs) as pool:
        space_futures = {
            role: pool.submit(space_job, space.encoding, root / f"train_{space.encoding}", budgets, ranges[role][0],
                              args.preset, args.seed, args.threads, args.tables)
            for role, space in spaces.items()
        }
        fixed_futures = [pool.submit(torchvision_job, name, root / f"torchvision_{name}", args.preset, args.seed, args.threads)
                         for name in names]
        entries = []
        for role, future in space_futures.items():
            train, extracted, job_timings = future.result()
            timings.update(job_timings)
            space = spaces[role]
            labels = [ROLE_NAMES[r] for r in [role, *aliases[role]]]
            entries.append({
                "role": role, "label": " = ".join(labels), "space": space.encoding,
                "qt_score": search["qt_score"] if space.encoding == search["best_space"] else homogeneous.get(space.encoding),
                "predicted_range_ms": list(ranges[role]), "run_dir": str(root / f"train_{space.encoding}"), "train": train,
                "extract": extracted, "skipped_budgets_ms": extracted.get("skipped_budgets_ms"), "skipped_note": extracted.get("skipped_note"),
            })
        fixed = []
        for future in fixed_futures:
            result, job_timings = future.result()
            timings.update(job_timings)
            fixed.append(result)

    # (d) one interleaved measurement of everything
    paths = [p for e in entries for r in e["extract"]["results"] for p in (r["onnx_int8"], r["onnx_fp32"])]
    paths += [p for f in fixed for p in (f["onnx_int8"], f["onnx_fp32"])]
    t = time.perf_counter()
    stats, scale = measure_all(paths, args.threads, args.tables)
    timings["measure_s"] = time.perf_counter() - t
    for entry in entries:
        entry["points"] = []
        for r in entry["extract"]["results"]:
            int8, fp32 = stats[r["onnx_int8"]], stats[r["onnx_fp32"]]
            entry["points"].append({
                "budget_ms": r["budget_ms"], "subnet": r["subnet"], "predicted_int8_ms": r["predicted_int8_ms"],
                "int8_ms": round(int8.ms, 4), "int8_raw_ms": round(int8.raw_median_ms, 4), "int8_spread": round(int8.spread, 4),
                "fp32_ms": round(fp32.ms, 4), "heldout_int8_top1": r["heldout_int8_top1"], "top1": r["test_ort_int8_top1"],
                "extract_measured_int8_ms": r["measured_int8_ms"], "over_budget_in_extract": r["over_budget"], "note": r.get("note"),
                "onnx_int8": r["onnx_int8"],
            })
    for f in fixed:
        int8, fp32 = stats[f["onnx_int8"]], stats[f["onnx_fp32"]]
        f.update(int8_ms=round(int8.ms, 4), int8_raw_ms=round(int8.raw_median_ms, 4), int8_spread=round(int8.spread, 4),
                 fp32_ms=round(fp32.ms, 4), int8_speedup=round(fp32.ms / int8.ms, 3))

    # (e) the comparison
    from spaceevo.train.data import load_data
    from spaceevo.train.loop import HELDOUT_SEED

    test_images = len(load_data("embedded", TORCHVISION_RESOLUTION, seed=HELDOUT_SEED).test)
    by_role = {e["role"]: e for e in entries}
    comparisons = []
    pairs = [("searched", "mbv3"), ("best_homogeneous", "mbv3"), ("searched", "best_homogeneous")]
    for a, b in pairs:
        if a in by_role and b in by_role:
            c = compare(by_role[a]["points"], by_role[b]["points"], f"{ROLE_NAMES[a]} {by_role[a]['space']}",
                        f"{ROLE_NAMES[b]} {by_role[b]['space']}", test_images=test_images)
            c["text"] = comparison_text(c)
            comparisons.append(c)
    if "searched" in by_role and "mbv3" not in by_role:
        comparisons.append({"text": f"the searched space is the MobileNetV3 space {MBV3_SPACE}: nothing to compare", "meets_issue_target": False})
    if args.preset == "smoke":
        notes.insert(0, "SMOKE preset: the numbers check the pipeline only and are not evidence for or against the method")

    command = "nice -n 19 python scripts/bench_spaces.py" + (" " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:])) if (argv or sys.argv[1:]) else "")
    report = {
        "preset": args.preset, "seed": args.seed, "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command, "run_root": str(root),
        "device": {**fingerprint.to_dict(), "describe": fingerprint.describe()},
        "train_recipe": TrainConfig.preset(args.preset).summary(),
        "search": {k: search[k] for k in ("best_space", "qt_score", "latency_constraints_ms", "evaluated", "reused") if k in search},
        "homogeneous_qt_scores": homogeneous,
        "latency_budgets_ms": budgets, "budgets_how": how, "latency_scale": scale,
        "spaces": entries, "fixed_points": fixed, "comparisons": comparisons, "notes": notes,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)

    print()
    print("\n".join(tables_markdown(report)))
    print("Comparison:")
    for c in comparisons:
        print(f"  {c['text']}")
    for line in fixed_point_lines(report):
        print(f"  {line}")
    for n in notes:
        print(f"  note: {n}")
    print(f"wall time {report['wall_s'] / 60:.1f} min; timings {json.dumps(report['timings_s'])}")
    if not args.no_write:
        report["plot_left_out"] = write_plot(ROOT / "docs" / "results" / "spaces_pareto.png", report)
        atomic_write_json(ROOT / "docs" / "results" / "spaces.json", report)
        write_section(ROOT / "docs" / "RESULTS.md", name="spaces", section=markdown(report))
        log("wrote docs/results/spaces.json, docs/results/spaces_pareto.png, docs/RESULTS.md (spaces section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
