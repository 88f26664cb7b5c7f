"""Fine-tuned against supernet-weight answers of ``spaceevo extract --finetune-epochs N``, paired on the
same test images.

Reads what ``spaceevo extract --finetune-epochs N --json`` printed (verified, so each budget's
deployed answer has its supernet-weight INT8 model and its fine-tuned one), runs both INT8 models in ONNX
Runtime on the run's test split and prints, per distinct answer, the test top-1 of each and the
paired bootstrap 95 % interval of the difference (images resampled); then the mean difference over
the answers with images and answers resampled (:func:`spaceevo.stats.paired_bootstrap`).

    spaceevo extract --run runs/tiny/supernet --finetune-epochs 3 --json > extract.json
    python scripts/bench_finetune.py --run runs/tiny/supernet --results extract.json [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from spaceevo.deploy.evaluate import engine_predictions
from spaceevo.deploy.trained import open_run
from spaceevo.stats import paired_bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run directory, extracted with --finetune-epochs N")
    parser.add_argument("--results", required=True, help="the JSON that spaceevo extract --finetune-epochs N --json printed")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    run = open_run(args.run)
    test = run.load_data().test
    labels = np.asarray(test.targets)
    answers: dict[str, dict] = {}
    for result in json.loads(Path(args.results).read_text())["results"]:
        row = result
        while row.get("fallback"):
            row = row["fallback"]
        if not row.get("finetuned") or not row.get("onnx_int8"):
            raise SystemExit(f"{args.results}: budget {result['budget_ms']} ms has no verified or no fine-tuned model; "
                             "extract with --finetune-epochs N and verification")
        entry = answers.setdefault(row["subnet"], {"subnet": row["subnet"], "budgets_ms": [], "row": row})
        entry["budgets_ms"].append(float(result["budget_ms"]))

    differences, report = [], []
    for entry in answers.values():
        row = entry["row"]
        resolution = run.space.subnet(row["subnet"]).resolution
        correct = {}
        for name, path in (("supernet", row["onnx_int8"]), ("finetuned", row["finetuned"]["onnx_int8"])):
            predictions = engine_predictions(onnx.load(path), test, resolution, args.threads, name=path)
            correct[name] = (predictions == labels).astype(np.float64) * 100.0
        difference = correct["finetuned"] - correct["supernet"]
        differences.append(difference)
        interval = paired_bootstrap(difference)
        report.append({
            "subnet": row["subnet"], "budgets_ms": entry["budgets_ms"], "predicted_int8_ms": float(row["predicted_int8_ms"]),
            "measured_int8_ms": row["measured_int8_ms"], "finetune_s": row["finetuned"]["train_s"],
            "heldout_supernet": float(row["heldout_int8_top1"]), "heldout_finetuned": float(row["finetuned"]["heldout_int8_top1"]),
            "test_supernet": round(float(correct["supernet"].mean()), 2), "test_finetuned": round(float(correct["finetuned"].mean()), 2),
            "gain_points": round(interval.mean, 2), "ci95": [round(interval.low, 2), round(interval.high, 2)],
        })
    overall = paired_bootstrap(np.stack(differences))
    summary = {"answers": report, "mean_gain_points": round(overall.mean, 2), "ci95": [round(overall.low, 2), round(overall.high, 2)],
               "test_images": int(len(labels)), "resampled": "images and answers"}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print("| budgets (ms) | predicted INT8 ms | held-out: supernet / fine-tuned | test ORT INT8: supernet / fine-tuned | gain [95 % CI] |")
    print("|---|---:|---:|---:|---:|")
    for r in report:
        print(f"| {', '.join(f'{b:g}' for b in r['budgets_ms'])} | {r['predicted_int8_ms']:.3f} | {r['heldout_supernet']:.1f} / "
              f"{r['heldout_finetuned']:.1f} | {r['test_supernet']:.2f} / {r['test_finetuned']:.2f} | "
              f"{r['gain_points']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] |")
    print(f"mean over {len(report)} answers: {summary['mean_gain_points']:+.2f} points, 95 % CI "
          f"[{summary['ci95'][0]:+.2f}, {summary['ci95'][1]:+.2f}] ({summary['test_images']} test images; {summary['resampled']} resampled)")


if __name__ == "__main__":
    main()
