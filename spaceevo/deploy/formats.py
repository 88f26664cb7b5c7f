"""One trained subnet in several number formats: what ``spaceevo formats`` reports.

For each format (:mod:`spaceevo.quant.formats`), the subnet's FP32 weights (BatchNorm recalibrated
on the held-out split, then folded) are quantized at the points the INT8 graph quantizes
(:func:`~spaceevo.quant.network.quantize_network`) and

* **PTQ**: calibrated on held-out images (weights per output channel, activations per tensor,
  ``max|x| / max_value``; integer formats from ``[min, max]``) and evaluated on the test split;
* **QAT**: the PTQ model fine-tuned for a few steps on the training split (weights and learned
  scales, Adam, distilled from the FP32 subnet's logits), then evaluated on the test split.

Each row also gives bits per weight and activation (MX counts its shared 8-bit scale per block),
a relative hardware cost of a multiply-accumulate where a published figure exists (else None,
"not published"), and whether ONNX Runtime's CPU provider runs the format with its own kernels
(INT8 only: the others are simulated). Integer weights use their full range (no ``reduce_range``):
this compares formats, not this device's INT8 deployment, which ``spaceevo evaluate`` measures.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from spaceevo.deploy.trained import open_run
from spaceevo.errors import UsageError
from spaceevo.latency.engines import DEFAULT_DEVICE, get_engine
from spaceevo.quant.formats import MxFormat, NumberFormat, get_format
from spaceevo.quant.network import FormatConfig, calibrate_network, quantize_network
from spaceevo.space import Subnet
from spaceevo.train.data import ImageSplit, make_loader
from spaceevo.train.evaluate import top1
from spaceevo.train.loop import EVAL_SEED

DEFAULT_FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2", "mxint8", "mxfp8_e4m3", "mxfp4")
QAT_STEPS = 100
QAT_BATCH = 64
QAT_LEARNING_RATE = 1e-4
CALIBRATION_IMAGES = 256
EVAL_BATCH = 256

VAN_BAALEN_2023 = (
    "van Baalen et al., 'FP8 versus INT8 for efficient deep learning inference', arXiv:2303.17951 (2023): "
    "FP formats are 50-180% less efficient in compute than INT8 in dedicated hardware"
)
NOT_PUBLISHED = "not published"

#: Published cost of one MAC relative to an INT8 MAC, as (low, high), with its source.
MAC_COSTS: dict[str, tuple[tuple[float, float], str]] = {
    "int8": ((1.0, 1.0), "the reference"),
    "fp8_e4m3": ((1.5, 2.8), VAN_BAALEN_2023),
    "fp8_e5m2": ((1.5, 2.8), VAN_BAALEN_2023),
}

@dataclass(frozen=True)
class FormatResult:
    """One format's row: test top-1 (%) after PTQ and after QAT, bits, MAC cost, native support."""

    format: str
    ptq_top1: float
    qat_top1: float | None
    weight_bits: float
    activation_bits: float
    relative_mac_cost: float | list[float] | None
    mac_cost_source: str
    native_on_device: bool


