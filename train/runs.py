"""Record a trained run: ``RUN_DIR/metrics.json``, a row in ``runs`` and its ``predictions``.

The baseline and the tuned LLM both end here, so ``bemerc compare`` and the API read every run the
same way.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa

from bemerc.store import Store
from bemerc.store import schema as S
from bemerc.store.runs import GROUP_KIND, check_run_dir, default_run_dir, list_runs, remove_run_files, write_run_files
from bemerc.train.metrics import classification_metrics


def new_run_id(kind: str) -> str:
    """A sortable, unique run id such as ``baseline-20261122-031500-4f2a``."""
    return f"{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def split_metrics(metrics_by_split: dict[str, dict]) -> dict:
    """The ``metrics.json`` layout: ``{"dev": {"weighted_f1", "accuracy", "macro_f1", "per_class", ...}, "test": ...}``."""
    return {split: m for split, m in metrics_by_split.items() if m and m.get("n", 0) > 0}


def save_run(
    store: Store,
    *,
    run_id: str,
    kind: str,
    run_dir: Path,
    classes: list[str],
    feature_sets: list[str],
    config: dict,
    metrics: dict,
    uids: list[str],
    splits: list[str],
    gold: list[str | None],
    probabilities: np.ndarray,
    dataset: str | None = None,
    write_files: Callable[[Path], object] | None = None,
) -> Path:
    """Write the run's files (``write_files(folder)``, e.g. its models, then ``metrics.json`` and
    ``config.json``) into ``run_dir``, whole or not at all (:func:`~bemerc.store.runs.write_run_files`),
    then the run and its predictions to the store (the run row last, so a run listed in ``runs``
    always has its predictions). When the store cannot record the run (a full disk, a read-only
    store), the files are taken back: no run folder without its ``runs`` row is left behind.

    ``probabilities`` is (N, C) in ``classes`` order; the predicted label is its argmax.
    """
    run_dir = Path(run_dir)

    def write(folder: Path) -> None:
        if write_files is not None:
            write_files(folder)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (folder / "config.json").write_text(json.dumps({"run_id": run_id, "kind": kind, "classes": classes,
                                                        "feature_sets": feature_sets, **config}, indent=2, default=str))

    written = write_run_files(run_dir, write)
    try:
        _record_run(store, run_id=run_id, kind=kind, run_dir=run_dir, classes=classes, feature_sets=feature_sets, config=config,
                    metrics=metrics, uids=uids, splits=splits, gold=gold, probabilities=probabilities, dataset=dataset)
    except BaseException:
        remove_run_files(run_dir, written)
        raise
    return run_dir


def _record_run(store: Store, *, run_id: str, kind: str, run_dir: Path, classes: list[str], feature_sets: list[str], config: dict,
                metrics: dict, uids: list[str], splits: list[str], gold: list[str | None], probabilities: np.ndarray,
                dataset: str | None) -> None:
    """The predictions, then the ``runs`` row (see :func:`save_run`)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    predicted = [classes[i] for i in probabilities.argmax(axis=1)]
    rows = pa.table(
        {
            "run_id": [run_id] * len(uids),
            "uid": uids,
            "split": splits,
            "label": predicted,
            "gold": gold,
            "probabilities": pa.array(list(probabilities), type=pa.list_(pa.float32())),
        },
        schema=S.PREDICTIONS,
    )
    with store.lock:
        versions = {name: store.version(name) for name in ["utterances", *[store.feature_set(f).table_name for f in feature_sets]]}
        store.upsert("predictions", rows)
        run = {
            "run_id": run_id,
            "kind": kind,
            "created_at": datetime.now(timezone.utc).replace(microsecond=0),
            "dataset": dataset,
            "classes": classes,
            "feature_sets": feature_sets,
            "table_versions_json": json.dumps(versions),
            "config_json": json.dumps(config, default=str),
            "metrics_json": json.dumps(metrics),
            "run_dir": str(run_dir.resolve()),
        }
        store.upsert("runs", pa.Table.from_pylist([run], schema=S.RUNS))


# -- seed groups ----------------------------------------------------------------------------------
# A seed group is a run of kind ``group`` (one more row in ``runs``, no new column, so every store
# reads it). Its config holds ``member_kind``, ``seeds``, ``members`` ({seed: run_id}) and ``failed``
# ({seed: reason}); its predictions are the seeds' mean probabilities on the utterances every member
# predicted (what `bemerc fuse` and the paired test of `bemerc compare` use); its metrics per split
# hold the mean over seeds (so ``metrics["dev"]["weighted_f1"]`` reads as for any run), the sample
# standard deviation, every seed's value and the score of the seed-mean probabilities.
GROUP_METRICS = ("weighted_f1", "accuracy", "macro_f1")


def parse_seeds(text: str) -> list[int]:
    """Seeds of ``--seeds``: comma-separated integers, each once.

    >>> parse_seeds("0,1, 2")
    [0, 1, 2]
    """
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds names a seed twice: {text!r}")
    return seeds


