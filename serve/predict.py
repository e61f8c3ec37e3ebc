"""``POST /predict``: a dialogue in, a label with probabilities per utterance out.

The run decides everything: its feature sets say which extractors to run (rebuilt from a profile and
checked against the stored config hash), its kind which model scores the features. Text is extracted
here, media in the :class:`~bemerc.serve.worker.MediaWorker` process, from uploads that
:mod:`bemerc.serve.uploads` has checked; the results are packed into arrays as stored features are
(:func:`bemerc.train.tensors.pack_rows`).

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
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from bemerc.extract.base import INPUT_SOURCES, MODALITY_ORDER  # audio first: a transcript can stand in for a missing text
from bemerc.models.profiles import DEFAULT_PROFILE
from bemerc.serve.request import PredictError, PredictRequest
from bemerc.serve.uploads import MEDIA_KINDS
from bemerc.serve.worker import MediaWorker
from bemerc.store import Store, StoreError
from bemerc.store import schema as S
from bemerc.store.runs import Run, list_runs
from bemerc.train.runs import MembersGoneError, ModelLoadError, NoModelError, RunModel, load_model
from bemerc.train.tensors import Corpus, ModalityArrays, pack_rows


# The HTTP status of a run whose model cannot be loaded, by the reason (any other: 500).
LOAD_STATUS = {NoModelError: 501, MembersGoneError: 409}


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

    def run(self, run_id: str | None) -> Run:
        """The runs row of ``run_id``, or the newest run when None."""
        runs = list_runs(self.store)
        if not runs:
            raise PredictError(409, f"the store {self.store.path} has no trained run: train one with `bemerc baseline`")
        if run_id is None:
            return runs[-1]
        for r in runs:
            if r.run_id == run_id:
                return r
        raise PredictError(404, f"no run {run_id!r} in the store (runs: {', '.join(r.run_id for r in runs)})")

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

    def model(self, run: Run) -> RunModel:
        """The cached model of ``run`` (:func:`bemerc.train.runs.load_model`)."""
        with self._load_lock:
            if run.run_id not in self._models:
                try:
                    self._models[run.run_id] = load_model(run, self.store)
                except ModelLoadError as exc:
                    raise PredictError(LOAD_STATUS.get(type(exc), 500), str(exc)) from None
            return self._models[run.run_id]

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
        sets = sorted((self.extractor(f) for f in run.feature_sets), key=lambda p: MODALITY_ORDER.index(p[0].modality))
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
                raise PredictError(422, f"utterance {i} has no usable input for run {run.run_id} "
                                        f"(modalities {', '.join(modalities)}){': ' + problems if problems else ''}")
        corpus = Corpus(_utterance_frame(request, texts, run.dataset), modalities)
        with self._using(f"run:{run.run_id}", deadline):
            probabilities = np.asarray(model.predict_proba(corpus), dtype=np.float64)
        classes = list(run.classes)
        if probabilities.shape != (n, len(classes)):
            raise PredictError(500, f"run {run.run_id} returned probabilities of shape {probabilities.shape}, "
                                    f"expected {(n, len(classes))}")
        extras = {m: a.extras for m, a in modalities.items()}
        return {
            "run": run.run_id,
            "kind": run.kind,
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
    return next((f"{k}_{index}" for k in INPUT_SOURCES[modality] if (k, index) in uploads), f"{modality} of utterance {index}")


def _extract(extractor, fs, texts: list[str | None], uploads: dict[tuple[str, int], Path], errors: list[dict],
             deadline: float | None = None, hold=contextlib.nullcontext, run_on=None) -> ModalityArrays:
    """Run one extractor on the utterances that have its input; the rest are marked absent.

    ``run_on(items)`` computes the results (default: ``extractor.extract``; the server sends media
    to its :class:`MediaWorker`), inside ``hold()`` (the extractor's lock) and only when some
    utterance has the input.
    Media is extracted one utterance at a time so that ``deadline`` is checked between them (a 504
    once it has passed); an utterance whose media fails to decode gets the reason in ``errors``.
    """
    from bemerc.extract.base import UtteranceMedia, has_input
    from bemerc.extract.media import MediaError

    n = len(texts)
    items = [
        UtteranceMedia(uid=f"request/{i}", text=texts[i],
                       audio_path=str(uploads[("audio", i)]) if ("audio", i) in uploads else None,
                       video_path=str(uploads[("video", i)]) if ("video", i) in uploads else None)
        for i in range(n)
    ]
    wanted = [i for i, item in enumerate(items) if has_input(fs.modality, item)]
    extra_names = [f.name for f in extractor.fields() if f.name != "vector"]
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
    done = []
    for i, result in zip(wanted, results):
        if isinstance(result, MediaError):
            errors[i][fs.modality] = result.reason
        else:
            done.append((i, result))
    extras = {name: [_plain(result.get(name)) for _, result in done] for name in extra_names}
    return pack_rows(fs, n, [i for i, _ in done], [result["vector"] for _, result in done], extras)


def _plain(value):
    """An extractor's extra value as JSON gives it back (arrays become lists)."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _utterance_frame(request: PredictRequest, texts: list[str | None], dataset: str | None) -> pl.DataFrame:
    """The request as one dialogue in the utterances schema (no labels)."""
    rows = [
        {"uid": f"request/{i}", "dataset": dataset or "request", "split": "predict", "dialogue_id": "request",
         "turn": i, "speaker": u.speaker, "text": texts[i]}
        for i, u in enumerate(request.utterances)
    ]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=S.UTTERANCES))  # type: ignore[return-value]
