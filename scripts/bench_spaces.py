"""The searched space against the MobileNetV3 space and stock models, with 95 % intervals.

One run on one device (issue 7, part 1; issue 18, item 3):

1. ``spaceevo search --device cpu`` for ``tiny`` (block LUTs + Q-T evolution, resumable, the first
   seed) gives the *searched* space (or ``--searched-space`` names it and the search is skipped);
   the *MobileNetV3* space of tiny is ``tiny-2222-0000`` (MBv3+SE blocks in every stage, same
   stages, strides and resolutions); the *best homogeneous* space is the homogeneous space with the
   highest Q-T score on the search's own LUT, constraints and fixed-stage latency (skipped, and said
   so, when it equals one of the other two or when no search ran).
2. For every seed of ``--seeds``, each space's quantized-for-all supernet is trained with the same
   recipe and epochs (:func:`spaceevo.train_supernet`, the same ``--preset``), then
   :func:`spaceevo.extract` finds its best subnet at the same latency budgets (exported as INT8
   ONNX).
3. Stock references (:data:`REFERENCE_MODELS`, torchvision, random init), adapted to 1-channel
   28 px input (:data:`ADAPTATIONS`), trained per seed on the same data for the same number of
   epochs by the training engine (a :class:`~spaceevo.train.static.StaticTask`, the supernets'
   optimizer, schedule and loaders), then made INT8 by ONNX Runtime post-training static
   quantization (QDQ U8S8 per-channel, calibrated on held-out images). spaceevo's LSQ+ QAT places
   its quantizers at the :class:`~spaceevo.nn.layers.QuantPoint` s of spaceevo networks
   (``prepare_qat`` takes a Supernet, ``export_int8`` a Supernet or StaticNet); torchvision models
   have none, so they get no QAT variant (:data:`REFERENCE_QAT`).
4. Every exported model (INT8 and FP32) is timed in **one** interleaved
   :func:`spaceevo.latency.api.measure_onnx` call. Every INT8 model predicts every image of the
   test split (``--test-data``, default the full 10,000-image Fashion-MNIST test set of Debian's
   ``dataset-fashion-mnist``; training stays on the embedded subset).
5. Comparisons on the same test images, each a mean gain in points with a paired bootstrap 95 %
   interval over test images and seeds (:func:`spaceevo.stats.paired_bootstrap`): the searched
   space against the MobileNetV3 space at equal measured INT8 latency (the reference's Pareto
   front of the same seed interpolated per image), and the deployed subnet of the searched space at
   each budget against every stock model at most as slow.

Everything lives under ``--run-root/<preset>/`` (``seed<N>/`` per seed; one folder per training and
extraction, skipped or resumed when done). ``--jobs N`` runs the independent jobs in N worker
processes of ``--threads`` threads each; the measurement runs alone, after all of them. Writes
``docs/results/spaces.json``, ``docs/results/spaces_pareto.png`` and the section between the
``spaces`` markers of ``docs/RESULTS.md`` (``--no-write`` only prints).

    nice -n 19 python scripts/bench_spaces.py --preset smoke --seeds 0 1 --test-data embedded  # minutes
    nice -n 19 python scripts/bench_spaces.py --preset default --jobs 2   # the evidence (a day on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import multiprocessing
import shlex
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spaceevo  # noqa: E402
from results_doc import markers, write_section  # noqa: E402
from spaceevo.deploy.evaluate import EVAL_BATCH  # noqa: E402
from spaceevo.errors import SpaceEvoError, UsageError  # noqa: E402
from spaceevo.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from spaceevo.latency.api import load_predictor, measure_onnx  # noqa: E402
from spaceevo.latency.fingerprint import device_fingerprint  # noqa: E402
from spaceevo.plot import PALETTE, Figure, Series, write_png  # noqa: E402
from spaceevo.space import CandidateSpace, Hyperspace, load_hyperspace  # noqa: E402
from spaceevo.stats import RESAMPLES, paired_bootstrap  # noqa: E402
from spaceevo.train.config import TrainConfig  # noqa: E402
from spaceevo.train.data import FASHION_MNIST_DEBIAN_DIR, load_data  # noqa: E402

SECTION = markers("spaces")
HYPERSPACE = "tiny"
MBV3_SPACE = "tiny-2222-0000"
REFERENCE_MODELS = ("mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "resnet18", "efficientnet_b0")
REFERENCE_RESOLUTION = 28  # the data's native size; the middle of tiny's resolutions (24, 28, 32)
TRAIN_DATA = "embedded"  # every model trains on the embedded subset (bounded CPU time)
FULL_TEST_DATA = f"fashion-mnist:{FASHION_MNIST_DEBIAN_DIR}"
REFERENCE_BATCH = 1  # stock models predict one image per run: ShuffleNet's exported channel shuffle fixes batch 1
DEFAULT_SEEDS = (0, 1, 2)
TARGET_POINTS = 1.0  # the issue's bar: a mean gain >= 1.0 point with its 95 % interval above 0
PLOT_CLIP = 4.0  # references slower than 4x the slowest space point are left out of the PNG (listed)
FRACTIONS = (0.125, 0.375, 0.625, 0.875)  # default budgets: these points of the common latency range
REFERENCE_QAT = (
    "no QAT variant: spaceevo's LSQ+ QAT puts its quantizers at the QuantPoints of spaceevo networks "
    "(spaceevo.quant.qat.prepare_qat takes a Supernet, export_int8 a Supernet or StaticNet); a torchvision "
    "module has no QuantPoints, so prepare_qat/export_int8 refuse it"
)


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
        log(f"search: spaceevo search --device cpu --space {HYPERSPACE} --preset {preset} --run {search_dir}")
        spaceevo.search_space(search_dir, HYPERSPACE, preset=preset, seed=seed, device="cpu", tables=tables)
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


ROLE_NAMES = {"searched": "searched space", "mbv3": "MobileNetV3 space", "best_homogeneous": "best homogeneous space"}


def compared_spaces(hyper: Hyperspace, best: str, homogeneous: dict[str, float]) -> tuple[dict[str, CandidateSpace], dict[str, list[str]], list[str]]:
    """The distinct spaces among (searched, mbv3, best_homogeneous when ``homogeneous`` scores exist):
    ``{role: space}``, ``{role: the roles it also plays}`` and a note per duplicate (trained once)."""
    roles = {"searched": best, "mbv3": MBV3_SPACE}
    if homogeneous:
        roles["best_homogeneous"] = max(homogeneous, key=homogeneous.get)
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


# ---- test-set predictions -----------------------------------------------------------------------


@lru_cache(maxsize=2)
def load_test_split(test_data: str):
    """The test split of ``test_data`` (read once per process); the full Fashion-MNIST test set
    needs Debian's package."""
    if test_data == FULL_TEST_DATA and not FASHION_MNIST_DEBIAN_DIR.is_dir():
        raise UsageError(
            f"--test-data {FULL_TEST_DATA} (the full 10,000-image Fashion-MNIST test set, the default) needs Debian's "
            f"package dataset-fashion-mnist, which installs {FASHION_MNIST_DEBIAN_DIR}: apt-get install dataset-fashion-mnist "
            "(or --test-data embedded: the 2,000 test images of the embedded subset, or fashion-mnist:DIR)"
        )
    return load_data(test_data, REFERENCE_RESOLUTION).test


