"""``POST /predict``: a dialogue in, a label with probabilities per utterance out.

The request names no server file: text comes as JSON, media only as uploaded bytes, which are
checked (size, magic bytes, ffprobe with a demuxer whitelist, duration) and written under a private
temporary folder that is deleted after the request. The run decides everything else: its feature
sets say which extractors to run (rebuilt from a profile and checked against the stored config
hash), its kind which model scores the features.

A modality that an utterance lacks, or whose upload cannot be decoded, is left out of that
utterance's prediction (the run fuses the others, as in training) and named in its ``errors``; an
utterance left with no usable input at all is a 422 naming the part.

>>> predictor = Predictor(Store("store"))                                        # doctest: +SKIP
>>> request = PredictRequest(utterances=[{"speaker": "Ross", "text": "Hi!"}])   # doctest: +SKIP
>>> predictor.predict(request, {})["utterances"][0]["label"]                     # doctest: +SKIP
'joy'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bemerc.extract.base import MODALITY_ORDER  # audio first: a transcript can stand in for a missing text
from bemerc.models.profiles import DEFAULT_PROFILE
from bemerc.store import Store, StoreError
from bemerc.store import schema as S
from bemerc.store.ingest.common import STILL_CONTAINERS, sniff_container
from bemerc.store.runs import list_runs
from bemerc.train.tensors import Corpus, ModalityArrays

MEDIA_KINDS = ("audio", "video")
UPLOAD_NAME = re.compile(r"^(audio|video)_(\d{1,4})$")
# Demuxers ffprobe may use on an upload: real containers only, never playlists or concat lists that
# could make ffmpeg open other files or URLs.
DEMUXERS = "wav,mp3,flac,ogg,aac,mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv"
# Keys that would name a media file by path inside the JSON body: refused, media must be uploaded.
PATH_KEYS = {"audio", "video", "audio_path", "video_path", "path", "file", "media", "url"}


class PredictError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, ``str()`` the message and
    ``retry_after_s`` (503 only) when to try again."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PredictUtterance(BaseModel):
    """One turn of the dialogue. Media for turn ``i`` is uploaded as ``audio_i`` / ``video_i``."""

    model_config = ConfigDict(extra="forbid")
    speaker: str | None = Field(None, max_length=200)
    text: str | None = Field(None, max_length=S.MAX_TEXT_CHARS)  # the limit of every entry point (manifests too)

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = sorted(PATH_KEYS & set(data))
            if named:
                raise ValueError(
                    f"field {named[0]!r} is not accepted: media is never read from a path or URL; upload it as a "
                    "multipart file named audio_<index> or video_<index> with the JSON in the form field 'dialogue'"
                )
        return data


class PredictRequest(BaseModel):
    """``{"utterances": [{"speaker": ..., "text": ...}, ...], "run": RUN_ID}``; run defaults to the newest."""

    model_config = ConfigDict(extra="forbid")
    utterances: list[PredictUtterance] = Field(..., min_length=1)
    run: str | None = Field(None, max_length=200)


@dataclass(frozen=True)
class ServeLimits:
    """What one ``/predict`` request may ask for, and how many may wait.

    Sizes bound the upload; ``max_media_s`` bounds the work (checked on the container's header, then on
    what the upload decodes to, before any extractor runs);
    ``max_pending`` / ``max_media_pending`` bound the queue (more gets 503 with ``Retry-After``);
    ``request_timeout_s`` bounds one request's wall time, waiting included (503 when it could not
    start in time, 504 when its own work ran over).
    """

    max_upload_bytes: int = 50 * 1024 * 1024  # per file
    max_request_bytes: int = 200 * 1024 * 1024  # the whole request body
    max_utterances: int = 64
    max_media_s: float = 60.0  # duration of one uploaded file (one utterance)
    max_pending: int = 16  # /predict requests in the server at once, running or waiting
    max_media_pending: int = 2  # of those, requests that upload media (their work is long)
    request_timeout_s: float = 120.0
    receive_timeout_s: float = 30.0  # to receive a request's headers and its whole body (a slow client is cut off)
    retry_after_s: int = 10  # what a 503 tells the client


# --- uploads -------------------------------------------------------------------------------------


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
    from PIL import Image

    if kind != "video":
        raise PredictError(415, f"upload {name!r} is a still image ({container}), not {kind}")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_STILL_PIXELS:
                raise PredictError(413, f"upload {name!r} is {image.width}x{image.height} pixels, over the limit of "
                                        f"{MAX_STILL_PIXELS:,} for a still image")
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
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


# --- extractors and models -----------------------------------------------------------------------


class RunModel(Protocol):
    """A trained run that scores a corpus: (N, C) probabilities in the run's class order."""

    def predict_proba(self, corpus: Corpus) -> np.ndarray: ...


