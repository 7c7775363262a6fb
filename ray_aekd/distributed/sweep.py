"""``ray-aekd sweep``: search a distillation's hyperparameters (C, T, ...) with Ray Tune.

One trial is one distillation run (``ray_aekd.distill.distill``) inside a Tune function
trainable: it builds a ``TorchTrainer`` and reports every epoch to Tune through
``TuneReportCallback``, so ASHA can stop weak trials early. The sweep:

1. checks the sweep config, its base config and the whole search space (``ray_aekd.config.sweep``),
   and the cluster, before anything is scheduled;
2. with ``soft_label_cache: true``, runs the teachers once (``ray-aekd relabel``; kept when
   it is already there for the same teachers and data) so that no trial runs a teacher;
3. opens a parent MLflow run (the search space as params); every trial is a child run
   (tag ``mlflow.parentRunId``) with the metrics of a plain distillation run;
4. prints a line per trial and epoch (state counts and the best so far);
5. at the end logs the best trial's params and metrics on the parent, a table of all trials
   (``trials.csv``) and plots of the metric against C and T, and prints the best configuration
   and where its student checkpoint is.

A sweep that is run again is a new sweep (new trial names); finished trials are not redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ray_aekd._console import LOG_FILE, capture_logs, tune_verbosity
from ray_aekd._provenance import environment_tags
from ray_aekd.config import DistillConfig, DistillTeacher, apply_preset, flatten, from_dict
from ray_aekd.config.sweep import (
    TOLERANCE_FRACTION,
    Dimension,
    SweepConfig,
    apply_values,
    load_sweep,
    parse_space,
)
from ray_aekd.data import open_source
from ray_aekd.distributed.distill import TrialHooks, _demands, _resources, distill, local_mode
from ray_aekd.distributed.prepare import check_run, resolve_paths, shared_paths, teacher_key
from ray_aekd.distributed.session import check_shared, connect
from ray_aekd.distributed.soft_labels import cache_uri, read_manifest, relabel
from ray_aekd.tracking.client import create_run, finish_run, log_artifacts, log_metric_rows, log_params, set_tags
from ray_aekd.tracking.compare import collect_runs, format_table, plot_metric_against, rank_runs, write_csv
from ray_aekd.tracking.runs import limit_mlflow_retries, open_store, resolve_tracking_uri, system_tags
from ray_aekd.tracking.trial_runs import close_stopped_children

__all__ = ["SweepResult", "run_sweep", "sweep_from_file"]

SWEEP_TAG = "ray_aekd.sweep"


@dataclasses.dataclass
class SweepResult:
    name: str
    mlflow_run_id: str | None
    trials: list[dict[str, Any]]  # per trial: name, values, status, metrics, student_checkpoint, ...
    best: dict[str, Any] | None  # the best finished trial
    relabel_forward_passes: int  # teacher forward passes of the soft-label cache made for this sweep
    cache_forward_passes: int  # what the cache the trials read cost when it was made (now or before)
    teacher_forward_passes: int  # all of them: the cache's and every finished trial's
    seconds: float


def _tune_space(dimensions: list[Dimension]) -> dict[str, Any]:
    make = {
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {d.key: make[d.kind](d.values) for d in dimensions}


def _trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def _run_trial(trial_config: dict[str, Any]) -> None:
    """Tune function trainable: one distillation run with the sampled values."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    # MLFLOW_TRACKING_URI wins over the config: this worker process may hold another store's
    os.environ["MLFLOW_TRACKING_URI"] = trial_config["base"]["tracking"]["uri"]
    values = trial_config["values"]
    data = apply_values(trial_config["base"], values)
    data["name"] = _trial_name(trial_config["sweep"], trial_id)
    data["output_dir"] = trial_config["trials_dir"]
    config = from_dict(DistillConfig, apply_preset(data))
    hooks = TrialHooks(
        parent_run_id=trial_config["parent_run_id"],
        params={f"sweep.{k}": v for k, v in values.items()},
        tags={SWEEP_TAG + ".name": trial_config["sweep"], "ray_aekd.trial_id": trial_id},
        callbacks=(TuneReportCallback(),),
    )
    log_file = Path(trial_config["trials_dir"]) / f"{data['name']}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:  # the sweep prints one line per epoch; the rest goes to a file
        with log_file.open("a") as f:
            f.write(line + "\n")
        if line.startswith("warning"):
            print(f"[{data['name']}] {line}", flush=True)

    distill(config, log=log, trial=hooks)


