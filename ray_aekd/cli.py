"""``ray-aekd``: the command line. Only this module knows argparse."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from ray_aekd import __version__


def _demo(args: argparse.Namespace) -> int:
    from ray_aekd.demo import run_demo

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
    from ray_aekd.teachers import train_teachers

    config = load_config(TeachersConfig, args.config, args.set)
    train_teachers(config)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from ray_aekd.config import DistillConfig, load_config
    from ray_aekd.distill import distill

    config = load_config(DistillConfig, args.config, args.set)
    result = distill(config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from ray_aekd.quickstart import run_quickstart

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
    quickstart.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: in this process)")
    quickstart.add_argument("--seed", type=int, default=0)
    quickstart.set_defaults(run=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"ray-aekd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
