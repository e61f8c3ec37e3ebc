"""The media worker of ``/predict``: audio, behaviour and visual extraction in a process of its own."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from bemerc.serve.request import PredictError


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
