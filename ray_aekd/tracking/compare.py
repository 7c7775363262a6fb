"""Rank finished (and running) distillation runs from MLflow: a table, a CSV and a plot.

``ray-aekd compare [--experiment NAME] [--sweep RUN_ID]`` calls :func:`compare`. Without
``--sweep`` it reads every distillation run of an experiment (default ``ray-aekd``); with it, the
child runs (one per trial) of that sweep's parent run. Runs are ranked by their final
``val/acc1`` (the last epoch's, which is what the saved student has), then by their final
``val/agreement`` with the teacher ensemble, then by name. The best epoch of each run is read from
its ``val/acc1`` history, to show when a run peaked before its end.

A distillation run is a run with the param ``distill.strategy`` and at least one ``val/acc1``
value; sweep parent runs (tag ``ray_aekd.sweep = true``) are never rows. The tolerance C is shown
as ``-`` for the ``average`` strategy, which has none.

Left out on purpose: no Ray import (this only reads MLflow), no averaging over seeds (each run is
one row) and no statistics beyond what MLflow holds; metrics are read, never logged.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlflow.entities import Experiment, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ray_aekd._locations import tracking_store_path
from ray_aekd.tracking.runs import limit_mlflow_retries, resolve_tracking_uri

__all__ = [
    "DEFAULT_EXPERIMENT",
    "RunRow",
    "check_store_exists",
    "collect_runs",
    "compare",
    "format_table",
    "plot_comparison",
    "plot_metric_against",
    "promote",
    "rank_runs",
    "write_csv",
]

DEFAULT_EXPERIMENT = "ray-aekd"
SWEEP_TAG = "ray_aekd.sweep"
PARENT_TAG = "mlflow.parentRunId"
STRATEGY_PARAM = "distill.strategy"
ACC1 = "val/acc1"
AGREEMENT = "val/agreement"
PLOT_KEYS = ("tolerance", "temperature")
SYMBOLS = {"tolerance": "C", "temperature": "T"}
MAX_LISTED = 10  # experiments or sweeps named in an error message
MAX_PLOTTED = 40  # runs in the comparison plot
CSV_COLUMNS = (
    "rank", "run", "strategy", "C", "T", "val/acc1", "val/agreement", "best_epoch", "best_acc1", "run_id",
    "status", "epochs",
)  # fmt: skip


@dataclass
class RunRow:
    """One distillation run, as the comparison shows it.

    Attributes:
        run_id: MLflow run id.
        name: MLflow run name (the config's ``name``).
        status: ``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``.
        strategy: ``distill.strategy`` (``average``, ``aekd`` or ``mgda``).
        tolerance: ``distill.tolerance`` C; ``None`` for ``average``, where it means nothing.
        temperature: ``distill.temperature`` T; ``None`` if the run did not log it.
        acc1: the last logged ``val/acc1`` (highest step).
        agreement: the last logged ``val/agreement``, or ``None``.
        best_acc1: the highest ``val/acc1`` of the run.
        best_epoch: the epoch (step) of ``best_acc1``; the earliest one on ties.
        epochs: how many epochs have a ``val/acc1`` value.
    """

    run_id: str
    name: str
    status: str
    strategy: str
    tolerance: float | None
    temperature: float | None
    acc1: float
    agreement: float | None
    best_acc1: float
    best_epoch: int
    epochs: int


def collect_runs(
    tracking_uri: str | None = None, experiment: str | None = None, sweep: str | None = None
) -> list[RunRow]:
    """The distillation runs of an experiment, or the child runs of one sweep, unranked.

    Args:
        tracking_uri: MLflow tracking URI; ``MLFLOW_TRACKING_URI`` wins, then this, then
            ``sqlite:///mlflow.db`` (see :func:`ray_aekd.tracking.resolve_tracking_uri`).
        experiment: experiment name (default ``ray-aekd``); with ``sweep``, it must be the sweep's.
        sweep: run id of a sweep's parent run: its children are read, in the parent's experiment.

    Raises:
        ValueError: unknown experiment or run id (the message lists what exists), or ``sweep`` is
            a run that has no child runs and is not tagged as a sweep.
    """
    limit_mlflow_retries()
    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri)
    client = MlflowClient(uri)
    if sweep is not None:
        runs = _sweep_children(client, uri, sweep, experiment)
    else:
        found = _experiment(client, uri, experiment or DEFAULT_EXPERIMENT)
        runs = _search(client, [found.experiment_id], f"params.`{STRATEGY_PARAM}` LIKE '%'")
    rows = []
    for run in runs:
        if STRATEGY_PARAM in run.data.params and run.data.tags.get(SWEEP_TAG) != "true":
            row = _row(client, run)
            if row is not None:
                rows.append(row)
    return rows


def check_store_exists(uri: str) -> None:
    """Refuse a local store that is not there: MLflow would make an empty one at that path, and
    the comparison would report no runs instead of the mistake. A server is asked by the first call."""
    path = tracking_store_path(uri)
    if path is not None and not Path(path).exists():
        raise ValueError(
            f"--tracking-uri: got {uri!r}, but no MLflow store is there ({path} does not exist), and compare reads "
            "runs, it does not make a store; allowed: the store your runs logged to, an existing SQLite file "
            "(sqlite:////absolute/path/mlflow.db, or sqlite:///mlflow.db in this folder) or a tracking server "
            "(http://host:5000)."
        )


def rank_runs(rows: Sequence[RunRow]) -> list[RunRow]:
    """``rows`` best first: final ``val/acc1`` descending, then ``val/agreement`` descending (a run
    without it after one with it), then name."""
    return sorted(rows, key=lambda r: (-r.acc1, -(r.agreement if r.agreement is not None else -math.inf), r.name))


def format_table(
    rows: Sequence[RunRow], tracking_uri: str | None = None, experiment: str | None = None, sweep: str | None = None
) -> str:
    """A fixed-width table of ``rows`` in the order given, and a line saying what was compared.

    ``tracking_uri``, ``experiment`` and ``sweep`` are the arguments given to :func:`collect_runs`;
    they are only named in the last line. A run that has not finished has its status after its name.
    """
    header = ("rank", "run", "strategy", "C", "T", "val/acc1", "val/agreement", "best epoch", "run id")
    lines = [
        (
            str(rank),
            row.name if row.status == "FINISHED" else f"{row.name} [{row.status.lower()}]",
            row.strategy,
            _number(row.tolerance),
            _number(row.temperature),
            f"{row.acc1:.4f}",
            "-" if row.agreement is None else f"{row.agreement:.4f}",
            f"{row.best_epoch} ({row.best_acc1:.4f})",
            row.run_id,
        )
        for rank, row in enumerate(rows, start=1)
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    left = {1, 2, 8}  # text columns; numbers are right-aligned

    def render(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    table = [render(header), *(render(line) for line in lines)]
    runs = f"{len(rows)} run" + ("" if len(rows) == 1 else "s")
    uri = resolve_tracking_uri(tracking_uri)
    table.append(f"{runs} {_where(experiment, sweep)} at {uri}, ranked by final val/acc1")
    return "\n".join(line.rstrip() for line in table)


def write_csv(rows: Sequence[RunRow], path: str | Path) -> Path:
    """``rows`` as CSV in the order given: the table's columns, with the best epoch and its
    accuracy in two columns, full run ids, unrounded floats, empty cells for missing values, then
    ``status`` and ``epochs``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for rank, r in enumerate(rows, start=1):
            writer.writerow(
                [
                    rank, r.name, r.strategy, _cell(r.tolerance), _cell(r.temperature), repr(r.acc1),
                    _cell(r.agreement), r.best_epoch, repr(r.best_acc1), r.run_id, r.status, r.epochs,
                ]
            )  # fmt: skip
    return path


def plot_metric_against(
    rows: Sequence[RunRow], key: Literal["tolerance", "temperature"], path: str | Path, title: str
) -> Path:
    """Final ``val/acc1`` against the tolerance C or the temperature T, as a PNG.

    One marker series per strategy and value of the other hyperparameter (e.g. ``aekd, T=4``),
    with a line through the mean at each x. Runs without a value for ``key`` are not points;
    against C, ``average`` runs (which have no C) are a dashed horizontal line per temperature.

    Raises:
        ValueError: ``key`` is not ``tolerance`` or ``temperature``.
    """
    if key not in PLOT_KEYS:
        raise ValueError(f"key must be one of {', '.join(PLOT_KEYS)}, got {key!r}")
    other = "temperature" if key == "tolerance" else "tolerance"
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    baselines: dict[float | None, list[float]] = defaultdict(list)
    for row in rows:
        x = getattr(row, key)
        if x is None:
            if key == "tolerance" and row.strategy == "average":
                baselines[row.temperature].append(row.acc1)
            continue
        value = getattr(row, other)
        label = row.strategy if value is None else f"{row.strategy}, {SYMBOLS[other]}={_number(value)}"
        series[label].append((x, row.acc1))

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^v<>ph*"
    for i, (label, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*points, strict=True)
        (dots,) = ax.plot(xs, ys, linestyle="none", marker=markers[i % len(markers)], label=label)
        means = sorted((x, sum(y for px, y in points if px == x) / xs.count(x)) for x in set(xs))
        if len(means) > 1:
            ax.plot(*zip(*means, strict=True), color=dots.get_color(), linewidth=1, alpha=0.6)
    ordered = sorted(baselines.items(), key=lambda item: (item[0] is None, item[0] or 0.0))
    for j, (temperature, accs) in enumerate(ordered, start=len(series)):
        label = "average" if temperature is None else f"average, T={_number(temperature)}"
        ax.axhline(sum(accs) / len(accs), linestyle="--", linewidth=1, color=f"C{j % 10}", label=label)
    if not series and not baselines:
        ax.text(0.5, 0.5, f"no run has a {key} {SYMBOLS[key]}", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"{key} {SYMBOLS[key]}")
    ax.set_ylabel("final val/acc1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, plt, Path(path))


def plot_comparison(rows: Sequence[RunRow], path: str | Path, title: str = "distillation runs") -> Path:
    """Ranked runs as a PNG, best at the top: the final ``val/acc1`` (filled marker) and the best
    one (hollow marker) of each run, coloured by strategy, labelled name (strategy, C, T).
    Only the best 40 runs are drawn; the title then says so."""
    ranked = rank_runs(rows)
    shown = ranked[:MAX_PLOTTED]
    if len(shown) < len(ranked):
        title = f"{title} (best {len(shown)} of {len(ranked)})"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(shown), 1)))
    colors = {s: f"C{i}" for i, s in enumerate(sorted({r.strategy for r in shown}))}
    ys = range(len(shown), 0, -1)
    for y, row in zip(ys, shown, strict=True):
        color = colors[row.strategy]
        ax.plot([row.acc1, row.best_acc1], [y, y], color=color, linewidth=1, alpha=0.5)
        ax.plot(row.best_acc1, y, marker="o", markerfacecolor="none", color=color)
        ax.plot(row.acc1, y, marker="o", color=color)
        ax.annotate(f"{row.acc1:.4f}", (row.acc1, y), xytext=(0, 6), textcoords="offset points", ha="center",
                    fontsize=7)  # fmt: skip
    labels = [f"{r.name} ({', '.join(_settings(r))})" for r in shown]
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.set_ylim(0.3, len(shown) + 0.7)
    for strategy, color in colors.items():
        ax.plot([], [], marker="o", linestyle="none", color=color, label=strategy)
    ax.plot([], [], marker="o", linestyle="none", color="black", label="final val/acc1")
    ax.plot([], [], marker="o", markerfacecolor="none", linestyle="none", color="black", label="best val/acc1")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("val/acc1")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, plt, Path(path))


