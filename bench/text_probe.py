"""How much emotion a linear model reads from each stored text feature set of a store, in one run.

    python bench/text_probe.py --store /tmp/meld

For every text feature set of the store (e.g. MiniLM in fp32 and bf16, mpnet from ``--profile mpnet``),
fit on the train split and score dev (weighted F1): the baseline's logistic head
(:class:`bemerc.train.baseline.LogisticHead`, default settings) and scikit-learn's class-balanced logistic
regression at C = 0.1, 1 and 10. The majority class is printed beside them. Used to choose the
offline text encoder (docs/models.md, "Text encoder: MiniLM or mpnet").
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

from bemerc.store import Store  # noqa: E402
from bemerc.train.baseline import BaselineConfig, LogisticHead  # noqa: E402
from bemerc.train.tensors import load_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    args = parser.parse_args()
    store = Store(args.store)
    sets = store.feature_sets("text")
    if not sets:
        raise SystemExit(f"error: {args.store}: no text feature set (run `bemerc extract --modality text`)")
    for fs in sets:
        corpus = load_corpus(store, [fs.id])
        x = corpus.modalities["text"].vectors
        labels = corpus.utterances["label"].to_list()
        split = np.array(corpus.utterances["split"].to_list())
        classes = sorted({label for label in labels if label is not None})
        y = np.array([classes.index(label) if label is not None else -1 for label in labels])
        train, dev = (split == "train") & (y >= 0), (split == "dev") & (y >= 0)
        majority = np.full(dev.sum(), np.bincount(y[train]).argmax())
        head = LogisticHead.fit(x[train], y[train], len(classes), BaselineConfig())
        scores = {"majority": f1_score(y[dev], majority, average="weighted"),
                  "logistic head": f1_score(y[dev], head(x[dev]).argmax(1), average="weighted")}
        for c in (0.1, 1.0, 10.0):
            model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x[train], y[train])
            scores[f"sklearn C={c:g}"] = f1_score(y[dev], model.predict(x[dev]), average="weighted")
        precision = fs.config.get("precision", "fp32")
        print(f"{fs.id} ({precision}, {x.shape[1]}-d), dev weighted F1: "
              + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()), flush=True)


if __name__ == "__main__":
    main()
