"""What every ingest shares: the error type, checksums, validation and the idempotent write."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa

from bemerc.store import schema as S
from bemerc.store.db import Store


class IngestError(ValueError):
    """Bad input: ``str()`` is one line naming the file, the row and the problem."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None):
        where = f"{path}: row {row}" if row is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


@dataclass
class IngestReport:
    """What an ingest read and wrote."""

    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)  # reason -> count of utterances left out
    missing_media: list[str] = field(default_factory=list)  # uids whose clip is absent
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["split"] for r in self.rows))


def read_utf8(path: Path) -> str:
    """A text file's contents; a byte that is not UTF-8 is an :class:`IngestError` naming its line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise IngestError(path, f"not UTF-8 (byte {e.start}, line {line}): re-save the file as UTF-8") from None
    except OSError as e:
        raise IngestError(path, f"cannot read ({e.strerror or e})") from None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def media_checksum(paths: Iterable[str | None], cache: dict[str, str] | None = None) -> str | None:
    """The media checksum of an utterance: the sha256 of its one media file, or the sha256 of the
    files' sha256s joined when it has a video and an audio file; None without media."""
    cache = {} if cache is None else cache
    digests = []
    for p in paths:
        if p:
            if p not in cache:  # IEMOCAP utterances share their dialogue's video: hash it once
                cache[p] = file_sha256(p)
            digests.append(cache[p])
    if not digests:
        return None
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def check_rows(rows: list[dict], source: str | Path, row_numbers: list[int] | None = None) -> None:
    """Raise :class:`IngestError` for duplicate uids or an unknown split."""
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        n = row_numbers[i] if row_numbers else i + 1
        if r["split"] not in S.SPLITS:
            raise IngestError(source, f"unknown split {r['split']!r} (expected one of {', '.join(S.SPLITS)})", n)
        if r["uid"] in seen:
            raise IngestError(source, f"duplicate uid {r['uid']!r} (first at row {seen[r['uid']]})", n)
        seen[r["uid"]] = n


def add_checksums(rows: list[dict], progress: Callable[[int], None] | None = None) -> None:
    """Fill ``media_sha256`` for rows with media (reads every media file once)."""
    cache: dict[str, str] = {}
    for r in rows:
        r["media_sha256"] = media_checksum([r.get("video_path"), r.get("audio_path")], cache)
        if progress:
            progress(1)


def write_utterances(store: Store, rows: list[dict]) -> tuple[int, int, int]:
    """Write only new or changed utterances in one commit; returns (inserted, updated, unchanged)."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in S.UTTERANCES.names} for r in rows], schema=S.UTTERANCES)
    existing = {}
    if store.has_table("utterances") and rows:
        for r in store.read_arrow("utterances").to_pylist():
            existing[r["uid"]] = r
    fresh = table.to_pylist()
    changed = [r for r in fresh if existing.get(r["uid"]) != r]
    inserted = sum(1 for r in changed if r["uid"] not in existing)
    if changed:
        store.upsert("utterances", pa.Table.from_pylist(changed, schema=S.UTTERANCES))
    return inserted, len(changed) - inserted, len(fresh) - len(changed)