def load_run_model(run: dict, store: Store) -> RunModel:
    """The model of a run, by its kind (a :class:`PredictError` 501 for kinds that cannot predict);
    ``store`` serves tuned runs that show retrieved demonstrations and the members of fusion runs."""
    if run["kind"] == "baseline":
        from bemerc.train.baseline import BaselineModel

        try:
            return BaselineModel.load(run["run_dir"])
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise PredictError(500, f"run {run['run_id']!r}: cannot load its saved model: {exc}") from None
    if run["kind"] == "tune":
        adapter = Path(run["run_dir"] or "") / "adapter"
        if not (adapter / "tune.json").is_file():
            raise PredictError(501, f"run {run['run_id']!r} saved no adapter (a zero-shot run?); /predict serves "
                                    "tuned runs that have RUN_DIR/adapter")
        from bemerc.train.tune.infer import TunedModel

        try:
            return TunedModel.load(adapter, store=store)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise PredictError(500, f"run {run['run_id']!r}: cannot load its adapter: {exc}") from None
    if run["kind"] == "fusion":
        from bemerc.train.fuse import FusionModel

        weights = run["config"].get("weights", {})
        runs = {r["run_id"]: r for r in list_runs(store)}
        gone = [m for m, w in weights.items() if w > 0 and m not in runs]
        if gone:
            raise PredictError(409, f"fusion run {run['run_id']!r} needs member run(s) {', '.join(gone)}, which are gone from the store")
        return FusionModel({m: load_run_model(runs[m], store) for m, w in weights.items() if w > 0}, weights)
    raise PredictError(501, f"run {run['run_id']!r} is of kind {run['kind']!r}, which /predict does not serve; "
                            "pick a baseline, tune or fusion run with \"run\"")


