"""Compare ``spaceevo extract``'s answers with the best of N random subnets under the same budgets.

First the front search of ``extract_subnets`` (no device verification) and its answer per budget B;
then N distinct random subnets predicted at or under B, drawn from the search's own random
sampler (random size levels) and scored by the same fitness (held-out INT8 fake-quant top-1 after BN
recalibration, outside the study). Prints one row per budget: the answer's held-out top-1, the best
random subnet's, and whether the search is at least as good.

    nice -n 19 python scripts/bench_extract.py --run runs/tiny/supernet --latency-budget 0.3 0.4 0.5 --preset smoke
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from spaceevo.extraction.api import extract_subnets, open_extraction
from spaceevo.extraction.genome import random_subnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run directory (from spaceevo train)")
    parser.add_argument("--latency-budget", required=True, nargs="+", type=float, metavar="MS")
    parser.add_argument("--preset", default="smoke", choices=["smoke", "default"], help="search size (default: smoke)")
    parser.add_argument("--trials", type=int, default=None, metavar="N", help="subnets the search evaluates (default: the preset's)")
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
        args.run, args.latency_budget, preset=args.preset, trials=args.trials, storage=args.storage, seed=args.seed,
        verify=False, threads=args.threads, tables=args.tables,
    )
    search_s = time.perf_counter() - started
    extraction = open_extraction(
        args.run, preset=args.preset, trials=args.trials, storage=found.storage, seed=args.seed, threads=args.threads,
        tables=args.tables,
    )
    rows = []
    for result in found.results:
        rng, seen, scores = random.Random(f"random:{args.seed + 1}:{result.budget_ms!r}"), set(), []
        for _ in range(100 * args.random):
            if len(scores) == args.random:
                break
            subnet = random_subnet(extraction.space, rng)
            if subnet.encode() in seen or extraction.predict_ms(subnet) > result.budget_ms:
                continue
            seen.add(subnet.encode())
            scores.append(extraction.fitness(subnet))
        best = max(scores)
        rows.append({
            "budget_ms": result.budget_ms,
            "search_top1": result.heldout_int8_top1,
            "search_ms": result.predicted_int8_ms,
            "random_best_top1": round(best, 2),
            "random_evaluated": len(scores),
            "search_at_least_as_good": result.heldout_int8_top1 >= round(best, 2),
        })
    if args.json:
        print(json.dumps({"rows": rows, "search_s": round(search_s, 1), "evaluated": found.evaluated,
                          "predictor": found.predictor.to_dict(), "fitness": found.fitness}, indent=2))
        return
    print(f"fitness: held-out {found.fitness} top-1 (%); search took {search_s:.1f} s ({found.evaluated_here} evaluated "
          f"here, {found.evaluated} in the study)")
    print(f"{'budget ms':>9}  {'search top-1':>12}  {'best random top-1':>17}  {'(n)':>4}  ok")
    for row in rows:
        print(f"{row['budget_ms']:>9g}  {row['search_top1']:>12.2f}  {row['random_best_top1']:>17.2f}  "
              f"{row['random_evaluated']:>4}  {'yes' if row['search_at_least_as_good'] else 'NO'}")


if __name__ == "__main__":
    main()
