"""Make the embedded demo's media: espeak-ng speech and a talking-face clip for every utterance.

The dialogues (``dialogues.jsonl``) are written for bemerc and ship inside the package; the media are
made on the user's machine, from tools that ``make setup`` installs (espeak-ng, ffmpeg) and a real
photograph that ships inside scikit-image (``skimage.data.astronaut()``), so text, audio and behaviour
features can all be extracted offline on any fresh machine.

Every utterance gets ``media/<dialogue>_<turn>_<key>.wav`` (espeak-ng, 22.05 kHz mono) and a ``.mp4``
of the same length (H.264 320x320 at 12 fps with that wav as its AAC track). ``key`` hashes everything
the files are made from, so editing a line or a style makes new files while a second run reuses them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from skimage.data import astronaut

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SPLITS = ("train", "dev", "test")
MANIFEST_COLUMNS = ("dialogue_id", "turn", "speaker", "text", "label", "split", "video", "audio", "start", "end")

FPS = 12
SIZE = 320  # output frames are SIZE x SIZE pixels

# One espeak-ng voice (language + variant) per speaker of dialogues.jsonl.
SPEAKER_VOICES = {"Maya": "en-us+f2", "Priya": "en-gb+f4", "Theo": "en-us+m3", "Sam": "en-gb+m1"}

# The astronaut photograph is 512x512; this square keeps her face and shoulders, face in the upper half.
PHOTO_CROP = (64, 0, 384, 320)  # x0, y0, x1, y1


@dataclass(frozen=True)
class Style:
    """How one label sounds and moves. Motion values are reached at the end of the clip."""

    pitch: int  # espeak-ng -p, 0..99 (its default is 50)
    speed: int  # espeak-ng -s, words per minute (its default is 175)
    volume: int  # espeak-ng -a, 0..200 (its default is 100)
    zoom: float  # scale of the photo (1.0 = as cropped)
    tilt_deg: float  # roll of the photo, degrees, positive = counter-clockwise
    lift: float  # vertical move as a fraction of the frame, positive = up
    shake_px: float  # amplitude of a fast tremor, pixels
    gain: float  # brightness factor (1.0 = unchanged)


STYLES = {
    "neutral": Style(pitch=50, speed=165, volume=100, zoom=1.04, tilt_deg=0.0, lift=0.00, shake_px=0.0, gain=1.00),
    "joy": Style(pitch=72, speed=190, volume=120, zoom=1.06, tilt_deg=3.0, lift=0.03, shake_px=0.0, gain=1.15),
    "surprise": Style(pitch=85, speed=185, volume=130, zoom=1.12, tilt_deg=-1.5, lift=0.02, shake_px=0.0, gain=1.10),
    "anger": Style(pitch=60, speed=200, volume=170, zoom=1.10, tilt_deg=-2.0, lift=-0.01, shake_px=2.5, gain=0.95),
    "sadness": Style(pitch=30, speed=130, volume=80, zoom=1.02, tilt_deg=-3.0, lift=-0.04, shake_px=0.0, gain=0.80),
    "disgust": Style(pitch=38, speed=150, volume=110, zoom=0.97, tilt_deg=4.0, lift=0.00, shake_px=0.0, gain=0.92),
    "fear": Style(pitch=68, speed=205, volume=90, zoom=0.95, tilt_deg=1.5, lift=0.01, shake_px=1.5, gain=0.88),
}


def load_dialogues() -> list[dict]:
    """The demo's utterances, in dialogue and turn order, as stored in the package's ``dialogues.jsonl``.

    Each row has ``dialogue_id, turn, speaker, text, label, split`` (and ``sentiment``).

    >>> {row["label"] for row in load_dialogues()} == set(LABELS)
    True
    """
    source = resources.files("bemerc.demo") / "dialogues.jsonl"
    rows = []
    for line_no, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        where = f"{source.name} line {line_no}"
        missing = [column for column in MANIFEST_COLUMNS[:6] if column not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if row.get("label") not in STYLES:
            raise ValueError(f"{where}: label {row.get('label')!r} is not one of {', '.join(LABELS)}")
        if row.get("speaker") not in SPEAKER_VOICES:
            raise ValueError(f"{where}: speaker {row.get('speaker')!r} has no voice in SPEAKER_VOICES")
        if row.get("split") not in SPLITS:
            raise ValueError(f"{where}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}")
        rows.append(row)
    return rows


def make_demo(out_dir: Path, *, force: bool = False) -> Path:
    """Make the demo's speech and face clips under ``out_dir/media`` and write ``out_dir/manifest.jsonl``.

    Returns the manifest's path. Files that exist are kept unless ``force``; every file is written under
    a temporary name and renamed when complete, so an interrupted run leaves no half-written file and
    the next run finishes the job. Manifest rows have MANIFEST_COLUMNS and ``sentiment``; ``video`` and
    ``audio`` are relative to ``out_dir``, ``start`` is 0 and ``end`` the utterance's duration in seconds.

    >>> make_demo(Path("demo_data"))  # doctest: +SKIP
    PosixPath('demo_data/manifest.jsonl')
    """
    _require_tools()
    out_dir = Path(out_dir)
    media_dir = out_dir / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    utterances = load_dialogues()
    stems = [f"{u['dialogue_id']}_{u['turn']:02d}_{_key(u['text'], *_voice_style(u))}" for u in utterances]
    # Each clip is a few short espeak-ng and ffmpeg runs, so one thread per core keeps every core busy.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        make = functools.partial(_make_utterance, force=force)
        durations = list(pool.map(make, utterances, [media_dir / stem for stem in stems]))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, start no further clip
    rows = [
        {
            **{column: utt[column] for column in MANIFEST_COLUMNS[:6]},
            "video": f"media/{stem}.mp4",
            "audio": f"media/{stem}.wav",
            "start": 0.0,
            "end": round(duration, 3),
            "sentiment": utt.get("sentiment"),
        }
        for utt, stem, duration in zip(utterances, stems, durations)
    ]
    manifest = out_dir / "manifest.jsonl"
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if force or not manifest.exists() or manifest.read_text(encoding="utf-8") != text:
        with _atomic(manifest) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return manifest


def _voice_style(utt: dict) -> tuple[str, Style]:
    return SPEAKER_VOICES[utt["speaker"]], STYLES[utt["label"]]


def _make_utterance(utt: dict, stem: Path, force: bool) -> float:
    """Make ``stem``.wav and ``stem``.mp4 for one utterance unless they exist; return its duration in s."""
    voice, style = _voice_style(utt)
    wav, mp4 = Path(f"{stem}.wav"), Path(f"{stem}.mp4")
    if force or not wav.exists():
        _speak(utt["text"], voice, style, wav)
    duration = _wav_duration(wav)
    if force or not mp4.exists():
        _write_clip(_face_frames(_photo(), style, duration), wav, mp4)
    return duration


def _require_tools() -> None:
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed but the demo needs it: run `make setup` (it installs it)")


def _key(text: str, voice: str, style: Style) -> str:
    """Short hash of everything an utterance's files are made from."""
    spec = json.dumps([text, voice, asdict(style), FPS, SIZE, PHOTO_CROP])
    return hashlib.sha1(spec.encode()).hexdigest()[:8]


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it to ``dest`` only if the block completes."""
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _run(cmd: list[str], dest: Path, stdin: bytes | None = None) -> None:
    # Own process group: Ctrl-C reaches only Python, which lets the running clips finish whole.
    proc = subprocess.run(cmd, input=stdin, capture_output=True, process_group=0)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
        raise RuntimeError(f"{dest}: {Path(cmd[0]).name} failed ({lines[-1]})")


def _speak(text: str, voice: str, style: Style, dest: Path) -> None:
    with _atomic(dest) as tmp:
        cmd = ["espeak-ng", "-v", voice, "-p", str(style.pitch), "-s", str(style.speed), "-a", str(style.volume),
               "-w", str(tmp), text]
        _run(cmd, dest)


def _wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


@functools.cache
def _photo() -> np.ndarray:
    """The astronaut photograph cropped to head and shoulders: uint8 array of shape (SIZE, SIZE, 3)."""
    x0, y0, x1, y1 = PHOTO_CROP
    return cv2.resize(astronaut()[y0:y1, x0:x1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def _face_frames(photo: np.ndarray, style: Style, duration_s: float) -> np.ndarray:
    """Animate ``photo`` (SIZE, SIZE, 3) towards ``style`` over ``duration_s``: uint8 (T, SIZE, SIZE, 3).

    The move eases in and out; a slight nod at a speaking rhythm keeps the neutral clip alive too.
    """
    n_frames = max(1, math.ceil(duration_s * FPS))
    frames = np.empty((n_frames, SIZE, SIZE, 3), dtype=np.uint8)
    centre = (SIZE / 2, SIZE * 0.38)  # about the face, so zoom and tilt pivot on it
    for i in range(n_frames):
        t = i / FPS
        ease = 0.5 - 0.5 * math.cos(math.pi * min(1.0, t / max(duration_s, 1e-3)))
        matrix = cv2.getRotationMatrix2D(centre, style.tilt_deg * ease, 1 + (style.zoom - 1) * ease)
        matrix[0, 2] += style.shake_px * math.sin(2 * math.pi * 7 * t)
        nod = 1.5 * math.sin(2 * math.pi * 2 * t)
        matrix[1, 2] += -style.lift * SIZE * ease + nod + style.shake_px * math.sin(2 * math.pi * 11 * t)
        moved = cv2.warpAffine(photo, matrix, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frames[i] = cv2.convertScaleAbs(moved, alpha=1 + (style.gain - 1) * ease)
    return frames


def _write_clip(frames: np.ndarray, wav: Path, dest: Path) -> None:
    """Encode ``frames`` (T, H, W, 3) RGB as H.264 with ``wav`` as the AAC audio track."""
    _, height, width, _ = frames.shape
    with _atomic(dest) as tmp:
        cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(FPS), "-i", "-",
               "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0",
               "-c:v", "libx264", "-preset", "superfast", "-crf", "23", "-pix_fmt", "yuv420p", "-threads", "1",
               "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", "-f", "mp4", str(tmp)]
        _run(cmd, dest, stdin=frames.tobytes())