def _short(values: dict[str, Any]) -> str:
    symbols = {"distill.tolerance": "C", TOLERANCE_FRACTION: "C_frac", "distill.temperature": "T"}
    parts = []
    for key, value in values.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{symbols.get(key, key)}={shown}")
    return " ".join(parts)


class _Progress(tune.Callback):
    """One line per trial result: the trial, its values, the epoch, the metric, the states of
    all trials and the best value so far."""

    def __init__(self, sweep: SweepConfig, epochs: int) -> None:
        self.sweep, self.epochs = sweep, epochs
        self.best: tuple[float, str] | None = None

    @staticmethod
    def log(line: str) -> None:  # Tune pickles its callbacks: no bound logger here
        print(line, flush=True)

    def _states(self, trials: list) -> str:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metric = self.sweep.metric
        if metric not in result:
            return
        value = float(result[metric])
        better = self.best is None or (value > self.best[0] if self.sweep.direction == "max" else value < self.best[0])
        if better:
            self.best = (value, trial.trial_id)
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        self.log(
            f"[sweep {self.sweep.name}] {trial.trial_id} {_short(trial.config['values'])}  epoch "
            f"{int(result.get('epoch', 0))}/{self.epochs}  {metric} {value:.4f}  | {self._states(trials)} | {best}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"[sweep {self.sweep.name}] {trial.trial_id} done | {self._states(trials)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"[sweep {self.sweep.name}] {trial.trial_id} FAILED (see {trial.local_path}) | {self._states(trials)}")


def sweep_from_file(
    path: str, overrides: list[str] | tuple[str, ...] = (), log: Callable[[str], None] = print
) -> SweepResult:
    """Load and check the sweep config at ``path`` (with ``--set`` overrides), then run it."""
    sweep, base = load_sweep(path, overrides)
    return run_sweep(sweep, base, log)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], log: Callable[[str], None] = print) -> SweepResult:
    """Run ``sweep`` over the base distillation config data ``base``; see the module docstring.
    Ray's and MLflow's log records go to ``ray_aekd.log`` in the sweep's folder."""
    with capture_logs(Path(sweep.output_dir).resolve() / sweep.name / LOG_FILE) as logs:
        return _run_sweep(sweep, base, log, logs)


