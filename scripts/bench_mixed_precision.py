"""Which stages of a trained subnet are faster in FP32 than in INT8 on this device's engine.

For one subnet of a QAT training run, exports the all-INT8 model, one mixed model per stage with
that stage kept in float (:func:`spaceevo.quant.qat.export_int8` with ``float_stages``), the model
with every stage in float (head still INT8) and the FP32 model, and times them all interleaved on
the ``--device`` engine (:func:`spaceevo.latency.endtoend.measure_models`, guarded by the reference
model), ``--repeats`` times. Each variant's latency is reported as a ratio to the all-INT8 model of
the same pass: the median over passes and the range. Test-split top-1 of every ONNX model in the
engine and of the PyTorch simulation of the mixed networks shows what the float stages cost or gain.

Writes ``docs/results/mixed_precision.json`` and the section between the ``mixed-precision`` markers
of ``docs/RESULTS.md`` (``--no-write`` only prints).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_doc import markers, write_section  # noqa: E402
from spaceevo.deploy.evaluate import engine_top1  # noqa: E402
from spaceevo.deploy.models import fp32_model, input_shape  # noqa: E402
from spaceevo.deploy.trained import open_run  # noqa: E402
from spaceevo.io import atomic_write_json  # noqa: E402
from spaceevo.latency.endtoend import measure_models  # noqa: E402
from spaceevo.latency.fingerprint import device_fingerprint  # noqa: E402
from spaceevo.latency.measure import MeasureConfig  # noqa: E402
from spaceevo.latency.reference import stable_meter  # noqa: E402
from spaceevo.quant.qat import export_int8, extract_qat, fold_for_int8  # noqa: E402
from spaceevo.train.data import make_loader  # noqa: E402
from spaceevo.train.evaluate import top1  # noqa: E402

SECTION = markers("mixed-precision")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="QAT training run directory (from spaceevo train)")
    parser.add_argument("--subnet", default="max", help="subnet string, 'max' or 'min' (default: max)")
    parser.add_argument("--device", default="cpu", help="engine (default: cpu, ONNX Runtime)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per pass (default: 15)")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes (default: 3)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/")
    args = parser.parse_args(argv)

    run = open_run(args.run)
    if not run.quantization_aware:
        parser.error(f"--run {args.run}: the run has no QAT phase")
    subnet = run.subnet(args.subnet)
    datasets = run.load_data()
    supernet = run.calibrated(run.supernet(), subnet, datasets)
    shape = input_shape(supernet, subnet)
    static = extract_qat(supernet, subnet).eval()
    fp32_supernet, _ = run.fp32_supernet()
    fp32 = fp32_model(run.calibrated(fp32_supernet, subnet, datasets), subnet)
    stages = list(range(len(static.stages)))
    variants: list[tuple[str, tuple[int, ...]]] = [("all INT8", ())]
    variants += [(f"stage {s} FP32", (s,)) for s in stages]
    variants += [("all stages FP32, head INT8", tuple(stages))]
    models: list[onnx.ModelProto] = [export_int8(static, None, shape, float_stages=f) for _, f in variants]
    names = [name for name, _ in variants] + ["FP32 network (FP32 weights)"]
    models.append(fp32)

    test = datasets.test
    loader = make_loader(test.with_resolution(subnet.resolution), 256, False, workers=0, distributed=False)
    torch_top1 = [top1(fold_for_int8(static, f), loader) for _, f in variants] + [None]
    engine = [engine_top1(m, test, subnet.resolution, device=args.device) for m in models]

    fingerprint = device_fingerprint(args.device, args.threads)
    config = MeasureConfig(warmup=5, rounds=args.rounds, runs_per_round=3, min_round_s=0.01)
    meter = stable_meter(fingerprint)
    passes = []
    for index in range(args.repeats):
        passes.append([s.ms for s in measure_models(models, fingerprint, config, meter)])
        print(f"timing pass {index + 1}/{args.repeats} done", file=sys.stderr)
    rows = []
    for i, name in enumerate(names):
        ratios = [p[i] / p[0] for p in passes]
        rows.append({
            "variant": name,
            "ms": round(statistics.median(p[i] for p in passes), 4),
            "ratio_to_int8": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
            "engine_test_top1": round(engine[i], 2),
            "torch_test_top1": None if torch_top1[i] is None else round(torch_top1[i], 2),
        })

    date = dt.date.today().isoformat()
    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/bench_mixed_precision.py", *arguments])
    lines = [
        SECTION[0],
        "## Mixed INT8/FP32: which stages are faster in FP32",
        "",
        f"Device: `{fingerprint.describe()}`. Date: {date}. Command: `{command}`.",
        f"Run `{run.space.encoding}`, subnet `{subnet.encode()}`, {len(test)} test images (data `{run.data}`).",
        "",
        "| variant | ms | latency / all-INT8 (median, range of passes) | engine top-1 | PyTorch top-1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        torch_text = "" if row["torch_test_top1"] is None else f"{row['torch_test_top1']:.2f}"
        lines.append(
            f"| {row['variant']} | {row['ms']:.3f} | {row['ratio_to_int8']:.3f} ({row['ratio_min']:.3f}-"
            f"{row['ratio_max']:.3f}) | {row['engine_test_top1']:.2f} | {torch_text} |"
        )
    lines += [
        "",
        f"Milliseconds: median over {args.repeats} passes of the interleaved medians (reference-model scale).",
        "A ratio below 1 means the variant is faster than the all-INT8 model in the same pass. Float",
        "stages use the QAT weights unquantized; the FP32 network is the FP32 phase's weights.",
        SECTION[1],
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        atomic_write_json(ROOT / "docs" / "results" / "mixed_precision.json", {
            "device": fingerprint.to_dict(), "date": date, "command": command, "space": run.space.encoding,
            "subnet": subnet.encode(), "rows": rows,
        })
        write_section(ROOT / "docs" / "RESULTS.md", name="mixed-precision", section=section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
