"""Record a trained run: ``RUN_DIR/metrics.json``, a row in ``runs`` and its ``predictions``.

The baseline and the tuned LLM both end here, so ``bemerc compare`` and the API read every run the
same way.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from bemerc.store import Store
from bemerc.store import schema as S


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
) -> Path:
    """Write ``metrics.json`` (and ``config.json``) in ``run_dir``, then the run and its predictions
    to the store (the run row last, so a run listed in ``runs`` always has its predictions).

    ``probabilities`` is (N, C) in ``classes`` order; the predicted label is its argmax.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id, "kind": kind, "classes": classes,
                                                     "feature_sets": feature_sets, **config}, indent=2, default=str))
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
    return run_dir
