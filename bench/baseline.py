"""Time the XGBoost baseline on a store and sweep its settings on dev (nothing is written).

    python bench/baseline.py --store store                # default config: time + dev scores
    python bench/baseline.py --store store --sweep        # one setting changed at a time
    python bench/baseline.py --store store --holdout 0.1  # select on 10% of train dialogues and
                                                          # score dev untouched (MELD here has no test)

Prints one JSON line per configuration: wall and CPU seconds, dev weighted F1 of each model, of
late fusion and of the ablation's combinations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import polars as pl

from bemerc.store import Store
from bemerc.train.baseline import BaselineConfig, fit_baseline
from bemerc.train.tensors import Corpus, load_corpus

# Each entry changes one default; chosen around the defaults to see which way dev moves.
SWEEP = [
    {},
    {"context": 0},
    {"context": 1},
    {"context": 5},
    {"context_dim": 128},
    {"class_weight_power": 0.0},
    {"class_weight_power": 0.25},
    {"class_weight_power": 0.75},
    {"max_depth": 6},
    {"max_depth": 3},
    {"min_child_weight": 5.0},
    {"reg_lambda": 5.0},
    {"learning_rate": 0.05},
    {"colsample_bytree": 0.3},
    {"max_dim": 64},
    {"max_dim": 384},
    {"logistic_c": 0.3},
    {"logistic_c": 3.0},
]


def holdout_corpus(corpus: Corpus, fraction: float, seed: int = 0) -> Corpus:
    """The corpus with ``fraction`` of train dialogues relabelled dev and the real dev relabelled
    test, so selection never sees the dev utterances that are scored."""
    u = corpus.utterances
    train_dialogues = u.filter(pl.col("split") == "train")["dialogue_id"].unique().sort().to_list()
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(train_dialogues, int(len(train_dialogues) * fraction), replace=False).tolist())
    split = (
        pl.when(pl.col("split") == "dev").then(pl.lit("test"))
        .when((pl.col("split") == "train") & pl.col("dialogue_id").is_in(list(chosen))).then(pl.lit("dev"))
        .otherwise(pl.col("split"))
    )
    # the new dev dialogues keep their place in dialogue order: split is part of the dialogue key only
    return Corpus(utterances=u.with_columns(split.alias("split")), modalities=corpus.modalities)


def run(corpus: Corpus, overrides: dict, split: str) -> dict:
    config = BaselineConfig(**overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    fit = fit_baseline(corpus, config)
    m = fit.metrics
    return {
        "overrides": overrides,
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "split": split,
        "models": {k: round(v[split]["weighted_f1"], 4) for k, v in m["models"].items() if split in v},
        "ablation": {k: round(v[split]["weighted_f1"], 4) for k, v in m["ablation"].items() if split in v},
        "fusion_weights": {k: round(w, 2) for k, w in m["fusion_weights"].items() if w > 0},
        "late_fusion_ci": [round(m[split]["ci"]["weighted_f1"][b], 4) for b in ("low", "high")] if split in m else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--feature-set", action="append", help="feature set ref (repeat); default: newest of each modality")
    parser.add_argument("--dataset")
    parser.add_argument("--sweep", action="store_true", help="run every entry of SWEEP")
    parser.add_argument("--holdout", type=float, default=0.0, help="select on this fraction of train dialogues; score dev")
    args = parser.parse_args()
    t = time.perf_counter()
    corpus = load_corpus(Store(args.store), args.feature_set, dataset=args.dataset)
    print(json.dumps({"load_s": round(time.perf_counter() - t, 1), "utterances": corpus.utterances.height,
                      "modalities": {m: int(a.present.sum()) for m, a in corpus.modalities.items()}}), flush=True)
    split = "dev"
    if args.holdout:
        corpus, split = holdout_corpus(corpus, args.holdout), "test"
    for overrides in SWEEP if args.sweep else [{}]:
        print(json.dumps(run(corpus, overrides, split)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
