"""Measure supernet training against the hardware: the elastic sandwich step against the same four
subnets trained as static networks.

Per case (space, phase, batch) the script runs, interleaved in one process, ``--reps`` repetitions
of two timed blocks of ``--steps`` steps on the same batches:

(a) elastic: the project's :class:`~spaceevo.train.sandwich.SandwichStep` on the project's
    :class:`~spaceevo.nn.Supernet`, set up as ``spaceevo train`` sets up the phase
    (``bench_sandwich.elastic_step``); every step draws the largest, the smallest and two random
    subnets, as in training;
(b) static, the physical reference: the four subnets each step of (a) drew, extracted as static
    networks (:meth:`Supernet.extract`, :func:`~spaceevo.quant.qat.extract_qat` in the QAT phase)
    and trained one after another on the same batch, in the same precision and memory format, with
    the same loss (label-smoothed cross-entropy for the largest, KL distillation from its logits for
    the others) and an SGD optimizer each: per network zero_grad, forward, backward, step. The
    static networks are warmed up by one untimed pass over the repetition's steps first, as a static
    network in training has long seen its shapes.

Each block is timed between two device synchronisations; batches are prepared before the block and
copied to the device inside the step, as in training. Images per second count each batch once
(each image runs through four subnets in both blocks); ``ratio`` is elastic / static images per
second, 1.0 when the elastic supernet trains as fast as the hardware trains the same networks. The
figures are medians over the repetitions, with the range over them. On CPU the record also holds
each block's process CPU time per step and their ratio (``cpu_ratio``, static / elastic CPU time):
on a machine shared with other work, wall time counts the waits for a core and CPU time does not.

Data: the embedded Fashion-MNIST subset for spaces it fits (``tiny``), else synthetic images at the
largest resolution (e.g. ``onnxw``, 3 x 224 x 224, 1,000 classes). ``--resolution R`` trains every
subnet at R px (one of the space's resolutions); without it, subnets draw their resolutions as in
training. ``--profile FILE`` runs one more (untimed) repetition under :mod:`torch.profiler` and
writes, per case and block, a summary (wall and device time per step, kernel launches, host syncs)
and the operators sorted by self device (on CPU: self CPU) time and by total CPU time.

    python scripts/bench_training.py --space tiny-1144-1101 --device cpu --threads 2 --phase fp32 qat
    python scripts/bench_training.py --space onnxw-151122-023231 --device cuda --resolution 224 \\
        --batch 128 --steps 8 --reps 3 --json --profile profile.txt
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType

from bench_sandwich import elastic_step
from spaceevo.errors import DataError, UsageError
from spaceevo.io import atomic_write_text
from spaceevo.space import CandidateSpace, Subnet, load_space, require_candidate_space
from spaceevo.train.allocator import keep_freed_memory
from spaceevo.train.config import TrainConfig
from spaceevo.train.data import DataSpec, make_loader, resize_batch
from spaceevo.train.loop import load_space_data
from spaceevo.train.optim import make_optimizer
from spaceevo.train.sandwich import SandwichStep, distillation_loss

PHASES = ("fp32", "qat")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One measurement: a candidate space (its resolutions possibly restricted, :func:`with_resolution`),
    a training phase and a batch size."""

    space: CandidateSpace
    phase: str
    batch: int


@dataclass
class StaticNet:
    """An extracted subnet and the optimizer that trains it."""

    net: nn.Module
    optimizer: torch.optim.Optimizer


def with_resolution(space: CandidateSpace, resolution: int | None) -> CandidateSpace:
    """``space`` with its resolutions restricted to ``resolution`` (None: unchanged); UsageError
    naming the allowed values if the space does not allow it."""
    if resolution is None:
        return space
    allowed = space.hyperspace.resolutions
    if resolution not in allowed:
        raise UsageError(f"--resolution {resolution} is not a resolution of {space.encoding}; allowed: {list(allowed)}")
    hyperspace = dataclasses.replace(space.hyperspace, resolutions=(resolution,))
    return dataclasses.replace(space, hyperspace=hyperspace)


