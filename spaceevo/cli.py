"""Command-line interface: parses arguments, calls the library, prints results. No logic lives here.

Errors from the library (:mod:`spaceevo.errors`) become one-line messages and exit codes (2 for
usage errors); argparse reports malformed command lines with exit code 2 as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from spaceevo import __version__
from spaceevo.errors import SpaceEvoError

SPACE_HELP = "hyperspace name or YAML path (tiny, search_spaces/tiny.yaml) or candidate-space encoding (tiny-1111-0000)"
SUBNET_HELP = "subnet string (d…_k…_w…_e…_r…), 'max' or 'min'"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= ``minimum``, with a message naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="ONNX Runtime execution provider (default: cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    parser.add_argument("--tables", default=None, help="latency table root (default: $SPACEEVO_LATENCY_TABLES or ./latency_tables)")


def _print_table(rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _emit(args: argparse.Namespace, data: dict, rows: Sequence[tuple[str, object]] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_table(rows if rows is not None else list(data.items()))


# ---- latency ---------------------------------------------------------------------------------


def _latency_build(args: argparse.Namespace) -> None:
    from spaceevo.latency import build_table

    report = build_table(
        args.space,
        args.device,
        args.threads,
        args.tables,
        workers=args.workers,
        calibration_samples=args.calibration_samples,
        max_segments=args.max_segments,
    )
    _emit(args, report.__dict__)


def _latency_predict(args: argparse.Namespace) -> None:
    from spaceevo.latency import predict_latency

    _emit(args, predict_latency(args.space, args.subnet, args.device, args.threads, args.tables))


def _latency_measure(args: argparse.Namespace) -> None:
    from spaceevo.latency import measure_latency

    _emit(args, measure_latency(args.space, args.subnet, args.device, args.threads, args.tables))


def _latency_validate(args: argparse.Namespace) -> None:
    from spaceevo.latency import validate_latency

    report = validate_latency(args.space, args.samples, args.seed, args.device, args.threads, args.tables)
    data = report.summary()
    if args.json:
        if args.rows:
            data["rows"] = [dict(r.__dict__, error=round(r.error, 4)) for r in report.rows]
        print(json.dumps(data, indent=2))
        return
    _print_table([(k, round(v, 4) if isinstance(v, float) else v) for k, v in data.items()])


# ---- train -----------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> None:
    from spaceevo.train.loop import train_supernet

    result = train_supernet(
        args.space,
        args.run,
        data=args.data,
        budget=args.budget,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        seed=args.seed,
        resume=args.resume,
        threads=args.threads,
    )
    _emit(args, result.summary())


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spaceevo",
        description="Hardware-aware NAS for INT8 inference on real devices (SpaceEvo, ICCV 2023).",
    )
    parser.add_argument("--version", action="version", version=f"spaceevo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    latency = commands.add_parser("latency", help="ONNX Runtime INT8 latency tables, prediction, measurement")
    latency_commands = latency.add_subparsers(dest="latency_command", required=True, metavar="ACTION")

    build = latency_commands.add_parser("build", help="measure this device's latency table for a hyperspace (resumable)")
    build.add_argument("--space", required=True, help=SPACE_HELP)
    _add_device(build)
    build.add_argument("--workers", type=_positive_int, default=2, help="processes that export and quantize segments")
    build.add_argument("--calibration-samples", type=_positive_int, default=30,
                       help="whole subnets measured to fit the boundary-cost model (default: 30)")
    build.add_argument("--max-segments", type=_positive_int, default=4000,
                       help="measure at most this many segments; larger hyperspaces are sampled and the rest "
                            "estimated by regression (default: 4000, which covers tiny exhaustively)")
    build.add_argument("--json", action="store_true", help="print JSON on stdout")
    build.set_defaults(handler=_latency_build)

    predict = latency_commands.add_parser("predict", help="predict a subnet's INT8 latency from the table")
    predict.add_argument("--space", required=True, help=SPACE_HELP)
    predict.add_argument("--subnet", required=True, help=SUBNET_HELP)
    _add_device(predict)
    predict.add_argument("--json", action="store_true", help="print JSON on stdout")
    predict.set_defaults(handler=_latency_predict)

    measure = latency_commands.add_parser("measure", help="export a subnet as FP32 and INT8 ONNX and time both")
    measure.add_argument("--space", required=True, help=SPACE_HELP)
    measure.add_argument("--subnet", required=True, help=SUBNET_HELP)
    _add_device(measure)
    measure.add_argument("--json", action="store_true", help="print JSON on stdout")
    measure.set_defaults(handler=_latency_measure)

    validate = latency_commands.add_parser("validate", help="compare predictions with end-to-end measurements")
    validate.add_argument("--space", required=True, help=SPACE_HELP)
    validate.add_argument("--samples", type=_positive_int, default=100, help="random subnets to measure (default: 100)")
    validate.add_argument("--seed", type=int, default=2023, help="sampling seed (default: 2023; calibration uses 0)")
    _add_device(validate)
    validate.add_argument("--json", action="store_true", help="print JSON on stdout")
    validate.add_argument("--rows", action="store_true", help="with --json, include every subnet's figures")
    validate.set_defaults(handler=_latency_validate)

    from spaceevo.train.config import BUDGETS  # dataclasses only: keeps --help fast

    train = commands.add_parser(
        "train", help="train the quantized-for-all supernet of a candidate space (sandwich rule, then LSQ+ QAT; resumable)"
    )
    train.add_argument("--space", required=True, help="candidate-space encoding, e.g. tiny-1111-0000")
    train.add_argument("--data", default="embedded",
                       help="data set: embedded (default), fashion-mnist:DIR, imagefolder:DIR or cifar10:DIR")
    train.add_argument("--run", required=True, help="run directory (config.json, checkpoints/last.pt, log.jsonl)")
    train.add_argument("--budget", default="default", choices=list(BUDGETS),
                       help="preset of every training setting (default: default; smoke: a few steps, for checks)")
    train.add_argument("--epochs", type=_non_negative_int, default=None, help="FP32 epochs (default: from the budget)")
    train.add_argument("--qat-epochs", type=_non_negative_int, default=None,
                       help="LSQ+ quantization-aware epochs after the FP32 ones (default: from the budget)")
    train.add_argument("--seed", type=_non_negative_int, default=None, help="training seed (default: 0)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run from its last finished epoch")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch intra-op threads per process (default: torch's choice, one per core)")
    train.add_argument("--json", action="store_true", help="print JSON on stdout")
    train.set_defaults(
        handler=_train,
        interrupt_hint="interrupted; finished epochs are saved, run the same command with --resume to continue",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except SpaceEvoError as error:
        print(f"spaceevo: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", "interrupted; finished work is saved, run the same command again to resume")
        print(f"spaceevo: {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
