"""Stacking: late fusion of stored runs, weights fit on dev.

A fusion run averages the class probabilities that its member runs stored in ``predictions`` (a
baseline's late fusion, a tuned LLM, another fusion run, a seed group's mean over its seeds, ...) with weights chosen on dev by the
baseline's greedy ensemble selection (:func:`bemerc.train.baseline.select_weights`, dev log loss),
and is recorded like any other run (kind ``fusion``): predictions for every evaluation split the
members share, ``RUN_DIR/config.json`` (members, weights) and ``RUN_DIR/metrics.json``.

Dev both chooses the weights and is scored, so the dev score flatters the fusion a little. The run
also stores an honest estimate, ``summary.cross_fit_dev_weighted_f1``: weights fit on one half of the
dev dialogues score the other half, and the other way round.

>>> store = Store("store")                                                      # doctest: +SKIP
>>> result = fuse_runs(store, resolve_runs(store, ["baseline:latest", "tune:latest"]))  # doctest: +SKIP
>>> result.weights, result.summary["cross_fit_dev_weighted_f1"]                 # doctest: +SKIP
({'baseline-20261130-101500-4f2a': 0.6, 'tune-20261130-121000-9b1c': 0.4}, 0.53)
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from bemerc.store import Store
from bemerc.store.schema import EVAL_SPLITS, sql_in
from bemerc.train.baseline import fuse, select_weights
from bemerc.train.evaluate import bootstrap_intervals
from bemerc.train.metrics import classification_metrics, weighted_f1
from bemerc.store.runs import Run, check_run_dir, default_run_dir, list_runs
from bemerc.train.runs import FUSION, GROUP, Predictions, new_run_id, save_run, split_metrics

LATEST = ":latest"


class FusionError(ValueError):
    """Runs that cannot be fused (unknown, different classes or datasets, no shared dev utterance)."""


@dataclass(frozen=True)
class FusionConfig:
    """Settings of a fusion run (stored with it)."""

    steps: int = 25  # greedy selection: weights are multiples of 1/steps
    objective: str = "log_loss"  # what the weights optimise on dev (or "weighted_f1")
    folds: int = 2  # cross-fitting folds over dev dialogues for the honest dev estimate
    seed: int = 0  # assignment of dev dialogues to folds, bootstrap resamples
    bootstrap_resamples: int = 1000


@dataclass
class FusionResult:
    run_id: str
    run_dir: Path
    members: list[str]
    weights: dict[str, float]  # member run id -> weight (sum 1)
    metrics: dict  # the metrics.json layout
    summary: dict  # cross-fitted dev estimate, utterance counts
    reused: bool = False  # an identical fusion run (same members, settings and inputs) was already stored


def _is_kind(run: Run, kind: str) -> bool:
    """``kind`` as a ref names it: a run's kind, or ``MEMBER-group`` for a seed group of ``MEMBER`` runs."""
    member, _, group = kind.rpartition("-")
    if group == GROUP and member:
        return run.kind == GROUP and run.config.get("member_kind") == member
    return run.kind == kind


def resolve_runs(store: Store, refs: list[str], skip_missing: bool = False) -> list[str]:
    """Run ids of ``refs``: each a run id, or ``KIND:latest`` for the newest run of that kind
    (``baseline-group:latest``, ``tune-group:latest``: the newest seed group of baselines, of tuned runs).

    With ``skip_missing`` a ref that matches no run is left out instead of raising.

    >>> resolve_runs(Store("store"), ["baseline:latest", "tune-20261130-121000-9b1c"])  # doctest: +SKIP
    ['baseline-20261130-101500-4f2a', 'tune-20261130-121000-9b1c']
    """
    runs = list_runs(store) if store.has_table("runs") else []
    ids = [r.run_id for r in runs]
    resolved: list[str] = []
    for ref in refs:
        if ref.endswith(LATEST):
            kind = ref[: -len(LATEST)]
            of_kind = [r.run_id for r in runs if _is_kind(r, kind)]  # oldest first
            found = of_kind[-1] if of_kind else None
            missing = f"no run of kind {kind!r} (kinds stored: {', '.join(sorted({r.kind for r in runs})) or 'none'})"
        else:
            found = ref if ref in ids else None
            missing = f"no run {ref!r} (runs: {', '.join(ids) or 'none'})"
        if found is None:
            if skip_missing:
                continue
            raise FusionError(f"{store.path}: {missing}")
        if found not in resolved:
            resolved.append(found)
    return resolved


