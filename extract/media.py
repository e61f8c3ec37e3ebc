"""Decoding in one place: probe a file, decode its audio as 16 kHz mono, sample its frames.

Everything goes through the ffmpeg command line (installed by `make setup`), so any container or
codec ffmpeg reads works, and a broken file becomes a :class:`MediaError` naming the file.

A path may be an object URI (``s3://bucket/clips/a.mp4``, any scheme :mod:`bemerc.store.objects`
opens): it is downloaded once into this process's media cache (:func:`local_media`), so the workers
of a cluster read media from object storage themselves and nothing needs a shared filesystem.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from bemerc.store.objects import ObjectError, download, is_uri

SAMPLE_RATE = 16_000
SKIP_NONREF_RATIO = 4  # source frames per sample from which non-reference frames are not decoded
FRAME_SAMPLING = "fps-filter,skip-nonref-4x"  # how sample_frames picks frames: in extractor configs (hashed)
T = TypeVar("T")
R = TypeVar("R")


class MediaError(Exception):
    """A media file that cannot be used; ``str()`` is one line naming the file and the problem."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file."""

    duration_s: float
    has_audio: bool
    has_video: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0


def _ffmpeg(tool: str = "ffmpeg") -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} is not installed: run `make setup` (it installs ffmpeg with apt)")
    return exe


class _MediaCache:
    """Local copies of media objects, least recently used first out once they pass ``limit_mb``.

    One per process, in a temporary folder removed at exit. The two newest copies are never evicted
    (the one being decoded and the one :func:`decode_ahead` fetches next).
    """

    def __init__(self, limit_mb: float):
        self.limit = int(limit_mb * (1 << 20))
        self.files: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self.folder: Path | None = None
        self.guard = threading.Lock()

    def get(self, uri: str) -> Path:
        with self.guard:
            if uri in self.files:
                self.files.move_to_end(uri)
                return self.files[uri][0]
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="bemerc-media-"))
                atexit.register(shutil.rmtree, self.folder, True)
            folder = self.folder
        local = folder / (hashlib.sha1(uri.encode()).hexdigest()[:20] + Path(uri).suffix[:12])
        size = download(uri, local).size
        with self.guard:
            self.files[uri] = (local, size)
            self.files.move_to_end(uri)
            while len(self.files) > 2 and sum(n for _, n in self.files.values()) > self.limit:
                _, (old, _) = self.files.popitem(last=False)
                old.unlink(missing_ok=True)
        return local


_CACHE = _MediaCache(float(os.environ.get("BEMERC_MEDIA_CACHE_MB", 2048)))


def local_media(path: str | Path) -> Path:
    """A local path to read ``path`` from: the path itself, or for an object URI its copy in this
    process's media cache (downloaded on first use; ``BEMERC_MEDIA_CACHE_MB`` bounds the cache, 2048).

    Raises :class:`MediaError` naming the URI when the object is missing or cannot be read.

    >>> local_media("s3://corpus/clips/dia1_utt0.mp4")  # doctest: +SKIP
    PosixPath('/tmp/bemerc-media-k2j4/5f1c0a7d2b9e8c3a4d6f.mp4')
    """
    if not is_uri(path):
        return Path(path)
    try:
        return _CACHE.get(str(path))
    except ObjectError as e:  # the reason names the object: a failures row shows which one
        raise MediaError(str(path), f"{e.problem} ({path})" if e.missing else e.problem) from None


def _open(path: str | Path) -> tuple[str, Path]:
    """``(name for errors, local path)`` of an existing, non-empty media file or object."""
    name, local = str(path), local_media(path)
    try:
        size = local.stat().st_size
    except FileNotFoundError:
        raise MediaError(name, "file not found") from None
    except OSError as e:
        raise MediaError(name, f"cannot read ({e.strerror or e})") from None
    if size == 0:
        raise MediaError(name, "empty file (0 bytes)")
    return name, local


def probe(path: str | Path) -> MediaInfo:
    """Duration and streams of a media file (a local path or an object URI).

    >>> probe("clip.mp4").duration_s  # doctest: +SKIP
    3.35
    """
    return _probe(*_open(path))