class Predictor:
    """Runs a trained run on new dialogues; extractors and models are loaded once and cached.

    Each extractor and each run's model is used by one request at a time (they are not all safe to
    call from several threads), but different ones run side by side: a text-only request does not
    wait while another request's long audio goes through Whisper. Media extractors run in a
    :class:`MediaWorker` process on half the cores (``media_threads``), so that light requests keep
    the rest of the machine and the server's own interpreter.
    """

    def __init__(self, store: Store, profile: str | None = None, retry_after_s: int = 10):
        self.store = store
        self.profile = profile or DEFAULT_PROFILE  # a name or TOML path; None: the default profile
        self.retry_after_s = retry_after_s
        self.media_threads = max(1, (os.cpu_count() or 2) // 2)
        self.media = MediaWorker.shared(self.profile, self.media_threads)
        self._extractors: dict[str, Any] = {}
        self._models: dict[str, RunModel] = {}
        self._load_lock = threading.Lock()
        self._busy_locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def _using(self, key: str, deadline: float | None):
        """Hold the lock of one extractor or model; a 503 when it is not free before ``deadline``."""
        with self._load_lock:
            lock = self._busy_locks.setdefault(key, threading.Lock())
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not lock.acquire(timeout=timeout):
            raise PredictError(503, "the server is busy with other predictions; try again shortly", self.retry_after_s)
        try:
            yield
        finally:
            lock.release()

    def run(self, run_id: str | None) -> dict:
        """The runs row of ``run_id``, or the newest run when None."""
        runs = list_runs(self.store)
        if not runs:
            raise PredictError(409, f"the store {self.store.path} has no trained run: train one with `bemerc baseline`")
        if run_id is None:
            return runs[-1]
        for r in runs:
            if r["run_id"] == run_id:
                return r
        raise PredictError(404, f"no run {run_id!r} in the store (runs: {', '.join(r['run_id'] for r in runs)})")

    def extractor(self, feature_set: str):
        """The cached extractor that reproduces ``feature_set`` (its config hash must match)."""
        with self._load_lock:
            if feature_set not in self._extractors:
                from bemerc.extract.base import config_hash
                from bemerc.extract.factory import build_extractor

                try:
                    fs = self.store.feature_set(feature_set)
                except StoreError as exc:
                    raise PredictError(409, f"the run's feature set is gone from the store: {exc}") from None
                try:
                    extractor = build_extractor(fs.modality, self.profile)
                except ValueError as exc:  # ProfileError too: a missing weight package, a bad profile file
                    raise PredictError(500, f"cannot build the {fs.modality} extractor of profile {self.profile!r}: {exc}") from None
                got = config_hash(extractor)
                if got != fs.config_hash:
                    raise PredictError(
                        409, f"the run was trained on {fs.id} but profile {self.profile!r} builds "
                             f"{fs.modality}/{extractor.name}@{got}; serve with the profile the features were extracted with"
                    )
                self._extractors[feature_set] = (fs, extractor)
            return self._extractors[feature_set]

    def model(self, run: dict) -> RunModel:
        with self._load_lock:
            if run["run_id"] not in self._models:
                self._models[run["run_id"]] = load_run_model(run, self.store)
            return self._models[run["run_id"]]

    def predict(self, request: PredictRequest, uploads: dict[tuple[str, int], Path], deadline: float | None = None) -> dict:
        """Labels and probabilities for every utterance of ``request``.

        ``uploads`` maps ``(kind, index)`` to a checked media file on the server; ``deadline`` (a
        ``time.monotonic()`` value) ends the request: 503 when it is still waiting for an extractor,
        504 when its own extraction runs past it.
        """
        run = self.run(request.run)
        n = len(request.utterances)
        for i, u in enumerate(request.utterances):
            if not (u.text or "").strip() and not any((k, i) in uploads for k in MEDIA_KINDS):
                raise PredictError(422, f"utterance {i} has neither text nor an uploaded audio_{i}/video_{i}")
        sets = sorted((self.extractor(f) for f in run["feature_sets"]), key=lambda p: MODALITY_ORDER.index(p[0].modality))
        model = self.model(run)
        texts = [(u.text or "").strip() or None for u in request.utterances]
        modalities: dict[str, ModalityArrays] = {}
        errors: list[dict[str, str]] = [{} for _ in range(n)]
        for fs, extractor in sets:
            run_on = extractor.extract if fs.modality == "text" else (lambda chunk: self.media.extract(fs.modality, chunk, deadline))
            arrays = _extract(extractor, fs, texts, uploads, errors, deadline, hold=lambda: self._using(fs.id, deadline),
                              run_on=run_on)
            if fs.modality == "audio" and "transcript" in arrays.extras:
                texts = [t or s for t, s in zip(texts, arrays.extras["transcript"])]
            modalities[fs.modality] = arrays
        for i in range(n):
            if modalities and not any(a.present[i] for a in modalities.values()):
                problems = "; ".join(f"{_part(m, i, uploads)}: {reason}" for m, reason in errors[i].items())
                raise PredictError(422, f"utterance {i} has no usable input for run {run['run_id']} "
                                        f"(modalities {', '.join(modalities)}){': ' + problems if problems else ''}")
        corpus = Corpus(_utterance_frame(request, texts, run.get("dataset")), modalities)
        with self._using(f"run:{run['run_id']}", deadline):
            probabilities = np.asarray(model.predict_proba(corpus), dtype=np.float64)
        classes = list(run["classes"])
        if probabilities.shape != (n, len(classes)):
            raise PredictError(500, f"run {run['run_id']} returned probabilities of shape {probabilities.shape}, "
                                    f"expected {(n, len(classes))}")
        extras = {m: a.extras for m, a in modalities.items()}
        return {
            "run": run["run_id"],
            "kind": run["kind"],
            "classes": classes,
            "utterances": [
                {
                    "index": i,
                    "speaker": u.speaker,
                    "text": texts[i],
                    "label": classes[int(probabilities[i].argmax())],
                    "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probabilities[i])},
                    "description": extras.get("behavior", {}).get("description", [None] * n)[i],
                    "transcript": extras.get("audio", {}).get("transcript", [None] * n)[i],
                    "modalities": [m for m, a in modalities.items() if a.present[i]],
                    "errors": errors[i],
                }
                for i, u in enumerate(request.utterances)
            ],
        }


def _part(modality: str, index: int, uploads: dict[tuple[str, int], Path]) -> str:
    """The part of the request a modality of utterance ``index`` came from: ``audio_0``, ``text``, ..."""
    if modality == "text":
        return f"utterances.{index}.text"
    kinds = ("audio", "video") if modality == "audio" else ("video",)
    return next((f"{k}_{index}" for k in kinds if (k, index) in uploads), f"{modality} of utterance {index}")


class MediaWorker:
    """Media extraction (audio, behaviour, visual) in one separate process, started on first use.

    Whisper's decoding loop and the media decoders then take neither the server's interpreter lock
    nor more than ``threads`` cores, at a lower priority, so ``/similar`` and text-only ``/predict``
    keep their latency while long audio is transcribed. The worker builds its extractors from the same profile (the
    server has checked their config hash against the run's feature sets). One worker per profile
    serves every app of the process (:meth:`shared`); it ends with the server.
    """

    _shared: dict[tuple[str, int], "MediaWorker"] = {}

    def __init__(self, profile: Any, threads: int):
        self.profile = profile
        self.threads = threads
        self._pool = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, profile: Any, threads: int) -> "MediaWorker":
        """The process's worker for ``profile`` (created once)."""
        key = (repr(profile), threads)
        if key not in cls._shared:
            cls._shared[key] = cls(profile, threads)
        return cls._shared[key]

    def extract(self, modality: str, items: list, deadline: float | None = None) -> list:
        """The extractor's results for ``items`` (dicts, or ``MediaError`` per item); a 504 once
        ``deadline`` passes."""
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        from bemerc.extract.media import MediaError

        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start)
            pool = self._pool
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            packed = pool.submit(_worker_extract, modality, self.profile, self.threads, items).result(timeout)
        except FutureTimeout:
            raise PredictError(504, f"the request ran over the server's time limit while extracting {modality} "
                                    "features; send shorter media or fewer utterances") from None
        except BrokenProcessPool as exc:
            with self._lock:
                self._pool = None  # the next request starts a fresh worker
            return [MediaError(item.uid, f"the media worker stopped ({exc})") for item in items]
        return [MediaError(item.uid, r["error"]) if "error" in r else r for item, r in zip(items, packed)]

    def close(self) -> None:
        """Stop the worker now, even in the middle of an extraction."""
        with self._lock:
            if self._pool is not None:
                processes = list((getattr(self._pool, "_processes", None) or {}).values())
                self._pool.shutdown(wait=False, cancel_futures=True)
                for process in processes:
                    process.terminate()
                self._pool = None


