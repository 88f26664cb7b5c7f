"""Command-line interface: parses arguments, calls the library, prints results. No logic lives here.

Errors from the library (:mod:`spaceevo.errors`) become one-line messages and exit codes (2 for
usage errors); argparse reports malformed command lines with exit code 2 as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from spaceevo import __version__
from spaceevo.errors import SpaceEvoError, UsageError
from spaceevo.interrupts import recorded_interrupts

SPACE_HELP = ("hyperspace name or YAML path (tiny, search_spaces/tiny.yaml) or candidate-space encoding (tiny-1111-0000; "
              "of a YAML of your own: my.yaml:my-1111-0000)")
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


def _device(text: str) -> str:
    """An argparse type for ``--device``: an engine of the registry or an ``ssh://`` device."""
    from spaceevo.latency.engines import check_device

    try:
        return check_device(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_engine(parser: argparse.ArgumentParser, purpose: str) -> None:
    """``--device``: the inference engine, from :data:`spaceevo.latency.engines.ENGINES`, here or on
    a device reached over ssh."""
    from spaceevo.latency.engines import DEFAULT_DEVICE, ENGINES
    from spaceevo.latency.engines.ssh import SSH_FORM

    engines = ", ".join(f"{name} ({e.label} {e.target})" for name, e in ENGINES.items())
    parser.add_argument("--device", default=DEFAULT_DEVICE, type=_device,
                        help=f"{purpose}: {engines}, or {SSH_FORM} to run ENGINE (default cpu) on a device "
                             f"reached over ssh (default: {DEFAULT_DEVICE})")


def _add_device(parser: argparse.ArgumentParser) -> None:
    _add_engine(parser, "inference engine on this host")
    parser.add_argument("--threads", type=_positive_int, default=1, help="the engine's inference threads (default: 1)")
    parser.add_argument("--tables", default=None, help="latency tables folder (default: $SPACEEVO_LATENCY_TABLES or ./latency_tables)")


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
    _emit(args, report.to_dict())


def _latency_predict(args: argparse.Namespace) -> None:
    from spaceevo.latency import predict_latency

    _emit(args, predict_latency(args.space, args.subnet, args.device, args.threads, args.tables).to_dict())


def _latency_measure(args: argparse.Namespace) -> None:
    from spaceevo.latency import measure_latency

    _emit(args, measure_latency(args.space, args.subnet, args.device, args.threads, args.tables).to_dict())


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
        preset=args.preset,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        largest_epochs=args.largest_epochs,
        seed=args.seed,
        eval_every=args.eval_every,
        resume=args.resume,
        threads=args.threads,
    )
    if result.resumed_from == result.total_epochs:
        print(f"spaceevo: {result.run_dir} already holds all {result.total_epochs} epochs of this training; nothing to do",
              file=sys.stderr)
    _emit(args, result.summary())


# ---- export / evaluate -------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> None:
    from spaceevo.deploy import export_subnet

    report = export_subnet(
        args.run, args.subnet, args.output, ptq=args.ptq, float_stages=args.float_stages, data=args.data,
        device=args.device, threads=args.threads,
    )
    _emit(args, report.to_dict())


def _evaluate(args: argparse.Namespace) -> None:
    from spaceevo.deploy import evaluate_model, evaluate_subnet

    if (args.model is None) == (args.run is None):
        raise UsageError("give either --run DIR (with --subnet) or --model FILE (.onnx, or .tflite with --device litert)")
    if args.model is not None:
        report = evaluate_model(
            args.model, data=args.data, device=args.device, threads=args.threads, tables=args.tables,
            measure=not args.no_latency,
        )
    else:
        report = evaluate_subnet(
            args.run, args.subnet, data=args.data, device=args.device, threads=args.threads, tables=args.tables,
            measure=not args.no_latency,
        )
    _emit(args, report.to_dict())