def _probe(name: str, path: Path) -> MediaInfo:
    """:func:`probe` of the local file ``path``; errors name ``name`` (the path or URI asked for)."""
    cmd = [_ffmpeg("ffprobe"), "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MediaError(name, f"unreadable media ({_last_line(proc.stderr)})")
    meta = json.loads(proc.stdout or "{}")
    streams = meta.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = float(meta.get("format", {}).get("duration", 0.0) or 0.0)
    fps = 0.0
    if video is not None:
        num, _, den = str(video.get("avg_frame_rate", "0/1")).partition("/")
        fps = float(num) / float(den or 1) if float(den or 1) else 0.0
    return MediaInfo(
        duration_s=duration,
        has_audio=audio is not None,
        has_video=video is not None,
        width=int(video.get("width", 0)) if video else 0,
        height=int(video.get("height", 0)) if video else 0,
        fps=fps,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "ffmpeg failed"


def _span_args(start_s: float | None, end_s: float | None) -> list[str]:
    args: list[str] = []
    if start_s is not None and start_s > 0:
        args += ["-ss", f"{start_s:.3f}"]
    if end_s is not None:
        args += ["-to", f"{end_s:.3f}"]
    return args


def decode_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, start_s: float | None = None, end_s: float | None = None
) -> np.ndarray:
    """Decode the audio of any media file as mono float32 in [-1, 1] at ``sample_rate`` Hz.

    ``start_s``/``end_s`` cut a span (for IEMOCAP-style long recordings). Raises
    :class:`MediaError` when the file is unreadable, has no audio stream or decodes to nothing.

    >>> decode_audio("speech.wav").shape  # doctest: +SKIP
    (53387,)
    """
    name, path = _open(path)
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", *_span_args(start_s, end_s), "-i", str(path),
           "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        if "matches no streams" in err or "does not contain any stream" in err:
            raise MediaError(name, "no audio stream")
        raise MediaError(name, f"cannot decode audio ({_last_line(err)})")
    audio = np.frombuffer(proc.stdout, dtype=np.float32).copy()
    if audio.size == 0:
        raise MediaError(name, "audio decodes to zero samples")
    return audio


def sample_frames(
    path: str | Path,
    fps: float = 4.0,
    max_side: int = 640,
    start_s: float | None = None,
    end_s: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample RGB frames at ``fps`` frames per second, scaled so the longer side is ``max_side``.

    Returns ``(frames, times_s)``: uint8 array of shape (T, H, W, 3) and float array (T,) of frame
    times in seconds from the start of the span. Raises :class:`MediaError` for an unreadable file,
    no video stream, or no frames.

    Only what is kept is paid for: ffmpeg seeks to ``start_s``, scales and converts only the sampled
    frames, and when the video has at least :data:`SKIP_NONREF_RATIO` frames per sample it does not
    decode the frames no other frame depends on (B-frames, most of an H.264 stream): a sample then
    lands on the nearest decoded frame, at most a few source frames (~0.1 s at 30 fps) from its time.
    """
    if is_still(path):
        return read_still(path, max_side)
    name, path = _open(path)
    info = _probe(name, path)
    if not info.has_video:
        raise MediaError(name, "no video stream")
    scale = max_side / max(info.width, info.height, 1)
    width = max(2, int(round(info.width * min(scale, 1.0) / 2)) * 2)
    height = max(2, int(round(info.height * min(scale, 1.0) / 2)) * 2)
    skip = ["-skip_frame", "noref"] if info.fps >= SKIP_NONREF_RATIO * fps else []
    # A reference frame decoded after the span's last packet may lie past its end: cut the output too.
    span_end = ["-t", f"{end_s - (start_s or 0.0):.3f}"] if end_s is not None else []
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", *skip, *_span_args(start_s, end_s), "-i", str(path), "-map", "0:v:0",
           "-vf", f"fps={fps},scale={width}:{height}", *span_end, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise MediaError(name, f"cannot decode video ({_last_line(proc.stderr.decode(errors='replace'))})")
    frame_bytes = width * height * 3
    count = len(proc.stdout) // frame_bytes
    if count == 0:
        raise MediaError(name, "video decodes to zero frames")
    frames = np.frombuffer(proc.stdout[: count * frame_bytes], dtype=np.uint8).reshape(count, height, width, 3)
    times = (np.arange(count) + 0.5) / fps
    return frames, times


STILL_PAD = 0.5  # a still image is framed by this fraction of its longer side on every side (grey)
def is_still(path: str | Path) -> bool:
    """Whether the media file (or object) at ``path`` is a JPEG or PNG, by its first bytes."""
    from bemerc.store.ingest.common import STILL_CONTAINERS, sniff_container  # not at import: it loads LanceDB

    _, local = _open(path)
    with open(local, "rb") as handle:
        return sniff_container(handle.read(16)) in STILL_CONTAINERS


def still_frame(image: np.ndarray, max_side: int = 640) -> np.ndarray:
    """A still RGB image as the frame the face finder reads: scaled down so its longer side is at most
    ``max_side``, then framed in grey by :data:`STILL_PAD` of that side. Photo corpora are often tight face
    crops (RAF-DB, FER2013), and the face detector needs context around a face to find it."""
    import cv2

    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    pad = int(round(STILL_PAD * max(image.shape[:2])))
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))


def read_still(path: str | Path, max_side: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """A JPEG or PNG as a one-frame video: ``(frames (1, H, W, 3) uint8 RGB, times_s [0.0])``, framed by
    :func:`still_frame`; :class:`MediaError` when it cannot be decoded."""
    import cv2

    name, path = _open(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise MediaError(name, f"cannot read image ({error.strerror})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise MediaError(name, "cannot decode image (not a readable JPEG or PNG)")
    frame = still_frame(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), max_side)
    return frame[None], np.zeros(1)


def evenly_spaced(frames: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of ``frames`` (T, ...), evenly spread, first and last included.

    >>> evenly_spaced(np.arange(10), 3), evenly_spaced(np.arange(2), 8)
    (array([0, 4, 9]), array([0, 1]))
    """
    return frames[np.unique(np.linspace(0, len(frames) - 1, min(len(frames), k)).round().astype(int))]


def decode_ahead(items: Iterable[T], decode: Callable[[T], R]) -> Iterator[tuple[T, R | MediaError]]:
    """``(item, decode(item))`` for each item in order, decoding the next item in a background thread
    while the caller works on this one (ffmpeg runs on another core while the models run).

    A :class:`MediaError` raised by ``decode`` is yielded in place of its result; other errors are
    raised. At most one decoded item waits beyond the one being used.

    >>> for item, frames in decode_ahead(paths, sample_frames): ...  # doctest: +SKIP
    """

    def attempt(item: T) -> R | MediaError:
        try:
            return decode(item)
        except MediaError as error:
            return error

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead") as pool:
        queue: deque[tuple[T, Future]] = deque()
        for item in items:
            queue.append((item, pool.submit(attempt, item)))
            if len(queue) > 1:
                done, future = queue.popleft()
                yield done, future.result()
        while queue:
            done, future = queue.popleft()
            yield done, future.result()
