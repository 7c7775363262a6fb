"""Where the time of a small distillation goes, and what the commands a new user runs cost.

    python benchmarks/bench_overhead.py [--epochs 20] [--workers 1] [--seed 0] [--skip-commands]
                                        [--work DIR] [--out FILE]

(a) One run in this process: the quickstart's 20-epoch digits distillation (``aekd``, its three
    teachers trained first, or reused from ``--work``), on a local Ray started for it. Reported:
    the run's ``timings`` (``ray_aekd.distill.fit_timings``: checks, Ray start, teachers on the
    validation split, MLflow, worker start, steps, evaluation, checkpoint and report, MLflow
    logging, the final model, the rest), ``ray.shutdown()``, the wall time, the sum of the
    epochs' own seconds (``epoch_seconds`` in ``metrics.jsonl``: steps, evaluation), and the
    ratios the issue sets targets for: wall / sum of epochs (<= 1.5) and steps / wall.
(b) Unless ``--skip-commands``: ``ray-aekd demo`` and ``ray-aekd quickstart`` as a new user
    runs them (subprocesses, one after the other, fresh output folders): wall seconds, their
    ratio (target <= 3), the quickstart's wall (target <= 120 s on 2 cores) and its console:
    lines in all (target <= 60) and those that are not the product's own (Ray's or MLflow's
    log lines, warnings, tracebacks).

One repeat of each (the commands take minutes); times on a shared 2-core machine are noisy.
Prints one JSON object (also to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: A console line that is not ray_aekd's: a logger's record (``2026-... INFO ...``, ``(pid=...)``
#: worker echoes), a Python warning, a traceback.
FOREIGN = re.compile(
    r"^\s*\(\w+[^)]*pid=|^\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d|Warning\b|warnings\.warn|Traceback|^\s*File \"|"
    r"\b(INFO|WARNING|ERROR|DEBUG)\b"
)


def run_distillation(work: Path, epochs: int, workers: int, seed: int) -> dict:
    import ray

    from ray_aekd.cli.quickstart import _reusable_teachers, distill_config, teachers_config
    from ray_aekd.distributed.distill import distill
    from ray_aekd.distributed.teachers import train_teachers

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t_config = teachers_config(work, 30, seed)
    if _reusable_teachers(t_config) is None:
        train_teachers(t_config, log=say)
        ray.shutdown()  # the measured run starts its own Ray, as `ray-aekd distill` does
    config = distill_config(work, "aekd", epochs, seed, workers)
    started = time.perf_counter()
    result = distill(config, log=say)
    stopping = time.perf_counter()
    ray.shutdown()
    done = time.perf_counter()
    lines = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    epoch_sum = sum(line["epoch_seconds"] for line in lines)
    wall = done - started
    return {
        "config": {"epochs": epochs, "workers": workers, "seed": seed, "strategy": "aekd", "dataset": "digits"},
        "wall_seconds": round(wall, 2),
        "shutdown_seconds": round(done - stopping, 2),
        "timings": getattr(result, "timings", {}),
        "sum_epoch_seconds": round(epoch_sum, 2),
        "wall_over_epochs": round(wall / epoch_sum, 3),
        "steps_share_of_wall": round(getattr(result, "timings", {}).get("steps", 0.0) / wall, 3),
        "val_acc1": result.metrics["val/acc1"],
    }


def run_command(argv: list[str], cwd: Path) -> dict:
    started = time.perf_counter()
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = (done.stdout + done.stderr).splitlines()
    foreign = [line for line in lines if FOREIGN.search(line)]
    return {
        "command": " ".join(argv[2:]) if argv[:2] == [sys.executable, "-m"] else " ".join(argv),
        "exit_code": done.returncode,
        "wall_seconds": round(wall, 2),
        "console_lines": len(lines),
        "foreign_lines": len(foreign),
        "foreign_examples": foreign[:8],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="Train workers of run (a); 0: local mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-commands", action="store_true", help="only (a)")
    parser.add_argument("--work", type=Path, help="folder for teachers and runs (default: a temporary one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        report: dict = {"distillation": run_distillation(work, args.epochs, args.workers, args.seed)}
        if not args.skip_commands:
            ray_aekd = [sys.executable, "-m", "ray_aekd.cli"]
            for name in ("demo", "quickstart"):
                folder = work / f"command-{name}"
                folder.mkdir(exist_ok=True)
                print(f"running ray-aekd {name} ...", file=sys.stderr, flush=True)
                report[name] = run_command([*ray_aekd, name], folder)
            report["quickstart_over_demo"] = round(
                report["quickstart"]["wall_seconds"] / report["demo"]["wall_seconds"], 2
            )
    report["targets"] = {
        "wall_over_epochs <= 1.5": report["distillation"]["wall_over_epochs"] <= 1.5,
        **(
            {
                "quickstart_over_demo <= 3": report["quickstart_over_demo"] <= 3,
                "quickstart wall <= 120 s": report["quickstart"]["wall_seconds"] <= 120,
                "quickstart console <= 60 lines, none foreign": report["quickstart"]["console_lines"] <= 60
                and report["quickstart"]["foreign_lines"] == 0,
            }
            if "quickstart" in report
            else {}
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