def batches(space: CandidateSpace, batch: int, device: torch.device, seed: int = 0) -> tuple[str, Iterator[Batch]]:
    """The data name and an endless stream of CPU training batches for ``space``: the embedded data
    through the training loader when it fits the space, else synthetic normal images at the largest
    resolution (a few distinct batches, cycled) with uniform labels."""
    hyperspace = space.hyperspace
    try:
        datasets = load_space_data(hyperspace, DataSpec.parse("embedded"))
    except DataError:
        generator = torch.Generator().manual_seed(seed)
        size = max(hyperspace.resolutions)
        made = []
        for _ in range(4):
            images = torch.randn(batch, hyperspace.in_channels, size, size, generator=generator)
            labels = torch.randint(hyperspace.num_classes, (batch,), generator=generator)
            if device.type == "cuda":
                images, labels = images.pin_memory(), labels.pin_memory()
            made.append((images, labels))
        return "synthetic", itertools.cycle(made)
    loader = make_loader(datasets.train, batch, True, seed=seed, drop_last=True)
    return "embedded", itertools.chain.from_iterable(itertools.repeat(loader))


def extract(step: SandwichStep, subnet: Subnet, phase: str, config: TrainConfig) -> StaticNet:
    """``subnet`` of the elastic step's supernet as a static network in the step's memory format,
    with an optimizer as the elastic one (same learning rate, momentum and weight decay)."""
    if phase == "qat":
        from spaceevo.quant.qat import extract_qat

        net = extract_qat(step.supernet, subnet)
    else:
        net = step.supernet.extract(subnet)
    net = net.to(memory_format=step.memory_format).train()
    lr = step.optimization.optimizer.param_groups[0]["lr"]
    return StaticNet(net, make_optimizer(net, lr, config.momentum, config.weight_decay))


def static_step(
    step: SandwichStep, nets: Sequence[tuple[Subnet, StaticNet]], images: torch.Tensor, labels: torch.Tensor
) -> None:
    """Train the static networks of one sandwich step one after another on one batch: the first
    (largest) on the labels, the others distilled from its logits, as the elastic step does."""
    images = images.to(step.device, non_blocking=True)
    labels = labels.to(step.device, non_blocking=True)
    scaler = step.optimization.scaler
    teacher = None
    for subnet, static in nets:
        static.optimizer.zero_grad(set_to_none=True)
        inputs = resize_batch(images, subnet.resolution).contiguous(memory_format=step.memory_format)
        with step.optimization.autocast():
            logits = static.net(inputs).float()
        if teacher is None:
            loss = F.cross_entropy(logits, labels, label_smoothing=step.config.label_smoothing)
            teacher = F.softmax(logits.detach(), dim=1)
        else:
            loss = distillation_loss(logits, teacher)
        step.optimization.backward(loss)
        if scaler is not None:
            scaler.step(static.optimizer)
        else:
            static.optimizer.step()
    if scaler is not None:
        scaler.update()


def timed(device: torch.device, run: Callable[[], None]) -> float:
    """Seconds ``run`` takes, between two device synchronisations."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


class Bench:
    """The elastic step and its static reference for one case, and their interleaved repetitions."""

    def __init__(self, case: Case, device: torch.device, config: TrainConfig, steps: int, amp: bool):
        self.case, self.device, self.config, self.steps = case, device, config, steps
        self.data, self.stream = batches(case.space, case.batch, device)
        first_images, _ = next(self.stream)
        self.step = elastic_step(case.space, device, case.phase, config, first_images, amp=amp)
        self.kept: dict[Subnet, StaticNet] = {}  # the largest and smallest networks, trained across repetitions
        self.cpu_seconds: list[tuple[float, float]] = []  # per repetition: the blocks' process CPU time

    def warm_up(self, steps: int) -> None:
        for images, labels in itertools.islice(self.stream, steps):
            self.step(images, labels)

    def repetition(
        self,
        elastic_context: contextlib.AbstractContextManager = contextlib.nullcontext(),
        static_context: contextlib.AbstractContextManager = contextlib.nullcontext(),
    ) -> tuple[float, float]:
        """One timed block of elastic steps, then one of static steps on the subnets they drew;
        returns both blocks' seconds."""
        data = list(itertools.islice(self.stream, self.steps))
        drawn: list[tuple[Subnet, ...]] = []

        def elastic() -> None:
            for images, labels in data:
                drawn.append(self.step(images, labels).subnets)

        cpu_start = time.process_time()
        with elastic_context:
            elastic_s = timed(self.device, elastic)
        elastic_cpu = time.process_time() - cpu_start
        keep = {self.step.max_subnet, self.step.min_subnet}
        nets = dict(self.kept)
        for subnet in {s for subnets in drawn for s in subnets} - nets.keys():
            nets[subnet] = extract(self.step, subnet, self.case.phase, self.config)
        self.kept = {s: n for s, n in nets.items() if s in keep}
        plan = [([(s, nets[s]) for s in subnets], batch) for subnets, batch in zip(drawn, data)]

        def static() -> None:
            for step_nets, (images, labels) in plan:
                static_step(self.step, step_nets, images, labels)

        static()  # warm-up: every network has seen its shapes before it is timed
        cpu_start = time.process_time()
        with static_context:
            static_s = timed(self.device, static)
        self.cpu_seconds.append((elastic_cpu, time.process_time() - cpu_start))
        return elastic_s, static_s


