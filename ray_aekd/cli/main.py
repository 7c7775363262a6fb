"""``ray-aekd``: the command line. Only this package knows argparse.

One ``_add_<command>`` function defines each command's flags (the shared ones come from
``ray_aekd.cli._options``) and one ``_<command>`` function runs it. Nothing heavy is imported
before a command runs: ``--help``, ``--check`` and ``--print-config`` import neither torch, Ray
nor MLflow.
"""

from __future__ import annotations

import argparse
import linecache
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray_aekd import __version__
from ray_aekd._console import set_verbose
from ray_aekd._names import GRADIENT_SPACES, MIN_NORM_STRATEGIES
from ray_aekd.cli._options import (
    add_config_flags,
    add_json_flag,
    add_output_dir_flag,
    add_tracking_flags,
    add_verbose_flag,
    check_outputs,
    config_command,
    json_stdout,
    overrides,
    tracking_uri_for_this_command,
    write_json,
)

__all__ = ["build_parser", "main"]

#: What the shorthand flags set in a teachers or distillation config ...
_CONFIG_KEYS = {"tracking_uri": "tracking.uri", "experiment": "tracking.experiment", "output_dir": "output_dir"}
#: ... and in a sweep config (tracking is the base distillation config's).
_SWEEP_KEYS = {
    "tracking_uri": "overrides.tracking.uri",
    "experiment": "overrides.tracking.experiment",
    "output_dir": "output_dir",
}


# --- running the commands -------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    check_outputs(args, [], None, tracks=False)  # --json PATH
    from ray_aekd.cli.demo import run_demo

    with json_stdout(args):
        result = run_demo(
            num_teachers=args.teachers, epochs=args.epochs, tolerance=args.tolerance, temperature=args.temperature,
            seed=args.seed, strategies=args.strategies, label_noise=args.label_noise, space=args.space,
        )  # fmt: skip
    write_json(args, result)
    if args.json not in (None, "-"):
        print(f"results written to {args.json}")
    return 0


def _teachers(args: argparse.Namespace) -> int:
    from ray_aekd.config import TeachersConfig, load_config

    def checks(config: TeachersConfig) -> None:
        check_outputs(args, [("output_dir", config.output_dir)], config.tracking.uri)

    load = lambda: load_config(TeachersConfig, args.config, overrides(args, _CONFIG_KEYS))  # noqa: E731
    config = config_command(args, load, checks)
    if config is None:
        return 0
    from ray_aekd.distributed.teachers import train_teachers

    with json_stdout(args):
        result = train_teachers(config)
    write_json(args, result)
    return 0


def _distill_outputs(args: argparse.Namespace, config: Any) -> None:
    check_outputs(args, [("output_dir", config.output_dir), ("storage_path", config.storage_path)], config.tracking.uri)


def _distill(args: argparse.Namespace) -> int:
    from ray_aekd.config import DistillConfig, load_config

    load = lambda: load_config(DistillConfig, args.config, overrides(args, _CONFIG_KEYS))  # noqa: E731
    config = config_command(args, load, lambda c: _distill_outputs(args, c))
    if config is None:
        return 0
    from ray_aekd.distributed.distill import distill

    with json_stdout(args):
        result = distill(config)
    write_json(args, result)
    return 0


def _relabel(args: argparse.Namespace) -> int:
    from ray_aekd.config import DistillConfig, load_config

    def checks(config: DistillConfig) -> None:
        if config.cache.path is None:  # as the run says (distributed/soft_labels.py), before torch
            raise ValueError("cache.path: got None; allowed: a folder or URI to write the soft-label cache to.")
        check_outputs(args, [("cache.path", config.cache.path)], None, tracks=False)

    load = lambda: load_config(DistillConfig, args.config, overrides(args, {"tracking_uri": "tracking.uri"}))  # noqa: E731
    config = config_command(args, load, checks)
    if config is None:
        return 0
    from ray_aekd.distributed.soft_labels import relabel

    with json_stdout(args):
        manifest = relabel(config, overwrite=args.overwrite)
    write_json(args, manifest)
    return 0


def _sweep_yaml(loaded: tuple[Any, dict[str, Any]]) -> str:
    """``--print-config`` of a sweep: the sweep config, then its base with the overrides."""
    from ray_aekd.config import DistillConfig, apply_preset, dump_yaml, from_dict

    sweep, base = loaded
    resolved = from_dict(DistillConfig, apply_preset(base))
    return f"{dump_yaml(sweep)}---\n# base ({sweep.base}) with the overrides, as every trial starts from it\n" + (
        dump_yaml(resolved)
    )


