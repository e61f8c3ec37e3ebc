"""MELD: ``{train,dev,test}_sent_emo.csv`` plus, when present, the clips of the video release.

Real-file quirks handled here: Utterance_ID is not contiguous in some dialogues (turn is the 0-based
rank of Utterance_ID in its dialogue), dialogue 60 is absent from train, two clips are missing from the
release (the row is kept with no media), ``Sr No.`` is not unique (not used as a key).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from bemerc.store.ingest.common import IngestError, IngestReport, check_rows, read_utf8
from bemerc.store.objects import as_path
from bemerc.store.schema import MELD_LABELS

CSV_NAMES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
REQUIRED = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
SENTIMENTS = ("neutral", "positive", "negative")


def _episode_seconds(stamp: str) -> float | None:
    """'00:16:16,059' -> 976.059 (MELD's times inside the episode)."""
    m = re.fullmatch(r"(\d+):(\d+):(\d+)[,.](\d+)", stamp.strip())
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 10 ** len(ms)


def _find_csv_dir(root: Path) -> Path:
    for candidate in (root, root / "data" / "MELD"):
        if any((candidate / name).exists() for name in CSV_NAMES.values()):
            return candidate
    raise IngestError(root, f"no MELD CSV found (expected {', '.join(CSV_NAMES.values())} here or in data/MELD/)")


def _find_clip_dir(root: Path, split: str) -> Path | None:
    name = CLIP_DIRS[split]
    for candidate in (root / name, root / "MELD.Raw" / name, root / "data" / "MELD" / name):
        if candidate.is_dir():
            return candidate
    found = next(iter(root.glob(f"**/{name}")), None) if root.is_dir() else None
    return found if found and found.is_dir() else None


def _read_csv(path: Path, split: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(read_utf8(path).splitlines(keepends=True))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise IngestError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(reader.fieldnames or [])}")
    return [(reader.line_num, row) for row in reader]


def read_meld(root: str | Path) -> IngestReport:
    """Read a MELD folder into utterance rows (nothing is written).

    ``root`` holds the CSVs directly or in ``data/MELD/``; clips ``dia{D}_utt{U}.mp4`` are linked from
    ``train_splits/``, ``dev_splits_complete/`` and ``output_repeated_splits_test/`` when present.
    ``root`` may be a prefix on object storage (``s3://bucket/MELD``): the clips are then linked by URI.

    >>> report = read_meld("../shared/data/meld")   # doctest: +SKIP
    >>> report.counts()                             # doctest: +SKIP
    {'train': 9989, 'dev': 1109}
    """
    root = as_path(root)
    if not root.exists():
        raise IngestError(root, "folder not found")
    csv_dir = _find_csv_dir(root)
    report = IngestReport(rows=[])
    row_numbers: list[int] = []
    for split, name in CSV_NAMES.items():
        path = csv_dir / name
        if not path.exists():
            continue
        clip_dir = _find_clip_dir(root, split)
        parsed = []
        for line, row in _read_csv(path, split):
            label = (row["Emotion"] or "").strip().lower()
            if label not in MELD_LABELS:
                raise IngestError(path, f"unknown label {row['Emotion']!r} (expected one of {', '.join(MELD_LABELS)})", line)
            try:
                dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except ValueError:
                raise IngestError(path, f"Dialogue_ID/Utterance_ID must be integers, found {row['Dialogue_ID']!r}/{row['Utterance_ID']!r}", line) from None
            sentiment = (row.get("Sentiment") or "").strip().lower() or None
            if sentiment is not None and sentiment not in SENTIMENTS:
                raise IngestError(path, f"unknown sentiment {row['Sentiment']!r}", line)
            parsed.append((line, dia, utt, label, sentiment, row))
        # turn = 0-based rank of Utterance_ID inside the dialogue (ids have gaps in real files)
        by_dialogue: dict[int, list[int]] = {}
        for _, dia, utt, *_ in parsed:
            by_dialogue.setdefault(dia, []).append(utt)
        ranks = {dia: {u: i for i, u in enumerate(sorted(set(us)))} for dia, us in by_dialogue.items()}
        for line, dia, utt, label, sentiment, row in parsed:
            clip = clip_dir / f"dia{dia}_utt{utt}.mp4" if clip_dir else None
            has_clip = clip is not None and clip.is_file() and clip.stat().st_size > 0  # an empty clip counts as missing
            uid = f"{split}/dia{dia}_utt{utt}"
            if clip_dir is not None and not has_clip:
                report.missing_media.append(uid)
            meta = {k: row.get(k) for k in ("Sr No.", "Season", "Episode", "StartTime", "EndTime") if row.get(k)}
            meta["episode_start_s"] = _episode_seconds(row.get("StartTime") or "")
            meta["episode_end_s"] = _episode_seconds(row.get("EndTime") or "")
            report.rows.append(
                {
                    "uid": uid,
                    "dataset": "meld",
                    "split": split,
                    "dialogue_id": str(dia),
                    "turn": ranks[dia][utt],
                    "speaker": row["Speaker"].strip(),
                    "text": row["Utterance"].strip(),
                    "label": label,
                    "sentiment": sentiment,
                    "start_s": None,  # each MELD clip is exactly its utterance
                    "end_s": None,
                    "video_path": str(clip) if has_clip else None,
                    "audio_path": None,
                    "media_sha256": None,
                    "meta_json": json.dumps(meta, ensure_ascii=False),
                }
            )
            row_numbers.append(line)
        check_rows(report.rows[len(row_numbers) - len(parsed):], path, row_numbers[len(row_numbers) - len(parsed):])
    if not report.rows:
        raise IngestError(csv_dir, "the MELD CSVs hold no utterances")
    return report