def predictions(onnx_path: str | Path, test_data: str, threads: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """The class an INT8 model predicts for each test image (ONNX Runtime, the model's own input
    resolution, ``batch_size`` images per run), cached beside the model per test set and model content."""
    from spaceevo.deploy.evaluate import engine_predictions

    blob = Path(onnx_path).read_bytes()
    split = load_test_split(test_data)
    key = hashlib.sha256(blob + test_data.encode()).hexdigest()[:16]
    cache = Path(onnx_path).with_name(f"{Path(onnx_path).stem}.predictions_{key}.npy")
    if cache.exists():
        return np.load(cache)
    model = onnx.load_from_string(blob)
    resolution = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    predicted = engine_predictions(model, split, int(resolution), threads, name=str(onnx_path), batch_size=batch_size)
    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npy", delete=False) as handle:
        np.save(handle, predicted)
    Path(handle.name).replace(cache)
    return predicted


# ---- supernets and extraction ---------------------------------------------------------------------


def extract_space(
    run_dir: Path, budgets: Sequence[float], low_ms: float, preset: str, seed: int, threads: int, tables: str | None,
) -> dict[str, Any]:
    """Extraction at ``budgets`` (those below the space's smallest subnet are skipped and noted);
    cached in ``RUN/bench_extract.json`` for the same budgets, search size and seed."""
    cache = run_dir / "bench_extract.json"
    key = {"budgets_ms": list(budgets), "preset": preset, "seed": seed}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            log(f"extract {run_dir}: done already ({cache})")
            return stored
    feasible = [b for b in budgets if b >= low_ms]
    skipped = [b for b in budgets if b < low_ms]
    log(f"extract {run_dir}: budgets {' '.join(f'{b:g}' for b in feasible)} ms")
    found = spaceevo.extract(run_dir, feasible, preset=preset, seed=seed, verify=True, device="cpu", threads=threads, tables=tables)
    data = {
        "key": key,
        "skipped_budgets_ms": skipped,
        "skipped_note": (f"below the smallest subnet's predicted INT8 latency ({low_ms:.4g} ms)" if skipped else None),
        **found.to_dict(),
    }
    atomic_write_json(cache, data)
    return data


def space_job(
    encoding: str, run_dir: Path, budgets: Sequence[float], low_ms: float, preset: str, seed: int, threads: int,
    tables: str | None, test_data: str,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """One space's training, extraction and test predictions for one seed (a worker process under
    ``--jobs``): ``(train summary, extraction, {step: seconds})``."""
    torch.set_num_threads(threads)
    space = load_hyperspace(HYPERSPACE).candidate_space(encoding)
    t = time.perf_counter()
    log(f"train {encoding} seed {seed}: {run_dir} (preset {preset})")
    train = spaceevo.train_supernet(space, run_dir, data=TRAIN_DATA, preset=preset, seed=seed, resume=True, threads=threads).summary()
    timings = {f"seed{seed}_train_{encoding}_s": time.perf_counter() - t}
    t = time.perf_counter()
    extracted = extract_space(run_dir, budgets, low_ms, preset, seed, threads, tables)
    timings[f"seed{seed}_extract_{encoding}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for r in extracted["results"]:
        predictions(r["onnx_int8"], test_data, threads)
    timings[f"seed{seed}_predict_{encoding}_s"] = time.perf_counter() - t
    return train, extracted, timings


def reference_job(name: str, run_dir: Path, preset: str, seed: int, threads: int, test_data: str) -> tuple[dict[str, Any], dict[str, float]]:
    """One stock reference for one seed (a worker process under ``--jobs``): ``(result, {step: seconds})``."""
    t = time.perf_counter()
    result = train_reference(name, run_dir, preset, seed, threads)
    predictions(result["onnx_int8"], test_data, threads, REFERENCE_BATCH)
    return result, {f"seed{seed}_{name}_s": time.perf_counter() - t}


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


# ---- stock references ------------------------------------------------------------------------

_TOTAL_STRIDE_8 = "total stride 8 like tiny (28 px -> 4x4 final feature map; unchanged, 32 would leave 1x1)"
ADAPTATIONS = {
    "mobilenet_v3_small": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); the first "
        f"inverted-residual block's depthwise conv stride 1 (was 2); 10 classes; {_TOTAL_STRIDE_8}"
    ),
    "mobilenet_v3_large": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); the first stride-2 "
        f"inverted-residual block (features[2]) has its depthwise conv at stride 1; 10 classes; {_TOTAL_STRIDE_8}"
    ),
    "mnasnet0_5": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); the first block of the "
        f"first stride-2 stack (layers[8]) has its depthwise conv at stride 1; 10 classes; {_TOTAL_STRIDE_8}. "
        "BatchNorm momentum 0.1, PyTorch's default (torchvision's 0.0003, TensorFlow's 0.9997, would leave the running "
        "statistics about half converged after this training's 2,520 steps). Its global pool is x.mean([2, 3]) (ONNX "
        "ReduceMean without keepdims), which stays FP32 in the INT8 graph"
    ),
    "shufflenet_v2_x0_5": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); max-pool removed; "
        f"10 classes; {_TOTAL_STRIDE_8}. Channel shuffle exports as Reshape/Transpose (plus Shape/Gather from "
        "its x.size() calls) and its global pool as ReduceMean, which stay FP32 in the INT8 graph"
    ),
    "resnet18": (
        "first conv 3x3, 1 input channel, stride 1 (was 7x7, 3 channels, stride 2); max-pool removed; "
        f"10 classes; {_TOTAL_STRIDE_8}"
    ),
    "efficientnet_b0": (
        "first conv 3x3 now 1 input channel and stride 1 (was 3 channels, stride 2); the first block of the "
        f"first stride-2 stage (features[2]) has its depthwise conv at stride 1; 10 classes; {_TOTAL_STRIDE_8}. "
        "Stochastic depth (0.2) and dropout train as in torchvision and are the identity in the exported model; "
        "SiLU exports as Sigmoid x Mul, quantized as such"
    ),
}