def _figure(value: float) -> float:
    """``value`` to four significant digits (images per second span 0.1 to 10,000 and more)."""
    return float(f"{value:.4g}")


def measure(
    case: Case, device: torch.device, config: TrainConfig, *, steps: int, reps: int, warmup: int, amp: bool
) -> tuple[dict, Bench]:
    """The figures of one case (the JSON object the script prints) and its bench, ready for more."""
    bench = Bench(case, device, config, steps, amp)
    bench.warm_up(warmup)
    elastic, static = [], []
    for _ in range(reps):
        elastic_s, static_s = bench.repetition()
        elastic.append(case.batch * steps / elastic_s)
        static.append(case.batch * steps / static_s)
    elastic_median, static_median = statistics.median(elastic), statistics.median(static)
    ratios = [e / s for e, s in zip(elastic, static)]
    step = bench.step
    record = {
        "space": case.space.encoding,
        "phase": case.phase,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "batch": case.batch,
        "resolutions": list(case.space.hyperspace.resolutions),
        "data": bench.data,
        "amp": str(step.optimization.amp_dtype).replace("torch.", "") if step.optimization.amp_dtype else None,
        "channels_last": step.memory_format == torch.channels_last,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None,
        "steps": steps,
        "reps": reps,
        "elastic_images_per_s": _figure(elastic_median),
        "static_images_per_s": _figure(static_median),
        "ratio": round(elastic_median / static_median, 3),
        "elastic_step_s": _figure(case.batch / elastic_median),
        "static_step_s": _figure(case.batch / static_median),
        "elastic_images_per_s_range": [_figure(min(elastic)), _figure(max(elastic))],
        "static_images_per_s_range": [_figure(min(static)), _figure(max(static))],
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "elastic_images_per_s_reps": [_figure(v) for v in elastic],
        "static_images_per_s_reps": [_figure(v) for v in static],
    }
    if device.type == "cpu":
        cpu_ratios = [s / e for e, s in bench.cpu_seconds]
        record.update(
            elastic_cpu_step_s=_figure(statistics.median(e for e, _ in bench.cpu_seconds) / steps),
            static_cpu_step_s=_figure(statistics.median(s for _, s in bench.cpu_seconds) / steps),
            cpu_ratio=round(statistics.median(cpu_ratios), 3),
            cpu_ratio_range=[round(min(cpu_ratios), 3), round(max(cpu_ratios), 3)],
        )
    return record, bench