@dataclass
class _Inputs:
    """Members' probabilities aligned on the utterances every member predicted, one split at a time."""

    uids: dict[str, list[str]]  # split -> shared uids
    gold: dict[str, list[str | None]]  # split -> gold labels (from the first member's rows)
    probabilities: dict[str, dict[str, np.ndarray]]  # split -> member -> (N, C), rows sum to 1 (NaN: none)
    counts: dict[str, dict[str, int]]  # split -> member -> utterances it predicted


def _load(store: Store, runs: list[Run]) -> _Inputs:
    n_classes = len(runs[0].classes)
    rows = store.read("predictions", ["run_id", "uid", "split", "gold", "probabilities"],
                      where=f"run_id IN ({sql_in(r.run_id for r in runs)})")
    inputs = _Inputs({}, {}, {}, {})
    for split in EVAL_SPLITS:
        part = rows.filter(pl.col("split") == split)
        by_run = {r.run_id: part.filter(pl.col("run_id") == r.run_id) for r in runs}
        inputs.counts[split] = {run_id: p.height for run_id, p in by_run.items()}
        shared = set.intersection(*(set(p["uid"].to_list()) for p in by_run.values()))
        if not shared:
            continue
        uids = sorted(shared)
        inputs.uids[split] = uids
        inputs.probabilities[split] = {}
        for run_id, p in by_run.items():
            p = p.filter(pl.col("uid").is_in(uids)).sort("uid")
            if run_id == runs[0].run_id:
                inputs.gold[split] = p["gold"].to_list()
            values = np.array(p["probabilities"].to_list(), dtype=np.float64).reshape(len(uids), n_classes)
            inputs.probabilities[split][run_id] = values / values.sum(axis=1, keepdims=True)
    return inputs


def _digest(inputs: _Inputs) -> str:
    """sha256 of everything the fusion reads, so an identical fusion is recognised and reused."""
    h = hashlib.sha256()
    for split, uids in inputs.uids.items():
        h.update("\x1f".join([split, *uids, *map(str, inputs.gold[split])]).encode())
        for run_id, p in inputs.probabilities[split].items():
            h.update(run_id.encode())
            h.update(np.ascontiguousarray(p, dtype=np.float32).tobytes())
    return h.hexdigest()


def cross_fit(probabilities: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, prior: np.ndarray,
              config: FusionConfig) -> tuple[np.ndarray | None, list[dict[str, float]]]:
    """Out-of-fold fused probabilities (N, C) of labelled dev rows: the dialogues (``groups``) are
    dealt into ``config.folds`` folds at random (seeded), and each fold is fused with weights fit
    on the others. Returns (None, []) with fewer dialogues than folds."""
    dialogues = np.unique(groups)
    if len(dialogues) < config.folds:
        return None, []
    order = np.random.default_rng(config.seed).permutation(len(dialogues))
    fold_of = dict(zip(dialogues[order], np.arange(len(dialogues)) % config.folds))
    fold = np.array([fold_of[g] for g in groups])
    out = np.zeros((len(y), len(prior)))
    fold_weights = []
    for k in range(config.folds):
        fit, held = fold != k, fold == k
        weights = select_weights({m: p[fit] for m, p in probabilities.items()}, y[fit], prior, config.steps, config.objective)
        out[held] = fuse({m: p[held] for m, p in probabilities.items()}, weights, prior)
        fold_weights.append(weights)
    return out, fold_weights


