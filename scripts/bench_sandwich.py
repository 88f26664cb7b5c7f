"""Measure the throughput of supernet training: sandwich steps per second on the embedded data.

Runs ``--warmup`` untimed and ``--steps`` timed sandwich steps (largest, smallest and two random
subnets, one optimizer step) of the FP32 phase, and with ``--qat`` of the QAT phase, on batches of
the embedded Fashion-MNIST subset, and prints training images per second (each image runs through
all four subnets). The ``default`` training budget is sized from this figure.

    python scripts/bench_sandwich.py --space tiny-1111-0000 --threads 1 --batch 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import torch

from spaceevo.nn import Supernet
from spaceevo.space import load_space, require_candidate_space
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import load_data, make_loader
from spaceevo.train.optim import make_optimizer
from spaceevo.train.sandwich import SandwichStep
from spaceevo.train.weights import initialize_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="tiny-1111-0000", help="candidate-space encoding")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--qat", action="store_true", help="time the QAT phase (needs spaceevo.quant.qat)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format (default: on, as in training)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    space = require_candidate_space(load_space(args.space), "the benchmark")
    datasets = load_data("embedded", 28)
    loader = make_loader(datasets.train, args.batch, True, drop_last=True)
    supernet = Supernet(space)
    initialize_weights(supernet)
    config = TrainConfig.preset("default", batch_size=args.batch, channels_last=args.channels_last)
    if args.qat:
        from spaceevo.quant.qat import initialize_quantizers, prepare_qat

        supernet = prepare_qat(supernet, reduce_range=True)
        supernet.set_max()
        images, _ = next(iter(loader))
        initialize_quantizers(supernet, images)
    if args.channels_last:
        supernet = supernet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(supernet, config.lr, config.momentum, config.weight_decay)
    step = SandwichStep(supernet, optimizer, None, config, random.Random(0))
    times = []
    for index, (images, labels) in enumerate(itertools.islice(loader, args.warmup + args.steps)):
        start = time.perf_counter()
        step(images, labels)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "space": args.space,
                "phase": "qat" if args.qat else "fp32",
                "threads": args.threads,
                "batch": args.batch,
                "channels_last": args.channels_last,
                "step_s_median": round(median, 3),
                "step_s_all": [round(t, 3) for t in times],
                "images_per_s": round(args.batch / median, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
