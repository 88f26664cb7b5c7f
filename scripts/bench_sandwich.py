"""Measure the throughput of supernet training: sandwich steps per second on the embedded data.

Runs ``--warmup`` untimed and ``--steps`` timed sandwich steps (largest, smallest and two random
subnets, one optimizer step) of the FP32 phase, and with ``--qat`` of the QAT phase, on batches of
the embedded Fashion-MNIST subset, and prints training images per second (each image runs through
all four subnets). The ``default`` training budget is sized from this figure.

On CUDA (``--device cuda``, or ``auto`` when a GPU is present) the step runs as ``spaceevo train``
runs it: the FP32 phase under autocast (bfloat16, or float16 with a gradient scaler), the QAT phase
in float32, in NCHW memory format, cuDNN autotuning off (``--cudnn-benchmark`` turns it on); the clock is read after
``torch.cuda.synchronize()``. Batches come from the CPU loader and are copied inside the timed step,
as in training; loading them is not timed.

    python scripts/bench_sandwich.py --space tiny-1111-0000 --threads 1 --batch 64
    python scripts/bench_sandwich.py --space tiny-1144-1101 --device cuda --steps 100 --warmup 20
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
from spaceevo.space import CandidateSpace, load_space, require_candidate_space
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import load_data, make_loader, resize_batch
from spaceevo.train.optim import make_optimizer
from spaceevo.train.engine import Optimization
from spaceevo.train.sandwich import SandwichStep, memory_format
from spaceevo.train.weights import initialize_weights


def elastic_step(
    space: CandidateSpace,
    device: torch.device,
    phase: str,
    config: TrainConfig,
    images: torch.Tensor,
    *,
    amp: bool = True,
    seed: int = 0,
) -> SandwichStep:
    """A fresh supernet of ``space`` on ``device`` and the :class:`SandwichStep` that trains it in
    ``phase`` (``fp32`` or ``qat``), set up as ``spaceevo train`` sets up that phase: weights
    initialised, the training memory format, the FP32 phase under autocast on CUDA (``amp``), the
    QAT phase in float32 with LSQ+ quantizers initialised from ``images`` at the largest resolution;
    SGD at the phase's learning rate, no schedule. ``seed`` seeds torch and the subnet sampler."""
    torch.manual_seed(seed)
    supernet = Supernet(space)
    initialize_weights(supernet)
    supernet = supernet.to(device, memory_format=memory_format(config, device))
    if phase == "qat":
        from spaceevo.quant.qat import initialize_quantizers, prepare_qat

        supernet = prepare_qat(supernet, reduce_range=True)
        supernet.set_max()
        initialize_quantizers(supernet, resize_batch(images.to(device), max(space.hyperspace.resolutions)))
    lr = config.qat_lr if phase == "qat" else config.lr
    optimizer = make_optimizer(supernet, lr, config.momentum, config.weight_decay)
    optimization = Optimization.on(device, optimizer, amp=amp and phase != "qat")
    return SandwichStep(supernet, optimization, config, random.Random(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="tiny-1111-0000", help="candidate-space encoding")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--qat", action="store_true", help="time the QAT phase (needs spaceevo.quant.qat)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the step runs (default: auto, CUDA when a GPU is present, as in training)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="autocast in the FP32 phase on CUDA (default: on, as in training)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                        help="cuDNN autotuning on CUDA (default: off, as in training)")
    parser.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=True,
                        help="use cuDNN on CUDA (default: on; off runs PyTorch's own convolution kernels)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: as in training, on CPU only)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cudnn.enabled = args.cudnn
    space = require_candidate_space(load_space(args.space), "the benchmark")
    datasets = load_data("embedded", 28)
    loader = make_loader(datasets.train, args.batch, True, drop_last=True)
    config = TrainConfig.preset("default", batch_size=args.batch, channels_last=args.channels_last)
    first_images, _ = next(iter(loader))
    step = elastic_step(space, device, "qat" if args.qat else "fp32", config, first_images, amp=args.amp)
    amp_dtype = step.optimization.amp_dtype

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as many epochs as the steps need
    times = []
    for index, (images, labels) in enumerate(itertools.islice(batches, args.warmup + args.steps)):
        synchronize()
        start = time.perf_counter()
        step(images, labels)
        synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "space": args.space,
                "phase": "qat" if args.qat else "fp32",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)",
                "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
                "cudnn": {"enabled": args.cudnn, "benchmark": args.cudnn_benchmark} if device.type == "cuda" else None,
                "batch": args.batch,
                "channels_last": config.uses_channels_last(device.type),
                "steps": len(times),
                "step_s_median": round(median, 4),
                "step_s_quartiles": [round(q, 4) for q in statistics.quantiles(times, n=4)] if len(times) > 1 else None,
                "step_s_all": [round(t, 4) for t in times],
                "images_per_s": round(args.batch / median, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
