"""Compare ``spaceevo extract``'s winner with the best of N random subnets in the same latency window.

For every budget B: the subnet search of ``extract_subnets`` (no device verification), then N
distinct random subnets inside the same predicted-latency window [B − delta, B] (the search's own
sampler), all scored by the same fitness (held-out INT8 fake-quant top-1 after BN recalibration)
through the same Optuna study, so subnets both evaluated are scored once. Prints one row per budget:
the winner's held-out top-1 and evaluations, the best random subnet's, and whether the search is at
least as good (the issue's requirement).

    nice -n 19 python scripts/bench_extract.py --run runs/tiny --latency-budget 0.3 0.4 0.5 --preset smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spaceevo.search.extract import extract_subnets, open_extraction, random_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run directory (from spaceevo train)")
    parser.add_argument("--latency-budget", required=True, nargs="+", type=float, metavar="MS")
    parser.add_argument("--delta", type=float, default=None, metavar="MS", help="window width (default: 10%% of the budget)")
    parser.add_argument("--preset", default="smoke", choices=["smoke", "default"], help="search size (default: smoke)")
    parser.add_argument("--random", type=int, default=50, metavar="N", help="random subnets per budget (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="search seed (random subnets: seed + 1)")
    parser.add_argument("--storage", default=None, metavar="URL", help="Optuna storage (default: RUN/extract/study.db)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default: 1)")
    parser.add_argument("--tables", default=None, help="latency table root")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    found = extract_subnets(
        args.run, args.latency_budget, delta_ms=args.delta, preset=args.preset, storage=args.storage, seed=args.seed,
        verify=False, threads=args.threads, tables=args.tables,
    )
    search_s = time.perf_counter() - started
    extraction = open_extraction(
        args.run, preset=args.preset, storage=found.storage, seed=args.seed, threads=args.threads, tables=args.tables
    )
    rows = []
    for result, plan in zip(found.results, extraction.plan(args.latency_budget, args.delta)):
        if plan.largest is not None:
            print(f"{plan.budget_ms:g} ms: {plan.note}; no random baseline")
            continue
        baseline = random_baseline(extraction, plan.budget_ms, plan.window, args.random, args.seed + 1)
        best = baseline.best
        rows.append({
            "budget_ms": plan.budget_ms,
            "window_ms": [plan.window.low_ms, plan.window.high_ms],
            "search_top1": result.heldout_int8_top1,
            "search_evaluated": result.evaluated,
            "search_ms": result.predicted_int8_ms,
            "random_best_top1": round(best.heldout_top1, 2),
            "random_evaluated": len(baseline.evaluated),
            "random_best_ms": round(best.predicted_int8_ms, 4),
            "search_at_least_as_good": result.heldout_int8_top1 >= round(best.heldout_top1, 2),
        })
    if args.json:
        print(json.dumps({"rows": rows, "search_s": round(search_s, 1), "fitness": found.fitness}, indent=2))
        return
    print(f"fitness: held-out {found.fitness} top-1 (%); search took {search_s:.1f} s ({found.evaluated_here} evaluated)")
    header = f"{'budget ms':>9}  {'window ms':>15}  {'search top-1':>12}  {'(n)':>4}  {'best random top-1':>17}  {'(n)':>4}  ok"
    print(header)
    for row in rows:
        window = f"[{row['window_ms'][0]:.4g}, {row['window_ms'][1]:.4g}]"
        print(
            f"{row['budget_ms']:>9g}  {window:>15}  {row['search_top1']:>12.2f}  {row['search_evaluated']:>4}  "
            f"{row['random_best_top1']:>17.2f}  {row['random_evaluated']:>4}  {'yes' if row['search_at_least_as_good'] else 'NO'}"
        )


if __name__ == "__main__":
    main()
