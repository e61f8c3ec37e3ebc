"""Runs: their kinds, recording one (``RUN_DIR/metrics.json``, a row in ``runs`` and its
``predictions``), loading the model of one, and seed groups.

Every trainer ends in :func:`save_run`, so ``bemerc compare``, fusion and the API read every run the
same way (:func:`bemerc.store.runs.list_runs` gives :class:`~bemerc.store.runs.Run` records). The
kind names are spelt here once (:data:`KINDS`), and :data:`MODELS` says, per kind, how its model is
loaded, as whisper's ``load_model`` sits beside its model:

>>> run = list_runs(Store("store"))[-1]                  # doctest: +SKIP
>>> load_model(run, store).predict_proba(corpus).shape   # doctest: +SKIP
(13, 7)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from bemerc.store import Store
from bemerc.store import schema as S
from bemerc.store.runs import Run, check_run_dir, default_run_dir, list_runs, remove_run_files, write_run_files
from bemerc.train.metrics import classification_metrics

if TYPE_CHECKING:
    from bemerc.train.tensors import Corpus

# -- kinds ----------------------------------------------------------------------------------------
# What made a run, as its ``runs`` row says: the one place these names are spelt.
BASELINE = "baseline"  # XGBoost late fusion (bemerc.train.baseline)
TUNE = "tune"  # the instruction-tuned LLM with its adapter (bemerc.train.tune)
ZERO_SHOT = "zero-shot"  # the LLM prompted without training: predictions, no adapter
FUSION = "fusion"  # stored runs stacked with weights fit on dev (bemerc.train.fuse)
GROUP = "group"  # a seed group: its members' mean probabilities (save_group)
EXTERNAL = "external"  # predictions made elsewhere (bemerc.train.external)
KINDS = (BASELINE, TUNE, ZERO_SHOT, FUSION, GROUP, EXTERNAL)


def new_run_id(kind: str) -> str:
    """A sortable, unique run id such as ``baseline-20261122-031500-4f2a``."""
    return f"{kind}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def split_metrics(metrics_by_split: dict[str, dict]) -> dict:
    """The ``metrics.json`` layout: ``{"dev": {"weighted_f1", "accuracy", "macro_f1", "per_class", ...}, "test": ...}``."""
    return {split: m for split, m in metrics_by_split.items() if m and m.get("n", 0) > 0}


@dataclass(frozen=True)
class Predictions:
    """What a run predicted, one entry per utterance: its uid, split and gold label (None when
    unlabelled), and (N, C) ``probabilities`` in the run's class order (the predicted label is the argmax)."""

    uids: list[str]
    splits: list[str]
    gold: list[str | None]
    probabilities: np.ndarray


def save_run(store: Store, run: Run, predictions: Predictions, write_files: Callable[[Path], object] | None = None) -> Path:
    """Write the run's files (``write_files(folder)``, e.g. its models, then ``metrics.json`` and
    ``config.json``) into ``run.run_dir``, whole or not at all (:func:`~bemerc.store.runs.write_run_files`),
    then the run and its predictions to the store (the run row last, so a run listed in ``runs``
    always has its predictions), stamped with the time and the versions of the tables it read. When
    the store cannot record the run (a full disk, a read-only store), the files are taken back: no
    run folder without its ``runs`` row is left behind. Returns the run folder.
    """
    run_dir = Path(run.run_dir)

    def write(folder: Path) -> None:
        if write_files is not None:
            write_files(folder)
        (folder / "metrics.json").write_text(json.dumps(run.metrics, indent=2))
        (folder / "config.json").write_text(json.dumps({"run_id": run.run_id, "kind": run.kind, "classes": run.classes,
                                                        "feature_sets": run.feature_sets, **run.config}, indent=2, default=str))

    written = write_run_files(run_dir, write)
    try:
        _record_run(store, replace(run, run_dir=str(run_dir.resolve())), predictions)
    except BaseException:
        remove_run_files(run_dir, written)
        raise
    return run_dir


def _record_run(store: Store, run: Run, predictions: Predictions) -> None:
    """The predictions, then the ``runs`` row (see :func:`save_run`)."""
    probabilities = np.asarray(predictions.probabilities, dtype=np.float32)
    predicted = [run.classes[i] for i in probabilities.argmax(axis=1)]
    rows = pa.table(
        {
            "run_id": [run.run_id] * len(predictions.uids),
            "uid": predictions.uids,
            "split": predictions.splits,
            "label": predicted,
            "gold": predictions.gold,
            "probabilities": pa.array(list(probabilities), type=pa.list_(pa.float32())),
        },
        schema=S.PREDICTIONS,
    )
    store.record_run(rows, {"run_id": run.run_id, "kind": run.kind, "created_at": datetime.now(timezone.utc).replace(microsecond=0),
                            "dataset": run.dataset, "classes": run.classes, "feature_sets": run.feature_sets,
                            "config_json": json.dumps(run.config, default=str), "metrics_json": json.dumps(run.metrics),
                            "run_dir": run.run_dir}, run.feature_sets)


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
    by_id = {r.run_id: r for r in list_runs(store)}
    runs = {seed: by_id[run_id] for seed, run_id in members.items()}
    first = next(iter(runs.values()))
    classes = list(first.classes)
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
        per_seed = {seed: r.metrics[split] for seed, r in runs.items() if split in r.metrics}
        if not per_seed:
            continue
        y = np.array([index.get(g, -1) if g is not None else -1 for g in gold])
        keep = (splits == split) & (y >= 0)
        metrics[split] = {"n": next(iter(per_seed.values())).get("n"), **seed_summary(per_seed)}
        if keep.any():
            ensemble = classification_metrics(y[keep], mean[keep].argmax(axis=1), classes)
            metrics[split]["seed_mean_probabilities"] = {k: ensemble[k] for k in ("n", *GROUP_METRICS)}
    group_id = new_run_id(f"{member_kind}-{GROUP}")
    run_dir = Path(run_dir) if run_dir else default_run_dir(store, group_id)
    config = {**(config or {}), "member_kind": member_kind, "seeds": sorted([*members, *failed]),
              "members": {str(s): r for s, r in members.items()}, "failed": {str(s): r for s, r in failed.items()}}
    save_run(store, Run(group_id, GROUP, first.dataset, classes, list(first.feature_sets), config, metrics, str(run_dir)),
             Predictions(uids, split_of, gold, mean))
    return group_id, run_dir, metrics


