"""Uploaded media of ``POST /predict``: where each file goes and whether it is media we decode.

Each upload is written under a server-chosen name in the request's private temporary folder, then
checked before any extractor sees it: size, magic bytes, ffprobe with a demuxer whitelist (never a
playlist or a concat list that could open other files or URLs), and its duration, from the container
and again on what decodes (:func:`check_media`).

>>> upload_slot("audio_3", 4)
('audio', 3)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from bemerc.serve.request import PredictError, ServeLimits
from bemerc.store.ingest.common import STILL_CONTAINERS, StillImageError, decode_still, sniff_container

MEDIA_KINDS = ("audio", "video")
UPLOAD_NAME = re.compile(r"^(audio|video)_(\d{1,4})$")
# Demuxers ffprobe may use on an upload: real containers only, never playlists or concat lists that
# could make ffmpeg open other files or URLs.
DEMUXERS = "wav,mp3,flac,ogg,aac,mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv"


def upload_slot(name: str, n_utterances: int) -> tuple[str, int]:
    """``"audio_3"`` -> ``("audio", 3)``; a :class:`PredictError` (422) for any other field name."""
    match = UPLOAD_NAME.match(name)
    if not match:
        raise PredictError(422, f"unexpected upload field {name!r}: files must be named audio_<index> or video_<index>")
    kind, index = match.group(1), int(match.group(2))
    if index >= n_utterances:
        raise PredictError(422, f"upload {name!r} refers to utterance {index}, but the dialogue has {n_utterances}")
    return kind, index


def check_media(path: Path, kind: str, name: str, max_media_s: float | None = None) -> float:
    """The duration in seconds of ``path``, a real audio/video file with a ``kind`` stream; else a
    :class:`PredictError`: 415 for what is not such media, 413 when it lasts over ``max_media_s``.

    The length is checked twice: from the container (ffprobe, before anything is decoded), then on
    what decodes. A header may lie (an MP3 without a Xing header is estimated from its first
    frame's bitrate: 2 s at 320 kbit/s then 10 min at 8 kbit/s probes at 32 s), so with a limit the
    streams the extractors will decode (the audio of any upload, the video of a ``video_<i>``) are
    decoded once, cheaply, and the decoding stops a moment past the limit (:func:`decoded_seconds`).
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    container = sniff_container(head)
    if container is None:
        raise PredictError(415, f"upload {name!r} is not a supported media file (expected wav, mp3, flac, ogg, mp4/mov, "
                                "mkv/webm, avi or flv by content, or a jpeg or png as video)")
    if container in STILL_CONTAINERS:
        return check_still(path, kind, name, container)
    exe = shutil.which("ffprobe")
    if exe is None:
        raise PredictError(503, "ffprobe is not installed on the server (install ffmpeg)")
    cmd = [exe, "-v", "error", "-protocol_whitelist", "file", "-format_whitelist", DEMUXERS,
           "-print_format", "json", "-show_streams", "-show_format", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise PredictError(415, f"upload {name!r}: probing the media took over 30 s") from None
    probe = json.loads(proc.stdout or "{}") if proc.returncode == 0 else {}
    streams = probe.get("streams", [])
    if not streams:
        raise PredictError(415, f"upload {name!r} looks like {container} but ffprobe cannot read it")
    if not any(s.get("codec_type") == kind for s in streams):
        found = ", ".join(sorted({str(s.get("codec_type")) for s in streams}))
        raise PredictError(415, f"upload {name!r} has no {kind} stream (found: {found})")
    duration = media_duration_s(probe)
    if duration is None:
        raise PredictError(415, f"upload {name!r}: its container does not say how long it is, so it is not decoded")
    if max_media_s is not None and duration > max_media_s:
        raise PredictError(413, f"upload {name!r} lasts {duration:.1f} s, over the limit of {max_media_s:g} s per utterance")
    if max_media_s is None:
        return duration
    codec_types = {s.get("codec_type") for s in streams}
    decoded = [kind] + (["audio"] if kind == "video" and "audio" in codec_types else [])
    for stream in decoded:
        seconds = decoded_seconds(path, stream, stop_after_s=max_media_s + 2 * DECODE_SLACK_S, name=name)
        if seconds > max_media_s + DECODE_SLACK_S:
            raise PredictError(413, f"upload {name!r}: its {stream} decodes to over {max_media_s:g} s (its container says "
                                    f"{duration:.1f} s), over the limit of {max_media_s:g} s per utterance")
        duration = max(duration, seconds)
    return duration


DECODE_SLACK_S = 0.5  # decoded media may run this far past the limit (codec padding, frame rounding) and pass
DECODE_TIMEOUT_S = 60.0  # wall time to decode an upload up to the limit


def decoded_seconds(path: Path, stream: str, stop_after_s: float, name: str = "", timeout_s: float = DECODE_TIMEOUT_S) -> float:
    """Seconds of the first ``stream`` (``"audio"`` or ``"video"``) of ``path`` as ffmpeg decodes it,
    counted on the decoded output (not on any header or timestamp the container gives); decoding
    stops once ``stop_after_s`` is reached, so the answer is at most about ``stop_after_s``.

    Audio is counted in samples (decoded to 8 kHz mono), video in frames of the same frame-rate
    filter :func:`bemerc.extract.media.sample_frames` uses (10 per second, each 2x2 grey), so a gap in
    the timestamps counts as the frames the extractor would be given. ffmpeg's own ``-t`` ends the
    decoding; the count ends it too where timestamps would keep ``-t`` from doing so. A file that
    does not decode counts what it gave (its extractor names the failure later). A
    :class:`PredictError` 415 when decoding up to the limit takes over ``timeout_s``.
    """
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise PredictError(503, "ffmpeg is not installed on the server (install ffmpeg)")
    if stream == "audio":
        out, per_s = ["-map", "0:a:0", "-ac", "1", "-ar", "8000", "-f", "s16le"], 8000 * 2
    else:
        out, per_s = ["-map", "0:v:0", "-vf", "fps=10,scale=2:2", "-pix_fmt", "gray", "-f", "rawvideo"], 10 * 4
    cmd = [exe, "-nostdin", "-v", "quiet", "-protocol_whitelist", "file", "-format_whitelist", DEMUXERS, "-i", str(path),
           *out, "-t", f"{stop_after_s:.3f}", "pipe:1"]
    enough = int(stop_after_s * per_s)
    count = 0
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, stop)
    timer.start()
    try:
        assert proc.stdout is not None
        while count < enough and (chunk := proc.stdout.read(1 << 16)):
            count += len(chunk)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()  # enough decoded: the rest is not looked at
        proc.stdout.close()  # type: ignore[union-attr]
        proc.wait()
    if timed_out.is_set() and count < enough:
        raise PredictError(415, f"upload {name!r}: decoding its {stream} up to the limit took over {timeout_s:g} s")
    return count / per_s


MAX_STILL_PIXELS = 50_000_000  # a still image larger than this is refused before it is decoded (a decompression bomb)


def check_still(path: Path, kind: str, name: str, container: str) -> float:
    """0.0 (a one-frame video) for a readable JPEG or PNG uploaded as video; else a :class:`PredictError`."""
    if kind != "video":
        raise PredictError(415, f"upload {name!r} is a still image ({container}), not {kind}")
    try:
        decode_still(path, MAX_STILL_PIXELS)
    except StillImageError as error:
        if error.size:
            raise PredictError(413, f"upload {name!r} is {error.size[0]}x{error.size[1]} pixels, over the limit of "
                                    f"{MAX_STILL_PIXELS:,} for a still image") from None
        raise PredictError(415, f"upload {name!r} looks like {container} but cannot be read ({error})") from None
    return 0.0


def media_duration_s(probe: dict) -> float | None:
    """The longest duration ffprobe's JSON (``-show_format -show_streams``) gives, or None.

    >>> media_duration_s({"format": {"duration": "3.34"}, "streams": [{"duration": "3.37"}]})
    3.37
    >>> media_duration_s({"format": {}, "streams": [{"codec_type": "audio"}]}) is None
    True
    """
    values = [probe.get("format", {}).get("duration"), *(s.get("duration") for s in probe.get("streams", []))]
    seconds = []
    for value in values:
        try:
            seconds.append(float(value))
        except (TypeError, ValueError):
            continue
    finite = [s for s in seconds if s == s and s not in (float("inf"), float("-inf"))]
    return max(finite) if finite else None



async def save_uploads(form, n_utterances: int, folder: Path, limits: ServeLimits) -> dict[tuple[str, int], Path]:
    """Write each uploaded file to ``folder`` under a server-chosen name and check it is real media."""
    uploads: dict[tuple[str, int], Path] = {}
    for name, value in form.multi_items():
        if name == "dialogue":
            continue
        if not isinstance(value, UploadFile):
            raise HTTPException(422, f"form field {name!r}: media must be uploaded as a file, not given as text or a path")
        kind, index = upload_slot(name, n_utterances)
        if (kind, index) in uploads:
            raise HTTPException(422, f"upload {name!r} is given twice")
        if value.size is not None and value.size > limits.max_upload_bytes:
            raise HTTPException(413, f"upload {name!r} is {value.size:,} bytes, over the limit of {limits.max_upload_bytes:,}")
        if value.size == 0:
            raise HTTPException(422, f"upload {name!r} is empty")
        path = folder / name
        with open(path, "wb") as out:
            while chunk := await value.read(1 << 20):
                out.write(chunk)
        await run_in_threadpool(check_media, path, kind, name, limits.max_media_s)
        uploads[(kind, index)] = path
    return uploads

