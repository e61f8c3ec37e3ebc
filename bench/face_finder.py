"""How many faces of a photo set the pipeline's face finder finds, by the lenient mesh's confidence.

    python bench/face_finder.py --faces ../shared/data/faces/rafdb_train.parquet --subset train \\
        [--confidences 0.5,0.4,0.3,0.2,0.1] [--limit N]

Every photo goes through the pipeline as a still (:func:`bemerc.extract.media.still_frame`, the face
finder, mesh and speaker rule, :func:`~bemerc.extract.behavior.train_expression.pipeline_face_box`)
with the lenient tries off (as training cuts its crops); the photos found no face in are
then tried again with each ``--confidences`` value as the finder's ``lenient_confidence``, and the count
found is printed per value. ``FaceFinder.LENIENT_MESH_CONFIDENCE``
was chosen with this on RAF-DB's train faces (docs/expression.md, "Finding the face in a photo").
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bemerc.extract.behavior.face import FaceFinder  # noqa: E402
from bemerc.extract.behavior.train_expression import decode_image, face_subset, pipeline_face_box, read_faces  # noqa: E402
from bemerc.extract.media import still_frame  # noqa: E402


def found_with(confidence: float | None, frames: list[np.ndarray]) -> list[bool]:
    """Whether the finder, its lenient tries at ``confidence`` (None: none), finds a face in each frame."""
    finder = FaceFinder(lenient_confidence=confidence)
    found = [pipeline_face_box(finder, frame) is not None for frame in frames]
    finder.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", required=True, help="face set (Parquet: file, label, image)")
    parser.add_argument("--subset", choices=("all", "dev", "train"), default="all",
                        help="dev/train: bemerc's held-out split of a training set (dev_split)")
    parser.add_argument("--confidences", default="0.5,0.4,0.3,0.2,0.1", help="comma-separated lenient mesh confidences")
    parser.add_argument("--limit", type=int, help="at most N faces (evenly spread over the set)")
    args = parser.parse_args()

    try:
        faces = read_faces(args.faces)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    index = face_subset(faces, args.subset, args.limit)
    start = time.perf_counter()
    frames = [still_frame(decode_image(faces["image"][i], faces["file"][i])) for i in index]
    strict = found_with(None, frames)  # as training cuts its crops
    missed = [frame for frame, hit in zip(frames, strict) if not hit]
    print(f"{args.faces} ({args.subset}): {len(frames)} faces, {len(missed)} not found without the lenient tries "
          f"({time.perf_counter() - start:.0f} s)")
    for confidence in (float(c) for c in args.confidences.split(",")):
        print(f"lenient mesh confidence {confidence:.2f}: {sum(found_with(confidence, missed))} of those {len(missed)} found")


if __name__ == "__main__":
    main()
