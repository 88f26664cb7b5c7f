"""Compare the activation fake-quantization op of QAT with PyTorch's learnable fake-quant op.

Times forward + backward of :class:`spaceevo.quant.lsq._LsqPerTensorFakeQuant` and of
``torch._fake_quantize_learnable_per_tensor_affine`` on activation shapes of the tiny space's
largest subnet (batch 64, channels-last as in training), interleaved round by round so that both see
the same machine load, and prints each one's median milliseconds and the ratio's median and range
over the rounds.

    python scripts/bench_lsq.py --threads 2 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from spaceevo.quant.lsq import _LsqPerTensorFakeQuant

SHAPES = ((64, 96, 32, 32), (64, 192, 16, 16), (64, 384, 8, 8), (64, 128, 4, 4))
"""Activation shapes of tiny-1144-1101's largest subnet at resolution 32 (expanded MBConv inputs and a
late stage)."""


def _time_ms(run: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape")
    parser.add_argument("--repeats", type=int, default=10, help="forward + backward calls per timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        x = (torch.randn(shape, generator=generator) * 2).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        upstream = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
        scale = torch.tensor([0.03], requires_grad=True)
        zero_point = torch.tensor([120.0], requires_grad=True)

        def pytorch_op() -> None:
            torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, 0, 255, 1.0).backward(upstream)

        def ours() -> None:
            _LsqPerTensorFakeQuant.apply(x, scale, zero_point, 255, True).backward(upstream)

        pytorch_op(), ours()  # warm-up
        times: dict[str, list[float]] = {"pytorch": [], "ours": []}
        for _ in range(args.rounds):
            times["pytorch"].append(_time_ms(pytorch_op, args.repeats))
            times["ours"].append(_time_ms(ours, args.repeats))
        ratios = [p / o for p, o in zip(times["pytorch"], times["ours"])]
        rows.append(
            {
                "shape": list(shape),
                "pytorch_ms": round(statistics.median(times["pytorch"]), 2),
                "ours_ms": round(statistics.median(times["ours"]), 2),
                "speedup_median": round(statistics.median(ratios), 2),
                "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)],
            }
        )
    print(json.dumps({"threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                      "op": "forward + backward, per-tensor uint8", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
