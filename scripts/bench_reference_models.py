"""FP32 vs INT8 latency of reference models on this device and one engine (``--device``), measured interleaved.

Models (random weights: latency does not depend on their values):
* the published SEQnet@vnni-A0..A4 subnets of the published space ``onnxw-151122-023231``
  (SpaceEvo, ICCV 2023; encodings from ``shared/reference/spaceevo_published.yaml``), built from
  their encodings by spaceevo;
* torchvision MobileNetV3-Large, MobileNetV3-Small, EfficientNet-B0 and ResNet-18 at 224 px.

Each model is exported to FP32 ONNX and quantized by ONNX Runtime's ``quantize_static`` (QDQ, U8S8,
per-channel, ``reduce_range`` as the device fingerprint says), then all FP32 and INT8 models are
timed round-robin (:mod:`spaceevo.latency.measure`, guarded by the reference model). The INT8
speed-up is FP32 / INT8 of the same round-robin, so slow phases of a shared machine hit both alike.

Writes ``docs/results/reference_models_SLUG.json`` and the section between the
``reference-models-SLUG`` markers of ``docs/RESULTS.md``, SLUG the device fingerprint's (one section
per CPU and engine; ``--no-write`` only prints).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_doc import markers, write_section  # noqa: E402
from spaceevo.io import atomic_write_json  # noqa: E402
from spaceevo.latency.endtoend import measure_models, randomize_batchnorm, subnet_models  # noqa: E402
from spaceevo.latency.engines import get_engine  # noqa: E402
from spaceevo.latency.fingerprint import DeviceFingerprint, device_fingerprint  # noqa: E402
from spaceevo.latency.measure import MeasureConfig  # noqa: E402
from spaceevo.latency.reference import stable_meter  # noqa: E402
from spaceevo.quant.export import export_fp32, quantize_ptq  # noqa: E402
from spaceevo.space import load_space  # noqa: E402

TORCHVISION_MODELS = ("mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0", "resnet18")


def published_subnets(path: Path, space_name: str) -> dict[str, tuple[str, str]]:
    """``{model name: (space encoding, subnet string)}`` of one published space."""
    data = yaml.safe_load(path.read_text())
    encoding = data["spaces"][space_name]
    return {
        name: (encoding, entry["subnet"])
        for name, entry in data["subnets"].items()
        if entry["space"] == space_name
    }


def torchvision_models(name: str, reduce_range: bool, seed: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    randomize_batchnorm(model, seed)
    shape = (1, 3, 224, 224)
    fp32 = export_fp32(model, shape)
    rng = np.random.default_rng(seed)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as work_dir:
        int8 = quantize_ptq(fp32, calibration, reduce_range=reduce_range, work_dir=work_dir)
    return fp32, int8


def markdown(rows: list[dict], fingerprint: DeviceFingerprint, published: dict, date: str, command: str) -> str:
    section = markers(f"reference-models-{fingerprint.slug}")
    lines = [
        section[0],
        f"## INT8 vs FP32 reference models: {get_engine(fingerprint.engine).label} on {fingerprint.cpu_model}",
        "",
        f"Device: `{fingerprint.describe()}`. Date: {date}. Command: `{command}`.",
        "",
        "| model | input | FP32 ms | INT8 ms | INT8 speed-up | INT8 spread |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['input']} | {row['fp32_ms']:.2f} | {row['int8_ms']:.2f} | "
            f"{row['int8_speedup']:.2f}x | {row['int8_spread']:.2f} |"
        )
    lines += [
        "",
        "Milliseconds are medians of interleaved rounds on the reference-model scale (the machine's",
        "speed drifts; see README, measurement protocol); spread = interquartile range / median of the INT8",
        "rounds. Speed-up = FP32 ms / INT8 ms of the same run.",
    ]
    for name, figures in published.items():
        if name != "note":
            lines.append(
                f"Published for comparison ({published.get('note', '')}): {name} FP32 {figures['fp32_ms']} ms, "
                f"INT8 {figures['int8_ms']} ms, {figures['int8_speedup']}x."
            )
    lines.append(section[1])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=ROOT.parent / "shared" / "reference" / "spaceevo_published.yaml",
                        help="published SpaceEvo results YAML (default: ../shared/reference/spaceevo_published.yaml)")
    parser.add_argument("--space", default="spaceevo@vnni", help="published space whose subnets to time (default: spaceevo@vnni)")
    parser.add_argument("--device", default="cpu", help="engine that runs the models (default: cpu, ONNX Runtime)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default: 15)")
    parser.add_argument("--seed", type=int, default=0, help="weights and calibration seed (default: 0)")
    parser.add_argument("--no-torchvision", action="store_true", help="only the published subnets")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/")
    args = parser.parse_args(argv)
    if not args.published.exists():
        parser.error(f"--published {args.published}: no such file")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    fingerprint = device_fingerprint(args.device, args.threads)
    entries: list[tuple[str, str, onnx.ModelProto, onnx.ModelProto]] = []
    for name, (encoding, subnet) in published_subnets(args.published, args.space).items():
        space = load_space(encoding)
        arch = space.resolve(space.subnet(subnet))
        models = subnet_models(arch, fingerprint, seed=args.seed)
        entries.append((name, f"{arch.in_channels}x{arch.resolution}x{arch.resolution}", models.fp32, models.int8))
        print(f"built {name} ({encoding})", file=sys.stderr)
    if not args.no_torchvision:
        for name in TORCHVISION_MODELS:
            fp32, int8 = torchvision_models(name, fingerprint.reduce_range, args.seed)
            entries.append((f"torchvision {name}", "3x224x224", fp32, int8))
            print(f"built {name}", file=sys.stderr)

    config = MeasureConfig(warmup=5, rounds=args.rounds, runs_per_round=3, min_round_s=0.01)
    models = [m for _, _, fp32, int8 in entries for m in (fp32, int8)]
    stats = measure_models(models, fingerprint, config, stable_meter(fingerprint))
    rows = []
    for index, (name, shape, _, _) in enumerate(entries):
        fp32, int8 = stats[2 * index], stats[2 * index + 1]
        rows.append({
            "model": name,
            "input": shape,
            "fp32_ms": round(fp32.ms, 4),
            "int8_ms": round(int8.ms, 4),
            "int8_speedup": round(fp32.ms / int8.ms, 3),
            "fp32_raw_ms": round(fp32.raw_median_ms, 4),
            "int8_raw_ms": round(int8.raw_median_ms, 4),
            "int8_spread": round(int8.spread, 3),
        })
    published = yaml.safe_load(args.published.read_text()).get("published_latency", {})
    date = dt.date.today().isoformat()
    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/bench_reference_models.py", *arguments])
    section = markdown(rows, fingerprint, published, date, command)
    print(section)
    if not args.no_write:
        atomic_write_json(ROOT / "docs" / "results" / f"reference_models_{fingerprint.slug}.json", {
            "device": fingerprint.to_dict(), "date": date, "command": command, "rows": rows,
        })
        write_section(ROOT / "docs" / "RESULTS.md", name=f"reference-models-{fingerprint.slug}", section=section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
