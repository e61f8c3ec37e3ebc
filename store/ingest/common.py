"""What every ingest shares: the error type, checksums, validation and the idempotent write."""

from __future__ import annotations

import hashlib
import math
import stat
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from bemerc.store import objects
from bemerc.store import schema as S
from bemerc.store.db import Store

MAX_TURN = 2**31 - 1  # the utterances table's int32 turn column
# Every character str.splitlines() breaks at, escaped: an error names a value from the file and stays one line.
ONE_LINE = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class IngestError(ValueError):
    """Bad input: ``str()`` is one line naming the file, the row and the problem."""

    def __init__(self, path: str | Path, problem: str, row: int | None = None):
        where = f"{path}: row {row}" if row is not None else f"{path}"
        super().__init__(f"{where}: {problem}".translate(ONE_LINE))


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


def read_source(path: str | Path) -> bytes:
    """The bytes of an input file, local or an object URI; an :class:`IngestError` naming it when it
    cannot be read."""
    if objects.is_uri(path):
        try:
            return objects.read_bytes(str(path))
        except objects.ObjectError as e:
            raise IngestError(path, "file not found" if e.missing else e.problem) from None
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IngestError(path, "file not found") from None
    except OSError as e:
        raise IngestError(path, f"cannot read ({e.strerror or e})") from None