def compare(
    tracking_uri: str | None = None, experiment: str | None = None, sweep: str | None = None, output_dir: str = "."
) -> tuple[list[RunRow], Path]:
    """Collect and rank the runs, write ``compare.csv`` and ``compare.png`` under ``output_dir``.

    Arguments are those of :func:`collect_runs`; ``output_dir`` is created if needed.

    Returns:
        The ranked rows and the path of ``compare.png``.

    Raises:
        ValueError: as :func:`collect_runs`, or when no distillation run was found.
    """
    rows = rank_runs(collect_runs(tracking_uri, experiment, sweep))
    if not rows:
        raise ValueError(
            f"no distillation runs were found {_where(experiment, sweep)} at {resolve_tracking_uri(tracking_uri)} "
            f"(a distillation run has the param {STRATEGY_PARAM} and at least one {ACC1} value); "
            "make some with `ray-aekd distill --config CONFIG` or `ray-aekd sweep`"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "compare.csv")
    return rows, plot_comparison(rows, out / "compare.png")


def _row(client: MlflowClient, run: Run) -> RunRow | None:
    """``run`` as a row, or ``None`` if it has no ``val/acc1`` yet."""
    history = client.get_metric_history(run.info.run_id, ACC1)
    if not history:
        return None
    final = max(history, key=lambda m: (m.step, m.timestamp))  # a resumed run may log an epoch twice
    best = min(history, key=lambda m: (-m.value, m.step))
    params = run.data.params
    strategy = params[STRATEGY_PARAM]
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        strategy=strategy,
        tolerance=None if strategy == "average" else _float(params.get("distill.tolerance")),
        temperature=_float(params.get("distill.temperature")),
        acc1=final.value,
        agreement=run.data.metrics.get(AGREEMENT),
        best_acc1=best.value,
        best_epoch=best.step,
        epochs=len({m.step for m in history}),
    )


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every active run that matches, over all result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client: MlflowClient, uri: str, name: str) -> Experiment:
    found = client.get_experiment_by_name(name)
    if found is None:
        names = [e.name for e in client.search_experiments(max_results=MAX_LISTED + 1)]
        listed = ", ".join(repr(n) for n in names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
        raise ValueError(
            f"--experiment {name!r}: no such experiment at {uri}; "
            + (f"experiments there: {listed}" if names else "there are no experiments there")
        )
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"--experiment {name!r}: experiment {found.experiment_id} at {uri} is deleted; "
            f"restore it with `mlflow experiments restore --experiment-id {found.experiment_id}`"
        )
    return found