def _worker_start() -> None:
    """In the media worker: run at a lower priority than the server (media work is batch work beside
    interactive requests) and end with the server, even when it is killed (its parent changes)."""
    try:
        os.nice(10)
    except OSError:
        pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="bemerc-parent-watch").start()


_WORKER_EXTRACTORS: dict[tuple[str, str], Any] = {}


def _worker_extract(modality: str, profile: Any, threads: int, items: list) -> list[dict]:
    """In the media worker: run the (cached) extractor of ``modality``; a MediaError becomes
    ``{"error": reason}`` and any other failure of an item the same, so one odd upload ends nothing."""
    from bemerc.extract.factory import build_extractor
    from bemerc.extract.media import MediaError

    key = (modality, repr(profile))
    if key not in _WORKER_EXTRACTORS:
        extractor = build_extractor(modality, profile)
        if hasattr(extractor, "num_threads"):
            extractor.num_threads = threads
        _WORKER_EXTRACTORS[key] = extractor
    out = []
    for item in items:
        try:
            [result] = _WORKER_EXTRACTORS[key].extract([item])
        except Exception as exc:  # noqa: BLE001 - reported with the item
            result = MediaError(item.uid, f"{modality} extraction failed ({type(exc).__name__}: {exc})")
        out.append({"error": result.reason} if isinstance(result, MediaError) else result)
    return out