def seed_groups(runs: list[Run]) -> dict[str, dict]:
    """The seed groups among ``runs`` (as :func:`~bemerc.store.runs.list_runs` gives them), by group run id:
    ``{"member_kind", "seeds", "members": {seed: run_id}, "failed": {seed: reason}}``. A group is a
    run of kind ``group`` (``bemerc baseline --seeds``, ``bemerc tune --seeds``); its members are
    ordinary runs, tied to it only by its config, so stores written before groups read unchanged.

    >>> seed_groups(list_runs(Store("store")))   # doctest: +SKIP
    {'baseline-group-20261202-052813-3d09': {'member_kind': 'baseline', 'seeds': [0, 1, 2], 'members': {...}, 'failed': {}}}
    """
    return {
        r.run_id: {"member_kind": r.config.get("member_kind"), "seeds": r.config.get("seeds", []),
                   "members": r.config.get("members", {}), "failed": r.config.get("failed", {})}
        for r in runs if r.kind == GROUP
    }

def group_config(config, **extra) -> dict:
    """The settings a seed group records: its members' (``config``, a dataclass such as
    ``BaselineConfig`` or ``TuneConfig``) but the seed, which each member records, plus ``extra``
    (e.g. the feature sets asked for). The one way every command says what its group was trained with.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Settings:
    ...     context: int = 2
    ...     seed: int = 0
    >>> group_config(Settings(), feature_sets=None)
    {'context': 2, 'feature_sets': None}
    """
    return {**{k: v for k, v in asdict(config).items() if k != "seed"}, **extra}


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


# -- loading a run's model ------------------------------------------------------------------------


class RunModel(Protocol):
    """A trained run that scores a corpus: (N, C) probabilities in the run's class order."""

    def predict_proba(self, corpus: "Corpus") -> np.ndarray: ...


class ModelLoadError(Exception):
    """A run whose model cannot be loaded: its saved files are missing or unreadable."""


class NoModelError(ModelLoadError):
    """A run that has no model to load: its kind has none (zero-shot, a seed group, external
    predictions), or it saved none."""


class MembersGoneError(ModelLoadError):
    """A fusion run whose member runs are gone from the store."""


def _load_baseline(run: Run, store: Store) -> RunModel:
    from bemerc.train.baseline import BaselineModel

    try:
        return BaselineModel.load(run.run_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"run {run.run_id!r}: cannot load its saved model: {exc}") from None


def _load_tuned(run: Run, store: Store) -> RunModel:
    adapter = Path(run.run_dir or "") / "adapter"
    if not (adapter / "tune.json").is_file():
        raise NoModelError(f"run {run.run_id!r} saved no adapter (a zero-shot run?); /predict serves "
                           "tuned runs that have RUN_DIR/adapter")
    from bemerc.train.tune.infer import TunedModel

    try:
        return TunedModel.load(adapter, store=store)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"run {run.run_id!r}: cannot load its adapter: {exc}") from None


def _load_fusion(run: Run, store: Store) -> RunModel:
    from bemerc.train.fuse import FusionModel

    weights = run.config.get("weights", {})
    runs = {r.run_id: r for r in list_runs(store)}
    gone = [m for m, w in weights.items() if w > 0 and m not in runs]
    if gone:
        raise MembersGoneError(f"fusion run {run.run_id!r} needs member run(s) {', '.join(gone)}, which are gone from the store")
    return FusionModel({m: load_model(runs[m], store) for m, w in weights.items() if w > 0}, weights)


# The kinds whose runs have a model, and how each is loaded (its classes import their libraries when loaded).
MODELS: dict[str, Callable[[Run, Store], RunModel]] = {BASELINE: _load_baseline, TUNE: _load_tuned, FUSION: _load_fusion}


def load_model(run: Run, store: Store) -> RunModel:
    """The model of ``run``, by its kind (:data:`MODELS`); ``store`` serves tuned runs that show
    retrieved demonstrations and the members of fusion runs. A :class:`NoModelError` for a run
    without one, a :class:`ModelLoadError` when its files cannot be read."""
    loader = MODELS.get(run.kind)
    if loader is None:
        kinds = [*MODELS]
        either = ", ".join(kinds[:-1]) + " or " + kinds[-1]
        raise NoModelError(f"run {run.run_id!r} is of kind {run.kind!r}, which /predict does not serve; "
                           f"pick a {either} run with \"run\"")
    return loader(run, store)