def _sweep_children(client: MlflowClient, uri: str, sweep: str, experiment: str | None) -> list[Run]:
    try:
        parent = client.get_run(sweep)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ValueError(f"--sweep {sweep!r}: no run with this id at {uri}; {_known_sweeps(client)}") from None
    where = client.get_experiment(parent.info.experiment_id).name
    if experiment is not None and experiment != where:
        raise ValueError(
            f"--sweep {sweep!r} is a run of experiment {where!r}, not of --experiment {experiment!r}; give only --sweep"
        )
    children = _search(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{sweep}'")
    if not children and parent.data.tags.get(SWEEP_TAG) != "true":
        raise ValueError(
            f"--sweep {sweep!r}: run {parent.info.run_name!r} of experiment {where!r} is not a sweep "
            f"(it has no child runs and no tag {SWEEP_TAG}=true); {_known_sweeps(client)}"
        )
    return children


def _known_sweeps(client: MlflowClient) -> str:
    """The newest sweep parent runs, for an error message."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments(max_results=1000)}
    parents = list(
        client.search_runs(
            list(experiments), f"tags.`{SWEEP_TAG}` = 'true'", max_results=MAX_LISTED + 1,
            order_by=["attributes.start_time DESC"],
        )
    )  # fmt: skip
    if not parents:
        return "there are no sweep runs there; `ray-aekd sweep` makes one"
    listed = ", ".join(
        f"{r.info.run_id} ({r.info.run_name!r} in {experiments[r.info.experiment_id]!r})" for r in parents[:MAX_LISTED]
    )
    return f"sweep runs there, newest first: {listed}" + (", ..." if len(parents) > MAX_LISTED else "")


def _where(experiment: str | None, sweep: str | None) -> str:
    return f"in sweep {sweep}" if sweep is not None else f"in experiment {experiment or DEFAULT_EXPERIMENT!r}"


def _float(text: str | None) -> float | None:
    """A logged param as a number; ``None`` when missing or not a number (e.g. ``None``)."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def _settings(row: RunRow) -> list[str]:
    parts = [row.strategy]
    if row.tolerance is not None:
        parts.append(f"C={_number(row.tolerance)}")
    if row.temperature is not None:
        parts.append(f"T={_number(row.temperature)}")
    return parts


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported late so that importing this module stays light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend outside the axes in the file
    plt.close(fig)
    return path


def promote(
    rows: Sequence[RunRow], tracking_uri: str | None = None, alias: str = "champion"
) -> tuple[str, str, RunRow]:
    """Set registry alias ``alias`` on the registered model version of the best finished run
    in ``rows`` (ranked); returns ``(model name, version, row)``.

    Raises:
        ValueError: no finished run, or the best one has no registered model version (distil
            with ``tracking.register_model`` set to register it).
    """
    finished = [r for r in rows if r.status == "FINISHED"]
    if not finished:
        raise ValueError("--promote: none of the runs has finished; allowed: a comparison with a FINISHED run.")
    best = finished[0]
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    versions = client.search_model_versions(f"run_id = '{best.run_id}'")
    if not versions:
        raise ValueError(
            f"--promote: the best run {best.name!r} ({best.run_id}) has no registered model version; allowed: a best "
            "run whose student was registered (distil with --set tracking.register_model=NAME)."
        )
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(version.name, alias, version.version)
    return version.name, str(version.version), best