def profile_repetition(bench: Bench, record: dict) -> str:
    """Profile one more repetition: per block a summary and the operator tables (top 30 rows)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profilers = {"elastic": profiler(activities=activities), "static": profiler(activities=activities)}
    started = time.perf_counter()
    elastic_s, static_s = bench.repetition(profilers["elastic"], profilers["static"])
    title = (
        f"{record['space']} {record['phase']} {record['device_name']} batch {record['batch']} "
        f"resolutions {record['resolutions']}: {bench.steps} steps per block (profiled repetition "
        f"{time.perf_counter() - started:.1f} s)"
    )
    lines = ["=" * len(title), title, "=" * len(title)]
    for name, seconds in (("elastic", elastic_s), ("static", static_s)):
        events = profilers[name].key_averages()
        summary = profile_summary(profilers[name], seconds, bench.steps, cuda)
        lines += [f"--- {name}: {json.dumps(summary)}"]
        sorts = (("self_device_time_total" if cuda else "self_cpu_time_total"), "cpu_time_total")
        for sort in sorts:
            lines += [f"--- {name}, sorted by {sort}", events.table(sort_by=sort, row_limit=30, max_name_column_width=70)]
    return "\n".join(lines) + "\n"


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


LAYOUT_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::reshape", "aten::flatten", "aten::slice",
    "aten::select", "aten::as_strided", "aten::alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::contiguous", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh", "aten::result_type",
}


def profile_summary(profiler, seconds: float, steps: int, cuda: bool) -> dict:
    """Per step: wall time (under the profiler), operators, the operators that compute (innermost
    aten operators that are no view, reshape or allocation: about the kernels a GPU would launch),
    host reads (``.item()`` and friends), copies and the optimizer's CPU time; on CUDA also the
    device's busy time, kernel launches, synchronisations and memcpy calls."""
    events = profiler.key_averages()
    compute_ops = sum(
        1
        for e in profiler.events()
        if e.name.startswith("aten::")
        and e.name not in LAYOUT_OPS
        and not any(child.name.startswith("aten::") for child in e.cpu_children)
    )

    def total(names: Sequence[str], field: str = "count") -> float:
        return sum(getattr(e, field) for e in events if e.key in names)

    per_step = {
        "wall_ms": 1e3 * seconds / steps,
        "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
        "compute_ops": compute_ops / steps,
        "host_reads": total(("aten::_local_scalar_dense",)) / steps,
        "aten_copy_": total(("aten::copy_",)) / steps,
        "optimizer_cpu_ms": total([e.key for e in events if e.key.startswith("Optimizer.step")], "cpu_time_total") / 1e3 / steps,
    }
    if cuda:  # device time as the profiler's table sums it: kernels, copies and memsets, once each
        device_us = sum(
            e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        per_step.update(
            device_ms=device_us / 1e3 / steps,
            device_busy=device_us / 1e6 / seconds if seconds > 0 else None,
            kernel_launches=total(LAUNCHES) / steps,
            syncs=total(SYNCS) / steps,
            memcpy=total(("cudaMemcpyAsync", "cudaMemcpy")) / steps,
        )
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in per_step.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", nargs="+", default=["tiny-1144-1101"], help="candidate-space encoding(s)")
    parser.add_argument("--phase", nargs="+", choices=PHASES, default=["fp32"], help="training phase(s)")
    parser.add_argument("--batch", nargs="+", type=int, default=[64], help="batch size(s)")
    parser.add_argument("--resolution", nargs="+", type=int, default=[None],
                        help="train every subnet at this many px (default: draw as in training)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: CUDA when present)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (elastic block, static block)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed elastic steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="autocast in the FP32 phase on CUDA (default: on, as in training)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                        help="cuDNN autotuning on CUDA, for both blocks (default: off, as in training)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per case")
    parser.add_argument("--profile", metavar="FILE", help="write a torch.profiler summary of one more repetition per case")
    args = parser.parse_args(argv)

    for name in ("steps", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or any(b < 1 for b in args.batch):
        parser.error("--warmup must be at least 0 and every --batch at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training does
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    try:
        spaces = [require_candidate_space(load_space(s), "the benchmark") for s in args.space]
        cases = [
            Case(with_resolution(space, resolution), phase, batch)
            for space, resolution, phase, batch in itertools.product(spaces, args.resolution, args.phase, args.batch)
        ]
    except UsageError as error:
        parser.error(str(error))
    profile: list[str] | None = [] if args.profile else None
    for case in cases:
        config = TrainConfig.preset("default", batch_size=case.batch)
        record, bench = measure(case, device, config, steps=args.steps, reps=args.reps, warmup=args.warmup, amp=args.amp)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(
                f"{record['space']} {record['phase']} {record['device_name']} batch {record['batch']} "
                f"r{'/'.join(map(str, record['resolutions']))}: elastic {record['elastic_images_per_s']} images/s "
                f"{record['elastic_images_per_s_range']}, static {record['static_images_per_s']} "
                f"{record['static_images_per_s_range']}, ratio {record['ratio']} {record['ratio_range']}"
                + (f", CPU-time ratio {record['cpu_ratio']} {record['cpu_ratio_range']}" if "cpu_ratio" in record else ""),
                flush=True,
            )
        if profile is not None:
            profile.append(profile_repetition(bench, record))
            atomic_write_text(args.profile, "\n".join(profile))


if __name__ == "__main__":
    main(sys.argv[1:])
