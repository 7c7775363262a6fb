"""``ray-aekd``: the command line. Only this module knows argparse."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ray_aekd import __version__
from ray_aekd._console import set_verbose


def _demo(args: argparse.Namespace) -> int:
    from ray_aekd.cli.demo import run_demo

    result = run_demo(
        num_teachers=args.teachers,
        epochs=args.epochs,
        tolerance=args.tolerance,
        temperature=args.temperature,
        seed=args.seed,
        strategies=args.strategies,
        label_noise=args.label_noise,
        space=args.space,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
        print(f"results written to {args.json}")
    return 0


def _teachers(args: argparse.Namespace) -> int:
    from ray_aekd.config import TeachersConfig, load_config
    from ray_aekd.distributed.teachers import train_teachers

    config = load_config(TeachersConfig, args.config, args.set)
    train_teachers(config)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from ray_aekd.config import DistillConfig, load_config
    from ray_aekd.distributed.distill import distill

    config = load_config(DistillConfig, args.config, args.set)
    result = distill(config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def _upload(args: argparse.Namespace) -> int:
    from ray_aekd.tracking.upload import upload

    upload(args.run_dir, tracking_uri=args.tracking_uri)
    return 0


def _relabel(args: argparse.Namespace) -> int:
    from ray_aekd.config import DistillConfig, load_config
    from ray_aekd.distributed.soft_labels import relabel

    config = load_config(DistillConfig, args.config, args.set)
    relabel(config, overwrite=args.overwrite)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ray_aekd.distributed.sweep import sweep_from_file

    result = sweep_from_file(args.config, args.set)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0 if result.best is not None else 1


def _compare(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from ray_aekd.tracking.compare import compare, format_table
    from ray_aekd.tracking.runs import resolve_tracking_uri

    try:
        rows, plot = compare(args.tracking_uri, args.experiment, args.sweep, args.output_dir)
    except MlflowException as error:  # an unreachable or failing store: one line, as for bad input
        uri = resolve_tracking_uri(args.tracking_uri)
        raise ValueError(f"--tracking-uri: MLflow at {uri} failed ({str(error).splitlines()[0]}).") from None
    print(format_table(rows, args.tracking_uri, args.experiment, args.sweep))
    print(f"plot: {plot}; table: {plot.with_name('compare.csv')}")
    if args.promote is not None:
        from ray_aekd.tracking.compare import promote

        name, version, best = promote(rows, args.tracking_uri, args.promote)
        print(
            f"promoted: registered model {name!r} version {version} (run {best.name!r}, {best.run_id}, val/acc1 "
            f"{best.acc1:.4f}) is now models:/{name}@{args.promote}; serve it with "
            f"`mlflow models serve -m models:/{name}@{args.promote} --env-manager local`"
        )
    return 0


def _preprocess_args(args: argparse.Namespace):
    """``--mean/--std/--size`` as a declared preprocessing, or None (the model's default)."""
    if args.mean is None and args.std is None and args.size is None:
        return None
    from ray_aekd.models.preprocess import Preprocess

    if args.mean is None or args.std is None:
        raise ValueError("--mean/--std: give both (per-channel numbers, e.g. --mean 0.485,0.456,0.406), or neither.")
    values = []
    for flag, text in (("--mean", args.mean), ("--std", args.std)):
        try:
            values.append(tuple(float(v) for v in text.split(",")))
        except ValueError:
            raise ValueError(f"{flag}: got {text!r}; allowed: comma-separated numbers, e.g. 0.5,0.5,0.5.") from None
    if not all(v > 0 for v in values[1]):
        raise ValueError(f"--std: got {args.std!r}; allowed: numbers > 0.")
    return Preprocess(values[0], values[1], args.size)


def _evaluate(args: argparse.Namespace) -> int:
    import os

    from ray_aekd.tracking.evaluate import evaluate_model, format_evaluation, open_eval_data, parse_model

    source = parse_model(args.model, args.arch, _preprocess_args(args))
    data = open_eval_data(args.data, size=args.image_size)
    track = args.tracking_uri is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    result = evaluate_model(
        source, data, batch_size=args.batch_size, tracking_uri=args.tracking_uri, experiment=args.experiment,
        track=track, log=(lambda _line: None) if args.json else print,
    )  # fmt: skip
    if args.predictions:
        _write_predictions(args.predictions, data, result.predictions)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_evaluation(result))
    return 0


def _write_predictions(path: str, data, predictions: list[int]) -> None:
    import csv

    names = data.source.class_names
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "predicted"])
        for index, predicted in zip(data.indices.tolist(), predictions, strict=True):
            writer.writerow([index, names[data.source[index][1]], names[predicted]])


