"""Predictions made elsewhere, recorded as a run of kind ``external``: scored like bemerc's own runs
(``bemerc compare`` with its paired test), fused with them (``bemerc fuse``, when the file gives
probabilities) and listed by ``/runs`` and the browse page.

A predictions file (CSV, JSONL or Parquet, read by the manifest's reader) has a ``uid`` column and
either a ``label`` column or one probability column per label of the dataset (any order; with both,
the label must be the most probable one). Every row is checked before anything is written; a bad
file stops with one line naming the file, the row and the problem, and the store stays as it was.

>>> ingest_predictions(Store("store"), "qwen7b-dev.csv", "qwen7b").run_id       # doctest: +SKIP
'external-qwen7b-20261201-101500-4f2a'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bemerc.store import Store
from bemerc.store.ingest.common import IngestError, file_sha256
from bemerc.store.ingest.manifest import read_table_rows
from bemerc.store.runs import Run, check_run_dir, default_run_dir, list_runs
from bemerc.store.schema import SPLITS, run_classes
from bemerc.train.evaluate import bootstrap_intervals
from bemerc.train.metrics import classification_metrics
from bemerc.train.runs import EXTERNAL, Predictions, new_run_id, save_run, split_metrics

# |sum of a row's probabilities - 1| allowed: a file written with 3 decimals (7 labels) is off by up
# to 0.0035; logits, percentages or unnormalised scores are far off
PROBABILITY_TOLERANCE = 0.01
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class ExternalRun:
    """The recorded run: its id, folder, metrics per split, rows, and whether the file gave probabilities."""

    run_id: str
    run_dir: Path
    metrics: dict
    rows: int
    probabilities: bool
    reused: bool = False


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _probability(value: object, path, n: int, column: str) -> float:
    try:
        if isinstance(value, bool) or _blank(value):
            raise TypeError
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IngestError(path, f"column {column!r} must be a probability from 0 to 1, found {value!r}", n) from None
    if not 0.0 <= p <= 1.0:
        raise IngestError(path, f"column {column!r} must be a probability from 0 to 1, found {p!r}", n)
    return p


def read_predictions(store: Store, path: str | Path) -> tuple[str, list[str], list[str], np.ndarray, bool]:
    """(dataset, classes, uids, (N, C) float32 probabilities, whether the file gave probabilities) of
    a predictions file, every row checked against the store (:class:`IngestError` naming the row)."""
    columns, rows = read_table_rows(path)
    if "uid" not in columns:
        raise IngestError(path, f"no 'uid' column (columns: {', '.join(columns) or 'none'})")
    if not rows:
        raise IngestError(path, "no rows")
    stored = store.read("utterances", ["uid", "dataset", "split", "label"])
    known = {uid: (d, s, g) for uid, d, s, g in zip(*(stored[c].to_list() for c in ("uid", "dataset", "split", "label")))}
    dataset, seen = None, {}
    for n, row in rows:
        uid = row.get("uid")
        if _blank(uid) or str(uid) not in known:
            raise IngestError(path, f"uid {uid!r} is not in the store" if not _blank(uid) else "empty uid", n)
        uid = str(uid)
        if uid in seen:
            raise IngestError(path, f"uid {uid!r} appears twice (rows {seen[uid]} and {n})", n)
        seen[uid] = n
        if dataset is None:
            dataset = known[uid][0]
        elif known[uid][0] != dataset:
            raise IngestError(path, f"uid {uid!r} is of dataset {known[uid][0]!r}, earlier rows of {dataset!r}: "
                                    "one file holds one dataset's predictions", n)
    classes = run_classes(dataset, [g for d, _, g in known.values() if d == dataset])
    others = [c for c in columns if c not in ("uid", "label")]
    unknown = [c for c in others if c not in classes]
    if unknown:
        raise IngestError(path, f"column(s) {', '.join(map(repr, unknown))} are not labels of dataset {dataset!r}: expected uid, "
                                f"then label or one probability column per label ({', '.join(classes)})")
    has_probabilities = bool(others)
    if has_probabilities and len(others) < len(classes):
        raise IngestError(path, f"no probability column for {', '.join(c for c in classes if c not in others)}: give one "
                                f"column per label of dataset {dataset!r} ({', '.join(classes)})")
    if not has_probabilities and "label" not in columns:
        raise IngestError(path, f"no 'label' column and no probability columns: expected uid, then label or one probability "
                                f"column per label ({', '.join(classes)})")
    labelled_splits = {s for d, s, g in known.values() if d == dataset and g is not None}
    probabilities = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for i, (n, row) in enumerate(rows):
        split = known[str(row["uid"])][1]
        if split not in labelled_splits:
            raise IngestError(path, f"uid {row['uid']!r} is of split {split!r}, which has no labels in the store, so it "
                                    "cannot be scored: leave that split out", n)
        label = row.get("label")
        if "label" in columns and (_blank(label) or str(label) not in classes):
            raise IngestError(path, f"label {label!r} is not a label of dataset {dataset!r} ({', '.join(classes)})", n)
        if has_probabilities:
            p = np.array([_probability(row[c], path, n, c) for c in classes], dtype=np.float64)
            if abs(p.sum() - 1.0) > PROBABILITY_TOLERANCE:
                raise IngestError(path, f"probabilities sum to {p.sum():.4g}, not 1 (within {PROBABILITY_TOLERANCE})", n)
            if "label" in columns and p[classes.index(str(label))] < p.max():
                top = classes[int(p.argmax())]
                raise IngestError(path, f"label {label!r} is not its most probable label ({top} {p.max():.4g})", n)
            probabilities[i] = p
        else:
            probabilities[i, classes.index(str(label))] = 1.0
    return dataset, classes, [str(row["uid"]) for _, row in rows], probabilities, has_probabilities


def ingest_predictions(store: Store, path: str | Path, name: str, *, run_dir: str | Path | None = None,
                       n_resamples: int = 1000, seed: int = 0) -> ExternalRun:
    """Record the predictions in ``path`` as a run of kind ``external`` named ``name`` (run id
    ``external-NAME-...``), scored per split against the store's labels, with 95% bootstrap
    intervals over dialogues. The same file ingested again under the same name returns the run
    already stored (``reused``)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"--name must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), found {name!r}")
    if run_dir is not None:
        check_run_dir(run_dir)
    dataset, classes, uids, probabilities, has_probabilities = read_predictions(store, path)
    digest = file_sha256(path)
    for r in list_runs(store) if store.has_table("runs") else []:
        if r.kind == EXTERNAL and r.config.get("name") == name and r.config.get("sha256") == digest:
            return ExternalRun(r.run_id, Path(r.run_dir), r.metrics, len(uids), has_probabilities, reused=True)

    utterances = store.read("utterances", ["uid", "split", "dialogue_id", "label"])
    info = {u: (s, d, g) for u, s, d, g in zip(*(utterances[c].to_list() for c in ("uid", "split", "dialogue_id", "label")))}
    splits = [info[u][0] for u in uids]
    gold = [info[u][2] for u in uids]
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(g, -1) if g is not None else -1 for g in gold])
    predicted = probabilities.argmax(axis=1)
    metrics = {}
    for split in SPLITS:
        rows = (np.array(splits) == split) & (y >= 0)
        if rows.any():
            metrics[split] = classification_metrics(y[rows], predicted[rows], classes)
            groups = np.array([f"{split}/{info[u][1]}" for u in uids])[rows]
            metrics[split]["ci"] = bootstrap_intervals(y[rows], predicted[rows], len(classes), n_resamples, groups=groups, seed=seed)
    run_id = new_run_id(f"{EXTERNAL}-{name}")
    folder = Path(run_dir) if run_dir else default_run_dir(store, run_id)
    config = {"name": name, "source": str(path), "sha256": digest, "rows": len(uids), "probabilities": has_probabilities}
    save_run(store, Run(run_id, EXTERNAL, dataset, classes, [], config, split_metrics(metrics), str(folder)),
             Predictions(uids, splits, gold, probabilities))
    return ExternalRun(run_id, folder, split_metrics(metrics), len(uids), has_probabilities)


