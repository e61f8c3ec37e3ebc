"""Does the stored face embedding carry the expression? A linear probe on it beside the network and the majority class.

    python bench/expression_probe.py [--faces ../shared/data/faces/rafdb_train.parquet]

In one run, on the RAF-DB dev split (the faces no training saw), through the pipeline's crops
(the train-expression cache, built on first use): the majority class of the training faces, the
network's own head, and a logistic regression fit on the 192-number embeddings of the RAF-DB
training faces (what the offline `visual` stage stores, L2-normalised as stored). Faces the pipeline
cannot find count as wrong for all three.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bemerc.extract.behavior.expression import EXPRESSIONS, NetExpression, centre_of_cut  # noqa: E402
from bemerc.extract.behavior.train_expression import cached_crops, dev_split, scores  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def network_crops(cache: np.ndarray, side: int) -> np.ndarray:
    """The network's crop of each cached cut, as extraction takes it."""
    return np.stack([centre_of_cut(c, side) for c in cache])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", default=str(SHARED / "faces" / "rafdb_train.parquet"))
    parser.add_argument("--cache", default="out/expression/cache", help="the train-expression crop cache")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    net = NetExpression()
    faces = cached_crops(args.faces, Path(args.cache), net.dims.box_scale, None, 2, print)
    labels = np.array([EXPRESSIONS.index(label) for label in faces["label"]])
    dev = dev_split(faces["file"], faces["label"])
    crops = network_crops(faces["crops"], net.dims.input_side)
    probabilities, embeddings = [], []
    for i in range(0, len(crops), 256):
        p, e = net.probabilities_and_embeddings(crops[i : i + 256])
        probabilities.append(p)
        embeddings.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    probabilities, embeddings = np.concatenate(probabilities), np.concatenate(embeddings)
    train = ~dev & faces["found"]
    found = faces["found"][dev]
    probe = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(embeddings[train], labels[train])
    majority = np.bincount(labels[~dev]).argmax()
    rows = {
        "majority class": np.full(dev.sum(), majority),
        "network head": probabilities[dev].argmax(1),
        "linear probe on the embedding": probe.predict(embeddings[dev]),
    }
    print(f"RAF-DB dev: {dev.sum()} faces ({int((~found).sum())} not found); probe fit on {train.sum()} train faces")
    print(f"{'':32} {'acc':>6} {'m-F1':>6}  recall " + " ".join(f"{e[:7]:>7}" for e in EXPRESSIONS))
    for name, predicted in rows.items():
        r = scores(labels[dev], np.where(found, predicted, -1))
        print(f"{name:32} {r['accuracy']:6.3f} {r['macro_f1']:6.3f}         " + " ".join(f"{r['recall'][e]:7.2f}" for e in EXPRESSIONS))


if __name__ == "__main__":
    main()
