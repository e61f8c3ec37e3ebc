"""A user's own corpus as a manifest: CSV, JSONL or Parquet, one row per utterance.

Columns: ``dialogue_id, turn`` (required) and ``speaker, text, label, split, video, audio, start, end``
(optional). Relative media paths resolve against the manifest's folder. uid is
``{split}/{dialogue_id}_{turn}``.

The manifest and its media may live on object storage (``s3://bucket/corpus/manifest.csv``, media
``clips/a.mp4`` relative to it or ``s3://...`` in full): ingest checks each object with a HEAD and a
16-byte read and hashes it streamed; the extractors (and a cluster's workers) read it from there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from bemerc.store.ingest.common import (
    MAX_TURN,
    IngestError,
    IngestReport,
    check_media_file,
    check_rows,
    read_source,
    read_utf8,
)
from bemerc.store.objects import is_uri, join_uri
from bemerc.store.schema import LABEL_SETS, MAX_TEXT_CHARS

REQUIRED = ("dialogue_id", "turn")
WHOLE_NUMBER = re.compile(r"\s*\+?[0-9]{1,12}(\.0*)?\s*")
OPTIONAL = ("speaker", "text", "label", "split", "video", "audio", "start", "end", "sentiment")


def read_table_rows(path: str | Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(row number as a person counts it, row)]) of a CSV, JSONL or Parquet file (local or
    an object URI): a manifest, or the predictions of ``bemerc ingest predictions``. CSV cells are
    strings; JSONL and Parquet keep their types."""
    suffix = PurePosixPath(str(path)).suffix.lower()
    if suffix == ".parquet":
        data = read_source(path)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # pyarrow's errors for a broken parquet file
            raise IngestError(path, f"unreadable parquet ({str(e).splitlines()[0]})") from None
        return table.column_names, list(enumerate(table.to_pylist(), start=1))
    text = read_utf8(path)
    if suffix in (".jsonl", ".ndjson"):
        rows, columns = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(path, f"invalid JSON ({e.msg})", n) from None
            if not isinstance(obj, dict):
                raise IngestError(path, "each line must be a JSON object", n)
            columns += [k for k in obj if k not in columns]
            rows.append((n, obj))
        return columns, rows
    if suffix in (".csv", ".tsv"):
        # newline="" as the csv module wants: a line break inside a quoted field stays in the field
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            if "field larger than field limit" in str(e):  # the csv module's own bound, far above ours
                raise IngestError(path, f"a cell holds more than {csv.field_size_limit():,} characters; "
                                        f"{TOO_LONG}", reader.line_num + 1) from None
            raise IngestError(path, f"unreadable CSV ({e})", reader.line_num) from None
        return list(reader.fieldnames or []), rows
    raise IngestError(path, f"unknown file format {suffix!r} (expected .csv, .jsonl or .parquet)")


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _number(value: object, path: Path, n: int, column: str) -> float | None:
    if _blank(value):
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise IngestError(path, f"column {column!r} must be a number of seconds, found {value!r}", n) from None


def _turn(value: object, path: Path, n: int) -> int:
    """A turn as an int: ``3``, ``3.0`` or ``"3"``; anything else, or a turn outside the int32 column,
    is an :class:`IngestError`."""
    turn = None
    if isinstance(value, int) and not isinstance(value, bool):
        turn = value
    elif isinstance(value, float) and value.is_integer():
        turn = int(value)
    elif isinstance(value, str) and WHOLE_NUMBER.fullmatch(value):
        turn = int(value.strip().split(".")[0])
    if turn is None or not 0 <= turn <= MAX_TURN:
        raise IngestError(path, f"turn must be a whole number from 0 to {MAX_TURN}, found {value!r}", n)
    return turn


TOO_LONG = f"an utterance's cells hold at most {MAX_TEXT_CHARS:,} characters (shorten or split the row)"


