"""Do two latency tables built on one machine predict the same? One quiet, one beside a busy process.

Builds the latency table of a hyperspace (``spaceevo latency build``'s protocol: segments, then the
end-to-end calibration) into a fresh temporary folder once per condition, ``quiet`` or ``busy``
(``busy``: the script starts ``--busy-procs`` processes that run a single-threaded numpy matmul loop,
or a pure-Python spin, for the whole build, and stops them after it), then predicts ``--subnets``
random subnets (plus ``max`` and ``min``) of each of ``--candidates`` with every table and compares
each table's predictions with the first one's: median and max |ratio - 1| and the fraction within
5 %. Also printed: the CPU fingerprint, the load average around every build, each table's
``reference_ms`` (its scale) and median spread (the measurement's own noise), the ratio of the
segment entries the tables share and of their calibration subnets (measured end to end), and each
build's boundary model.

The machine's other load is whatever it is: on a shared machine "quiet" only means "no busy
process of ours". A build of the whole ``tiny`` table took 3 to 19 minutes on a 2-core VM, depending
on the other load; ``--max-segments`` samples fewer segments (tiny: no fewer than ~1,330) and
``--space`` takes a smaller hyperspace's YAML for a run of a few minutes::

    python scripts/bench_table_reproducibility.py --conditions quiet busy
    python scripts/bench_table_reproducibility.py --space small.yaml --candidates small-123-101 \\
        --calibration-samples 16 --subnets 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spaceevo.latency.build import build_latency_table  # noqa: E402
from spaceevo.latency.fingerprint import device_fingerprint  # noqa: E402
from spaceevo.latency.predictor import LatencyPredictor  # noqa: E402
from spaceevo.space import CandidateSpace, Hyperspace, load_space  # noqa: E402

DEFAULT_CANDIDATES = ("tiny-1111-0000", "tiny-5555-1111", "tiny-0123-0101", "tiny-2345-1010")
WITHIN = 0.05


BUSY_LOOPS = {
    "matmul": "import numpy as np\n"
    "a = np.random.default_rng(0).random((384, 384), dtype=np.float32)\n"
    "while os.getppid() == parent:\n"
    "    a = (a @ a) * np.float32(1e-3)\n",
    "spin": "x = 0\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100_000):\n"
    "        x += 1\n",
}
"""What a busy process runs, until it is stopped or the script is gone (killed: then it ends too)."""


class BusyProcesses:
    """``count`` single-threaded processes keeping CPUs busy while the ``with`` block runs."""

    def __init__(self, count: int, kind: str):
        self.count, self.kind = count, kind
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyProcesses":
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = f"import os\nparent = {os.getpid()}\n" + BUSY_LOOPS[self.kind]
        self.procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(self.count)]
        time.sleep(1.0 if self.count else 0.0)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait()


@dataclass
class Build:
    condition: str
    reference_ms: float
    median_spread: float
    seconds: float
    load_before: float
    load_after: float
    boundary_model: dict
    predictor: LatencyPredictor


def build(hyperspace: Hyperspace, condition: str, root: Path, args: argparse.Namespace) -> Build:
    fingerprint = device_fingerprint("cpu", args.threads)
    load_before = os.getloadavg()[0]
    with BusyProcesses(args.busy_procs if condition == "busy" else 0, args.load):
        predictor, report = build_latency_table(
            hyperspace,
            fingerprint,
            root,
            workers=args.workers,
            calibration_samples=args.calibration_samples,
            max_segments=args.max_segments,
            show_progress=False,
        )
    return Build(
        condition=condition,
        reference_ms=predictor.table.reference_ms or 0.0,
        median_spread=report.median_spread,
        seconds=report.seconds,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        boundary_model=asdict(predictor.calibration.model),
        predictor=predictor,
    )


def subnets_to_compare(hyperspace: Hyperspace, candidates: list[str], count: int, seed: int):
    """``(space encoding, architecture)``: max, min and ``count`` random subnets per candidate."""
    rng = random.Random(seed)
    archs = []
    for encoding in candidates:
        space = hyperspace.candidate_space(encoding)
        subnets = [space.max_subnet(), space.min_subnet()] + [space.random_subnet(rng) for _ in range(count)]
        archs += [(encoding, space.resolve(s)) for s in subnets]
    return archs


def ratio_summary(ratios: list[float]) -> dict:
    deviations = [abs(r - 1) for r in ratios]
    return {
        "n": len(ratios),
        "median_abs_dev": statistics.median(deviations),
        "max_abs_dev": max(deviations),
        "within_5pct": sum(d <= WITHIN for d in deviations) / len(deviations),
        "median_ratio": statistics.median(ratios),
    }


def compare(first: Build, other: Build, archs) -> dict:
    """Predictions and shared segment entries of ``other`` relative to ``first``."""
    per_space: dict[str, list[float]] = {}
    named = {}
    for encoding, arch in archs:
        a, b = first.predictor.predict_ms(arch), other.predictor.predict_ms(arch)
        per_space.setdefault(encoding, []).append(b / a)
        if arch.subnet.encode() == arch.space.max_subnet().encode() and encoding not in named:
            named[encoding] = (a, b)
    shared = sorted(set(first.predictor.table.entries) & set(other.predictor.table.entries))
    segment_ratios = [other.predictor.table.ms(k) / first.predictor.table.ms(k) for k in shared]
    measured = {(s.space, s.subnet): s.measured_ms for s in first.predictor.calibration.samples}
    calibration_ratios = [
        s.measured_ms / measured[s.space, s.subnet]
        for s in other.predictor.calibration.samples
        if (s.space, s.subnet) in measured
    ]
    return {
        "condition": other.condition,
        "reference_ms_ratio": other.reference_ms / first.reference_ms,
        "segments": ratio_summary(segment_ratios),
        "calibration": ratio_summary(calibration_ratios),
        "predictions": ratio_summary([r for ratios in per_space.values() for r in ratios]),
        "per_space": {k: ratio_summary(v) for k, v in per_space.items()},
        "max_subnet_ms": {k: [round(a, 4), round(b, 4)] for k, (a, b) in named.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="tiny", help="hyperspace name or YAML path (default: tiny)")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                        help="candidate spaces whose subnets are compared (default: %(default)s)")
    parser.add_argument("--subnets", type=int, default=40, help="random subnets per candidate space, besides max and min")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compared subnets")
    parser.add_argument("--conditions", nargs="+", choices=("quiet", "busy"), default=["quiet", "busy"],
                        help="one table is built per condition, in this order; all are compared with the first")
    parser.add_argument("--load", choices=("matmul", "spin"), default="matmul", help="what a busy process runs")
    parser.add_argument("--busy-procs", type=int, default=1, help="busy processes during a 'busy' build")
    parser.add_argument("--max-segments", type=int, default=4000,
                        help="segments measured per table (a stratified sample below the hyperspace's count; "
                             "tiny has 3,545 and samples no fewer than ~1,330)")
    parser.add_argument("--calibration-samples", type=int, default=30, help="whole subnets timed per build")
    parser.add_argument("--workers", type=int, default=2, help="processes that build segment models")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--keep", type=Path, default=None, help="build the tables under this folder and keep them")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    space = load_space(args.space)
    hyperspace = space.hyperspace if isinstance(space, CandidateSpace) else space
    fingerprint = device_fingerprint("cpu", args.threads)
    print(f"device: {fingerprint.describe()} ({fingerprint.slug}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    archs = subnets_to_compare(hyperspace, args.candidates, args.subnets, args.seed)
    with tempfile.TemporaryDirectory(prefix="table-repro-") as tmp:
        base = args.keep or Path(tmp)
        builds = []
        for i, condition in enumerate(args.conditions):
            root = base / f"{i}-{condition}"
            print(f"building table {i} ({condition}) under {root} ...", flush=True)
            b = build(hyperspace, condition, root, args)
            print(f"  {b.seconds:.0f} s, reference_ms {b.reference_ms:.6f}, median spread {b.median_spread:.4f}, "
                  f"load average {b.load_before:.2f} -> {b.load_after:.2f}, boundary model "
                  + ", ".join(f"{k} {v:.4g}" for k, v in b.boundary_model.items()), flush=True)
            builds.append(b)
        comparisons = [compare(builds[0], other, archs) for other in builds[1:]]
    for c in comparisons:
        p, s = c["predictions"], c["segments"]
        print(f"table '{c['condition']}' vs table '{builds[0].condition}': reference_ms ratio {c['reference_ms_ratio']:.4f}")
        print(f"  segment entries ({s['n']} shared): median ratio {s['median_ratio']:.4f}, "
              f"median |r-1| {s['median_abs_dev']:.4f}, max |r-1| {s['max_abs_dev']:.4f}, within 5 % {s['within_5pct']:.3f}")
        k = c["calibration"]
        print(f"  calibration subnets ({k['n']}, measured end to end): median ratio {k['median_ratio']:.4f}, "
              f"median |r-1| {k['median_abs_dev']:.4f}, max |r-1| {k['max_abs_dev']:.4f}, within 5 % {k['within_5pct']:.3f}")
        print(f"  predictions ({p['n']} subnets): median ratio {p['median_ratio']:.4f}, median |r-1| "
              f"{p['median_abs_dev']:.4f}, max |r-1| {p['max_abs_dev']:.4f}, within 5 % {p['within_5pct']:.3f}")
        for encoding, summary in c["per_space"].items():
            first_ms, other_ms = c["max_subnet_ms"][encoding]
            print(f"    {encoding}: max subnet {first_ms:.4f} vs {other_ms:.4f} ms; median |r-1| "
                  f"{summary['median_abs_dev']:.4f}, max |r-1| {summary['max_abs_dev']:.4f}, "
                  f"within 5 % {summary['within_5pct']:.3f}")
    if args.json:
        summary = {
            "device": fingerprint.slug,
            "builds": [{f.name: getattr(b, f.name) for f in fields(b) if f.name != "predictor"} for b in builds],
            "comparisons": comparisons,
        }
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
