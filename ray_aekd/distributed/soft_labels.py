"""The soft-label cache: teacher logits for V views of the training set, written once.

Teachers are the expensive part of a distillation and their logits depend neither on the
tolerance C nor on the temperature T. ``ray-aekd relabel`` runs every teacher once over V
deterministic views of the training split (and once over the validation split) and writes

    <cache.path>/train/view=<v>/*.parquet   rows: index, logits/<teacher> [K] per teacher
    <cache.path>/val/*.parquet              the validation split, unaugmented
    <cache.path>/manifest.json              what made it; written last (no manifest: incomplete)

to any filesystem Ray Data writes to (a local folder, ``s3://``, ``gs://``). A run with
``cache.path`` set reads it instead of running teachers: epoch e uses view ``e mod V``; the
image of a sample is re-made from its (seed, view, index) key, and its logits are looked up by
(index, view) in that view's table, which each data worker process loads once and keeps.
So a cached run sees what an online run with the same seed and ``data.views`` sees.

The manifest records the teachers (names and weight hashes), the data, the split, the seed and
the views; a run whose settings differ is refused with the differences named, never trained
on stale soft labels. Not done here: top-k storage (every logit is kept, float32 or float16).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data import SaveMode

from ray_aekd import __version__
from ray_aekd.config import DistillConfig
from ray_aekd.data import open_source
from ray_aekd.data.ray_dataset import to_ray_dataset
from ray_aekd.data.sources import ImageSource
from ray_aekd.distributed.pipeline import (
    _TASK_CPUS,
    TeacherStageSpec,
    ViewClock,
    add_teacher_stages,
    apply_view,
    fixed_view,
    logits_column,
    view_settings,
)
from ray_aekd.distributed.prepare import check_run, demand_totals, resolve_paths, run_demands, stage_specs
from ray_aekd.distributed.session import connect

__all__ = [
    "MANIFEST",
    "cache_identity",
    "teacher_identity",
    "cached_dataset",
    "check_cache",
    "read_manifest",
    "relabel",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path)`` for a local folder or a URI pyarrow knows (``s3://``, ``gs://``, ...)."""
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices.numpy().astype(np.int64)).tobytes()).hexdigest()


def cache_identity(
    config: DistillConfig,
    source: ImageSource,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    stages: Sequence[TeacherStageSpec],
) -> dict[str, Any]:
    """What a cache must have been made from for ``config`` to use it: teachers (names and
    weight hashes, in order), data, split, seed and views. ``config`` has resolved paths."""
    pad, flip = view_settings(source)
    data = config.data
    return {
        "teachers": [teacher_identity(t, s) for t, s in zip(config.teachers, stages, strict=True)],
        "dataset": data.dataset,
        "data_path": data.path,
        "image_size": data.image_size,
        "val_fraction": data.val_fraction,
        "seed": config.seed,
        "augment": data.augment,
        "views": data.views if data.augment else 1,
        "view_padding": pad,
        "view_flip": flip,
        "num_classes": source.num_classes,
        "train_samples": len(train_idx),
        "train_indices_sha256": _digest(train_idx.sort().values),
        "val_samples": len(val_idx),
        "val_indices_sha256": _digest(val_idx.sort().values),
    }