def _run_sweep(sweep: SweepConfig, base: dict[str, Any], log: Callable[[str], None], logs: Path | None) -> SweepResult:
    """check and connect -> absolute paths -> soft-label cache -> folders and the parent run ->
    Tune -> the best trial -> result."""
    start = time.perf_counter()
    limit_mlflow_retries()
    dimensions = parse_space(sweep.space, base, sweep.search.algorithm, sweep.soft_label_cache)
    sweep_dir = Path(sweep.output_dir).resolve() / sweep.name
    config = from_dict(DistillConfig, apply_preset(base))
    _check_and_connect(sweep, config, sweep_dir, log, logs)
    base, config = _with_absolute_paths(base, config, sweep_dir)
    relabel_passes, cache_passes = _soft_label_cache(sweep, config, log)
    uri, tune_storage = _prepare_folders(sweep, config, sweep_dir)
    # the trials log where the driver does, whatever their processes' environment says
    base["tracking"] = dict(base.get("tracking") or {}, uri=uri)
    parent_id = _open_parent(sweep, config, uri, log)
    trials_dir = sweep_dir / "trials"
    tuner = _tuner(sweep, config, base, dimensions, trials_dir, tune_storage, parent_id, uri, log)
    status, grid = "FAILED", None
    try:
        grid = tuner.fit()
        status = "FINISHED"
    finally:
        if parent_id is not None:
            _close_children(uri, parent_id, grid, log)
            if status == "FAILED":
                _terminate(uri, parent_id, status, log)
    trials = _trial_rows(grid, sweep, trials_dir)
    result = SweepResult(
        name=sweep.name,
        mlflow_run_id=parent_id,
        trials=trials,
        best=_best_trial(trials, sweep),
        relabel_forward_passes=relabel_passes,
        cache_forward_passes=cache_passes,
        teacher_forward_passes=relabel_passes + sum(t["teacher_forward_passes"] for t in trials),
        seconds=time.perf_counter() - start,
    )
    (sweep_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    if parent_id is not None:
        _finish_parent(sweep, result, uri, parent_id, sweep_dir, log)
    log(_summary(sweep, result))
    return result


def _check_and_connect(
    sweep: SweepConfig, config: DistillConfig, sweep_dir: Path, log: Callable[[str], None], logs: Path | None
) -> None:
    """The base config's checks, and the cluster's resources for one trial, before any trial is
    scheduled; teachers the base config names but that do not exist yet are trained first when
    the sweep names a teachers config."""
    train_first = sweep.teachers is not None and bool(_missing_teachers(config))
    if not train_first:
        _check_base(config, sweep_dir)  # bad teachers or data: one error before any trial is scheduled
    cpus, gpus, what = _resources(config)
    connect(
        cpus + sweep.trials.cpus,
        gpus,
        f"one trial ({what} and its driver)",
        "lower workers.cpus in the sweep's overrides, or trials.cpus",
        local_cpus=(cpus + sweep.trials.cpus) * sweep.trials.max_concurrent,
        log_to_driver=False,  # each trial's own log goes to <output_dir>/<name>/trials/<trial>.log
        demands=_demands(config),
    )
    if logs is not None:  # after the checks: a refused sweep says only why
        log(f"Ray's and MLflow's logs: {logs} (--verbose shows them here)")
    if train_first:
        _train_missing_teachers(config, str(sweep.teachers), log)
        _check_base(config, sweep_dir)


def _with_absolute_paths(
    base: dict[str, Any], config: DistillConfig, sweep_dir: Path
) -> tuple[dict[str, Any], DistillConfig]:
    """A copy of the base config data (``config``) whose paths (data, teachers, cache, storage)
    are absolute, and its config: every trial runs elsewhere."""
    resolved = resolve_paths(config, sweep_dir)
    base = dict(base)
    base["teachers"] = [
        dict(t, **{teacher_key(r): r.location}) for t, r in zip(base["teachers"], resolved.teachers, strict=True)
    ]
    if resolved.data.path is not None:
        base["data"] = dict(base.get("data", {}), path=resolved.data.path)
    if config.cache.path is not None and "://" not in config.cache.path:
        base["cache"] = dict(base.get("cache", {}), path=str(Path(config.cache.path).resolve()))
    if resolved.storage_path is not None:
        base["storage_path"] = resolved.storage_path
    return base, from_dict(DistillConfig, apply_preset(base))


def _soft_label_cache(sweep: SweepConfig, config: DistillConfig, log: Callable[[str], None]) -> tuple[int, int]:
    """With ``soft_label_cache``, run the teachers once (``relabel``; a cache made for the same
    teachers and data is kept). Returns ``(teacher forward passes made now, the cache's)``."""
    if not sweep.soft_label_cache:
        return 0, 0
    before = read_manifest(cache_uri(config))
    manifest = relabel(config, log=log)  # kept as it is when it was made for the same teachers and data
    cache_passes = int(sum(manifest["teacher_forward_passes"].values()))
    made_now = before is None or before.get("created") != manifest.get("created")
    return (cache_passes if made_now else 0), cache_passes


def _prepare_folders(sweep: SweepConfig, config: DistillConfig, sweep_dir: Path) -> tuple[str, str]:
    """The sweep's folder with ``sweep.json``, the storage folders and the MLflow store, checked to
    be shared (trials run on any node). Returns ``(tracking URI, Tune's storage)``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(dataclasses.asdict(sweep), indent=2))
    if config.storage_path is not None and "://" not in config.storage_path:
        Path(config.storage_path).mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(config.tracking.uri)
    open_store(uri)  # a SQLite store's file must exist to be checked
    tune_storage = _tune_storage(sweep, sweep_dir)
    shared = shared_paths(config, sweep_dir / "sweep.json", uri)
    if "://" not in tune_storage:
        Path(tune_storage).mkdir(parents=True, exist_ok=True)
        shared["storage_path (the sweep's, for Tune)"] = tune_storage
    check_shared(shared, uri)  # trials run on any node
    return uri, tune_storage


def _scheduler(sweep: SweepConfig, epochs: int) -> Any:
    """ASHA (``scheduler.type: asha``), or None: every trial runs all its epochs."""
    if sweep.scheduler.type != "asha":
        return None
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        # above the last epoch: ASHA stops a trial that reaches max_t, which would cut off
        # the export of its student after the last report
        max_t=epochs + 1,
        grace_period=min(sweep.scheduler.grace_period, epochs),
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def _search_algorithm(sweep: SweepConfig) -> Any:
    """Optuna, seeded random search, or None (Tune's grid)."""
    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search.seed)
    if sweep.search.algorithm == "random":
        # given explicitly, the generator needs the concurrency limit itself (Tune does not pass it on)
        return tune.search.BasicVariantGenerator(
            random_state=sweep.search.seed, max_concurrent=sweep.trials.max_concurrent
        )
    return None


def _tuner(
    sweep: SweepConfig,
    config: DistillConfig,
    base: dict[str, Any],
    dimensions: list[Dimension],
    trials_dir: Path,
    tune_storage: str,
    parent_id: str | None,
    uri: str,
    log: Callable[[str], None],
) -> tune.Tuner:
    """The sweep's ``tune.Tuner`` (one trial: ``_run_trial``, one distillation run); says what it
    will search."""
    epochs = config.train.epochs
    scheduler, search_alg = _scheduler(sweep, epochs), _search_algorithm(sweep)
    log(
        f"sweep {sweep.name}: {sweep.search.algorithm} search over {', '.join(d.key for d in dimensions)}; "
        f"{sweep.num_samples} sample(s), up to {sweep.trials.max_concurrent} trial(s) at once"
        + (", ASHA on " + sweep.metric if scheduler else "")
        + (f"; MLflow parent run {parent_id} at {uri}" if parent_id else "")
    )
    return tune.Tuner(
        # a trial whose one Train worker runs in its own process (local mode) holds that worker's CPUs too
        tune.with_resources(
            _run_trial, {"CPU": sweep.trials.cpus + (config.workers.cpus if local_mode(config) else 0)}
        ),
        param_space={
            "values": _tune_space(dimensions),
            "base": base,
            "sweep": sweep.name,
            "trials_dir": str(trials_dir),
            "parent_run_id": parent_id,
        },
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.direction,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.trials.max_concurrent,
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=tune_storage,
            callbacks=[_Progress(sweep, epochs)],  # one line per trial and epoch; Tune's tables with --verbose
            verbose=tune_verbosity(),
        ),
    )


