"""How well an expression model reads real faces, two ways in one run, per model.

    python bench/expression.py --faces ../shared/data/faces/rafdb_train.parquet --subset dev \\
        [--model fer,bemerc,PATH.onnx] [--limit N] [--json OUT.json]

For any face set in the shared format (Parquet: ``file``, ``label``, ``image`` bytes; labels in
FER2013's words), each model is scored two ways:

- **aligned**: the image as it is (an aligned face crop) straight into the model, no face finder;
- **pipeline**: the image as bemerc extracts a still (a one-frame video): framed
  (:func:`bemerc.extract.media.still_frame`), the behaviour stage's face finder and mesh and its
  speaker rule, then the model's crop of the mesh box. A face the pipeline cannot find counts as
  wrong, and their count is printed.

Per way: accuracy, weighted and macro F1, recall per class, the confusion matrix (rows: true), and
milliseconds per face (the model alone; for the pipeline also with the face finder). ``--subset
dev`` scores the held-out dev split of a training set (:func:`~bemerc.extract.behavior.
train_expression.dev_split`: the faces bemerc's network never trained on); ``all`` (default) every row.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bemerc.extract.behavior.expression import EXPRESSIONS, load_expression_model  # noqa: E402
from bemerc.extract.behavior.face import FaceFinder  # noqa: E402
from bemerc.extract.behavior.train_expression import (  # noqa: E402
    decode_image, face_subset, pipeline_face_box, read_faces, scores,
)
from bemerc.extract.media import still_frame  # noqa: E402


def load_model(ref: str):
    """``fer``, ``bemerc`` (the shipped network) or the path of a network's .onnx (from train-expression)."""
    if ref.endswith(".onnx"):
        return load_expression_model("bemerc", ref)
    return load_expression_model(ref)


def box_scale(model) -> float:
    return model.dims.box_scale if hasattr(model, "dims") else model.BOX_SCALE


def whole_image_box(image: np.ndarray, scale: float) -> np.ndarray:
    """The box whose model crop is the whole (square) image: side / scale, centred."""
    h, w = image.shape[:2]
    side = max(h, w) / scale
    return np.array([w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2])


def evaluate(model, images: list[np.ndarray], frames: list[np.ndarray], boxes: list[np.ndarray | None],
             labels: np.ndarray) -> dict:
    out = {}
    for way in ("aligned", "pipeline"):
        predicted = np.full(len(labels), -1)
        seconds, measured = 0.0, 0
        for i, image in enumerate(images):
            if way == "aligned":
                frame, box = image, whole_image_box(image, box_scale(model))
            else:
                frame, box = frames[i], boxes[i]
                if box is None:
                    continue
            start = time.perf_counter()
            p = model.measure(frame, box)
            seconds += time.perf_counter() - start
            measured += 1
            predicted[i] = int(np.argmax(p))
        result = scores(labels, predicted)
        result["ms_per_face"] = 1000 * seconds / max(measured, 1)
        result["not_found"] = int((predicted < 0).sum()) if way == "pipeline" else 0
        out[way] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", required=True, help="face set (Parquet: file, label, image)")
    parser.add_argument("--model", default="fer,bemerc", help="comma-separated: fer, bemerc, or PATH.onnx")
    parser.add_argument("--subset", choices=("all", "dev", "train"), default="all",
                        help="dev/train: bemerc's held-out split of a training set (dev_split)")
    parser.add_argument("--limit", type=int, help="score at most N faces (evenly spread over the set)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    faces = read_faces(args.faces)
    index = face_subset(faces, args.subset, args.limit)
    labels = np.array([EXPRESSIONS.index(faces["label"][i]) for i in index])
    images = [decode_image(faces["image"][i], faces["file"][i]) for i in index]

    finder = FaceFinder()
    frames, boxes = [], []
    start = time.perf_counter()
    for image in images:
        frames.append(still_frame(image))
        boxes.append(pipeline_face_box(finder, frames[-1]))
    finder_ms = 1000 * (time.perf_counter() - start) / max(len(images), 1)
    print(f"{args.faces} ({args.subset}): {len(images)} faces; the pipeline found {sum(b is not None for b in boxes)} "
          f"({finder_ms:.1f} ms per face for framing, face finder and mesh)")

    results = {"faces": args.faces, "subset": args.subset, "count": len(images), "finder_ms_per_face": finder_ms, "models": {}}
    for ref in args.model.split(","):
        model = load_model(ref)
        model.measure(images[0], whole_image_box(images[0], box_scale(model)))  # load before timing
        results["models"][ref] = evaluate(model, images, frames, boxes, labels)

    header = f"{'model':<12} {'way':<9} {'acc':>6} {'w-F1':>6} {'m-F1':>6} " + " ".join(f"{e[:7]:>7}" for e in EXPRESSIONS) + "  ms/face  missed"
    print(header)
    for ref, ways in results["models"].items():
        for way, r in ways.items():
            ms = r["ms_per_face"] + (finder_ms if way == "pipeline" else 0.0)
            print(f"{Path(ref).name[:12]:<12} {way:<9} {r['accuracy']:6.3f} {r['weighted_f1']:6.3f} {r['macro_f1']:6.3f} "
                  + " ".join(f"{r['recall'][e]:7.2f}" for e in EXPRESSIONS)
                  + f"  {r['ms_per_face']:5.2f}{f' ({ms:.1f})' if way == 'pipeline' else ''}  {r['not_found']}")
    refs = list(results["models"])
    if len(refs) > 1:
        base = results["models"][refs[0]]["pipeline"]["ms_per_face"]
        for ref in refs[1:]:
            print(f"model time per face, {ref} / {refs[0]}: {results['models'][ref]['pipeline']['ms_per_face'] / base:.2f}x")
    for ref, ways in results["models"].items():
        print(f"\nconfusion, {ref}, pipeline (rows: true {', '.join(EXPRESSIONS)}; last column: not found)")
        confusion = np.array(ways["pipeline"]["confusion"])
        missed = [int(((labels == k) & np.array([b is None for b in boxes])).sum()) for k in range(len(EXPRESSIONS))]
        for name, row, miss in zip(EXPRESSIONS, confusion, missed):
            print(f"  {name:<9}" + " ".join(f"{v:5d}" for v in row) + f" | {miss:4d}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