def _sweep_outputs(args: argparse.Namespace, loaded: tuple[Any, dict[str, Any]]) -> None:
    from ray_aekd.config import DistillConfig, apply_preset, from_dict

    sweep, base = loaded
    config = from_dict(DistillConfig, apply_preset(base))
    outputs = [("output_dir", sweep.output_dir), ("storage_path", sweep.storage_path)]
    outputs += [("overrides.storage_path", config.storage_path), ("overrides.cache.path", config.cache.path)]
    check_outputs(args, outputs, config.tracking.uri)


def _sweep(args: argparse.Namespace) -> int:
    from ray_aekd.config import load_sweep

    load = lambda: load_sweep(args.config, overrides(args, _SWEEP_KEYS))  # noqa: E731
    loaded = config_command(args, load, lambda c: _sweep_outputs(args, c), describe=_sweep_yaml)
    if loaded is None:
        return 0
    from ray_aekd.distributed.sweep import run_sweep

    with json_stdout(args):
        result = run_sweep(*loaded)
    write_json(args, result)
    return 0 if result.best is not None else 1


def _compare(args: argparse.Namespace) -> int:
    check_outputs(args, [("--output-dir", args.output_dir)], None, tracks=False)
    from mlflow.exceptions import MlflowException

    from ray_aekd.tracking.compare import compare, format_table
    from ray_aekd.tracking.runs import resolve_tracking_uri

    try:
        rows, plot = compare(args.tracking_uri, args.experiment, args.sweep, args.output_dir)
    except MlflowException as error:  # an unreachable or failing store: one line, as for bad input
        uri = resolve_tracking_uri(args.tracking_uri)
        raise ValueError(f"--tracking-uri: MLflow at {uri} failed ({str(error).splitlines()[0]}).") from None
    table = plot.with_name("compare.csv")
    write_json(args, {"runs": rows, "plot": str(plot), "table": str(table)})
    if args.json != "-":
        print(format_table(rows, args.tracking_uri, args.experiment, args.sweep))
        print(f"plot: {plot}; table: {table}")
    if args.promote is not None:
        _promote(args, rows)
    return 0


def _promote(args: argparse.Namespace, rows: list[Any]) -> None:
    from ray_aekd.tracking.compare import promote

    name, version, best = promote(rows, args.tracking_uri, args.promote)
    print(
        f"promoted: registered model {name!r} version {version} (run {best.name!r}, {best.run_id}, val/acc1 "
        f"{best.acc1:.4f}) is now models:/{name}@{args.promote}; serve it with "
        f"`mlflow models serve -m models:/{name}@{args.promote} --env-manager local`",
        file=sys.stderr if args.json == "-" else sys.stdout,
    )


def _preprocess_args(args: argparse.Namespace) -> Any:
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

    track = args.tracking_uri is not None or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    check_outputs(args, [("--predictions", args.predictions)], None, tracks=track)
    source = parse_model(args.model, args.arch, _preprocess_args(args))
    data = open_eval_data(args.data, size=args.image_size)
    with json_stdout(args):  # --json alone: progress to stderr
        result = evaluate_model(
            source, data, batch_size=args.batch_size, tracking_uri=args.tracking_uri, experiment=args.experiment,
            track=track, log=print,
        )  # fmt: skip
    if args.predictions:
        _write_predictions(args.predictions, data, result.predictions)
    write_json(args, result.to_json())
    if args.json != "-":
        print(format_evaluation(result))
    return 0


def _write_predictions(path: str, data: Any, predictions: list[int]) -> None:
    import csv

    names = data.source.class_names
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "predicted"])
        for index, predicted in zip(data.indices.tolist(), predictions, strict=True):
            writer.writerow([index, names[data.source[index][1]], names[predicted]])


def _export(args: argparse.Namespace) -> int:
    check_outputs(args, [], None, tracks=False)  # --json PATH
    from ray_aekd.tracking.evaluate import export_model, open_eval_data, parse_model

    source = parse_model(args.model, args.arch, _preprocess_args(args))
    data = open_eval_data(args.data, size=args.image_size) if args.data else None
    path, meta = export_model(source, args.output, data)
    shape = "x".join(map(str, meta["input_shape"]))
    result = {"path": str(path), "format": args.format, "input_shape": list(meta["input_shape"])}
    write_json(args, result | {"num_classes": meta["num_classes"], "preprocess": meta["preprocess"]})
    if args.json == "-":
        return 0
    print(
        f"exported {source.describe()} to {path}: a torch.export program, float32 [N, {shape.replace('x', ', ')}] "
        f"images in [0, 1] -> logits [N, {meta['num_classes']}], preprocessing inside "
        f"({meta['preprocess']}); load with torch.export.load({str(path)!r}).module()"
    )
    return 0