def fuse_runs(
    store: Store,
    run_ids: list[str],
    *,
    config: FusionConfig = FusionConfig(),
    run_dir: str | Path | None = None,
    run_id: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> FusionResult:
    """Fit late-fusion weights on dev over the stored probabilities of ``run_ids`` and record the
    fused run (kind ``fusion``) with predictions for every evaluation split all members predicted.

    The runs must share one dataset and one class list; each split fuses the utterances every
    member predicted. Weights are fit on the labelled shared dev utterances only; test is only
    scored. An identical fusion already stored (same members, settings and inputs) is returned
    as it is (``reused``) instead of being recorded twice.
    """
    started = time.perf_counter()
    if run_dir is not None:
        check_run_dir(run_dir)  # before any work: a taken folder is refused, never written over
    by_id = {r.run_id: r for r in list_runs(store)} if store.has_table("runs") else {}
    unknown = [r for r in run_ids if r not in by_id]
    if unknown:
        raise FusionError(f"{store.path}: no run {', '.join(map(repr, unknown))} (runs: {', '.join(by_id) or 'none'})")
    if len(set(run_ids)) < 2:
        raise FusionError(f"fusion needs at least two different runs, got {', '.join(run_ids) or 'none'}")
    runs = [by_id[r] for r in dict.fromkeys(run_ids)]
    labels_only = [r.run_id for r in runs if r.config.get("probabilities") is False]  # an external run of labels
    if labels_only:
        raise FusionError(f"run(s) {', '.join(labels_only)} hold labels, not probabilities: fusion weighs probabilities "
                          "(ingest the predictions with one probability column per label)")
    class_lists = {tuple(r.classes) for r in runs}
    if len(class_lists) > 1:
        raise FusionError("runs have different class lists: " + "; ".join(f"{r.run_id} ({', '.join(r.classes)})" for r in runs))
    datasets = {r.dataset for r in runs}
    if len(datasets) > 1:
        raise FusionError("runs are of different datasets: " + "; ".join(f"{r.run_id} ({r.dataset})" for r in runs))
    classes, dataset, members = list(runs[0].classes), runs[0].dataset, [r.run_id for r in runs]

    inputs = _load(store, runs)
    index = {c: i for i, c in enumerate(classes)}
    y = {s: np.array([index.get(g, -1) if g is not None else -1 for g in inputs.gold[s]]) for s in inputs.uids}
    if "dev" not in inputs.uids or not (y["dev"] >= 0).any():
        raise FusionError(f"runs {', '.join(members)} share no labelled dev utterance to fit the weights on "
                          f"(dev predictions: {', '.join(f'{m} {n:,}' for m, n in inputs.counts['dev'].items())})")
    for split in EVAL_SPLITS:
        counts = inputs.counts[split]
        if len(set(counts.values())) > 1:
            shared = len(inputs.uids.get(split, []))
            log(f"{split}: {shared:,} utterances predicted by every run are fused "
                f"({', '.join(f'{m} {n:,}' for m, n in counts.items())})")

    digest = _digest(inputs)
    for r in by_id.values():
        c = r.config
        if (r.kind == FUSION and c.get("members") == members and c.get("inputs_sha256") == digest
                and all(c.get(k) == v for k, v in asdict(config).items())):
            log(f"already fused as {r.run_id}: reused")
            return FusionResult(r.run_id, Path(r.run_dir), members, c["weights"], r.metrics, c.get("summary", {}), reused=True)

    utterances = store.read("utterances", ["uid", "dataset", "split", "dialogue_id"])
    dialogue_of = dict(zip(utterances["uid"].to_list(),
                           (utterances["dataset"] + "/" + utterances["split"] + "/" + utterances["dialogue_id"]).to_list()))
    prior = np.full(len(classes), 1 / len(classes))  # only for an utterance no member has a probability for
    dev = y["dev"] >= 0
    dev_members = {m: p[dev] for m, p in inputs.probabilities["dev"].items()}
    weights = select_weights(dev_members, y["dev"][dev], prior, config.steps, config.objective)

    dev_groups = np.array([dialogue_of.get(u, u) for u in inputs.uids["dev"]])[dev]
    out_of_fold, fold_weights = cross_fit(dev_members, y["dev"][dev], dev_groups, prior, config)
    summary = {
        "cross_fit_dev_weighted_f1": (weighted_f1(y["dev"][dev], out_of_fold.argmax(axis=1), len(classes))
                                      if out_of_fold is not None else None),
        "cross_fit_folds": config.folds,
        "cross_fit_weights": fold_weights,
        "utterances": {s: len(u) for s, u in inputs.uids.items()},
        "member_predictions": inputs.counts,
    }
    if out_of_fold is None:
        summary["notes"] = [f"no cross-fitted dev estimate: fewer than {config.folds} dev dialogues"]

    fused = {s: fuse(inputs.probabilities[s], weights, prior) for s in inputs.uids}
    metrics, models = {}, {m: {} for m in members}
    for s, p in fused.items():
        rows = y[s] >= 0
        if not rows.any():
            continue
        predicted = p[rows].argmax(axis=1)
        metrics[s] = classification_metrics(y[s][rows], predicted, classes)
        groups = np.array([dialogue_of.get(u, u) for u in inputs.uids[s]])[rows]
        metrics[s]["ci"] = bootstrap_intervals(y[s][rows], predicted, len(classes), config.bootstrap_resamples,
                                               groups=groups, seed=config.seed)
        for m, member in inputs.probabilities[s].items():
            scores = classification_metrics(y[s][rows], member[rows].argmax(axis=1), classes)
            models[m][s] = {k: scores[k] for k in ("n", "weighted_f1", "accuracy", "macro_f1")}
    metrics = split_metrics(metrics)
    metrics["models"] = models
    metrics["fusion_weights"] = weights
    metrics["fit_seconds"] = round(time.perf_counter() - started, 1)

    run_id = run_id or new_run_id(FUSION)
    run_dir = Path(run_dir) if run_dir else default_run_dir(store, run_id)
    splits = list(inputs.uids)
    run = Run(run_id, FUSION, dataset, classes, list(dict.fromkeys(f for r in runs for f in r.feature_sets)),
              {**asdict(config), "members": members, "weights": weights, "inputs_sha256": digest, "summary": summary},
              metrics, str(run_dir))
    save_run(store, run, Predictions([u for s in splits for u in inputs.uids[s]], [s for s in splits for _ in inputs.uids[s]],
                                     [g for s in splits for g in inputs.gold[s]], np.concatenate([fused[s] for s in splits])))
    return FusionResult(run_id, run_dir, members, weights, metrics, summary)


class FusionModel:
    """A fusion run as a model (``/predict``): its members' models, each scoring the corpus, fused
    with the run's weights. Members of weight 0 are never loaded.

    >>> model = FusionModel({"baseline-...": baseline_model, "tune-...": tuned}, weights)   # doctest: +SKIP
    >>> model.predict_proba(corpus).sum(axis=1)                                           # doctest: +SKIP
    array([1., 1., ...], dtype=float32)
    """

    def __init__(self, members: dict, weights: dict[str, float]):
        self.members = {m: model for m, model in members.items() if weights.get(m, 0) > 0}
        self.weights = {m: weights[m] for m in self.members}

    def predict_proba(self, corpus) -> np.ndarray:
        probabilities = {m: np.asarray(model.predict_proba(corpus), dtype=np.float32) for m, model in self.members.items()}
        n_classes = next(iter(probabilities.values())).shape[1]
        return fuse(probabilities, self.weights, np.full(n_classes, 1 / n_classes))
