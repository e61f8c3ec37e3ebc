"""How often the behaviour description names the right expression: dev faces and the seven real clips.

    python bench/expression_rules.py [--faces ../shared/data/faces/rafdb_train.parquet] [--limit N] [--json OUT]

1. Dev faces (the held-out RAF-DB dev split, through the still-image pipeline and the profile's
   expression model): for the expression group of ``configs/behavior_rules.toml`` as it is, and for
   a grid of its two thresholds (``above``: the named expression's probability; ``lead``: its margin
   over the runner-up), the share of faces that get an expression named (coverage), how often a named
   expression is the label (precision) and how often the label is named (agreement = coverage x
   precision). The thresholds are chosen by the rule written here, before looking: the highest
   agreement whose precision is at least 0.85 (a named expression should be right at least 6 times
   in 7; below that the description says "a mixed expression").
2. The seven real clips in ../shared/data (six CREMA-D takes of actor 1001, one RAVDESS neutral): each
   clip's description beside its acted label.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bemerc.extract.behavior import BehaviorExtractor, DescriptionRules  # noqa: E402
from bemerc.extract.behavior.expression import EXPRESSIONS  # noqa: E402
from bemerc.extract.behavior.face import FaceFinder  # noqa: E402
from bemerc.extract.behavior.train_expression import decode_image, dev_split, pipeline_face_box, read_faces  # noqa: E402
from bemerc.extract.behavior.extractor import summarize  # noqa: E402
from bemerc.extract.media import sample_frames, still_frame  # noqa: E402
from bemerc.models.profiles import load_profile  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CREMAD_LABELS = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
MIN_PRECISION = 0.85


def named(probabilities: np.ndarray, above: float, lead: float) -> np.ndarray:
    """Index of the expression the rules would name per row, -1 for "a mixed expression"."""
    order = np.sort(probabilities, axis=1)
    top = probabilities.argmax(axis=1)
    ok = (order[:, -1] > above) & (order[:, -1] - order[:, -2] >= lead)
    return np.where(ok, top, -1)


def rates(choice: np.ndarray, labels: np.ndarray) -> dict:
    said = choice >= 0
    right = (choice == labels) & said
    return {"coverage": float(said.mean()), "precision": float(right.sum() / max(said.sum(), 1)), "agreement": float(right.mean())}


def real_clips() -> list[tuple[Path, str]]:
    clips = sorted((SHARED / "cremad").rglob("*.flv")) + sorted((SHARED / "cremad").rglob("*.mp4"))
    out = [(p, CREMAD_LABELS.get(p.stem.split("_")[2], "?")) for p in clips if len(p.stem.split("_")) > 2]
    ravdess = SHARED / "ravdess" / "video" / "01-01-01-01-01-01-01.mp4"
    return out + ([(ravdess, "neutral")] if ravdess.is_file() else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", default=str(SHARED / "faces" / "rafdb_train.parquet"))
    parser.add_argument("--profile", default=None, help="model profile (default: offline)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--clips-only", action="store_true", help="only the seven real clips' descriptions")
    parser.add_argument("--json")
    args = parser.parse_args()

    extractor = BehaviorExtractor.from_profile(load_profile(args.profile))
    model = extractor._expression
    if args.clips_only:
        args.limit = 1
    faces = read_faces(args.faces)
    index = np.flatnonzero(dev_split(faces["file"], faces["label"]))
    if args.limit and args.limit < len(index):
        index = index[np.unique(np.linspace(0, len(index) - 1, args.limit).round().astype(int))]
    finder = FaceFinder(files=extractor.face_files)
    probabilities = np.full((len(index), len(EXPRESSIONS)), np.nan)
    for row, i in enumerate(index):
        frame = still_frame(decode_image(faces["image"][i]))
        box = pipeline_face_box(finder, frame)
        if box is not None:
            probabilities[row] = model.measure(frame, box)[: len(EXPRESSIONS)]
    labels = np.array([EXPRESSIONS.index(faces["label"][i]) for i in index])
    found = np.isfinite(probabilities).all(axis=1)
    p = np.where(found[:, None], probabilities, 0.0)

    rules = DescriptionRules.load()
    group = rules.groups["expression"]
    current = rates(np.where(found, named(p, group.above, group.lead or 0.0), -1), labels)
    print(f"{len(index)} dev faces ({int((~found).sum())} not found), model {model.name}")
    print(f"rules as they are (above {group.above}, lead {group.lead}): coverage {current['coverage']:.3f}, "
          f"precision {current['precision']:.3f}, agreement {current['agreement']:.3f}")
    grid = []
    for above in (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6):
        for lead in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
            grid.append({"above": above, "lead": lead, **rates(np.where(found, named(p, above, lead), -1), labels)})
    eligible = [g for g in grid if g["precision"] >= MIN_PRECISION] or grid
    best = max(eligible, key=lambda g: (g["agreement"], g["above"], g["lead"]))
    print(f"chosen (highest agreement with precision >= {MIN_PRECISION}): above {best['above']}, lead {best['lead']}: "
          f"coverage {best['coverage']:.3f}, precision {best['precision']:.3f}, agreement {best['agreement']:.3f}")
    print("  above  lead  coverage  precision  agreement")
    for g in grid:
        print(f"  {g['above']:5.2f} {g['lead']:5.2f}  {g['coverage']:8.3f}  {g['precision']:9.3f}  {g['agreement']:9.3f}")

    clips = []
    print("clip                             label    top mean (lead over the runner-up)  description")
    for path, label in real_clips():
        measures = extractor.measure_frames(*sample_frames(path, extractor.fps, extractor.max_side))
        summary = summarize(measures)
        means = sorted(((summary[f"p_{e}.mean"], e) for e in EXPRESSIONS), reverse=True)
        description = extractor.features(measures, str(path))["description"]
        clips.append({"clip": path.name, "label": label, "top": means[0][1], "top_mean": means[0][0],
                      "lead": means[0][0] - means[1][0], "description": description})
        print(f"{path.name:<32} {label:<8} {means[0][1]:<8} {means[0][0]:.2f} ({means[0][0] - means[1][0]:.2f})"
              f"{'':17}{description}")
    if args.json:
        Path(args.json).write_text(json.dumps({"current": current, "chosen": best, "grid": grid, "clips": clips}, indent=1))


if __name__ == "__main__":
    main()