def _export(args: argparse.Namespace) -> int:
    from ray_aekd.tracking.evaluate import export_model, open_eval_data, parse_model

    source = parse_model(args.model, args.arch, _preprocess_args(args))
    data = open_eval_data(args.data, size=args.image_size) if args.data else None
    path, meta = export_model(source, args.output, data)
    shape = "x".join(map(str, meta["input_shape"]))
    print(
        f"exported {source.describe()} to {path}: a torch.export program, float32 [N, {shape.replace('x', ', ')}] "
        f"images in [0, 1] -> logits [N, {meta['num_classes']}], preprocessing inside "
        f"({meta['preprocess']}); load with torch.export.load({str(path)!r}).module()"
    )
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from ray_aekd.cli.quickstart import run_quickstart

    run_quickstart(
        output_dir=args.output_dir,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        workers=args.workers,
        seed=args.seed,
    )
    return 0


def _add_config_args(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-aekd", description="Adaptive ensemble knowledge distillation (AE-KD) on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="distil disagreeing teachers on the bundled digits data with each weighting strategy (CPU, ~20 s)",
        description="Train M teachers on scikit-learn's digits, each with noisy labels on its own classes, "
        "then distil a small student with average, AE-KD and MGDA weighting and compare them.",
    )
    demo.add_argument("--teachers", type=int, default=3, help="number of teachers M (default 3)")
    demo.add_argument("--epochs", type=int, default=30, help="student epochs per strategy (default 30)")
    demo.add_argument("--tolerance", type=float, default=0.6, help="AE-KD tolerance C in [1/M, 1] (default 0.6)")
    demo.add_argument("--temperature", type=float, default=4.0, help="KD temperature T > 0 (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--label-noise", type=float, default=0.7, help="label noise on each teacher's classes")
    demo.add_argument("--space", choices=("batch_mean", "per_sample"), default="batch_mean")
    demo.add_argument(
        "--strategies", nargs="+", default=["average", "aekd", "mgda"], choices=("average", "aekd", "mgda")
    )
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.set_defaults(run=_demo)

    teachers = commands.add_parser(
        "teachers",
        help="train the teacher ensemble of a config concurrently on Ray (one Tune trial per teacher)",
        description="Train the M teachers listed in a config, each as one Ray Tune trial with its own resources; "
        "save safe checkpoints, log one MLflow run per teacher, and print the ensemble's accuracy and disagreement. "
        "Uses the Ray cluster in RAY_ADDRESS, else a local Ray.",
    )
    _add_config_args(teachers, "tune_configs/teachers_digits.yaml")
    teachers.set_defaults(run=_teachers)

    distill = commands.add_parser(
        "distill",
        help="distil trained teachers into a student on Ray (teacher stages on Ray Data + a Ray Train worker group)",
        description="Stream the training data through one Ray Data stage per teacher and train the student "
        "on a Ray Train worker group with average, AE-KD or MGDA teacher weights; evaluate, checkpoint and log "
        "to MLflow every epoch. Running the same config again resumes it. Uses the Ray cluster in RAY_ADDRESS "
        "(as `ray job submit` sets it), else a local Ray.",
    )
    _add_config_args(distill, "tune_configs/distill_digits.yaml")
    distill.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    distill.set_defaults(run=_distill)

    relabel = commands.add_parser(
        "relabel",
        help="run the teachers once over data.views views and write their logits to cache.path (Parquet)",
        description="Make the soft-label cache of a distillation config: every teacher runs once over "
        "data.views deterministic views of the training split and once over the validation split, and their logits "
        "are written with the keys (index, view) as Parquet to cache.path (a folder, s3://, gs://). A distillation "
        "or sweep with cache.path set then reads them and runs no teacher. A cache already there for the same "
        "teachers and data is kept.",
    )
    _add_config_args(relabel, "tune_configs/distill_digits.yaml --set cache.path=runs/cache --set data.views=4")
    relabel.add_argument("--overwrite", action="store_true", help="replace a cache made for other settings")
    relabel.set_defaults(run=_relabel)

    sweep = commands.add_parser(
        "sweep",
        help="search C, T (any config key) with Ray Tune: one distillation per trial, MLflow parent + child runs",
        description="Run a Ray Tune search over a distillation config's keys (grid, random or Optuna; optional "
        "ASHA), one distillation run per trial, logged to MLflow as child runs of one parent run, optionally "
        "reading a soft-label cache made once for all trials. Prints the best configuration and its student.",
    )
    _add_config_args(sweep, "tune_configs/sweep_digits.yaml")
    sweep.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    sweep.set_defaults(run=_sweep)

    compare = commands.add_parser(
        "compare",
        help="rank distillation runs (an experiment, or one sweep's trials) from MLflow, with a plot",
        description="Read the distillation runs of an MLflow experiment (or the child runs of one sweep) and print "
        "them ranked by final val/acc1 with strategy, C, T, val/agreement and best epoch; write compare.csv and "
        "compare.png. Works with the local SQLite store and with a tracking server (MLFLOW_TRACKING_URI).",
    )
    compare.add_argument("--experiment", help="MLflow experiment name (default ray-aekd)")
    compare.add_argument("--sweep", metavar="RUN_ID", help="the parent run id of a sweep: compare its trials")
    compare.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    compare.add_argument("--output-dir", default=".", help="where compare.csv and compare.png go (default .)")
    compare.add_argument(
        "--promote",
        nargs="?",
        const="champion",
        metavar="ALIAS",
        help="set this registry alias (default champion) on the best finished run's registered model version",
    )
    compare.set_defaults(run=_compare)

    model_help = (
        "the model: a checkpoint folder, weights (.pt/.pth/.safetensors) with --arch, an exported program (.pt2), "
        "a TorchScript file (torchscript:FILE), an MLflow model (models:/NAME@ALIAS, models:/MODEL_ID, "
        "runs:/RUN_ID/PATH, or a local folder)"
    )

    def model_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help=model_help)
        parser.add_argument("--arch", help="with a weights file: its architecture (registry name, torchvision:, timm:)")
        parser.add_argument("--mean", help="the model's input mean, per channel (e.g. 0.485,0.456,0.406)")
        parser.add_argument("--std", help="the model's input std, per channel")
        parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE for the model")
        parser.add_argument("--image-size", type=int, help="imagefolder data: resize images to this size when read")

    evaluate = commands.add_parser(
        "evaluate",
        help="score any model (checkpoint, weights, .pt2, TorchScript, MLflow) on a held-out set",
        description="Print acc@1, acc@5, ECE, NLL and per-class accuracy of a model on a held-out set. With a tracking "
        "URI (--tracking-uri or MLFLOW_TRACKING_URI) also log an evaluation run with a confusion matrix and a "
        "reliability diagram.",
    )
    model_args(evaluate)
    evaluate.add_argument(
        "--data",
        required=True,
        help="digits (its held-out split), cifar10:ROOT or cifar100:ROOT (test split), imagefolder:DIR, config:FILE",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.add_argument("--predictions", metavar="CSV", help="also write each sample's label and prediction")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--tracking-uri", help="log an evaluation run to this MLflow store")
    evaluate.add_argument("--experiment", default="ray-aekd-eval", help="MLflow experiment (default ray-aekd-eval)")
    evaluate.set_defaults(run=_evaluate)

    export = commands.add_parser(
        "export",
        help="write a model as a torch.export program that takes [0, 1] images (preprocessing inside)",
        description="Write any model a teacher can be as a torch.export program (.pt2) with a dynamic batch "
        "dimension and its preprocessing inside: float32 [N, C, H, W] images in [0, 1] -> logits [N, K]. Class "
        "names and input shape travel inside the file.",
    )
    model_args(export)
    export.add_argument("--format", choices=("pt2",), default="pt2", help="output format (pt2: torch.export)")
    export.add_argument("--output", required=True, help="the .pt2 file to write")
    export.add_argument(
        "--data", help="the data the model is for (as evaluate's --data); needed unless --model is a checkpoint"
    )
    export.set_defaults(run=_export)

    upload = commands.add_parser(
        "upload",
        help="log a distillation run folder to MLflow after the tracking server was unreachable",
        description="Log what a distillation kept in its run folder (metrics.jsonl, result.json, plots, alpha, the "
        "student) to MLflow: into the run it opened (mlflow_run_id), logging only the epochs that run lacks, or into "
        "a new run. For runs that trained while the tracking server was down.",
    )
    upload.add_argument("run_dir", help="the run folder (output_dir/<name>)")
    upload.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the run's tracking.uri)"
    )
    upload.set_defaults(run=_upload)

    quickstart = commands.add_parser(
        "quickstart",
        help="train 3 teachers on the bundled digits, distil a student with average and AE-KD, compare (~3 min)",
        description="The whole product on one machine with no network: three disagreeing teachers on "
        "scikit-learn's digits (reused if already trained), a student distilled on Ray with average and with "
        "AE-KD weighting, both logged to MLflow, and a side-by-side table.",
    )
    quickstart.add_argument("--output-dir", default="runs/quickstart", help="where teachers and students go")
    quickstart.add_argument("--teacher-epochs", type=int, default=30)
    quickstart.add_argument("--student-epochs", type=int, default=20)
    quickstart.add_argument(
        "--workers", type=int, default=1, help="Ray Train workers (default 1: in this process, Train's local mode)"
    )
    quickstart.add_argument("--seed", type=int, default=0)
    quickstart.set_defaults(run=_quickstart)
    for command in commands.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show Ray's and MLflow's own logs and the Ray workers' output here (default: in the run "
            "folder's ray_aekd.log)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:  # before Ray starts: its processes read it from the environment
        set_verbose(True)
    try:
        return args.run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"ray-aekd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # the run stopped on NaN/Inf: which teacher, which step
        print(f"ray-aekd {args.command}: stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