def seed_summary(values: dict[int, dict]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one seed) and per-seed values of each metric.

    ``values``: {seed: {"weighted_f1", "accuracy", "macro_f1", ...}} of one split.

    >>> s = seed_summary({0: {"weighted_f1": 0.5, "accuracy": 0.6, "macro_f1": 0.3},
    ...                   1: {"weighted_f1": 0.7, "accuracy": 0.6, "macro_f1": 0.5}})
    >>> round(s["weighted_f1"], 3), round(s["std"]["weighted_f1"], 4), s["seeds"]
    (0.6, 0.1414, 2)
    """
    seeds = list(values)
    out: dict = {"seeds": len(seeds), "std": {}, "per_seed": {str(s): {m: values[s][m] for m in GROUP_METRICS} for s in seeds}}
    for m in GROUP_METRICS:
        x = np.array([values[s][m] for s in seeds], dtype=np.float64)
        out[m] = float(x.mean())
        out["std"][m] = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return out


def run_seeds(seeds: list[int], train_one, log=lambda message: None) -> tuple[dict[int, str], dict[int, str]]:
    """Call ``train_one(seed) -> run_id`` for every seed; a seed that raises is recorded as failed
    (its one-line reason) and the others still run. Returns ({seed: run_id}, {seed: reason})."""
    members, failed = {}, {}
    for seed in seeds:
        log(f"seed {seed}: training")
        try:
            members[seed] = train_one(seed)
        except Exception as exc:  # noqa: BLE001 - one seed's failure must not lose the others
            failed[seed] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log(f"seed {seed}: failed ({failed[seed]})")
    return members, failed


def save_group(
    store: Store,
    *,
    member_kind: str,
    members: dict[int, str],
    failed: dict[int, str],
    run_dir: Path | None = None,
    config: dict | None = None,
) -> tuple[str, Path, dict]:
    """Record the seed group of finished ``members`` ({seed: run_id}) and ``failed`` seeds as a run
    of kind ``group``; returns (group run id, run folder, metrics). Needs at least one member."""
    if not members:
        raise ValueError("every seed failed: " + "; ".join(f"seed {s}: {r}" for s, r in failed.items()))
    by_id = {r["run_id"]: r for r in list_runs(store)}
    runs = {seed: by_id[run_id] for seed, run_id in members.items()}
    first = next(iter(runs.values()))
    classes = list(first["classes"])
    preds = store.read("predictions", ["run_id", "uid", "split", "gold", "probabilities"],
                       where=f"run_id IN ({S.sql_in(members.values())})")
    by_run = {run_id: preds.filter(pl.col("run_id") == run_id) for run_id in members.values()}
    shared = set.intersection(*(set(p["uid"].to_list()) for p in by_run.values()))  # a uid is one utterance of one split
    mean = np.zeros((len(shared), len(classes)))
    for i, part in enumerate(by_run.values()):
        part = part.filter(pl.col("uid").is_in(list(shared))).sort("uid")
        p = np.array(part["probabilities"].to_list(), dtype=np.float64).reshape(len(shared), len(classes))
        mean += p / p.sum(axis=1, keepdims=True)
        if i == 0:
            uids, split_of, gold = part["uid"].to_list(), part["split"].to_list(), part["gold"].to_list()
    mean /= len(members)
    index = {c: k for k, c in enumerate(classes)}
    metrics: dict = {}
    splits = np.array(split_of)
    for split in sorted(set(splits)):
        per_seed = {seed: r["metrics"][split] for seed, r in runs.items() if split in r["metrics"]}
        if not per_seed:
            continue
        y = np.array([index.get(g, -1) if g is not None else -1 for g in gold])
        keep = (splits == split) & (y >= 0)
        metrics[split] = {"n": next(iter(per_seed.values())).get("n"), **seed_summary(per_seed)}
        if keep.any():
            ensemble = classification_metrics(y[keep], mean[keep].argmax(axis=1), classes)
            metrics[split]["seed_mean_probabilities"] = {k: ensemble[k] for k in ("n", *GROUP_METRICS)}
    group_id = new_run_id(f"{member_kind}-{GROUP_KIND}")
    run_dir = Path(run_dir) if run_dir else default_run_dir(store, group_id)
    save_run(
        store,
        run_id=group_id,
        kind=GROUP_KIND,
        run_dir=run_dir,
        classes=classes,
        feature_sets=list(first["feature_sets"]),
        config={**(config or {}), "member_kind": member_kind, "seeds": sorted([*members, *failed]),
                "members": {str(s): r for s, r in members.items()}, "failed": {str(s): r for s, r in failed.items()}},
        metrics=metrics,
        uids=uids,
        splits=split_of,
        gold=gold,
        probabilities=mean,
        dataset=first["dataset"],
    )
    return group_id, run_dir, metrics


def train_group(store: Store, member_kind: str, seeds: list[int], train_one, *, run_dir: str | Path | None = None,
                config: dict | None = None, log=lambda message: None) -> dict:
    """One run per seed (``train_one(seed, run_dir_or_None) -> run_id``), then their group.

    With ``run_dir`` the seed-``s`` run goes to ``RUN_DIR/seed-s`` and the group's files to
    ``RUN_DIR``. Returns ``{"group_id", "run_dir", "members", "failed", "metrics"}``; raises
    ValueError (naming every seed's reason) when no seed finished.
    """
    base = Path(run_dir) if run_dir else None
    if base is not None:  # the group's folder holds nothing yet but (maybe) seed folders, each checked as its seed's run folder
        check_run_dir(base, allow=[f"seed-{seed}" for seed in seeds])
    members, failed = run_seeds(seeds, lambda seed: train_one(seed, base / f"seed-{seed}" if base else None), log)
    group_id, group_dir, metrics = save_group(store, member_kind=member_kind, members=members, failed=failed,
                                              run_dir=base, config=config)
    return {"group_id": group_id, "run_dir": str(group_dir), "members": members, "failed": failed, "metrics": metrics}