def _depthwise_stride_1(block: nn.Module) -> None:
    """Set the (first) depthwise conv of ``block``, at stride 2, to stride 1."""
    depthwise = next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels)
    assert depthwise.stride == (2, 2), depthwise
    depthwise.stride = (1, 1)


def _stem(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    return conv


def adapt_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ``name`` (random init) for small grayscale images; see :data:`ADAPTATIONS`."""
    if name not in ADAPTATIONS:
        raise UsageError(f"no adaptation for reference {name!r}; allowed: {', '.join(REFERENCE_MODELS)}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if name in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"):
        model.features[0][0] = _stem(model.features[0][0], in_channels)
        _depthwise_stride_1(model.features[1] if name == "mobilenet_v3_small" else model.features[2][0] if name == "efficientnet_b0" else model.features[2])
    elif name == "mnasnet0_5":
        model.layers[0] = _stem(model.layers[0], in_channels)
        _depthwise_stride_1(model.layers[8][0])
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = 0.1
    elif name == "shufflenet_v2_x0_5":
        model.conv1[0] = _stem(model.conv1[0], in_channels)
        model.maxpool = nn.Identity()
    elif name == "resnet18":
        model.conv1 = _stem(model.conv1, in_channels)
        model.maxpool = nn.Identity()
    return model


def train_reference(name: str, run_dir: Path, preset: str, seed: int, threads: int) -> dict[str, Any]:
    """Train, export FP32, PTQ to INT8 and evaluate one stock reference in ``run_dir`` (trained by the
    training engine as a :class:`~spaceevo.train.static.StaticTask`, resumable per epoch; skipped when
    ``result.json`` exists). Same data, batch size, epochs (FP32 + QAT epochs of the preset, in one
    phase), SGD, peak LR, warm-up, weight decay and label smoothing as the supernets."""
    from spaceevo.deploy.evaluate import engine_top1
    from spaceevo.quant.export import export_fp32, quantize_ptq
    from spaceevo.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from spaceevo.train.data import make_loader
    from spaceevo.train.engine import Engine, EngineConfig, Phase
    from spaceevo.train.loop import EVAL_SEED, HELDOUT_SEED
    from spaceevo.train.optim import make_optimizer
    from spaceevo.train.sandwich import memory_format
    from spaceevo.train.static import StaticTask

    done = run_dir / "result.json"
    if done.exists():
        log(f"reference {name} seed {seed}: done already ({done})")
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(threads)
    config = TrainConfig.preset(preset, seed=seed)
    datasets = load_data(TRAIN_DATA, REFERENCE_RESOLUTION, seed=HELDOUT_SEED)
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
        log(f"reference {name} seed {seed}: epoch {record['epoch']}/{epochs} loss {record['loss']:.3f} ({record['train_s']} s)")

    engine = Engine(task, EngineConfig(
        phases=(Phase("fp32", epochs, steps, optimizer, warmup_steps=round(config.warmup_epochs * steps)),),
        name=f"reference {name}",
        checkpoint=checkpoint_path,
        checkpoint_format=CHECKPOINT_FORMAT,
        meta={"torchvision": name, "config": config.to_dict()},
        progress=False,
        on_epoch_end=report,
    ))
    state = None
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        log(f"reference {name} seed {seed}: resuming after epoch {state.get('epoch')}")
    history = list(engine.run(state).history)
    train_s = time.perf_counter() - started
    model = task.model.to(memory_format=torch.contiguous_format).eval()
    shape = (1, datasets.in_channels, REFERENCE_RESOLUTION, REFERENCE_RESOLUTION)
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
        "model": name,
        "seed": seed,
        "adaptation": ADAPTATIONS[name],
        "resolution": REFERENCE_RESOLUTION,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "int8_method": "ptq",
        "ptq": f"ONNX Runtime quantize_static QDQ U8S8 per-channel, {len(calibration)} held-out calibration images",
        "qat": REFERENCE_QAT,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "heldout_ort_int8_top1": round(engine_top1(int8, datasets.heldout, REFERENCE_RESOLUTION, threads, batch_size=REFERENCE_BATCH), 2),
        "onnx_fp32": str(run_dir / "fp32.onnx"),
        "onnx_int8": str(run_dir / "int8.onnx"),
        "history": history,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(done, result)
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
#
# A point is a dict with "int8_ms" (measured), "top1" (%) and "correct" (bool per test image). Per
# seed, a comparison yields one row of per-image differences in points; the rows of all seeds go to
# the paired bootstrap.


def front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front (latency up, top-1 up) of (ms, top-1) points, sorted by latency."""
    return [points[i] for i in front_indices(points)]


def front_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto front (latency up, top-1 up) of (ms, top-1) points, by latency."""
    kept: list[int] = []
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if not kept or points[i][1] > points[kept[-1]][1]:
            kept.append(i)
    return kept


def curve_weights(points: Sequence[tuple[float, float]], ms: float) -> dict[int, float] | None:
    """The reference curve at latency ``ms`` as weights on ``points``: the Pareto front, linear between
    its points, held at its best point beyond its slowest one; None below its fastest one. Top-1 (or
    per-image correctness) of the curve = the weighted sum of the points'."""
    curve = front_indices(points)
    if not curve or ms < points[curve[0]][0]:
        return None
    if ms >= points[curve[-1]][0]:
        return {curve[-1]: 1.0}
    for i, j in zip(curve, curve[1:]):
        x0, x1 = points[i][0], points[j][0]
        if x0 <= ms <= x1:
            w = (ms - x0) / (x1 - x0)
            return {i: 1.0 - w, j: w}
    raise AssertionError


def _interval(rows: dict[int, np.ndarray], resamples: int) -> dict[str, Any]:
    """Mean gain and bootstrap interval of per-seed per-image differences ``{seed: row}``."""
    seeds = sorted(rows)
    result = paired_bootstrap(np.stack([rows[s] for s in seeds]), resamples=resamples)
    return {"mean_gain_points": round(result.mean, 3), "ci95": [round(result.low, 3), round(result.high, 3)], "seeds": seeds}


def _verdict(entry: dict[str, Any]) -> bool:
    return entry["mean_gain_points"] is not None and entry["mean_gain_points"] >= TARGET_POINTS and entry["ci95"][0] > 0


def compare_spaces(
    points: dict[int, list[dict]], reference: dict[int, list[dict]], name: str, ref_name: str, resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """``name``'s points against ``ref_name``'s curve of the same seed at equal measured INT8 latency:
    per seed, the mean over its comparable points of (point - reference curve) per image."""
    rows, table, budgets = {}, [], set()
    for seed in sorted(set(points) & set(reference)):
        ref_points = reference[seed]
        xy = [(p["int8_ms"], p["top1"]) for p in ref_points]
        diffs = []
        for p in points[seed]:
            weights = curve_weights(xy, p["int8_ms"])
            row = {"seed": seed, "budget_ms": p["budget_ms"], "int8_ms": p["int8_ms"], "top1": p["top1"], "reference_top1_at_same_ms": None}
            if weights is not None:
                curve_correct = sum(w * ref_points[i]["correct"] for i, w in weights.items())
                diffs.append(100.0 * (p["correct"] - curve_correct))
                row["reference_top1_at_same_ms"] = round(sum(w * ref_points[i]["top1"] for i, w in weights.items()), 2)
                budgets.add(p["budget_ms"])
            row["difference"] = None if weights is None else round(p["top1"] - row["reference_top1_at_same_ms"], 2)
            table.append(row)
        if diffs:
            rows[seed] = np.mean(diffs, axis=0)
    entry: dict[str, Any] = {"kind": "space", "space": name, "reference": ref_name, "mean_gain_points": None, "ci95": None,
                             "budgets_ms": sorted(budgets), "seeds": [], "rows": table}
    if rows:
        entry.update(_interval(rows, resamples))
    entry["meets_issue_target"] = _verdict(entry)
    return entry


def compare_reference(
    deployed: dict[int, list[dict]], reference: dict[int, dict], name: str, ref_name: str, resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """The deployed subnets of ``name`` at each budget against a stock model, at the budgets whose
    subnet (same seed) is at least as slow as the model: per seed, the mean over those budgets of
    (subnet - model) per image; also each budget alone (``per_budget``). A model slower than every
    deployed subnet is set against the slowest one instead (``kind`` "reference_slower")."""
    seeds = sorted(set(deployed) & set(reference))
    by_budget: dict[float, dict[int, np.ndarray]] = {}
    for seed in seeds:
        ref = reference[seed]
        for p in deployed[seed]:
            if p["int8_ms"] >= ref["int8_ms"]:
                by_budget.setdefault(p["budget_ms"], {})[seed] = 100.0 * (p["correct"].astype(float) - ref["correct"])
    kind = "at_most_as_slow"
    if not by_budget:
        kind = "reference_slower"
        for seed in seeds:
            slowest = max(deployed[seed], key=lambda p: p["int8_ms"])
            by_budget.setdefault(slowest["budget_ms"], {})[seed] = 100.0 * (slowest["correct"].astype(float) - reference[seed]["correct"])
    rows: dict[int, list[np.ndarray]] = {}
    for budget in sorted(by_budget):
        for seed, row in by_budget[budget].items():
            rows.setdefault(seed, []).append(row)
    entry: dict[str, Any] = {
        "kind": kind, "space": name, "reference": ref_name, "mean_gain_points": None, "ci95": None,
        "budgets_ms": sorted(by_budget), "seeds": [],
        "reference_int8_ms": round(float(np.mean([reference[s]["int8_ms"] for s in seeds])), 4) if seeds else None,
        "per_budget": [{"budget_ms": b, **_interval(by_budget[b], resamples)} for b in sorted(by_budget)],
    }
    if rows:
        entry.update(_interval({s: np.mean(r, axis=0) for s, r in rows.items()}, resamples))
    entry["meets_issue_target"] = _verdict(entry) and kind == "at_most_as_slow"
    return entry


def comparison_text(c: dict[str, Any]) -> str:
    if c["mean_gain_points"] is None:
        return f"{c['space']} vs {c['reference']}: no point lies at a latency the reference reaches; no comparison at equal latency."
    lo, hi = c["ci95"]
    seeds = f"{len(c['seeds'])} seed(s)"
    budgets = ", ".join(f"{b:g}" for b in c["budgets_ms"])
    if c["kind"] == "space":
        head = f"{c['space']} vs {c['reference']} at equal measured INT8 latency (budgets {budgets} ms, {seeds})"
    elif c["kind"] == "at_most_as_slow":
        head = (f"deployed subnet of {c['space']} vs {c['reference']} ({c['reference_int8_ms']:.3g} ms) at the budgets whose "
                f"subnet is at least as slow ({budgets} ms, {seeds})")
    else:
        head = (f"deployed subnet of {c['space']} vs {c['reference']} ({c['reference_int8_ms']:.3g} ms), slower than every "
                f"deployed subnet: the slowest one (budget {budgets} ms, {seeds}) at lower latency")
    text = f"{head}: mean gain {c['mean_gain_points']:+.2f} points, 95 % interval [{lo:+.2f}, {hi:+.2f}]"
    if c["kind"] == "reference_slower":
        return text + " (not an equal-latency comparison: outside the issue's bar)."
    verdict = "MEETS" if c["meets_issue_target"] else "does NOT meet"
    return text + f". This {verdict} the bar (gain >= {TARGET_POINTS:g} point with the interval above 0)."


# ---- report ---------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _ci(c: dict[str, Any]) -> str:
    return "-" if c.get("ci95") is None else f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def comparison_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "| model | reference | kind | budgets ms | seeds | mean gain (points) | 95 % interval | bar met |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    kinds = {"space": "equal latency", "at_most_as_slow": "reference at most as slow", "reference_slower": "reference slower than every subnet"}
    for c in report["comparisons"]:
        lines.append(
            f"| {c['space']} | {c['reference']} | {kinds[c['kind']]} | {', '.join(f'{b:g}' for b in c['budgets_ms']) or '-'} | "
            f"{' '.join(map(str, c['seeds'])) or '-'} | {fmt(c['mean_gain_points'], '+.2f')} | {_ci(c)} | "
            f"{'n/a' if c['kind'] == 'reference_slower' else 'yes' if c['meets_issue_target'] else 'no'} |"
        )
    return lines + [""]


def per_budget_table(report: dict[str, Any]) -> list[str]:
    """Per budget: the deployed subnet's gain over each stock model at most as slow."""
    refs = [c for c in report["comparisons"] if c["kind"] == "at_most_as_slow"]
    if not refs:
        return []
    budgets = report["latency_budgets_ms"]
    lines = ["Per budget, deployed subnet minus each stock model at most as slow (points, mean [95 % interval]; "
             "- where the model is slower than that budget's subnet):", "",
             "| reference | INT8 ms | " + " | ".join(f"{b:g} ms" for b in budgets) + " |",
             "|---|---:|" + "---:|" * len(budgets)]
    for c in refs:
        cells = {row["budget_ms"]: f"{row['mean_gain_points']:+.2f} {_ci(row)}" for row in c["per_budget"]}
        lines.append(f"| {c['reference']} | {c['reference_int8_ms']:.3f} | " + " | ".join(cells.get(b, "-") for b in budgets) + " |")
    return lines + [""]


def tables_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    for entry in report["spaces"]:
        lines += [
            f"**{entry['label']}** `{entry['space']}` (Q-T score {fmt(entry.get('qt_score'), '.4g')})",
            "",
            "| seed | budget ms | subnet | predicted INT8 ms | measured INT8 ms | spread | measured FP32 ms | held-out top-1 (fake-quant) | ORT INT8 test top-1 |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for seed, run in entry["seeds"].items():
            for p in run["points"]:
                lines.append(
                    f"| {seed} | {p['budget_ms']:g} | `{p['subnet']}` | {fmt(p['predicted_int8_ms'], '.3f')} | {fmt(p['int8_ms'], '.3f')} | "
                    f"{fmt(p['int8_spread'], '.1%')} | {fmt(p['fp32_ms'], '.3f')} | {fmt(p['heldout_int8_top1'])} | {fmt(p['top1'])} |"
                )
            for b in run.get("skipped_budgets_ms") or []:
                lines.append(f"| {seed} | {b:g} | (skipped: {run['skipped_note']}) | | | | | | |")
        notes = sorted({p["note"] for run in entry["seeds"].values() for p in run["points"] if p.get("note")})
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if report["references"]:
        lines += [
            "**Stock references** (torchvision, adapted to 1x28x28, trained alone with the same data, epochs and recipe; "
            "INT8 by ONNX Runtime post-training quantization; per seed)",
            "",
            "| model | seed | params M | measured INT8 ms | spread | measured FP32 ms | held-out INT8 top-1 | ORT INT8 test top-1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["references"]:
            lines.append(
                f"| {r['model']} | {r['seed']} | {r['params_m']:.2f} | {fmt(r['int8_ms'], '.3f')} | {fmt(r['int8_spread'], '.1%')} | "
                f"{fmt(r['fp32_ms'], '.3f')} | {fmt(r['heldout_ort_int8_top1'])} | {fmt(r['top1'])} |"
            )
        lines.append("")
        for name in dict.fromkeys(r["model"] for r in report["references"]):
            lines.append(f"- {name}: {ADAPTATIONS[name]}.")
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    smoke = report["preset"] == "smoke"
    title = "## Searched space vs MobileNetV3 space vs stock models, INT8 on this device, 95 % intervals"
    lines = [SECTION[0], title + (f" - SMOKE-PRESET RUN (`--preset {report['preset']}`), NOT EVIDENCE" if smoke else ""), ""]
    if smoke:
        lines += [
            "> **This is a `--preset smoke` run: a few training steps per model. It shows that the pipeline runs end to "
            "end; its accuracies are near chance and its comparisons mean nothing. Run `--preset default` for evidence.**",
            "",
        ]
    search = report["search"]
    lines += [
        f"Device: `{report['device']['describe']}`. Date: {report['date']}. Wall time: {report['wall_s'] / 60:.1f} min "
        f"(this invocation; finished steps are skipped). Preset: `{report['preset']}` (training: {report['train_recipe']}; "
        f"same data, recipe and epochs for every space and model). Seeds: {' '.join(map(str, report['seeds']))}. "
        f"Test set: {report['test_set']}.",
        "",
        (f"Search: `{search['best_space']}` found by `spaceevo search --device cpu` (Q-T score {search['qt_score']:.4g}, latency "
         f"constraints {', '.join(f'{c:g}' for c in search['latency_constraints_ms'])} ms)." if search.get("qt_score") is not None
         else f"Searched space `{search['best_space']}` given with --searched-space (no search ran).")
        + f" Latency budgets: {', '.join(f'{b:g}' for b in report['latency_budgets_ms'])} ms ({report['budgets_how']}).",
        "",
    ]
    lines += [f"- {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += ["### Comparisons", ""] + comparison_table(report) + per_budget_table(report)
    lines += [f"- {c['text']}" for c in report["comparisons"]]
    lines += [
        "",
        f"Method: top-1 = ONNX Runtime INT8 on the test set ({report['test_images']:,} images). Every comparison is a "
        "mean gain in points with a paired percentile bootstrap 95 % interval "
        f"({report['resamples']:,} replicates, `spaceevo.stats.paired_bootstrap`): both models are scored on the same "
        "images; each replicate draws the test images and, independently, the seeds with replacement, so the interval "
        "holds the test-set and the training-seed variation. Spaces: per seed, the reference space's Pareto front "
        "(measured INT8 ms, top-1) of the same seed, linear between its points (per image: the weighted mean of the two "
        "neighbours' correctness) and held at its best point beyond its slowest one; points faster than its fastest are "
        "not compared. Stock models: per seed, the deployed subnet of each budget whose measured INT8 latency is at "
        "least that of the stock model. Latency: every exported model (INT8 and FP32) timed in one interleaved "
        f"measurement (medians of 15 rounds on the {report['latency_scale']} scale; spread = interquartile range / median).",
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
        f"- Stock references are INT8 by **post-training quantization** only: {REFERENCE_QAT}. PTQ lost at most "
        "0.2 points against FP32 on spaceevo's own subnets (see Export and evaluation).",
        "- Stock references train as plain supervised nets (one phase, FP32+QAT epochs of the preset, the same SGD, "
        "peak LR, warm-up, weight decay, label smoothing, batch size, data and augmentation); supernet subnets are trained "
        "by the sandwich rule with in-place distillation and LSQ+ QAT, then BN-recalibrated.",
        f"- Training on the embedded subset (9,000 images); {len(report['seeds'])} seed(s), one machine shared with "
        "other jobs; latency on the latency table's reference scale. The search ran once (first seed).",
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
    """The Pareto PNG (every seed's points); returns the references left out of it."""
    series, left_out = [], []
    slowest = max((p["int8_ms"] for e in report["spaces"] for run in e["seeds"].values() for p in run["points"]), default=0.0)
    for index, entry in enumerate(report["spaces"]):
        points = [(p["int8_ms"], p["top1"]) for run in entry["seeds"].values() for p in run["points"]]
        series.append(Series(f"{entry['label']} {entry['space']}", points, PALETTE[index % len(PALETTE)], radius=4.0))
    names = list(dict.fromkeys(r["model"] for r in report["references"]))
    for offset, name in enumerate(names):
        points = [(r["int8_ms"], r["top1"]) for r in report["references"] if r["model"] == name]
        if slowest and min(ms for ms, _ in points) > PLOT_CLIP * slowest:
            left_out.append(f"{name} ({np.mean([ms for ms, _ in points]):.3g} ms, top-1 {np.mean([t for _, t in points]):.2f})")
            continue
        color = PALETTE[(len(report["spaces"]) + offset) % len(PALETTE)]
        series.append(Series(f"{name} (PTQ)", points, color, radius=6.0, outline=True))
    title = "ORT INT8 test top-1 vs measured INT8 latency, every seed" + (" (SMOKE preset: not evidence)" if report["preset"] == "smoke" else "")
    write_png(path, Figure(series, "measured INT8 latency (ms, 1 thread)", "ONNX Runtime INT8 test top-1 (%)", title,
                           vlines=report["latency_budgets_ms"]))
    return left_out


# ---- main -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["smoke", "default"],
                        help="size of search, training (same for every space and model) and extraction (default: default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="training and extraction seeds; every model is trained once per seed (default: 0 1 2)")
    parser.add_argument("--searched-space", default=None, metavar="ENCODING",
                        help="compare this candidate space of tiny instead of searching (no best homogeneous space then)")
    parser.add_argument("--references", nargs="*", default=list(REFERENCE_MODELS), choices=REFERENCE_MODELS, metavar="MODEL",
                        help=f"stock models to train and compare (default: all of {', '.join(REFERENCE_MODELS)}; none: leave them out)")
    parser.add_argument("--test-data", default=FULL_TEST_DATA,
                        help=f"data set whose test split scores every model (default: {FULL_TEST_DATA}, the full 10,000 images; "
                             "embedded: the subset's 2,000)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap replicates (default: {RESAMPLES})")
    parser.add_argument("--run-root", type=Path, default=Path("runs/bench_spaces"),
                        help="run folders go to RUN_ROOT/<preset>/ (default: runs/bench_spaces)")
    parser.add_argument("--latency-budgets", type=float, nargs="+", default=None, metavar="MS",
                        help="predicted INT8 latency budgets (default: 4 spread over the latency range all compared spaces reach)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads per job (default: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes for the independent trainings and extractions (default: 1, in this process)")
    parser.add_argument("--tables", default=None, help="latency table root (default: ./latency_tables)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs",
                        help="where results/spaces.json, results/spaces_pareto.png and RESULTS.md are written (default: docs/)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    args = parser.parse_args(argv)
    for name in ("threads", "jobs", "resamples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}")
    args.seeds = sorted(args.seeds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, argv)
    except SpaceEvoError as error:
        print(f"bench_spaces: error: {error}", file=sys.stderr)
        return error.exit_code


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    test = load_test_split(args.test_data)  # fails first when the test set is missing
    labels = np.asarray(test.targets)
    root = args.run_root / args.preset
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = device_fingerprint("cpu", args.threads)
    hyper = load_hyperspace(HYPERSPACE)
    notes: list[str] = []
    timings: dict[str, float] = {}

    # (a) the search, or the space given
    t = time.perf_counter()
    if args.searched_space:
        search = {"best_space": hyper.candidate_space(args.searched_space).encoding, "given": True}
        homogeneous: dict[str, float] = {}
        notes.append("no search ran (--searched-space): no best homogeneous space")
    else:
        search_dir = root / "search"
        search = run_search(search_dir, args.preset, args.seeds[0], args.tables)
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

    # (b) training, extraction and the references, per seed: independent jobs
    jobs = len(args.seeds) * (len(spaces) + len(args.references))
    log(f"{jobs} jobs on {args.jobs} worker(s) of {args.threads} thread(s)")
    with executor(args.jobs) as pool:
        space_futures = {
            (role, seed): pool.submit(space_job, space.encoding, root / f"seed{seed}" / f"train_{space.encoding}", budgets,
                                      ranges[role][0], args.preset, seed, args.threads, args.tables, args.test_data)
            for seed in args.seeds for role, space in spaces.items()
        }
        reference_futures = [
            pool.submit(reference_job, name, root / f"seed{seed}" / f"reference_{name}", args.preset, seed, args.threads, args.test_data)
            for seed in args.seeds for name in args.references
        ]
        runs: dict[str, dict[int, dict[str, Any]]] = {role: {} for role in spaces}
        for (role, seed), future in space_futures.items():
            train, extracted, job_timings = future.result()
            timings.update(job_timings)
            runs[role][seed] = {"train": train, "extract": extracted, "skipped_budgets_ms": extracted.get("skipped_budgets_ms"),
                                "skipped_note": extracted.get("skipped_note")}
        references = []
        for future in reference_futures:
            result, job_timings = future.result()
            timings.update(job_timings)
            references.append(result)

    # (c) one interleaved measurement of everything, then the test predictions
    paths = [p for role in runs.values() for run_ in role.values() for r in run_["extract"]["results"] for p in (r["onnx_int8"], r["onnx_fp32"])]
    paths += [p for r in references for p in (r["onnx_int8"], r["onnx_fp32"])]
    t = time.perf_counter()
    stats, scale = measure_all(paths, args.threads, args.tables)
    timings["measure_s"] = time.perf_counter() - t
    correct: dict[str, np.ndarray] = {}
    reference_paths = {r["onnx_int8"] for r in references}

    def correct_of(path: str) -> np.ndarray:
        if path not in correct:
            correct[path] = predictions(path, args.test_data, args.threads, REFERENCE_BATCH if path in reference_paths else EVAL_BATCH) == labels
        return correct[path]

    entries = []
    for role, space in spaces.items():
        for seed, run_ in runs[role].items():
            run_["points"] = []
            for r in run_["extract"]["results"]:
                int8, fp32 = stats[r["onnx_int8"]], stats[r["onnx_fp32"]]
                run_["points"].append({
                    "budget_ms": r["budget_ms"], "subnet": r["subnet"], "predicted_int8_ms": r["predicted_int8_ms"],
                    "int8_ms": round(int8.ms, 4), "int8_raw_ms": round(int8.raw_median_ms, 4), "int8_spread": round(int8.spread, 4),
                    "fp32_ms": round(fp32.ms, 4), "heldout_int8_top1": r["heldout_int8_top1"],
                    "top1": round(100.0 * float(correct_of(r["onnx_int8"]).mean()), 2),
                    "note": r.get("note"), "onnx_int8": r["onnx_int8"],
                })
        entries.append({
            "role": role, "label": " = ".join(ROLE_NAMES[r] for r in [role, *aliases[role]]), "space": space.encoding,
            "qt_score": search.get("qt_score") if space.encoding == search["best_space"] else homogeneous.get(space.encoding),
            "predicted_range_ms": list(ranges[role]), "seeds": {str(s): runs[role][s] for s in sorted(runs[role])},
        })
    for r in references:
        int8, fp32 = stats[r["onnx_int8"]], stats[r["onnx_fp32"]]
        r.update(int8_ms=round(int8.ms, 4), int8_raw_ms=round(int8.raw_median_ms, 4), int8_spread=round(int8.spread, 4),
                 fp32_ms=round(fp32.ms, 4), top1=round(100.0 * float(correct_of(r["onnx_int8"]).mean()), 2))

    # (d) the comparisons
    t = time.perf_counter()

    def with_correct(points: list[dict]) -> list[dict]:
        return [{**p, "correct": correct_of(p["onnx_int8"])} for p in points]

    by_role = {e["role"]: {int(s): with_correct(run_["points"]) for s, run_ in e["seeds"].items()} for e in entries}
    names = {e["role"]: f"{ROLE_NAMES[e['role']]} {e['space']}" for e in entries}
    comparisons = []
    for a, b in [("searched", "mbv3"), ("best_homogeneous", "mbv3"), ("searched", "best_homogeneous")]:
        if a in by_role and b in by_role:
            comparisons.append(compare_spaces(by_role[a], by_role[b], names[a], names[b], args.resamples))
    if "mbv3" not in by_role:
        notes.append(f"the searched space is the MobileNetV3 space {MBV3_SPACE}: nothing to compare")
    for name in args.references:
        per_seed = {r["seed"]: {**r, "correct": correct_of(r["onnx_int8"])} for r in references if r["model"] == name}
        comparisons.append(compare_reference(by_role["searched"], per_seed, names["searched"], f"torchvision {name}", args.resamples))
    for c in comparisons:
        c["text"] = comparison_text(c)
    timings["bootstrap_s"] = time.perf_counter() - t
    if args.preset == "smoke":
        notes.insert(0, "SMOKE preset: the numbers check the pipeline only and are not evidence for or against the method")

    given = argv if argv is not None else sys.argv[1:]
    report = {
        "preset": args.preset, "seeds": args.seeds, "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "nice -n 19 python scripts/bench_spaces.py" + ("".join(" " + shlex.quote(a) for a in given)),
        "run_root": str(root), "test_data": args.test_data, "test_images": int(len(labels)),
        "test_set": f"`{args.test_data}`, {len(labels):,} images" + (" (the full Fashion-MNIST test set)" if len(labels) == 10_000 else ""),
        "resamples": args.resamples,
        "device": {**fingerprint.to_dict(), "describe": fingerprint.describe()},
        "train_recipe": TrainConfig.preset(args.preset).summary(),
        "search": {k: search[k] for k in ("best_space", "qt_score", "latency_constraints_ms", "evaluated", "reused", "given") if k in search},
        "homogeneous_qt_scores": homogeneous,
        "latency_budgets_ms": budgets, "budgets_how": how, "latency_scale": scale,
        "spaces": entries, "references": references, "comparisons": comparisons, "notes": notes,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)

    print()
    print("\n".join(comparison_table(report) + per_budget_table(report)))
    for c in comparisons:
        print(f"  {c['text']}")
    for n in notes:
        print(f"  note: {n}")
    print(f"wall time {report['wall_s'] / 60:.1f} min; timings {json.dumps(report['timings_s'])}")
    if not args.no_write:
        results = args.output / "results"
        results.mkdir(parents=True, exist_ok=True)
        report["plot_left_out"] = write_plot(results / "spaces_pareto.png", report)
        atomic_write_json(results / "spaces.json", report)
        write_section(args.output / "RESULTS.md", name="spaces", section=markdown(report))
        log(f"wrote {results / 'spaces.json'}, {results / 'spaces_pareto.png'}, {args.output / 'RESULTS.md'} (spaces section)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