def _upload(args: argparse.Namespace) -> int:
    check_outputs(args, [], None, tracks=False)  # --json PATH
    from ray_aekd.tracking.upload import upload, upload_tracking_uri

    with json_stdout(args):
        run_id = upload(args.run_dir, tracking_uri=args.tracking_uri)
    write_json(args, {"run_id": run_id, "tracking_uri": upload_tracking_uri(args.run_dir, args.tracking_uri)})
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    check_outputs(args, [("--output-dir", args.output_dir)], None)
    from ray_aekd.cli.quickstart import run_quickstart

    with json_stdout(args):
        result = run_quickstart(
            output_dir=args.output_dir, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
            workers=args.workers, seed=args.seed,
        )  # fmt: skip
    write_json(args, result)
    return 0


# --- the parser: one function per command ---------------------------------------------------------


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="distil disagreeing teachers on the bundled digits data with each weighting strategy (CPU, ~20 s)",
        description="Train M teachers on scikit-learn's digits, each with noisy labels on its own classes, "
        "then distil a small student with average, AE-KD and MGDA weighting and compare them. No Ray, no MLflow.",
    )
    demo.add_argument("--teachers", type=int, default=3, help="number of teachers M (default 3)")
    demo.add_argument("--epochs", type=int, default=30, help="student epochs per strategy (default 30)")
    demo.add_argument("--tolerance", type=float, default=0.6, help="AE-KD tolerance C in [1/M, 1] (default 0.6)")
    demo.add_argument("--temperature", type=float, default=4.0, help="KD temperature T > 0 (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--label-noise", type=float, default=0.7, help="label noise on each teacher's classes")
    demo.add_argument("--space", choices=GRADIENT_SPACES, default=GRADIENT_SPACES[0])
    demo.add_argument("--strategies", nargs="+", default=list(MIN_NORM_STRATEGIES), choices=MIN_NORM_STRATEGIES)
    add_json_flag(demo, "the results")
    demo.set_defaults(run=_demo)


def _add_teachers(commands: Any) -> None:
    teachers = commands.add_parser(
        "teachers",
        help="train the teacher ensemble of a config concurrently on Ray (one Tune trial per teacher)",
        description="Train the M teachers listed in a config, each as one Ray Tune trial with its own resources "
        "(trials.cpus, trials.gpus); save safe checkpoints, log one MLflow run per teacher, and print the "
        "ensemble's accuracy and disagreement. Uses the Ray cluster in RAY_ADDRESS, else a local Ray.",
    )
    add_config_flags(teachers, "tune_configs/teachers_digits.yaml")
    add_output_dir_flag(teachers, "where the teachers' checkpoints go")
    add_tracking_flags(teachers)
    add_json_flag(teachers, "the result (each teacher's metrics, the ensemble's)")
    teachers.set_defaults(run=_teachers)


def _add_distill(commands: Any) -> None:
    distill = commands.add_parser(
        "distill",
        help="distil trained teachers into a student on Ray (teacher stages on Ray Data + a Ray Train worker group)",
        description="Stream the training data through one Ray Data stage per teacher and train the student "
        "on a Ray Train worker group with average, AE-KD or MGDA teacher weights; evaluate, checkpoint and log "
        "to MLflow every epoch. Running the same config again resumes it. Uses the Ray cluster in RAY_ADDRESS "
        "(as `ray job submit` sets it), else a local Ray.",
    )
    add_config_flags(distill, "tune_configs/distill_digits.yaml")
    add_output_dir_flag(distill, "where the run folder (<output_dir>/<name>) goes")
    add_tracking_flags(distill)
    add_json_flag(distill, "the result (metrics, student checkpoint, MLflow run id)")
    distill.set_defaults(run=_distill)


def _add_relabel(commands: Any) -> None:
    relabel = commands.add_parser(
        "relabel",
        help="run the teachers once over data.views views and write their logits to cache.path (Parquet)",
        description="Make the soft-label cache of a distillation config: every teacher runs once over "
        "data.views deterministic views of the training split and once over the validation split, and their logits "
        "are written with the keys (index, view) as Parquet to cache.path (a folder, s3://, gs://). A distillation "
        "or sweep with cache.path set then reads them and runs no teacher. A cache already there for the same "
        "teachers and data is kept.",
    )
    add_config_flags(relabel, "tune_configs/distill_digits.yaml --set cache.path=runs/cache --set data.views=4")
    relabel.add_argument("--overwrite", action="store_true", help="replace a cache made for other settings")
    add_tracking_flags(relabel, experiment=None)  # where mlflow: teachers load from; relabel logs no run
    add_json_flag(relabel, "the cache's manifest")
    relabel.set_defaults(run=_relabel)