def _formats(args: argparse.Namespace) -> None:
    from spaceevo.deploy.formats import compare_formats

    report = compare_formats(args.run, args.subnet, args.formats, qat_steps=args.qat_steps, data=args.data,
                             device=args.device)
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return
    _print_table([(k, v) for k, v in data.items() if k != "formats"])
    header = ("format", "ptq_top1", "qat_top1", "weight_bits", "activation_bits", "relative_mac_cost", "native_on_device")
    table = [header] + [tuple(str(row[k]) for k in header) for row in data["formats"]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    sources = sorted({row["mac_cost_source"] for row in data["formats"]})
    print("relative_mac_cost: one MAC against one INT8 MAC; sources: " + "; ".join(sources))


# ---- score, search ---------------------------------------------------------------------------


def _score(args: argparse.Namespace) -> None:
    from spaceevo.search.api import parse_fixed_stage_ms, parse_latency_constraints, score_spaces

    scores = score_spaces(
        args.block_lut,
        args.hyperspace,
        parse_latency_constraints(args.latency_constraints),
        args.spaces,
        fixed_stage_ms=parse_fixed_stage_ms(args.fixed_stage_ms or ["0"]),
        samples=args.samples,
        seed=args.seed,
    )
    constraints = [c.latency_ms for c in scores[0].constraints]
    data = {"latency_constraints_ms": constraints, "scores": [s.to_dict() for s in scores]}
    rows = [("latency constraints ms", ", ".join(f"{c:g}" for c in constraints))] + [
        (
            s.space,
            f"Q-T {s.qt_score:.4f}  feasible {', '.join(f'{f:.3f}' for f in s.feasible_fraction)}"
            f"  top-tier loss {', '.join(f'{x:.4g}' for x in s.top_tier_loss)}",
        )
        for s in scores
    ]
    _emit(args, data, rows)


def _shard(text: str) -> tuple[int, int]:
    """``i/n`` with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got '{text}'")
    return shard


def _search(args: argparse.Namespace) -> None:
    from spaceevo.search.api import parse_fixed_stage_ms, parse_latency_constraints, search_block_lut

    constraints = parse_latency_constraints(args.latency_constraints)
    if args.run is None:
        args.run = str(Path("runs") / Path(args.hyperspace or args.space).stem)
    if args.block_lut is None:
        from spaceevo.search.pipeline import search_space

        if args.fixed_stage_ms is not None:
            raise UsageError("--fixed-stage-ms is only for --block-lut; without it the fixed stages come from this device's latency table")
        result = search_space(
            args.run, args.space, data=args.data, preset=args.preset, latency_constraints_ms=constraints,
            storage=args.storage, seed=args.seed, teacher_path=args.teacher, shard=args.shard, device=args.device,
            tables=args.tables, workers=args.workers, samples=args.samples,
        )
        if result is None:
            print(f"spaceevo: shard {args.shard[0]}/{args.shard[1]} built its block LUTs; the space search runs in "
                  "the call that finds every shard's LUT files", file=sys.stderr)
            return
        _emit(args, {**result.summary(), "plot": str(result.result_path.parent / "subnets.png")})
        return
    if args.hyperspace is None:
        raise UsageError("--block-lut needs --hyperspace NAME (the hyperspace the LUT was built for)")
    result = search_block_lut(
        args.block_lut,
        args.hyperspace,
        constraints,
        args.run,
        storage=args.storage,
        preset=args.preset,
        seed=args.seed,
        fixed_stage_ms=parse_fixed_stage_ms(args.fixed_stage_ms or ["0"]),
        samples=args.samples,
        workers=args.workers,
    )
    _emit(args, result.summary())


# ---- extract -----------------------------------------------------------------------------------


def _extract(args: argparse.Namespace) -> None:
    from spaceevo.extraction.api import extract_subnets
    from spaceevo.search.budgets import parse_latency_budgets

    result = extract_subnets(
        args.run, parse_latency_budgets(args.latency_budget), num_budgets=args.num_budgets, preset=args.preset,
        trials=args.trials, storage=args.storage, seed=args.seed, verify=not args.no_verify, device=args.device,
        threads=args.threads, tables=args.tables, finetune=args.finetune_epochs,
    )
    data = result.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return
    from spaceevo.latency.engines import ORT_DEVICE

    for r in result.results:
        measured = "" if r.measured_int8_ms is None else (
            f"  measured {r.measured_int8_ms:.4g} ms (fp32 {r.measured_fp32_ms:.4g})  test ORT INT8 {r.test_ort_int8_top1:.2f}%"
            + ("" if args.device == ORT_DEVICE else f", {args.device} INT8 {r.test_device_int8_top1:.2f}%")
        )
        print(f"{r.budget_ms:g} ms: {r.subnet}  predicted {r.predicted_int8_ms:.4g} ms  held-out {r.heldout_int8_top1:.2f}%{measured}")
        for path in (r.onnx_int8, r.onnx_fp32):
            if path:
                print(f"  {path}")
        if r.note:
            print(f"  note: {r.note}")
        if r.fallback is not None:
            f = r.fallback
            print(f"  fallback: {f.subnet}  predicted {f.predicted_int8_ms:.4g} ms  measured {f.measured_int8_ms} ms  "
                  f"held-out {f.heldout_int8_top1:.2f}%  {f.onnx_int8}")
        tuned = r.deployed().finetuned
        if tuned is not None:
            print(f"  fine-tuned ({tuned.epochs} FP32 + {tuned.qat_epochs} QAT epochs, {tuned.train_s:.0f} s): held-out INT8 "
                  f"{tuned.heldout_int8_top1:.2f}%  test ORT INT8 {tuned.test_ort_int8_top1:.2f}%  {tuned.onnx_int8}")
    _print_table([("latency budgets", result.budgets.describe())]
                 + [("predictor (k-fold)", f"Spearman {data['predictor']['spearman']}, RMSE {data['predictor']['rmse']} points")]
                 + [(k, data[k]) for k in ("pareto_csv", "pareto_png", "evaluated_csv", "predictor_json", "storage", "evaluated",
                                           "front_size", "evaluated_here", "verified_here")])


# ---- run -----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> None:
    from spaceevo.pipeline import report_rows, run_pipeline
    from spaceevo.search.budgets import parse_latency_budgets

    report = run_pipeline(
        args.run, parse_latency_budgets(args.latency_budget), num_budgets=args.num_budgets, hyperspace=args.space,
        data=args.data, preset=args.preset, seed=args.seed, device=args.device, threads=args.threads, tables=args.tables,
        finetune_epochs=args.finetune_epochs,
    )
    _emit(args, report.to_dict(), report_rows(report))


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spaceevo",
        description="Hardware-aware NAS for INT8 inference on real devices (SpaceEvo, ICCV 2023).",
    )
    parser.add_argument("--version", action="version", version=f"spaceevo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    latency = commands.add_parser("latency", help="INT8 latency tables, prediction, measurement on an inference engine")
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

    from spaceevo.train.config import PRESETS  # dataclasses only: keeps --help fast

    train = commands.add_parser(
        "train", help="train the quantized-for-all supernet of a candidate space (sandwich rule, then LSQ+ QAT; resumable)"
    )
    train.add_argument("--space", required=True, help="candidate-space encoding, e.g. tiny-1111-0000 (or my.yaml:my-1111-0000)")
    train.add_argument("--data", default="embedded",
                       help="data set: embedded (default), fashion-mnist:DIR, imagefolder:DIR or cifar10:DIR")
    train.add_argument("--run", required=True, help="run directory (config.json, checkpoints/last.pt, log.jsonl)")
    train.add_argument("--preset", default="default", choices=list(PRESETS),
                       help="preset of every training setting (default: default; smoke: a few steps, for checks)")
    train.add_argument("--epochs", type=_non_negative_int, default=None, help="FP32 epochs (default: from the preset)")
    train.add_argument("--qat-epochs", type=_non_negative_int, default=None,
                       help="LSQ+ quantization-aware epochs after the FP32 ones (default: from the preset)")
    train.add_argument("--largest-epochs", type=_non_negative_int, default=None,
                       help="the first N FP32 epochs train the largest subnet alone, as Once-for-All's "
                            "progressive shrinking starts (default: from the preset; with --epochs, the preset's "
                            "share of them)")
    train.add_argument("--seed", type=_non_negative_int, default=None, help="training seed (default: 0)")
    train.add_argument("--eval-every", type=_positive_int, default=None,
                       help="measure held-out top-1 after every N-th epoch and after the last epoch of each "
                            "phase (default: from the preset)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run from its last finished epoch")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch intra-op threads per process (default: torch's choice, one per core)")
    train.add_argument("--json", action="store_true", help="print JSON on stdout")
    train.set_defaults(
        handler=_train,
        interrupt_hint="interrupted; finished epochs are saved, run the same command with --resume to continue",
    )

    export = commands.add_parser(
        "export", help="write a trained subnet as FP32 and INT8 ONNX (PATH_fp32.onnx, PATH_int8.onnx) with metadata"
    )
    export.add_argument("--run", required=True, help="training run directory (from spaceevo train)")
    export.add_argument("--subnet", default="max", help=SUBNET_HELP + " (default: max)")
    export.add_argument("-o", "--output", required=True, help="path stem of the two ONNX files, e.g. models/tiny_max")
    export.add_argument("--ptq", action="store_true",
                        help="INT8 by ONNX Runtime post-training quantization of the FP32 model instead of the QAT model")
    export.add_argument("--float-stages", type=_non_negative_int, nargs="+", default=[], metavar="STAGE",
                        help="stages (0 = stem) the INT8 model keeps in float: one mixed INT8/FP32 model "
                             "(QAT runs only; default: none)")
    export.add_argument("--data", default=None, help="data for BN recalibration and checks (default: the run's)")
    _add_engine(export, "inference engine whose device fingerprint the metadata records; an engine with a format of its "
                        "own (litert) also gets its models (PATH_fp32.tflite, PATH_int8.tflite)")
    export.add_argument("--threads", type=_positive_int, default=1, help="threads of that fingerprint (default: 1)")
    export.add_argument("--json", action="store_true", help="print JSON on stdout")
    export.set_defaults(handler=_export)

    evaluate = commands.add_parser(
        "evaluate",
        help="test-split top-1 in PyTorch, ONNX Runtime (FP32, QAT INT8, PTQ INT8) and the --device engine (INT8), "
             "and device latency of a subnet",
    )
    target = evaluate.add_argument_group("what to evaluate (one of)")
    target.add_argument("--run", default=None, help="training run directory (from spaceevo train)")
    target.add_argument("--model", default=None,
                        help="an exported model file instead of a run (ONNX; .tflite with --device litert)")
    evaluate.add_argument("--subnet", default="max", help=SUBNET_HELP + " (with --run; default: max)")
    evaluate.add_argument("--data", default=None, help="data set (default: the run's, or the model's metadata)")
    evaluate.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _add_device(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print JSON on stdout")
    evaluate.set_defaults(handler=_evaluate)

    formats = commands.add_parser(
        "formats",
        help="test-split top-1 of a trained subnet in several number formats (INT, FP8, MX) after PTQ and a short QAT",
    )
    formats.add_argument("--run", required=True, help="training run directory (from spaceevo train)")
    formats.add_argument("--subnet", default="max", help=SUBNET_HELP + " (default: max)")
    formats.add_argument("--formats", nargs="+", default=None, metavar="NAME",
                         help="format names, see docs/formats.md (default: int8 int4 fp8_e4m3 fp8_e5m2 mxint8 mxfp8_e4m3 mxfp4)")
    formats.add_argument("--qat-steps", type=_non_negative_int, default=None,
                         help="QAT fine-tuning steps per format, 0 for none (default: 100)")
    formats.add_argument("--data", default=None, help="data set (default: the run's)")
    _add_engine(formats, "inference engine whose native formats the table marks")
    formats.add_argument("--json", action="store_true", help="print JSON on stdout")
    formats.set_defaults(handler=_formats)

    score = commands.add_parser("score", help="Q-T scores of candidate spaces on a block LUT folder")
    score.add_argument("--block-lut", required=True, metavar="DIR",
                       help="block LUT folder in the published SpaceEvo format (stage{i}_{block}_{window}.csv)")
    score.add_argument("--hyperspace", required=True, metavar="NAME", help="hyperspace name or YAML path the LUT was built for")
    score.add_argument("--latency-constraints", required=True, nargs="+", metavar="MS",
                       help="latency constraints in ms, or 'auto' (spread over the latency range of the given spaces)")
    score.add_argument("--spaces", required=True, nargs="+", metavar="ENC", help="candidate-space encodings, e.g. tiny-1111-0000")
    _add_qt_options(score)
    score.add_argument("--json", action="store_true",
                       help="print JSON on stdout; per-space feasible_fraction and top_tier_loss are lists in "
                            "the order of latency_constraints_ms")
    score.set_defaults(handler=_score)

    search = commands.add_parser(
        "search", help="evolutionary search over candidate spaces by Q-T score, on Optuna (resumable, several workers)"
    )
    search.add_argument("--block-lut", default=None, metavar="DIR",
                        help="search an existing block LUT folder (published SpaceEvo format) without training")
    search.add_argument("--hyperspace", default=None, metavar="NAME", help="hyperspace name or YAML path of --block-lut")
    search.add_argument("--space", default="tiny", metavar="HYPERSPACE",
                        help="without --block-lut: hyperspace to search, name or YAML path (default: tiny)")
    search.add_argument("--data", default="embedded", help="without --block-lut: data for the teacher and block-wise "
                        "distillation: embedded (default), fashion-mnist:DIR, imagefolder:DIR or cifar10:DIR")
    search.add_argument("--teacher", default=None, metavar="PATH",
                        help="without --block-lut: a teacher checkpoint to use instead of training one in RUN/search/")
    search.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="without --block-lut: build only distillation jobs j with j %% N == I (several processes "
                             "or machines sharing --run); the search runs once every LUT file exists")
    _add_engine(search, "latency target")
    search.add_argument("--tables", default=None, help="latency tables folder (default: $SPACEEVO_LATENCY_TABLES or ./latency_tables)")
    search.add_argument("--run", default=None, metavar="DIR",
                        help="run directory: search/study.db, search/result.json, search/best_space.yaml "
                             "(default: runs/HYPERSPACE)")
    search.add_argument("--latency-constraints", nargs="+", default=["auto"], metavar="MS",
                        help="latency constraints in ms, or 'auto' (default: four constraints spread over the "
                             "LUT's latency range, printed)")
    search.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage shared by workers: an RDB URL (sqlite:///…, postgresql://…) or "
                             "journal:PATH (default: sqlite:///RUN/search/study.db)")
    search.add_argument("--preset", default="default", choices=["smoke", "default", "full"],
                        help="population/tournament/total: smoke 16/4/48, default 100/25/1000, full (paper) "
                             "500/125/5000, capped by the hyperspace's size (default: default)")
    search.add_argument("--workers", type=_positive_int, default=1, help="processes sharing the study (default: 1)")
    _add_qt_options(search)
    search.add_argument("--json", action="store_true", help="print JSON on stdout")
    search.set_defaults(
        handler=_search,
        interrupt_hint="interrupted; finished work is saved (teacher and block-KD epochs, LUT files, evaluated spaces), "
                       "run the same command again to resume",
    )

    extract = commands.add_parser(
        "extract",
        help="most accurate INT8 subnet of a trained supernet per latency budget, answered from the accuracy/latency "
             "front of one multi-objective search (Optuna, resumable), exported and verified on the device",
    )
    extract.add_argument("--run", required=True, metavar="DIR", help="training run directory (from spaceevo train); "
                         "writes DIR/extract/ (study.db, evaluated.csv, pareto.csv, pareto.png, predictor.json, "
                         "budget_<MS>ms_*.onnx)")
    _add_latency_budgets(extract, "the smallest and largest subnets of the run's space")
    extract.add_argument("--preset", default="default", choices=["smoke", "default"],
                         help="search size: smoke 12 subnets on 256 held-out images, default 200 on the whole "
                              "held-out split (default: default)")
    extract.add_argument("--trials", type=_positive_int, default=None, metavar="N",
                         help="subnets the front search evaluates in all, across workers (default: the preset's)")
    extract.add_argument("--storage", default=None, metavar="URL",
                         help="Optuna storage shared by workers: an RDB URL or journal:PATH "
                              "(default: sqlite:///DIR/extract/study.db)")
    extract.add_argument("--seed", type=_non_negative_int, default=0, help="search seed (default: 0)")
    extract.add_argument("--no-verify", action="store_true",
                         help="skip export, latency measurement and test top-1 of the winners")
    _add_finetune(extract)
    _add_device(extract)
    extract.add_argument("--json", action="store_true", help="print JSON on stdout")
    extract.set_defaults(
        handler=_extract,
        interrupt_hint="interrupted; evaluated subnets are in the study, run the same command again to resume",
    )

    run = commands.add_parser(
        "run", help="the whole pipeline: space search, supernet training, extraction and verification per budget (resumable)"
    )
    _add_latency_budgets(run, "the hyperspace's sampled candidate spaces")
    run.add_argument("--space", default="tiny", metavar="HYPERSPACE", help="hyperspace name or YAML path (default: tiny)")
    run.add_argument("--data", default="embedded", help="embedded (default), fashion-mnist:DIR, imagefolder:DIR or cifar10:DIR")
    run.add_argument("--run", default="runs/tiny", metavar="DIR", help="run directory (default: runs/tiny)")
    run.add_argument("--preset", default="default", choices=["smoke", "default"],
                     help="size of every step: smoke (minutes, for checks) or default (default: default)")
    run.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every step (default: 0)")
    _add_finetune(run)
    _add_device(run)
    run.add_argument("--json", action="store_true", help="print JSON on stdout")
    run.set_defaults(handler=_run, interrupt_hint="interrupted; finished steps are saved, run the same command again to continue")
    return parser


def _add_latency_budgets(parser: argparse.ArgumentParser, range_of: str) -> None:
    parser.add_argument("--latency-budget", nargs="+", default=["auto"], metavar="MS",
                        help="predicted INT8 latency budgets in ms on this device, one subnet each, or 'auto' "
                             f"(default: --num-budgets budgets spread over the latency range of {range_of}, "
                             "printed)")
    parser.add_argument("--num-budgets", type=_positive_int, default=None, metavar="N",
                        help="with --latency-budget auto: how many budgets (default: 3)")


def _add_finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--finetune-epochs", type=_non_negative_int, default=0, metavar="N",
                        help="fine-tune each budget's subnet for N FP32 epochs distilled from the supernet's largest, "
                             "then one QAT epoch, and export it too (default: 0, the supernet's weights only)")


def _add_qt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed-stage-ms", nargs="+", default=None, metavar="MS",
                        help="latency of the stages the LUT does not cover (stem, fixed stages, head): one value, "
                             "or RESOLUTION=MS pairs (default: 0 for a given LUT; from this device's latency table "
                             "for the LUTs spaceevo builds)")
    parser.add_argument("--samples", type=_positive_int, default=100_000, help="subnets sampled per space (default: 100000)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="sampling and search seed (default: 0)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        with recorded_interrupts():
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