def write_predictions(store: Store, run_id: str, path: str | Path) -> Path:
    """A stored run's predictions as a file :func:`ingest_predictions` reads (CSV, JSONL or Parquet by
    the suffix): ``uid`` and one probability column per class, written exactly (float32 values).

    >>> write_predictions(Store("store"), "baseline-20261130-101500-4f2a", "baseline.csv")   # doctest: +SKIP
    """
    import polars as pl

    from bemerc.store.schema import sql_quote

    run = next((r for r in list_runs(store) if r.run_id == run_id), None)
    if run is None:
        raise ValueError(f"{store.path}: no run {run_id!r}")
    preds = store.read("predictions", ["uid", "probabilities"], where=f"run_id = {sql_quote(run_id)}").sort("uid")
    values = np.array(preds["probabilities"].to_list(), dtype=np.float32).reshape(preds.height, len(run.classes))
    frame = pl.DataFrame({"uid": preds["uid"], **{c: values[:, i] for i, c in enumerate(run.classes)}})
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":  # each float32 as the shortest decimal that reads back to it
        frame = frame.with_columns(pl.col(c).map_elements(lambda v: repr(float(v)), return_dtype=pl.String) for c in run.classes)
        frame.write_csv(path)
    elif suffix in (".jsonl", ".ndjson"):
        frame.write_ndjson(path)
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        raise ValueError(f"{path}: unknown file format {suffix!r} (expected .csv, .jsonl or .parquet)")
    return path