def _add_sweep(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="search C, T (any config key) with Ray Tune: one distillation per trial, MLflow parent + child runs",
        description="Run a Ray Tune search over a distillation config's keys (grid, random or Optuna; optional "
        "ASHA), one distillation run per trial, logged to MLflow as child runs of one parent run, optionally "
        "reading a soft-label cache made once for all trials. Prints the best configuration and its student. "
        "--tracking-uri and --experiment set the base config's tracking (overrides.tracking.*).",
    )
    add_config_flags(sweep, "tune_configs/sweep_digits.yaml")
    add_output_dir_flag(sweep, "where the sweep's folder (<output_dir>/<name>) goes")
    add_tracking_flags(sweep)
    add_json_flag(sweep, "the result (every trial, the best)")
    sweep.set_defaults(run=_sweep)


def _add_compare(commands: Any) -> None:
    compare = commands.add_parser(
        "compare",
        help="rank distillation runs (an experiment, or one sweep's trials) from MLflow, with a plot",
        description="Read the distillation runs of an MLflow experiment (or the child runs of one sweep) and print "
        "them ranked by final val/acc1 with strategy, C, T, val/agreement and best epoch; write compare.csv and "
        "compare.png. Works with the local SQLite store and with a tracking server. A store that does not exist "
        "is refused (compare reads runs; it never makes a store).",
    )
    add_tracking_flags(compare, experiment="ray-aekd")
    compare.add_argument("--sweep", metavar="RUN_ID", help="the parent run id of a sweep: compare its trials")
    add_output_dir_flag(compare, "where compare.csv and compare.png go", default=".")
    add_json_flag(compare, "the ranked runs")
    compare.add_argument(
        "--promote", nargs="?", const="champion", metavar="ALIAS",
        help="set this registry alias (default champion) on the best finished run's registered model version",
    )  # fmt: skip
    compare.set_defaults(run=_compare)