def _text(value: object, path: Path, n: int, column: str) -> str | None:
    """A text cell stripped (None when blank); lists, objects, bytes, text that cannot be stored as
    UTF-8 (lone surrogates from JSON escapes) and text longer than
    :data:`~bemerc.store.schema.MAX_TEXT_CHARS` are an :class:`IngestError`."""
    if _blank(value):
        return None
    if not isinstance(value, (str, int, float)):
        raise IngestError(path, f"column {column!r} must be text, found {type(value).__name__} {str(value)[:40]!r}", n)
    text = str(value).strip()
    if len(text) > MAX_TEXT_CHARS:
        raise IngestError(path, f"column {column!r} holds {len(text):,} characters; {TOO_LONG}", n)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise IngestError(path, f"column {column!r} holds characters that are not valid Unicode ({text[:40]!r})", n) from None
    return text


def _media_path(manifest: str | Path, cell: str) -> str | Path:
    """A manifest's media cell as a path or URI: URIs and absolute paths as they are, relative paths
    against the manifest's folder (or its prefix on object storage).

    >>> _media_path("s3://b/corpus/manifest.csv", "clips/a.mp4"), _media_path(Path("/data/m.csv"), "a.wav")
    ('s3://b/corpus/clips/a.mp4', PosixPath('/data/a.wav'))
    """
    if is_uri(cell) or Path(cell).is_absolute():
        return cell
    return join_uri(str(manifest), cell) if is_uri(manifest) else Path(manifest).parent / cell


def read_manifest(path: str | Path, labels: str | list[str] = "meld", dataset: str | None = None) -> IngestReport:
    """Read a manifest into utterance rows (nothing is written).

    ``labels`` is a label set name (``meld``, ``iemocap``) or an explicit list; any other label is an
    error. Missing media files are errors too (a manifest names its files on purpose).

    >>> read_manifest("demo_data/manifest.jsonl").counts()   # doctest: +SKIP
    {'train': 24, 'dev': 10, 'test': 9}
    """
    path = str(path) if is_uri(path) else Path(path).resolve()
    if isinstance(path, Path) and not path.exists():
        raise IngestError(path, "file not found")
    label_set = LABEL_SETS[labels] if isinstance(labels, str) and labels in LABEL_SETS else labels
    if isinstance(label_set, str):
        label_set = [x.strip() for x in label_set.split(",") if x.strip()]
    if dataset:
        try:
            dataset.encode("utf-8")
        except UnicodeEncodeError:
            raise IngestError(path, f"the dataset name {dataset!r} holds characters that are not valid Unicode") from None
    columns, raw = read_table_rows(path)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise IngestError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    report = IngestReport(rows=[])
    numbers = []
    for n, row in raw:
        cells = {c: _text(row.get(c), path, n, c) for c in ("dialogue_id", "speaker", "text", "label", "split", "sentiment", "video", "audio")}
        if cells["dialogue_id"] is None:
            raise IngestError(path, "empty dialogue_id", n)
        turn = _turn(row.get("turn"), path, n)
        label = None if cells["label"] is None else cells["label"].lower()
        if label is not None and label not in label_set:
            raise IngestError(path, f"unknown label {row['label']!r} (expected one of {', '.join(label_set)})", n)
        media = {}
        for column in ("video", "audio"):
            if cells[column] is None:
                media[column] = None
                continue
            media[column] = check_media_file(_media_path(path, cells[column]), path, n, column)
        split = "train" if cells["split"] is None else cells["split"].lower()
        dialogue_id = cells["dialogue_id"]
        report.rows.append(
            {
                "uid": f"{split}/{dialogue_id}_{turn}",
                "dataset": dataset or PurePosixPath(str(path)).stem,
                "split": split,
                "dialogue_id": dialogue_id,
                "turn": turn,
                "speaker": cells["speaker"],
                "text": cells["text"],
                "label": label,
                "sentiment": None if cells["sentiment"] is None else cells["sentiment"].lower(),
                "start_s": _number(row.get("start"), path, n, "start"),
                "end_s": _number(row.get("end"), path, n, "end"),
                "video_path": media["video"],
                "audio_path": media["audio"],
                "media_sha256": None,
                "meta_json": None,
            }
        )
        numbers.append(n)
    if not report.rows:
        raise IngestError(path, "the manifest has no rows")
    check_rows(report.rows, path, numbers)
    return report