def _best_trial(trials: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """The finished trial with the best ``metric``; ties broken as ``ray-aekd compare`` ranks
    them: then val/agreement, then the first in name order."""
    finished = [t for t in trials if t["status"] == "FINISHED" and sweep.metric in t["metrics"]]
    if not finished:
        return None
    sign = 1 if sweep.direction == "max" else -1
    return max(  # the first of equal trials in name order wins
        sorted(finished, key=lambda t: t["name"]),
        key=lambda t: (sign * t["metrics"][sweep.metric], t["metrics"].get("val/agreement", float("-inf"))),
    )


def _missing_teachers(config: DistillConfig) -> list[str]:
    return [t.name for t in config.teachers if _is_missing(t)]


def _is_missing(teacher: DistillTeacher) -> bool:
    """A local checkpoint folder that is not there yet (the sweep's teachers config can make it)."""
    location = teacher.location
    return teacher.source_kind == "checkpoint" and "://" not in location and not Path(location).exists()


def _tune_storage(sweep: SweepConfig, sweep_dir: Path) -> str:
    """Where Tune keeps the sweep's state: ``storage_path`` (a local one made absolute), or
    ``<output_dir>/<name>/_tune``."""
    if sweep.storage_path is None:
        return str(sweep_dir / "_tune")
    return sweep.storage_path if "://" in sweep.storage_path else str(Path(sweep.storage_path).resolve())


def _check_base(config: DistillConfig, sweep_dir: Path) -> None:
    """The checks of ``ray-aekd distill`` on the base config: teachers against the data, the
    student on one image, batch sizes."""
    resolved = resolve_paths(config, sweep_dir)
    source = open_source(
        resolved.data.dataset, resolved.data.path, download=resolved.data.download, size=resolved.data.image_size
    )
    train_idx, _ = resolved.data.split(len(source), resolved.seed)
    check_run(resolved, source, len(train_idx))


def _train_missing_teachers(config: DistillConfig, teachers_file: str, log: Callable[[str], None]) -> None:
    """Train the teachers of ``teachers_file`` (a fresh machine has no checkpoints yet); refuse
    if the base config's checkpoints are still missing afterwards."""
    missing = _missing_teachers(config)
    from ray_aekd.config import TeachersConfig, load_config
    from ray_aekd.distributed.teachers import train_teachers

    log(f"teacher checkpoint(s) of {', '.join(missing)} missing: training the teachers of {teachers_file} first")
    train_teachers(load_config(TeachersConfig, teachers_file), log=log)
    still = [t.location for t in config.teachers if _is_missing(t)]
    if still:
        raise ValueError(
            f"teachers: {teachers_file} did not make the checkpoints the base config names ({', '.join(still)}); "
            "make its output_dir and teacher names match the base config's teachers.<i>.checkpoint."
        )


def _open_parent(sweep: SweepConfig, config: DistillConfig, uri: str, log: Callable[[str], None]) -> str | None:
    """The sweep's parent run: the sweep config and the search space as params."""
    try:
        tags = system_tags({SWEEP_TAG: "true"} | environment_tags())
        run_id = create_run(uri, config.tracking.experiment, sweep.name, tags)
        values = {f"sweep.{k}": v for k, v in flatten(sweep).items() if not k.startswith(("space", "overrides"))}
        values |= {f"space.{k}": json.dumps(v) for k, v in sweep.space.items()}
        values |= {f"base.{k}": v for k, v in flatten(config).items()}
        log_params(uri, run_id, values)
        return run_id
    except Exception as error:  # an unreachable tracking server must not stop the sweep
        log(f"warning: MLflow at {uri} is not reachable ({type(error).__name__}: {error}); sweeping without it.")
        return None


def _close_children(uri: str, parent_id: str, grid: Any, log: Callable[[str], None]) -> None:
    """Children still RUNNING were stopped by the scheduler (or died with their trial): mark
    them KILLED, and give them the epochs Tune saw that rank 0 had no time to log (it logs
    after each report, and a stopped trial is killed right after one). A failure is a warning:
    the runs and their metrics are there, only the status of stopped ones stays RUNNING."""
    try:
        close_stopped_children(uri, parent_id, _reported_epochs(grid))
    except Exception as error:  # an unreachable tracking server must not fail a finished sweep
        log(
            f"warning: could not mark the stopped trials' MLflow runs KILLED ({type(error).__name__}: {error}); "
            "they stay RUNNING in MLflow."
        )


def _reported_epochs(grid: Any) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> what the trial reported to Tune, one dict per result (``epoch`` and metrics)."""
    reported = {}
    for result in grid or []:
        frame = result.metrics_dataframe
        if frame is not None and len(frame) and "trial_id" in frame:
            reported[str(frame["trial_id"].iloc[0])] = frame.to_dict("records")
    return reported


def _terminate(uri: str, run_id: str, status: str, log: Callable[[str], None]) -> None:
    try:
        finish_run(uri, run_id, status)
    except Exception as error:
        log(f"warning: could not mark MLflow run {run_id} {status} ({error}).")


def _trial_rows(grid: Any, sweep: SweepConfig, trials_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        name = _trial_name(sweep.name, str(metrics.get("trial_id", "unknown")))
        run_dir = trials_dir / name
        summary = run_dir / "result.json"
        done = json.loads(summary.read_text()) if summary.exists() else None
        status = "FINISHED" if done else ("FAILED" if result.error else "STOPPED")
        rows.append(
            {
                "name": name,
                "values": result.config["values"],
                "status": status,
                "epochs": int(metrics.get("epoch", 0)),
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "train/", "weights/"))},
                "student_checkpoint": done["student_checkpoint"] if done else None,
                "mlflow_run_id": done["mlflow_run_id"] if done else None,
                "teacher_forward_passes": int(sum(done["teacher_forward_passes"].values())) if done else 0,
                "error": str(result.error) if result.error else None,
            }
        )
    return rows


def _finish_parent(
    sweep: SweepConfig, result: SweepResult, uri: str, parent_id: str, sweep_dir: Path, log: Callable[[str], None]
) -> None:
    """On the parent run: the best trial's params and metrics, the table of trials, the plots."""
    try:
        metrics = [("teacher_forward_passes", float(result.teacher_forward_passes), 0)]
        if result.best is not None:
            best = result.best
            metrics += [(k, float(v), best["epochs"]) for k, v in best["metrics"].items()]
            log_params(uri, parent_id, {f"best.{k}": v for k, v in best["values"].items()})
            tags = {"ray_aekd.best_trial": best["name"]}
            if best["mlflow_run_id"]:  # None when the trial could not reach MLflow (it said so in its log)
                tags = {"ray_aekd.best_run_id": best["mlflow_run_id"]} | tags
            set_tags(uri, parent_id, tags)
        log_metric_rows(uri, parent_id, metrics)
        rows = rank_runs(collect_runs(uri, sweep=parent_id))
        if rows:
            write_csv(rows, sweep_dir / "trials.csv")
            plots = sweep_dir / "plots"
            plot_metric_against(rows, "tolerance", plots / "acc1_vs_tolerance.png", f"{sweep.name}: val/acc1 vs C")
            plot_metric_against(rows, "temperature", plots / "acc1_vs_temperature.png", f"{sweep.name}: val/acc1 vs T")
            log_artifacts(uri, parent_id, [sweep_dir / "trials.csv"], {"plots": plots})
            log(format_table(rows, uri, sweep=parent_id))
        log_artifacts(uri, parent_id, [sweep_dir / "summary.json"])
        finish_run(uri, parent_id, "FINISHED")
    except Exception as error:
        log(f"warning: MLflow at {uri} failed while closing the sweep's run ({type(error).__name__}: {error}).")


def _summary(sweep: SweepConfig, result: SweepResult) -> str:
    counts: dict[str, int] = {}
    for trial in result.trials:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    passes = f"{result.teacher_forward_passes} teacher forward passes"
    if result.cache_forward_passes and not result.relabel_forward_passes:
        passes += f" (the trials read a soft-label cache made before, which cost {result.cache_forward_passes})"
    elif result.relabel_forward_passes:
        passes += f" ({result.relabel_forward_passes} of them making the soft-label cache)"
    lines = [f"sweep {sweep.name}: {len(result.trials)} trial(s) ({states}) in {result.seconds:.0f} s; {passes}"]
    if result.best is None:
        lines.append("no trial finished; see the trial logs under " + str(Path(sweep.output_dir) / sweep.name))
    else:
        best = result.best
        lines.append(
            f"best: {_short(best['values'])}  {sweep.metric} {best['metrics'][sweep.metric]:.4f}  "
            f"(trial {best['name']}, MLflow run {best['mlflow_run_id']})"
        )
        lines.append(f"best student checkpoint: {best['student_checkpoint']}")
    return "\n".join(lines)