_MODEL_HELP = (
    "the model: a checkpoint folder, weights (.pt/.pth/.safetensors) with --arch, an exported program (.pt2), "
    "a TorchScript file (torchscript:FILE), an MLflow model (models:/NAME@ALIAS, models:/MODEL_ID, "
    "runs:/RUN_ID/PATH, or a local folder)"
)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model flags of ``evaluate`` and ``export``."""
    parser.add_argument("--model", required=True, help=_MODEL_HELP)
    parser.add_argument("--arch", help="with a weights file: its architecture (registry name, torchvision:, timm:)")
    parser.add_argument("--mean", help="the model's input mean, per channel (e.g. 0.485,0.456,0.406)")
    parser.add_argument("--std", help="the model's input std, per channel")
    parser.add_argument("--size", type=int, help="resize images to SIZE x SIZE for the model")
    parser.add_argument("--image-size", type=int, help="imagefolder data: resize images to this size when read")


def _add_evaluate(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score any model (checkpoint, weights, .pt2, TorchScript, MLflow) on a held-out set",
        description="Print acc@1, acc@5, ECE, NLL and per-class accuracy of a model on a held-out set. With a tracking "
        "URI (--tracking-uri or MLFLOW_TRACKING_URI) also log an evaluation run with a confusion matrix and a "
        "reliability diagram.",
    )
    _add_model_flags(evaluate)
    evaluate.add_argument(
        "--data", required=True,
        help="digits (its held-out split), cifar10:ROOT or cifar100:ROOT (test split), imagefolder:DIR, config:FILE",
    )  # fmt: skip
    add_json_flag(evaluate, "the scores")
    evaluate.add_argument("--predictions", metavar="CSV", help="also write each sample's label and prediction")
    evaluate.add_argument("--batch-size", type=int, default=256, help="inference batch size (default 256)")
    add_tracking_flags(evaluate, experiment="ray-aekd-eval", default="ray-aekd-eval")
    evaluate.set_defaults(run=_evaluate)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write a model as a torch.export program that takes [0, 1] images (preprocessing inside)",
        description="Write any model a teacher can be as a torch.export program (.pt2) with a dynamic batch "
        "dimension and its preprocessing inside: float32 [N, C, H, W] images in [0, 1] -> logits [N, K]. Class "
        "names and input shape travel inside the file.",
    )
    _add_model_flags(export)
    export.add_argument("--format", choices=("pt2",), default="pt2", help="output format (pt2: torch.export)")
    export.add_argument("--output", required=True, help="the .pt2 file to write")
    export.add_argument(
        "--data", help="the data the model is for (as evaluate's --data); needed unless --model is a checkpoint"
    )
    add_json_flag(export, "the program's path, format and input shape")
    export.set_defaults(run=_export)


def _add_upload(commands: Any) -> None:
    upload = commands.add_parser(
        "upload",
        help="log a distillation run folder to MLflow after the tracking server was unreachable",
        description="Log what a distillation kept in its run folder (metrics.jsonl, result.json, plots, alpha, the "
        "student) to MLflow: into the run it opened (mlflow_run_id), logging only the epochs that run lacks, or into "
        "a new run. For runs that trained while the tracking server was down. Without --tracking-uri, the store the "
        "run logged to.",
    )
    upload.add_argument("run_dir", help="the run folder (output_dir/<name>)")
    upload.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: the store the run logged to)"
    )
    add_json_flag(upload, "the MLflow run id and tracking URI")
    upload.set_defaults(run=_upload)


def _add_quickstart(commands: Any) -> None:
    quickstart = commands.add_parser(
        "quickstart",
        help="train 3 teachers on the bundled digits, distil a student with average and AE-KD, compare (~1 min)",
        description="The whole product on one machine with no network: three disagreeing teachers on "
        "scikit-learn's digits (reused if already trained), a student distilled on Ray with average and with "
        "AE-KD weighting, both logged to MLflow, and a side-by-side table.",
    )
    add_output_dir_flag(quickstart, "where teachers and students go", default="runs/quickstart")
    add_tracking_flags(quickstart, experiment=None)
    quickstart.add_argument("--teacher-epochs", type=int, default=30, help="epochs of each teacher (default 30)")
    quickstart.add_argument("--student-epochs", type=int, default=20, help="epochs of each student (default 20)")
    quickstart.add_argument(
        "--workers", type=int, default=1, help="Ray Train workers (default 1: in this process, Train's local mode)"
    )
    quickstart.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_json_flag(quickstart, "the result (teachers, ensemble, students)")
    quickstart.set_defaults(run=_quickstart)


_COMMANDS = (
    _add_demo, _add_teachers, _add_distill, _add_relabel, _add_sweep, _add_compare, _add_evaluate, _add_export,
    _add_upload, _add_quickstart,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-aekd", description="Adaptive ensemble knowledge distillation (AE-KD) on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    for name, command in commands.choices.items():
        add_verbose_flag(command, name)
    return parser


#: The ValueError subclasses ray_aekd raises for bad input (a Ray task's error keeps its cause's
#: class among its bases). Named, not imported: the CLI imports no torch before a command runs.
_BAD_INPUT_ERRORS = frozenset({
    "ray_aekd.config._base.ConfigError", "ray_aekd.data.sources.DataSourceError",
    "ray_aekd.models.sources.ModelSourceError", "ray_aekd.models.checkpoint.CheckpointError",
})  # fmt: skip
_PACKAGE = Path(__file__).resolve().parents[1]


def _is_bad_input(error: ValueError) -> bool:
    """Whether ``error`` reports bad input: one of ``_BAD_INPUT_ERRORS``, or a ValueError that a
    ``raise`` statement in ray_aekd made (its checks say what was wrong and what is allowed).
    A ValueError from inside torch, numpy or Ray, or from a failed conversion in ray_aekd's own
    code, is not."""
    if any(f"{c.__module__}.{c.__qualname__}" in _BAD_INPUT_ERRORS for c in type(error).__mro__):
        return True
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = filename == _PACKAGE or _PACKAGE in filename.parents
    return ours and linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise ")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:  # before Ray starts: its processes read it from the environment
        set_verbose(True)
    try:
        with tracking_uri_for_this_command(getattr(args, "tracking_uri", None)):
            return args.run(args)
    except ValueError as error:
        if not _is_bad_input(error):
            raise  # a failure inside a library: its traceback, not an 'error:' line that blames the input
        if args.verbose:
            traceback.print_exception(error, file=sys.stderr)
        print(f"ray-aekd {args.command}: error: {error}", file=sys.stderr)  # bad input: one clear line
        return 2
    except FloatingPointError as error:  # the run stopped on NaN/Inf: which teacher, which step
        print(f"ray-aekd {args.command}: stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