def teacher_identity(teacher: Any, stage: TeacherStageSpec) -> dict[str, Any]:
    """What makes a teacher's logits: its name and file digest, and, for any teacher but a
    checkpoint using its own statistics, its kind and the preprocessing it runs with (so that a
    changed ``preprocess`` never reuses stale logits; caches made before teacher sources existed
    still match their checkpoint teachers)."""
    out: dict[str, Any] = {"name": stage.name, "weights_sha256": stage.weights_sha256}
    if stage.source.kind != "checkpoint" or teacher.preprocess is not None:
        pre = stage.source.preprocess
        out |= {"kind": stage.source.kind, "preprocess": [list(pre.mean), list(pre.std), pre.size] if pre else None}
    return out


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The cache's manifest, or None if there is none (no cache, or an interrupted relabel)."""
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_stream(_join(path, MANIFEST)) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def _differences(manifest: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    out = []
    for key, want in identity.items():
        have = manifest.get(key)
        if have != want:
            if key == "teachers":
                have = have or []
                names = [t["name"] for t in have]
                if names != [t["name"] for t in want]:
                    out.append(f"teachers {names} (this run: {[t['name'] for t in want]})")
                else:
                    changed = [t["name"] for t, u in zip(have, want, strict=True) if t != u]
                    out.append(f"other weights for teacher(s) {changed}")
            elif key.endswith("sha256"):
                out.append(
                    f"{key.removesuffix('_sha256')} (another split of the data: data.val_fraction, "
                    "data.split_seed, data.tuning_fraction or seed)"
                )
            else:
                out.append(f"{key} = {have!r} (this run: {want!r})")
    return out


def check_cache(uri: str, identity: dict[str, Any], key: str = "cache.path") -> dict[str, Any]:
    """The manifest of the cache at ``uri`` if it was made for ``identity``; else a
    ``ValueError`` that names every difference."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise ValueError(
            f"{key}: no soft-label cache at {uri!r} (no {MANIFEST}; a relabel that was interrupted leaves none). "
            "Make it with `ray-aekd relabel --config <this config>`."
        )
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{key}: the cache at {uri!r} has format {manifest.get('format')!r}; this ray_aekd reads format "
            f"{FORMAT_VERSION}. Make it again with `ray-aekd relabel --overwrite`."
        )
    differences = _differences(manifest, identity)
    if differences:
        raise ValueError(
            f"{key}: the soft-label cache at {uri!r} was made for other settings than this run's: "
            f"{'; '.join(differences)}. Its logits would be stale: make a new cache with "
            "`ray-aekd relabel --config <this config> --overwrite`, or point cache.path elsewhere."
        )
    return manifest


def _cache_rows(batch: dict[str, np.ndarray], names: Sequence[str], dtype: str, with_view: bool) -> pa.Table:
    columns: dict[str, Any] = {"index": pa.array(np.asarray(batch["index"], dtype=np.int64))}
    if with_view:
        columns["view"] = pa.array(np.asarray(batch["view"], dtype=np.int64))
    for name in names:
        logits = np.ascontiguousarray(batch[logits_column(name)], dtype=np.dtype(dtype))  # [B, K]
        flat = pa.array(logits.reshape(-1))
        columns[logits_column(name)] = pa.FixedSizeListArray.from_arrays(flat, logits.shape[1])
    return pa.table(columns)


def relabel(config: DistillConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Run the teachers once over ``data.views`` views of the training split and the
    validation split, and write their logits to ``config.cache.path``. Returns the manifest.

    A cache that is already there for the same teachers and data is kept (nothing runs);
    one made for other settings is refused unless ``overwrite``.
    """
    if config.cache.path is None:
        raise ValueError("cache.path: got None; allowed: a folder or URI to write the soft-label cache to.")
    start = time.perf_counter()
    run_dir = Path(config.output_dir).resolve() / config.name
    config = resolve_paths(config, run_dir)
    uri = cache_uri(config)
    source = open_source(
        config.data.dataset, config.data.path, download=config.data.download, size=config.data.image_size
    )
    train_idx, val_idx = config.data.split(len(source), config.seed)
    check_run(config, source, len(train_idx))
    stages = stage_specs(config, source)
    identity = cache_identity(config, source, train_idx, val_idx, stages)
    existing = _existing_cache(uri, identity, overwrite, log)
    if existing is not None:
        return existing
    demands = run_demands(config, teachers=True, workers=False)
    cpus, gpus = demand_totals(demands)
    connect(cpus, gpus, f"{len(stages)} teacher stage(s)", "lower teachers.<i>.cpus or actors", demands=demands)
    fs, path = _filesystem(uri)
    fs.create_dir(path, recursive=True)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(_join(path, MANIFEST))  # from here on the cache is incomplete until the end
    names, views = [s.name for s in stages], identity["views"]
    log(
        f"relabel: running {len(names)} teachers ({', '.join(names)}) over {views} view(s) of {len(train_idx)} "
        f"training and {len(val_idx)} validation images; writing {config.cache.dtype} logits to {uri}"
    )
    forwards = _write_logits(config, source, train_idx, val_idx, stages, views, uri)
    manifest = {
        "format": FORMAT_VERSION,
        **identity,
        "teacher_sources": [{"name": s.name, "kind": s.source.kind, "location": s.source.location} for s in stages],
        "dtype": config.cache.dtype,
        "teacher_forward_passes": forwards,
        "seconds": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ray_aekd_version": __version__,
    }
    with fs.open_output_stream(_join(path, MANIFEST)) as f:  # last: its presence means complete
        f.write(json.dumps(manifest, indent=2).encode())
    log(
        f"relabel: wrote {views} view(s) of logits for {len(names)} teachers to {uri} "
        f"({sum(forwards.values())} teacher forward passes, {manifest['seconds']:.0f} s)"
    )
    return manifest


def _existing_cache(
    uri: str, identity: dict[str, Any], overwrite: bool, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The manifest of the cache at ``uri`` when it is complete and made for ``identity`` (said on
    the console), else None (none there, or ``overwrite``); a cache made for other settings is
    refused, naming the differences."""
    existing = read_manifest(uri)
    if existing is None or overwrite:
        return None
    if not _differences(existing, identity) and existing.get("format") == FORMAT_VERSION:
        log(f"soft-label cache at {uri} is up to date ({existing['views']} view(s)); nothing to do.")
        return existing
    check_cache(uri, identity)  # raises, naming the differences
    return None


def _write_logits(
    config: DistillConfig,
    source: Any,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    stages: list[TeacherStageSpec],
    views: int,
    uri: str,
) -> dict[str, int]:
    """Run the teacher stages over ``views`` views of the training split (``<uri>/train``,
    partitioned by view) and over the validation split (``<uri>/val``); returns the teachers'
    forward passes, counted."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # a line at the start and one at the end say what happens
    context.print_on_execution_start = False
    names = [s.name for s in stages]
    counter = ViewClock.remote()  # type: ignore[attr-defined]
    pad, flip = view_settings(source)
    order = train_idx.sort().values.numpy()
    parts = [
        to_ray_dataset(source, order, num_cpus=_TASK_CPUS).map_batches(
            fixed_view,  # type: ignore[arg-type]
            fn_kwargs={"view": v, "augment": config.data.augment, "seed": config.seed, "pad": pad, "flip": flip},
            batch_format="numpy",
            num_cpus=_TASK_CPUS,
        )
        for v in range(views)
    ]
    train = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    train = add_teacher_stages(train, stages, counter).map_batches(
        _cache_rows,  # type: ignore[arg-type]
        fn_kwargs={"names": names, "dtype": config.cache.dtype, "with_view": True},
        batch_format="numpy",
        num_cpus=_TASK_CPUS,
    )
    train.write_parquet(_join(uri, "train"), partition_cols=["view"], mode=SaveMode.OVERWRITE)
    val = add_teacher_stages(to_ray_dataset(source, val_idx.sort().values.numpy()), stages, counter)
    val = val.map_batches(
        _cache_rows,  # type: ignore[arg-type]
        fn_kwargs={"names": names, "dtype": config.cache.dtype, "with_view": False},
        batch_format="numpy",
        num_cpus=_TASK_CPUS,
    )
    val.write_parquet(_join(uri, "val"), mode=SaveMode.OVERWRITE)
    forwards = ray.get(counter.forwards.remote())
    ray.kill(counter)
    return forwards


# per data-worker process: the last few tables read, keyed by (cache uri, view or -1 for val)
_TABLES: dict[tuple[str, int], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
_MAX_TABLES = 2


def _load_table(uri: str, view: int, names: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(position, logits)``: ``position[index]`` is the row of sample ``index`` (-1: absent),
    ``logits[name]`` float32 ``[N, K]``."""
    key = (uri, view)
    if key in _TABLES:
        return _TABLES[key]
    fs, path = _filesystem(uri)
    folder = _join(path, "val") if view < 0 else _join(path, "train", f"view={view}")
    table = pq.read_table(folder, filesystem=fs, columns=["index", *(logits_column(n) for n in names)])
    index = table.column("index").to_numpy()
    position = np.full(int(index.max()) + 1 if len(index) else 0, -1, dtype=np.int64)
    position[index] = np.arange(len(index))
    logits = {}
    for name in names:
        column = table.column(logits_column(name)).combine_chunks()
        logits[name] = column.flatten().to_numpy().astype(np.float32).reshape(len(index), column.type.list_size)
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (position, logits)
    return position, logits


def _lookup_logits(batch: dict[str, np.ndarray], uri: str, names: Sequence[str], split: str) -> dict[str, np.ndarray]:
    index = np.asarray(batch["index"], dtype=np.int64)
    views = np.asarray(batch["view"]) if split == "train" else np.full(len(index), -1)
    out = {logits_column(n): np.empty((len(index), 0), dtype=np.float32) for n in names}
    for view in np.unique(views):
        rows = views == view
        position, logits = _load_table(uri, int(view), names)
        wanted = index[rows]
        inside = wanted < len(position)
        found = np.full(len(wanted), -1, dtype=np.int64)
        found[inside] = position[wanted[inside]]
        if (found < 0).any():
            missing = wanted[found < 0][:5].tolist()
            raise ValueError(
                f"cache.path: the soft-label cache at {uri!r} has no logits for samples {missing} in "
                f"{'view ' + str(view) if view >= 0 else 'the validation split'}; it was made for other data."
            )
        for name in names:
            table = logits[name][found]
            if out[logits_column(name)].shape[1] == 0:
                out[logits_column(name)] = np.empty((len(index), table.shape[1]), dtype=np.float32)
            out[logits_column(name)][rows] = table
    batch.update(out)
    return batch


def cached_dataset(
    source: ImageSource,
    indices: Sequence[int] | np.ndarray,
    uri: str,
    names: Sequence[str],
    split: str,
    clock: Any = None,
    seed: int = 0,
    views: int | None = None,
    view: int | None = None,
) -> ray.data.Dataset:
    """Rows ``index``, ``image``, ``label`` and ``logits/<teacher>`` from the cache at ``uri``:
    like ``pipeline.distill_dataset`` but with no teacher run.

    Args:
        split: ``train`` (augmented views; the clock's epoch picks view ``epoch mod views``;
            without a clock, as with ``data.augment: false``, view 0 unaugmented) or ``val``.
        view: without a clock, always view ``view`` (augmented), for a pass kept in memory.
    """
    dataset = to_ray_dataset(source, indices, num_cpus=_TASK_CPUS)
    if split == "train":
        pad, flip = view_settings(source)
        if clock is not None:
            fn_kwargs = {"clock": clock, "seed": seed, "pad": pad, "flip": flip, "views": views}
            dataset = dataset.map_batches(apply_view, fn_kwargs=fn_kwargs, batch_format="numpy", num_cpus=_TASK_CPUS)  # type: ignore[arg-type]
        else:
            fixed = {"view": view or 0, "augment": view is not None, "seed": seed, "pad": pad, "flip": flip}
            dataset = dataset.map_batches(fixed_view, fn_kwargs=fixed, batch_format="numpy", num_cpus=_TASK_CPUS)  # type: ignore[arg-type]
    return dataset.map_batches(
        _lookup_logits,  # type: ignore[arg-type]
        fn_kwargs={"uri": uri, "names": list(names), "split": split},
        batch_format="numpy",
        num_cpus=_TASK_CPUS,
    )


def cache_uri(config: DistillConfig) -> str:
    """``cache.path`` as an absolute local path or a URI."""
    path = config.cache.path or ""
    return path if "://" in path else str(Path(path).resolve())
