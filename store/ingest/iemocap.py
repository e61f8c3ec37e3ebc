"""IEMOCAP (IEMOCAP_full_release): Session1-5 with transcriptions, EmoEvaluation, sentence wavs and
dialogue videos.

Conventions (the common 6-class setup): labels happy, sad, neutral, angry, excited, frustrated; other
labels (xxx, oth, sur, fea, dis) are left out and counted. Session 5 is the test split; dev is a fixed
~10% of the Session 1-4 dialogues (every dialogue whose name hashes to 0 mod 10), the rest train.
The utterance's video is its dialogue's ``dialog/avi/DivX/{dialogue}.avi`` with ``start_s``/``end_s``
from the evaluation file; its audio is the sentence wav, taken whole.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

from bemerc.store.ingest.common import IngestError, IngestReport
from bemerc.store.objects import ObjectError, as_path

LABEL_CODES = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry", "exc": "excited", "fru": "frustrated"}
EVAL_LINE = re.compile(r"^\[(\d+\.?\d*)\s*-\s*(\d+\.?\d*)\]\s+(\S+)\s+(\S+)\s+\[")
TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[\d.]+-[\d.]+\]:\s*(.*)$")


def _split_of(session: int, dialogue: str) -> str:
    if session == 5:
        return "test"
    return "dev" if zlib.crc32(dialogue.encode()) % 10 == 0 else "train"


def _read_text(path: Path) -> list[str]:
    """A release text file's lines (read once, a local file or an object)."""
    try:
        data = path.read_bytes()
    except ObjectError as e:
        raise IngestError(path, e.problem) from None
    except OSError as e:
        raise IngestError(path, f"cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return data.decode("latin-1").splitlines()  # a few release files are not UTF-8


def read_iemocap(root: str | Path) -> IngestReport:
    """Read an IEMOCAP_full_release folder into utterance rows (nothing is written).

    ``root`` may be a prefix on object storage (``s3://bucket/IEMOCAP_full_release``).

    >>> read_iemocap("IEMOCAP_full_release").counts()   # doctest: +SKIP
    """
    root = as_path(root)
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise IngestError(root, "no Session1..Session5 folders (expected the IEMOCAP_full_release layout)")
    report = IngestReport(rows=[])
    for session_dir in sessions:
        session = int(session_dir.name[-1])
        eval_dir = session_dir / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            raise IngestError(session_dir, "missing dialog/EmoEvaluation/")
        for eval_file in sorted(eval_dir.glob("*.txt")):
            dialogue = eval_file.stem
            texts = {}
            transcript = session_dir / "dialog" / "transcriptions" / f"{dialogue}.txt"
            if transcript.exists():
                for line in _read_text(transcript):
                    m = TRANSCRIPT_LINE.match(line.strip())
                    if m:
                        texts[m.group(1)] = m.group(2).strip()
            utterances = []
            for n, line in enumerate(_read_text(eval_file), start=1):
                m = EVAL_LINE.match(line.strip())
                if not m:
                    continue
                start, end, name, code = float(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
                if code not in LABEL_CODES:
                    report.skipped[f"label {code}"] += 1
                    continue
                if end <= start:
                    raise IngestError(eval_file, f"utterance {name} ends ({end}) before it starts ({start})", n)
                utterances.append((start, end, name, LABEL_CODES[code]))
            utterances.sort()
            video = session_dir / "dialog" / "avi" / "DivX" / f"{dialogue}.avi"
            split = _split_of(session, dialogue)
            for turn, (start, end, name, label) in enumerate(utterances):
                wav = session_dir / "sentences" / "wav" / dialogue / f"{name}.wav"
                uid = f"{split}/{name}"
                if not wav.exists() and not video.exists():
                    report.missing_media.append(uid)
                report.rows.append(
                    {
                        "uid": uid,
                        "dataset": "iemocap",
                        "split": split,
                        "dialogue_id": dialogue,
                        "turn": turn,
                        # speaker: the session's actor of that gender, e.g. Ses01_F (from Ses01F_impro01_F000)
                        "speaker": f"{name[:5]}_{name.rsplit('_', 1)[-1][0]}",
                        "text": texts.get(name),
                        "label": label,
                        "sentiment": None,
                        "start_s": start if video.exists() else None,
                        "end_s": end if video.exists() else None,
                        "video_path": str(video) if video.exists() else None,
                        "audio_path": str(wav) if wav.exists() else None,
                        "media_sha256": None,
                        "meta_json": json.dumps({"session": session, "utterance": name}),
                    }
                )
    if not report.rows:
        raise IngestError(root, "no utterances with the six IEMOCAP labels found")
    return report
