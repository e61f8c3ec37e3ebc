"""Run an extractor over the store's utterances: skip what is stored and current, batch, record
failures, show progress.

Every feature row records the digest of the inputs it was computed from (:mod:`bemerc.store.inputs`,
the extractor's ``inputs``): a row whose utterance's inputs changed since (a corrected text, a new file
at the same media path, another span) is stale and computed again, counted apart.

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

from bemerc.extract.base import Extractor, UtteranceMedia, config_hash, extractor_inputs, has_input
from bemerc.extract.media import MediaError
from bemerc.progress import LOG_EVERY_S, LiveBar, progress_line
from bemerc.store import FeatureSet, Store
from bemerc.store.inputs import DIGEST_COLUMN, digest_field, spoken_text
from bemerc.store.schema import feature_schema, sql_in

# Utterances per extract() call: text batches sort by length inside the call, so bigger is faster;
# media extractors decode per item, so small batches keep progress and flushes frequent.
DEFAULT_BATCH = {"text": 256, "audio": 8, "behavior": 8, "visual": 8}
# Off a terminal (a log file, a pipe), a plain progress line this often.


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
    already: int = 0  # rows stored by an earlier run with the same extractor and config, inputs unchanged
    stale: int = 0  # rows stored from other inputs (or with no input digest), extracted again
    unverified: int = 0  # of those, rows that recorded no input digest (written before digests were)
    removed: int = 0  # stale rows whose utterance has lost this modality's input, deleted
    failed: int = 0  # new failures recorded in this run
    skipped_failed: int = 0  # failed in an earlier run and not retried
    not_applicable: int = 0  # utterances without the input this modality needs
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{self.done} extracted"]
        if self.stale:
            parts.append(f"{self.stale} stale, re-extracted" + (f" ({self.unverified} without an input digest)" if self.unverified else ""))
        if self.removed:
            parts.append(f"{self.removed} stale, removed (input gone)")
        parts += [f"{self.already} already stored", f"{self.failed} failed"]
        if self.skipped_failed:
            parts.append(f"{self.skipped_failed} failed before (use --retry-failures)")
        if self.not_applicable:
            parts.append(f"{self.not_applicable} without input")
        return f"{self.feature_set}: " + ", ".join(parts) + f" in {self.seconds:.1f} s"


class RunProgress(LiveBar):
    """Progress of one run: a rich bar on a terminal; otherwise (output to a file or a pipe) a plain
    line every ``every_s`` seconds and at the end: modality, done/total, items/s and the time left.
    Nothing when there is no work."""

    def __init__(self, label: str, total: int, console: Console | None = None, every_s: float = LOG_EVERY_S):
        self.console = console or Console()
        self.label, self.total, self.every_s, self.done = label, total, every_s, 0
        self.start = self.logged = time.monotonic()
        self.bar = None
        if total and self.console.is_terminal:
            columns = [TextColumn(f"{label:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
            self.bar = Progress(*columns, console=self.console, transient=False)
            self.task = self.bar.add_task(label, total=total)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if not self.bar and self.total and self.done and self.done < self.total:
            self.log(time.monotonic())  # stopped early: say how far it got

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar:
            self.bar.advance(self.task, n)
            return
        now = time.monotonic()
        if now - self.logged >= self.every_s or self.done >= self.total:
            self.log(now)

    def log(self, now: float) -> None:
        self.logged = now
        elapsed = now - self.start
        line = progress_line(self.label, self.done, self.total, elapsed, f"{self.done / max(elapsed, 1e-9):.1f} items/s")
        self.console.print(line, highlight=False, soft_wrap=True)
        self.console.file.flush()


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
            store.track_inputs(fs, extractor_inputs(extractor))  # a table from before input digests gets the column
            return fs
    return store.register_feature_set(
        modality=extractor.modality,
        extractor=extractor.name,
        config_hash=digest,
        config=extractor.config(),
        fields=extractor.fields(),
        random_weights=extractor.random_weights,
        inputs=extractor_inputs(extractor),
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
    progress_every_s: float = LOG_EVERY_S,
) -> RunSummary:
    """Extract features for every utterance that lacks them, or whose stored row was computed from
    other inputs (stale), and write them to ``store``.

    ``limit`` takes the first N utterances in dialogue order (whole store order, before skipping).
    Rows are written every ``flush_rows`` rows or ``flush_seconds`` seconds, whichever comes first.
    Text uses the utterance's text, or the transcript stored by the audio extractor when it has none.
    Off a terminal, progress is a plain line every ``progress_every_s`` seconds.
    ``engine`` computes the results (default :func:`local_engine`; see
    :class:`bemerc.extract.ray_engine.RayEngine`); this function alone writes them. It holds the feature
    set's claim (:meth:`Store.extract_claim`) while it works: a second extraction of the same feature set
    waits, then finds these rows stored.

    >>> run_extractor(Store("store"), build_extractor("text"))   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    batch_size = batch_size or DEFAULT_BATCH.get(extractor.modality, 8)
    fs = register(store, extractor)
    # One extraction of a feature set at a time: a second process waits here, then finds the rows stored.
    with store.extract_claim(fs):
        summary = RunSummary(feature_set=fs.id)
        utterances = store.utterances()
        if limit is not None:
            utterances = utterances.head(limit)
        rows = utterances.to_dicts()
        inputs = extractor_inputs(extractor)
        current = store.input_digests(inputs, rows)  # before the text of a text run is filled in below
        if extractor.modality == "text":
            spoken = store.transcripts()
            for r in rows:
                r["text"] = spoken_text(r, spoken)
        stored = store.stored_digests(fs)
        failed_before = set()
        if not retry_failures:
            failures = store.read("failures", ["uid", "feature_set"])
            failed_before = set(failures.filter(pl.col("feature_set") == fs.id)["uid"].to_list())
        todo, stale, gone = [], set(), []
        for r in rows:
            uid = r["uid"]
            if uid in stored and stored[uid] is not None and stored[uid] == current[uid]:
                summary.already += 1
            elif not has_input(extractor.modality, r):
                summary.not_applicable += 1
                if uid in stored:
                    gone.append(uid)
            elif uid in stored:
                stale.add(uid)
                todo.append(r)
            elif uid in failed_before:
                summary.skipped_failed += 1
            else:
                todo.append(r)
        if gone:  # computed from an input the utterance no longer has (its text removed, say)
            store.delete(fs.table_name, f"uid IN ({sql_in(gone)})")
            summary.removed = len(gone)
        # no work: the model library stays unloaded
        schema = feature_schema([*extractor.fields(), digest_field(inputs)]) if todo else None
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
                outdated = [uid for uid, _ in pending_failures if uid in stale]
                if outdated:  # its old row was computed from inputs that are gone: a failure now, not a row
                    store.delete(fs.table_name, f"uid IN ({sql_in(outdated)})")
                store.record_failures(fs, pending_failures)
                pending_failures.clear()

        with RunProgress(fs.modality, len(todo), console, progress_every_s) as progress, sigterm_as_interrupt():
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
                            pending.append({"uid": item.uid, **result, DIGEST_COLUMN: current[item.uid]})
                            if item.uid in stale:
                                summary.stale += 1
                                summary.unverified += stored[item.uid] is None
                            else:
                                summary.done += 1
                    if len(pending) + len(pending_failures) >= flush_rows or time.monotonic() - last_flush >= flush_seconds:
                        flush()
                    progress.advance(len(batch))
                    if on_batch:
                        on_batch(len(batch))
            finally:
                flush()  # on Ctrl-C and SIGTERM too: what was computed is kept
        summary.seconds = time.perf_counter() - t0
        return summary