def decode_utf8(path: str | Path, data: bytes) -> str:
    """``data`` (the contents of ``path``) as text; a byte that is not UTF-8 is an :class:`IngestError`
    naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise IngestError(path, f"not UTF-8 (byte {e.start}, line {line}): re-save the file as UTF-8") from None


def read_utf8(path: str | Path) -> str:
    """A text file's contents (local or an object URI); bytes that are not UTF-8 are an
    :class:`IngestError` naming the line."""
    return decode_utf8(path, read_source(path))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's (or an object's) bytes, read in 1 MiB chunks."""
    if objects.is_uri(path):
        return objects.sha256(str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def media_checksum(digests: list[str]) -> str | None:
    """The media checksum of an utterance from its files' sha256s (video first): the one file's
    sha256, the sha256 of both joined for a video and an audio file, None without media."""
    if not digests:
        return None
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def sniff_container(head: bytes) -> str | None:
    r"""The media container a file's first 16 bytes announce (``wav``, ``mp4``, ``mkv``, ...), or None.

    Covers mp4/mov/m4a, mkv/webm, avi, flv, wav, flac, mp3 and ogg, and the still images jpeg and png
    (:data:`STILL_CONTAINERS`, read as one-frame videos): enough to refuse a text file, a device or a
    playlist before anything tries to decode it.

    >>> sniff_container(b"RIFF\x24\x00\x00\x00WAVEfmt "), sniff_container(b"root:x:0:0:root:/root")
    ('wav', None)
    """
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return "wav" if head[8:12] == b"WAVE" else "avi"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


NOT_MEDIA = ("is not audio, video or a still image (expected mp4/mov, mkv/webm, avi, flv, wav, flac, mp3, ogg, m4a, "
             "jpeg or png by content)")
STILL_CONTAINERS = ("jpeg", "png")  # still images: a video column may name one (a one-frame video), never audio


def check_container(head: bytes, what: str, source: str | Path, row: int | None, column: str) -> str:
    """The container ``head`` starts (:func:`sniff_container`); IngestError unless it is one ``column`` may
    hold (no still image as audio)."""
    kind = sniff_container(head)
    if kind is None:
        raise IngestError(source, f"{column} {what} {NOT_MEDIA}", row)
    if kind in STILL_CONTAINERS and column == "audio":
        raise IngestError(source, f"{column} {what} is a still image ({kind}), not audio", row)
    return kind


class StillImageError(ValueError):
    """Why a still image cannot be used (Pillow's words); ``size`` (width, height) when it is over the
    pixel limit it was checked against."""

    def __init__(self, reason: str, size: tuple[int, int] | None = None):
        super().__init__(reason)
        self.size = size


def decode_still(path: Path, max_pixels: int | None = None) -> None:
    """Decode the JPEG or PNG at ``path`` whole (a cut-short or damaged image fails); with
    ``max_pixels``, one over it is refused from its header, before it is decoded (a decompression
    bomb). :class:`StillImageError` says why. Ingest and ``/predict`` both check stills with it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise StillImageError(f"{image.width}x{image.height} pixels", (image.width, image.height))
            image.load()
    except StillImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise StillImageError(str(e)) from None


def check_still_readable(path: Path, source: str | Path, row: int | None, column: str) -> None:
    """IngestError unless the JPEG or PNG at ``path`` decodes (a cut-short or damaged image is refused
    at ingest, not at extraction)."""
    try:
        decode_still(path)
    except StillImageError as e:
        raise IngestError(source, f"{column} file {path} is not a readable image ({e})", row) from None


def check_media_object(uri: str, source: str | Path, row: int | None, column: str) -> str:
    """``uri`` when it names a non-empty object whose first bytes are a known media container (one
    HEAD and one 16-byte range read); otherwise an :class:`IngestError` naming ``source``, ``row`` and
    ``column``."""
    try:
        size = objects.head(uri).size
        head = objects.read_bytes(uri, 0, min(16, size)) if size else b""
    except objects.ObjectError as e:
        raise IngestError(source, f"{column} object not found: {uri}" if e.missing else f"{column} {e}", row) from None
    if size == 0:
        raise IngestError(source, f"{column} object {uri} is empty", row)
    check_container(head, f"object {uri}", source, row, column)
    return uri


def check_media_file(path: str | Path, source: str | Path, row: int | None, column: str) -> str:
    """``path`` resolved, when it is a regular, non-empty file whose first bytes are a known media
    container; otherwise an :class:`IngestError` naming ``source``, ``row`` and ``column``. An object
    URI (``s3://...``) is checked with :func:`check_media_object` and kept as it is.

    Devices (``/dev/zero``), folders, FIFOs and text files are refused before anything reads them
    whole, so ingest never hangs on or hashes what is not media.
    """
    if objects.is_uri(path):
        return check_media_object(str(path), source, row, column)
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise IngestError(source, f"{column} file not found: {path}", row) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise IngestError(source, f"{column} file {path}: cannot read ({getattr(e, 'strerror', None) or e})", row) from None
    if stat.S_ISDIR(info.st_mode):
        raise IngestError(source, f"{column} {path} is a folder, not a media file", row)
    if not stat.S_ISREG(info.st_mode):
        raise IngestError(source, f"{column} {path} is not a regular file (a device, pipe or socket)", row)
    if info.st_size == 0:
        raise IngestError(source, f"{column} file {path} is empty", row)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise IngestError(source, f"{column} file {path}: cannot read ({e.strerror or e})", row) from None
    if check_container(head, f"file {path}", source, row, column) in STILL_CONTAINERS:
        check_still_readable(path, source, row, column)
    return str(path.resolve())


def check_rows(rows: list[dict], source: str | Path, row_numbers: list[int] | None = None) -> None:
    """Raise :class:`IngestError` for duplicate uids, an unknown split, a turn that does not fit its
    column or a span that is not finite, is negative or ends before it starts."""
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        n = row_numbers[i] if row_numbers else i + 1
        if r["split"] not in S.SPLITS:
            raise IngestError(source, f"unknown split {r['split']!r} (expected one of {', '.join(S.SPLITS)})", n)
        if not 0 <= r["turn"] <= MAX_TURN:
            raise IngestError(source, f"turn {r['turn']} is out of range (0 to {MAX_TURN})", n)
        start, end = r.get("start_s"), r.get("end_s")
        for column, value in (("start", start), ("end", end)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise IngestError(source, f"{column} must be a finite number of seconds >= 0, found {value!r}", n)
        if start is not None and end is not None and end <= start:
            raise IngestError(source, f"the span must end after it starts (start {start} s, end {end} s)", n)
        if r["uid"] in seen:
            raise IngestError(source, f"duplicate uid {r['uid']!r} (first at row {seen[r['uid']]})", n)
        seen[r["uid"]] = n


def add_checksums(rows: list[dict], progress: Callable[[int], None] | None = None, threads: int = 8) -> None:
    """Fill ``media_sha256`` for rows with media, reading every distinct media file once (IEMOCAP
    utterances share their dialogue's recording). Objects on object storage are hashed ``threads`` at
    a time, streamed; local files one at a time."""
    paths = list(dict.fromkeys(p for r in rows for p in (r.get("video_path"), r.get("audio_path")) if p))
    workers = threads if any(objects.is_uri(p) for p in paths) else 1

    def digest(path: str) -> str:
        try:
            return file_sha256(path)
        except objects.ObjectError as e:
            raise IngestError(path, e.problem) from None
        except OSError as e:
            raise IngestError(path, f"cannot read ({e.strerror or e})") from None

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="checksum") as pool:
        futures = {p: pool.submit(digest, p) for p in paths}
        try:
            for r in rows:
                media = [p for p in (r.get("video_path"), r.get("audio_path")) if p]
                r["media_sha256"] = media_checksum([futures[p].result() for p in media])
                if progress:
                    progress(1)
        finally:
            for future in futures.values():
                future.cancel()


def check_no_clash(source: str | Path, fresh: list[dict], existing: dict[str, dict]) -> None:
    """Refuse (an :class:`IngestError` naming ``source``, both datasets and some uids) rows whose uid
    belongs to another dataset in the store: a store holds several corpora side by side, and one
    corpus never replaces another's utterances. The same dataset's uids are updated in place."""
    clashes: dict[tuple[str, str], list[str]] = {}
    for r in fresh:
        old = existing.get(r["uid"])
        if old is not None and old["dataset"] != r["dataset"]:
            clashes.setdefault((r["dataset"], old["dataset"]), []).append(r["uid"])
    for (new, old), uids in clashes.items():
        shown = ", ".join(uids[:3]) + (" ..." if len(uids) > 3 else "")
        raise IngestError(source, f"dataset {new!r} would replace {len(uids)} utterance(s) of dataset {old!r} ({shown}), "
                                      "nothing written: a manifest's uids are {split}/{dialogue_id}_{turn}, so corpora side by "
                                      f"side need distinct dialogue ids (or another --store); to update {old!r} itself, "
                                      f"ingest with --dataset {old}")


def write_utterances(store: Store, rows: list[dict], source: str | Path | None = None) -> tuple[int, int, int]:
    """Write only new or changed utterances in one commit; returns (inserted, updated, unchanged).

    ``source`` is the manifest or corpus folder the rows were read from, as the ingest commands pass
    it: rows whose uid another dataset holds then stop the write with one line naming it
    (:func:`check_no_clash`). Without it (a caller renaming a dataset on purpose) they are replaced."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in S.UTTERANCES.names} for r in rows], schema=S.UTTERANCES)
    existing = {}
    if store.has_table("utterances") and rows:
        for r in store.read_arrow("utterances").to_pylist():
            existing[r["uid"]] = r
    fresh = table.to_pylist()
    if source is not None:
        check_no_clash(source, fresh, existing)
    changed = [r for r in fresh if existing.get(r["uid"]) != r]
    inserted = sum(1 for r in changed if r["uid"] not in existing)
    if changed:
        store.upsert("utterances", pa.Table.from_pylist(changed, schema=S.UTTERANCES))
    return inserted, len(changed) - inserted, len(fresh) - len(changed)
