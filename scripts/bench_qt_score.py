"""Measure Q-T score throughput (candidate spaces per second) on a synthetic block LUT.

The LUT has the shape of a published onnxw LUT: one file per (searchable stage, block type, width
window) of the hyperspace (132 files for onnxw), ``--rows`` rows each (published LUTs: about 1000),
spread over the hyperspace's resolutions, written in the published CSV format and read back with
:func:`spaceevo.search.lut.load_block_lut`. Latency grows with depth, width, expansion and
resolution; loss falls with them, plus noise. Each repeat scores ``--spaces`` random candidate spaces
with N = ``--samples`` subnets each under four constraints; the median, min and max over repeats are
printed with the CPU they ran on.

    nice -n 19 python scripts/bench_qt_score.py            # the issue's requirement: >= 20 spaces/s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from spaceevo.search.lut import (
    LutRow,
    format_stage_config,
    load_block_lut,
    lut_filename,
    stage_input_sizes,
    write_lut_csv,
)
from spaceevo.search.qt_score import QTScorer, auto_constraints
from spaceevo.space import BlockChoice, Hyperspace, load_hyperspace


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_synthetic_lut(directory: Path, hyperspace: Hyperspace, rows: int, seed: int) -> None:
    """One file per (stage, block, window) with ``rows`` random sub-stages of plausible figures."""
    rng = np.random.default_rng(seed)
    sizes = stage_input_sizes(hyperspace)
    for stage_index, stage in enumerate(hyperspace.searchable_stages, start=1):
        for block in hyperspace.stage_block_types(stage):
            block_cost = 0.6 + 0.2 * block.digit  # block types differ in speed ...
            block_quality = 1.0 + 0.15 * ((block.digit * 7) % 5)  # ... and in distillation loss
            for window_index, widths in enumerate(stage.windows):
                lut_rows = []
                for _ in range(rows):
                    resolution = int(rng.choice(hyperspace.resolutions))
                    size = sizes[stage_index - 1][resolution]
                    depth = int(rng.choice(stage.depths))
                    blocks = [
                        BlockChoice(int(rng.choice(block.kernels)), int(rng.choice(widths)), float(rng.choice(block.expand_ratios)))
                        for _ in range(depth)
                    ]
                    work = sum(b.width * b.kernel * max(b.expand, 1.0) for b in blocks) * size * size
                    latency = block_cost * work * 2e-7 * rng.lognormal(0, 0.1)
                    loss = block_quality / (1.0 + 0.02 * work ** 0.25) * rng.lognormal(0, 0.1)
                    lut_rows.append(
                        LutRow(format_stage_config(blocks), (1, widths[0], size, size), loss, work * 1e-6, work * 1e-8, latency)
                    )
                write_lut_csv(directory / lut_filename(stage_index, block.digit, window_index), lut_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hyperspace", default="onnxw", help="hyperspace whose LUT shape to imitate (default: onnxw)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per LUT file (default: 1000)")
    parser.add_argument("--samples", type=int, default=100_000, help="sampled subnets per space, N (default: 100000)")
    parser.add_argument("--spaces", type=int, default=50, help="spaces scored per repeat (default: 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LUT and of the spaces (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON")
    args = parser.parse_args()

    hyperspace = load_hyperspace(args.hyperspace)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_synthetic_lut(Path(tmp), hyperspace, args.rows, args.seed)
        written = time.perf_counter()
        lut = load_block_lut(tmp, hyperspace)
        loaded = time.perf_counter()
    constraints = auto_constraints(lut, seed=args.seed)
    scorer = QTScorer(lut, constraints, samples=args.samples)
    picker = random.Random(args.seed)
    spaces = [hyperspace.random_candidate_space(picker) for _ in range(args.spaces)]
    scorer.score(spaces[0], args.seed)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for space in spaces:
            scorer.score(space, args.seed)
        rates.append(len(spaces) / (time.perf_counter() - start))
    result = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "numpy": np.__version__,
        "hyperspace": hyperspace.name,
        "lut_files": len(lut.tables),
        "rows_per_file": args.rows,
        "lut_write_s": round(written - started, 2),
        "lut_load_s": round(loaded - written, 2),
        "samples_per_space": args.samples,
        "latency_constraints_ms": constraints,
        "spaces_per_repeat": args.spaces,
        "repeats": args.repeats,
        "spaces_per_s_median": round(statistics.median(rates), 1),
        "spaces_per_s_min": round(min(rates), 1),
        "spaces_per_s_max": round(max(rates), 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:<24}{value}")


if __name__ == "__main__":
    main()