def _extract(extractor, fs, texts: list[str | None], uploads: dict[tuple[str, int], Path], errors: list[dict],
             deadline: float | None = None, hold=contextlib.nullcontext, run_on=None) -> ModalityArrays:
    """Run one extractor on the utterances that have its input; the rest are marked absent.

    ``run_on(items)`` computes the results (default: ``extractor.extract``; the server sends media
    to its :class:`MediaWorker`), inside ``hold()`` (the extractor's lock) and only when some
    utterance has the input.
    Media is extracted one utterance at a time so that ``deadline`` is checked between them (a 504
    once it has passed); an utterance whose media fails to decode gets the reason in ``errors``.
    """
    from bemerc.extract.base import UtteranceMedia
    from bemerc.extract.media import MediaError

    n = len(texts)
    items = [
        UtteranceMedia(uid=f"request/{i}", text=texts[i],
                       audio_path=str(uploads[("audio", i)]) if ("audio", i) in uploads else None,
                       video_path=str(uploads[("video", i)]) if ("video", i) in uploads else None)
        for i in range(n)
    ]
    wanted = [i for i, item in enumerate(items) if _has_input(fs.modality, item)]
    vectors = np.zeros((n, fs.dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    extras: dict[str, list] = {f.name: [None] * n for f in extractor.fields() if f.name != "vector"}
    step = max(1, len(wanted)) if fs.modality == "text" else 1
    results: list = []
    with hold() if wanted else contextlib.nullcontext():
        for start in range(0, len(wanted), step):
            if deadline is not None and time.monotonic() > deadline:
                raise PredictError(504, f"the request ran over the server's time limit while extracting {fs.modality} "
                                        "features; send shorter media or fewer utterances")
            chunk = [items[i] for i in wanted[start : start + step]]
            try:
                results += (run_on or extractor.extract)(chunk)
            except PredictError:
                raise
            except Exception as exc:  # a decoder or model failing on one odd upload must not end the request
                if fs.modality == "text":
                    raise
                results += [MediaError(chunk[0].uid, f"{fs.modality} extraction failed ({type(exc).__name__}: {exc})")]
    for i, result in zip(wanted, results):
        if isinstance(result, MediaError):
            errors[i][fs.modality] = result.reason
            continue
        vectors[i] = np.asarray(result["vector"], dtype=np.float32)
        present[i] = True
        for key in extras:
            value = result.get(key)
            extras[key][i] = value.tolist() if isinstance(value, np.ndarray) else value
    return ModalityArrays(fs, vectors, present, extras)


def _has_input(modality: str, item) -> bool:
    if modality == "text":
        return bool(item.text)
    if modality == "audio":
        return bool(item.audio_path or item.video_path)
    return bool(item.video_path)


def _utterance_frame(request: PredictRequest, texts: list[str | None], dataset: str | None) -> pl.DataFrame:
    """The request as one dialogue in the utterances schema (no labels)."""
    rows = [
        {"uid": f"request/{i}", "dataset": dataset or "request", "split": "predict", "dialogue_id": "request",
         "turn": i, "speaker": u.speaker, "text": texts[i]}
        for i, u in enumerate(request.utterances)
    ]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=S.UTTERANCES))  # type: ignore[return-value]
