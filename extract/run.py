"""Run an extractor over the store's utterances: skip what exists, batch, record failures, show progress.

A run writes its rows in commits of at most ``flush_rows`` rows and at least every ``flush_seconds``
(30 s by default), each keyed by uid, so a run killed midway (even by ``kill -9``) loses at most half
a minute of work and the next run does only the rest, with no duplicates. SIGTERM is handled like
Ctrl-C: what was computed is flushed, then :class:`Terminated` is raised (the CLI exits 143).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import polars as pl
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bemerc.extract.base import Extractor, UtteranceMedia, config_hash
from bemerc.extract.media import MediaError
from bemerc.store import FeatureSet, Store
from bemerc.store.schema import feature_schema

# Utterances per extract() call: text batches sort by length inside the call, so bigger is faster;
# media extractors decode per item, so small batches keep progress and flushes frequent.
DEFAULT_BATCH = {"text": 256, "audio": 8, "behavior": 8, "visual": 8}


class Terminated(KeyboardInterrupt):
    """The run got SIGTERM; raised after what was computed has been flushed (exit status 143)."""


@contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises :class:`Terminated` (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the final flush short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class RunSummary:
    """What one extractor run did."""

    feature_set: str
    done: int = 0
    already: int = 0  # rows stored by an earlier run with the same extractor and config
    failed: int = 0  # new failures recorded in this run
    skipped_failed: int = 0  # failed in an earlier run and not retried
    not_applicable: int = 0  # utterances without the input this modality needs
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{self.done} extracted", f"{self.already} already stored", f"{self.failed} failed"]
        if self.skipped_failed:
            parts.append(f"{self.skipped_failed} failed before (use --retry-failures)")
        if self.not_applicable:
            parts.append(f"{self.not_applicable} without input")
        return f"{self.feature_set}: " + ", ".join(parts) + f" in {self.seconds:.1f} s"


def _needs(modality: str, row: dict) -> bool:
    if modality == "text":
        return bool(row.get("text"))
    if modality == "audio":
        return bool(row.get("audio_path") or row.get("video_path"))
    return bool(row.get("video_path"))


def transcripts(store: Store) -> dict[str, str]:
    """uid -> transcript from the newest audio feature set that has a ``transcript`` column."""
    for fs in reversed(store.feature_sets("audio")):
        if "transcript" in store.table(fs.table_name).schema.names:
            table = store.read_features(fs, ["uid", "transcript"])  # not the vectors
            return {u: t for u, t in zip(table["uid"].to_pylist(), table["transcript"].to_pylist()) if t}
    return {}


Engine = Callable[[Extractor, list[UtteranceMedia], int], Iterator[list[tuple[UtteranceMedia, "dict | MediaError"]]]]
"""Computes results: ``engine(extractor, items, batch_size)`` yields lists of ``(item, row or MediaError)``
as they are done, every item once, in any order."""


def local_engine(
    extractor: Extractor, items: list[UtteranceMedia], batch_size: int
) -> Iterator[list[tuple[UtteranceMedia, dict | MediaError]]]:
    """Results in this process, ``batch_size`` items per ``extractor.extract`` call, in order."""
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        yield list(zip(batch, extractor.extract(batch)))


def register(store: Store, extractor: Extractor) -> FeatureSet:
    """The extractor's feature set in ``store`` (created on first use). A feature set already
    recorded is found by its config alone: the extractor's output fields (which may need its model
    library) are asked for only to create the table."""
    digest = config_hash(extractor)
    for fs in store.feature_sets(extractor.modality):
        if fs.extractor == extractor.name and fs.config_hash == digest and store.has_table(fs.table_name):
            return fs
    return store.register_feature_set(
        modality=extractor.modality,
        extractor=extractor.name,
        config_hash=digest,
        config=extractor.config(),
        fields=extractor.fields(),
        random_weights=extractor.random_weights,
    )


def run_extractor(
    store: Store,
    extractor: Extractor,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    flush_rows: int = 256,
    flush_seconds: float = 30.0,
    retry_failures: bool = False,
    console: Console | None = None,
    on_batch: Callable[[int], None] | None = None,
    engine: Engine | None = None,
) -> RunSummary:
    """Extract features for every utterance that lacks them and write them to ``store``.

    ``limit`` takes the first N utterances in dialogue order (whole store order, before skipping).
    Rows are written every ``flush_rows`` rows or ``flush_seconds`` seconds, whichever comes first.
    Text uses the utterance's text, or the transcript stored by the audio extractor when it has none.
    ``engine`` computes the results (default :func:`local_engine`; see
    :class:`bemerc.extract.ray_engine.RayEngine`); this function alone writes them.

    >>> run_extractor(Store("store"), build_extractor("text"))   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    batch_size = batch_size or DEFAULT_BATCH.get(extractor.modality, 8)
    fs = register(store, extractor)
    summary = RunSummary(feature_set=fs.id)
    utterances = store.utterances()
    if limit is not None:
        utterances = utterances.head(limit)
    rows = utterances.to_dicts()
    if extractor.modality == "text":
        spoken = transcripts(store)
        for r in rows:
            if not r.get("text") and r["uid"] in spoken:
                r["text"] = spoken[r["uid"]]
    stored = store.stored_uids(fs)
    failed_before = set()
    if not retry_failures:
        failures = store.read("failures", ["uid", "feature_set"])
        failed_before = set(failures.filter(pl.col("feature_set") == fs.id)["uid"].to_list())
    todo = []
    for r in rows:
        if r["uid"] in stored:
            summary.already += 1
        elif not _needs(extractor.modality, r):
            summary.not_applicable += 1
        elif r["uid"] in failed_before:
            summary.skipped_failed += 1
        else:
            todo.append(r)
    schema = feature_schema(extractor.fields()) if todo else None  # no work: the model library stays unloaded
    pending: list[dict] = []
    pending_failures: list[tuple[str, str]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        last_flush = time.monotonic()
        if pending:
            store.write_features(fs, pa.Table.from_pylist(pending, schema=schema))
            pending.clear()
        if pending_failures:
            store.record_failures(fs, pending_failures)
            pending_failures.clear()

    columns = [TextColumn(f"{fs.modality:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not todo) as progress, sigterm_as_interrupt():
        task = progress.add_task(fs.id, total=len(todo))
        try:
            items = [
                UtteranceMedia(
                    uid=r["uid"], text=r.get("text"), video_path=r.get("video_path"), audio_path=r.get("audio_path"),
                    start_s=r.get("start_s"), end_s=r.get("end_s"),
                )
                for r in todo
            ]
            for batch in (engine or local_engine)(extractor, items, batch_size):
                for item, result in batch:
                    if isinstance(result, MediaError):
                        pending_failures.append((item.uid, result.reason))
                        summary.failed += 1
                        key = result.reason.split("(")[0].strip()
                        summary.reasons[key] = summary.reasons.get(key, 0) + 1
                    else:
                        pending.append({"uid": item.uid, **result})
                        summary.done += 1
                if len(pending) + len(pending_failures) >= flush_rows or time.monotonic() - last_flush >= flush_seconds:
                    flush()
                progress.advance(task, len(batch))
                if on_batch:
                    on_batch(len(batch))
        finally:
            flush()  # on Ctrl-C and SIGTERM too: what was computed is kept
    summary.seconds = time.perf_counter() - t0
    return summary