@dataclass(frozen=True)
class FormatsReport:
    """What :func:`compare_formats` measured for one subnet."""

    space: str
    subnet: str
    data: str
    test_images: int
    calibration_images: int
    qat_steps: int
    fp32_top1: float
    formats: list[FormatResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def storage_bits(fmt: NumberFormat) -> float:
    """Bits per element, an MX block's shared 8-bit scale spread over its elements."""
    if isinstance(fmt, MxFormat):
        return fmt.bits + 8 / fmt.block_size
    return float(fmt.bits)


def mac_cost(name: str) -> tuple[float | list[float] | None, str]:
    """The published relative MAC cost of format ``name`` (a number, a [low, high] range or None) and its source."""
    if name not in MAC_COSTS:
        return None, NOT_PUBLISHED
    (low, high), source = MAC_COSTS[name]
    return (low if low == high else [low, high]), source


def _loader(split: ImageSplit, resolution: int, batch: int, shuffle: bool):
    return make_loader(split.with_resolution(resolution), batch, shuffle, seed=EVAL_SEED, workers=0, distributed=False)


def _calibration_batches(split: ImageSplit, resolution: int, images: int) -> list[torch.Tensor]:
    batches, seen = [], 0
    for x, _ in _loader(split, resolution, min(images, 128), True):
        batches.append(x)
        seen += x.shape[0]
        if seen >= images:
            break
    return batches


def _fine_tune(model: torch.nn.Module, teacher: torch.nn.Module, split: ImageSplit, resolution: int, steps: int) -> None:
    """``steps`` Adam steps on ``split``, KL divergence to the FP32 ``teacher``'s logits."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=QAT_LEARNING_RATE)
    model.train()
    done = 0
    while done < steps:
        for x, _ in _loader(split, resolution, QAT_BATCH, True):
            with torch.no_grad():
                target = F.softmax(teacher(x), dim=1)
            loss = F.kl_div(F.log_softmax(model(x), dim=1), target, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    model.eval()


def _check_names(names: Sequence[str]) -> list[tuple[str, NumberFormat]]:
    if not names:
        raise UsageError("--formats: give at least one format")
    return [(name, get_format(name)) for name in names]


def compare_formats(
    run_dir: str | Path,
    subnet: str | Subnet,
    formats: Sequence[str] | None = None,
    *,
    qat_steps: int | None = None,
    data: str | None = None,
    device: str = DEFAULT_DEVICE,
    show_progress: bool = True,
) -> FormatsReport:
    """Test-split top-1 of ``subnet`` of the run in ``run_dir`` in each of ``formats``, after PTQ and
    after ``qat_steps`` steps of QAT (none with 0), with bits, MAC cost and whether the engine
    ``device`` names runs the format natively. None means the defaults, :data:`DEFAULT_FORMATS` and
    :data:`QAT_STEPS`."""
    formats = DEFAULT_FORMATS if formats is None else formats
    qat_steps = QAT_STEPS if qat_steps is None else qat_steps
    if qat_steps < 0:
        raise UsageError(f"--qat-steps must be 0 or more, got {qat_steps}")
    chosen_formats = _check_names(formats)
    native = get_engine(device).native_formats
    run = open_run(run_dir)
    chosen = run.subnet(subnet)
    datasets = run.load_data(data)
    supernet, _ = run.fp32_supernet()
    run.calibrated(supernet, chosen, datasets)
    teacher = supernet.extract(chosen).eval()
    resolution = chosen.resolution
    test = _loader(datasets.test, resolution, EVAL_BATCH, False)
    with torch.no_grad():
        fp32_top1 = top1(teacher, test)
    calibration = _calibration_batches(datasets.heldout, resolution, CALIBRATION_IMAGES)
    rows = []
    bar = tqdm(chosen_formats, desc="formats", unit="format", file=sys.stderr, disable=not show_progress, leave=False)
    for name, fmt in bar:
        bar.set_postfix_str(name, refresh=True)
        model = quantize_network(teacher, FormatConfig(fmt, fmt))
        calibrate_network(model, calibration)
        with torch.no_grad():
            ptq_top1 = top1(model, test)
        qat_top1 = None
        if qat_steps:
            _fine_tune(model, teacher, datasets.train, resolution, qat_steps)
            with torch.no_grad():
                qat_top1 = round(top1(model, test), 2)
        cost, source = mac_cost(name)
        rows.append(
            FormatResult(
                format=name,
                ptq_top1=round(ptq_top1, 2),
                qat_top1=qat_top1,
                weight_bits=storage_bits(fmt),
                activation_bits=storage_bits(fmt),
                relative_mac_cost=cost,
                mac_cost_source=source,
                native_on_device=name in native,
            )
        )
    bar.close()
    return FormatsReport(
        space=run.space.encoding,
        subnet=chosen.encode(),
        data=str(datasets.spec),
        test_images=len(datasets.test),
        calibration_images=sum(int(b.shape[0]) for b in calibration),
        qat_steps=qat_steps,
        fp32_top1=round(fp32_top1, 2),
        formats=rows,
    )
