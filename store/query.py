"""Read-side queries of the store: nearest neighbours, one utterance in full, filters and exports.

Every function returns polars DataFrames (or plain data built from them) and imports no model
library, so the CLI and the HTTP service share them.

>>> store = Store("store")                                   # doctest: +SKIP
>>> similar(store, "dev/dia0_utt0", modality="text", k=3)    # doctest: +SKIP
shape: (3, 6)   uid | text | label | speaker | split | distance
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from lancedb.index import IvfPq

from bemerc.store.db import FeatureSet, Store, StoreError, dialogue_order
from bemerc.store.schema import BASE_TABLES, sql_in, sql_quote

# Above this many rows a vector search may use an IVF_PQ index (see :func:`create_vector_index`);
# below it an exact scan is fast and an index would only lose recall.
INDEX_MIN_ROWS = 10_000
EXPORT_FORMATS = ("parquet", "csv")
# file-name suffix -> export format (`query export` takes the format from the suffix when none is given)
EXPORT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# earlier turns `query show` (and /utterances) lists as a turn's context unless told otherwise
SHOW_CONTEXT = 10


class QueryError(ValueError):
    """A query that cannot be answered (unknown uid, table, modality, bad filter); one-line message."""


def whole_filter(sql: str) -> str:
    r"""A user's SQL filter wrapped so that the store must parse all of it.

    LanceDB parses a filter's first complete expression and ignores the rest, so
    ``label = 'joy' ADN speaker = 'Ross'`` would match every joy row. Inside parentheses the parser
    has to reach the closing one, so trailing text becomes a parse error. The parentheses of the
    filter itself must balance (outside quotes and comments), or it could close the wrapper early.

    >>> whole_filter("label = 'joy' -- a comment")
    "(label = 'joy' -- a comment\n)"
    >>> try:
    ...     whole_filter("label = 'joy') OR (1 = 1")
    ... except QueryError as exc:
    ...     print(exc)
    bad filter "label = 'joy') OR (1 = 1": ')' at character 14 closes nothing
    """
    depth, i, n = 0, 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":  # string literal or quoted identifier; a doubled quote is an escaped one
            j = i + 1
            while j < n and not (sql[j] == c and sql[j + 1 : j + 2] != c):
                j += 2 if sql[j] == c else 1
            if j >= n:
                raise QueryError(f"bad filter {sql!r}: the quote at character {i + 1} is never closed")
            i = j
        elif sql.startswith("--", i):
            i = sql.find("\n", i) if "\n" in sql[i:] else n
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise QueryError(f"bad filter {sql!r}: the comment at character {i + 1} is never closed")
            i = end + 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise QueryError(f"bad filter {sql!r}: ')' at character {i + 1} closes nothing")
        i += 1
    if depth:
        raise QueryError(f"bad filter {sql!r}: {depth} '(' never closed")
    return f"({sql}\n)"


def _read(store: Store, table: str, columns: list[str] | None = None, where: str | None = None) -> pl.DataFrame:
    """``store.read`` of a user's filter (parsed whole, see :func:`whole_filter`); errors become a
    :class:`QueryError` naming the filter."""
    wrapped = whole_filter(where) if where is not None else None
    try:
        return store.read(table, columns, where=wrapped)
    except StoreError:
        raise
    except Exception as exc:  # LanceDB reports SQL errors as several exception types
        raise QueryError(f"bad filter {where!r} on table {table!r}: {_filter_problem(exc)}") from None


def _filter_problem(exc: Exception) -> str:
    """LanceDB's error about a filter as one short line, without the statement it was pasted into."""
    message = str(exc).strip().removeprefix("Invalid input, ")
    parser = re.search(r"sql parser error: (.*)\)\s*$", message, re.S)
    if parser:
        found = re.fullmatch(r"Expected: \), found: (.*)", parser.group(1).strip(), re.S)
        if found:
            return f"cannot parse it whole: {found.group(1)!r} follows a complete condition (join conditions with AND / OR)"
        return f"cannot parse it: {parser.group(1).strip()}"
    return message.splitlines()[0] if message else type(exc).__name__


# --- similar -------------------------------------------------------------------------------------


def _feature_set(store: Store, modality: str) -> FeatureSet:
    try:
        return store.feature_set(modality)
    except StoreError:
        present = sorted({f.modality for f in store.feature_sets()})
        raise QueryError(
            f"no {modality!r} features in {store.path} (modalities present: {', '.join(present) or 'none'}; "
            "run `bemerc extract` first)"
        ) from None


def query_vector(store: Store, fs: FeatureSet, uid: str) -> list[float]:
    """The stored ``vector`` of ``uid`` in feature set ``fs``."""
    rows = store.table(fs.table_name).search().where(f"uid = {sql_quote(uid)}").select(["vector"]).limit(1).to_arrow()
    if rows.num_rows == 0:
        if store.count("utterances", f"uid = {sql_quote(uid)}") == 0:
            raise QueryError(f"no utterance with uid {uid!r} in {store.path}")
        raise QueryError(f"utterance {uid!r} has no row in feature set {fs.id} (see `bemerc query show {uid}`)")
    return rows["vector"][0].as_py()


def similar(
    store: Store,
    uid: str,
    modality: str = "text",
    k: int = 10,
    where: str | None = None,
) -> pl.DataFrame:
    """The ``k`` utterances nearest to ``uid`` by cosine distance of the newest ``modality`` features.

    ``where`` is an SQL filter on utterance columns (``"split = 'dev'"``). Feature tables hold only
    uid and features, so the matching uids are found first and passed to the vector search as a
    prefilter: ``uid IN (...)`` or, when most rows match, ``uid NOT IN (...)`` of the others. The
    search uses an ANN index when one exists (:func:`create_vector_index`), else an exact scan.

    Returns uid, text, label, speaker, split, distance; nearest first, ``uid`` itself excluded.

    >>> similar(store, "dev/dia0_utt0", "text", k=5, where="split = 'train'")  # doctest: +SKIP
    """
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    fs = _feature_set(store, modality)
    vector = query_vector(store, fs, uid)
    search = store.table(fs.table_name).search(vector, vector_column_name="vector").distance_type("cosine")
    if where:
        matching = set(_read(store, "utterances", ["uid"], where=where)["uid"].to_list())
        matching.discard(uid)
        if not matching:
            return _similar_frame(store, [], [])
        total = store.count("utterances")
        if len(matching) <= total // 2:
            search = search.where(f"uid IN ({sql_in(sorted(matching))})", prefilter=True)
        else:
            others = set(_read(store, "utterances", ["uid"])["uid"].to_list()) - matching
            search = search.where(f"uid NOT IN ({sql_in(sorted(others | {uid}))})", prefilter=True)
    # one more than asked: the query itself (or an identical vector) usually comes first
    hits = search.select(["uid", "_distance"]).limit(k + 1).to_arrow()
    pairs = [(u, d) for u, d in zip(hits["uid"].to_pylist(), hits["_distance"].to_pylist()) if u != uid][:k]
    return _similar_frame(store, [u for u, _ in pairs], [max(0.0, float(d)) for _, d in pairs])


def _similar_frame(store: Store, uids: list[str], distances: list[float]) -> pl.DataFrame:
    hits = pl.DataFrame({"uid": uids, "distance": distances}, schema={"uid": pl.String, "distance": pl.Float64})
    columns = ["uid", "text", "label", "speaker", "split"]
    if uids:
        info = store.read("utterances", columns, where=f"uid IN ({sql_in(uids)})")
    else:
        info = pl.DataFrame(schema={c: pl.String for c in columns})
    return hits.join(info, on="uid", how="left", maintain_order="left").select([*columns, "distance"])


def create_vector_index(store: Store, modality: str, min_rows: int = INDEX_MIN_ROWS, replace: bool = False) -> bool:
    """Build an IVF_PQ cosine index on the newest ``modality`` feature table when it has at least
    ``min_rows`` rows; returns whether an index was built. Small tables keep exact search.

    Partitions ~ sqrt(rows); sub-vectors = dim / 8 (dim / 4 when 8 does not divide it).
    """
    fs = _feature_set(store, modality)
    rows = store.count(fs.table_name)
    if rows < min_rows:
        return False
    table = store.table(fs.table_name)
    if not replace and any("vector" in idx.columns for idx in table.list_indices()):
        return False
    sub_vectors = fs.dim // 8 if fs.dim % 8 == 0 else max(1, fs.dim // 4) if fs.dim % 4 == 0 else 1
    config = IvfPq(distance_type="cosine", num_partitions=max(1, int(rows**0.5)), num_sub_vectors=sub_vectors)
    with store.lock:
        table.create_index("vector", replace=True, config=config)
    return True


# --- show ----------------------------------------------------------------------------------------


@dataclass
class UtteranceView:
    """Everything the store knows about one utterance."""

    utterance: dict  # the utterances row, meta_json decoded into "meta"
    context: pl.DataFrame  # up to ``context`` earlier turns of the dialogue: uid, turn, speaker, text, label
    transcript: str | None  # from the newest audio feature set with a transcript column
    description: str | None  # behaviour description from the newest behavior feature set
    feature_sets: list[str]  # ids of the feature sets that have a row for the utterance
    failures: pl.DataFrame  # feature_set, stage, reason, created_at
    predictions: pl.DataFrame  # run_id, kind, label, correct, classes, probabilities
    earlier_turns: int = 0  # earlier turns in the dialogue, listed in ``context`` or not

    def to_dict(self) -> dict:
        """Plain JSON-able data (timestamps as ISO strings)."""
        return _jsonable(
            {
                "utterance": self.utterance,
                "context": self.context.to_dicts(),
                "earlier_turns": self.earlier_turns,
                "transcript": self.transcript,
                "description": self.description,
                "feature_sets": self.feature_sets,
                "failures": self.failures.to_dicts(),
                "predictions": prediction_records(self.predictions),
            }
        )


def utterance(store: Store, uid: str) -> dict:
    """The utterances row of ``uid`` as a dict (raises :class:`QueryError` when unknown)."""
    rows = store.read("utterances", where=f"uid = {sql_quote(uid)}").to_dicts()
    if not rows:
        raise QueryError(f"no utterance with uid {uid!r} in {store.path}")
    row = rows[0]
    row["meta"] = json.loads(row.pop("meta_json") or "{}")
    return row


def _feature_column(store: Store, modality: str, column: str, uids: list[str]) -> dict[str, Any]:
    """uid -> ``column`` of the newest ``modality`` feature set that has that column."""
    for fs in reversed(store.feature_sets(modality)):
        if store.has_table(fs.table_name) and column in store.table(fs.table_name).schema.names:
            table = store.read_arrow(fs.table_name, ["uid", column], where=f"uid IN ({sql_in(uids)})")
            return dict(zip(table["uid"].to_pylist(), table[column].to_pylist()))
    return {}


def show(store: Store, uid: str, context: int | None = SHOW_CONTEXT) -> UtteranceView:
    """The utterance ``uid`` with its dialogue context (the ``context`` turns before it; None: all),
    transcript, behaviour description, feature sets, failures and every run's prediction.

    >>> view = show(store, "dev/dia0_utt3")      # doctest: +SKIP
    >>> view.context["turn"].to_list()             # doctest: +SKIP
    [0, 1, 2]
    """
    row = utterance(store, uid)
    same_dialogue = (
        f"dataset = {sql_quote(row['dataset'])} AND split = {sql_quote(row['split'])} "
        f"AND dialogue_id = {sql_quote(row['dialogue_id'])} AND turn < {int(row['turn'])}"
    )
    if context is not None and context < 0:
        raise QueryError(f"context must be 0 or more turns, got {context}")
    earlier = store.count("utterances", same_dialogue)
    window = same_dialogue if context is None else f"{same_dialogue} AND turn >= {int(row['turn']) - context}"
    shown = store.read("utterances", ["uid", "turn", "speaker", "text", "label"], where=window).sort("turn")
    if context is not None and shown.height > context:  # turn numbers with gaps: the last `context` of them
        shown = shown.tail(context)
    present = [
        fs.id for fs in store.feature_sets()
        if store.has_table(fs.table_name) and store.count(fs.table_name, f"uid = {sql_quote(uid)}") > 0
    ]
    failures = store.read("failures", ["feature_set", "stage", "reason", "created_at"], where=f"uid = {sql_quote(uid)}")
    return UtteranceView(
        utterance=row,
        context=shown,
        transcript=_feature_column(store, "audio", "transcript", [uid]).get(uid),
        description=_feature_column(store, "behavior", "description", [uid]).get(uid),
        feature_sets=present,
        failures=failures.sort("feature_set"),
        predictions=predictions(store, [uid]).drop("uid"),
        earlier_turns=earlier,
    )


def predictions(store: Store, uids: list[str]) -> pl.DataFrame:
    """Every run's prediction for ``uids``, runs oldest first: uid, run_id, kind, label, correct
    (null without a gold label), classes and probabilities (in ``classes`` order)."""
    schema = {"uid": pl.String, "run_id": pl.String, "kind": pl.String, "label": pl.String, "correct": pl.Boolean,
              "classes": pl.List(pl.String), "probabilities": pl.List(pl.Float32)}
    if not uids:
        return pl.DataFrame(schema=schema)
    preds = store.read("predictions", ["run_id", "uid", "label", "gold", "probabilities"], where=f"uid IN ({sql_in(uids)})")
    runs = store.read("runs", ["run_id", "kind", "classes", "created_at"])
    joined = preds.join(runs, on="run_id", how="inner").sort(["created_at", "uid"])
    correct = pl.when(pl.col("gold").is_null()).then(None).otherwise(pl.col("gold") == pl.col("label"))
    return joined.with_columns(correct.alias("correct")).select(list(schema)).cast(schema)  # type: ignore[arg-type]


def prediction_records(rows: pl.DataFrame | list[dict] | None) -> list[dict]:
    """Prediction rows (a :func:`predictions` frame or its dicts) with ``probabilities`` as
    ``{class: p}`` rounded to 4 digits."""
    records = []
    for r in (rows.to_dicts() if isinstance(rows, pl.DataFrame) else rows or []):
        r = dict(r)
        classes = r.pop("classes")
        r["probabilities"] = {c: round(float(p), 4) for c, p in zip(classes, r["probabilities"])}
        records.append(r)
    return records


# --- dialogues -----------------------------------------------------------------------------------


def dialogues(store: Store, split: str | None = None) -> pl.DataFrame:
    """One row per dialogue, in dialogue order: dataset, split, dialogue_id, utterances (count),
    speakers and first (the text of its first turn)."""
    where = f"split = {sql_quote(split)}" if split else None
    utt = store.read("utterances", ["dataset", "split", "dialogue_id", "turn", "speaker", "text"], where=where)
    grouped = utt.sort("turn").group_by(["dataset", "split", "dialogue_id"], maintain_order=True).agg(
        pl.len().alias("utterances"),
        pl.col("speaker").unique(maintain_order=True).alias("speakers"),
        pl.col("text").first().alias("first"),
    )
    return dialogue_order(grouped)


def dialogue(store: Store, split: str, dialogue_id: str, dataset: str | None = None) -> pl.DataFrame:
    """The utterances of one dialogue in turn order with their behaviour description, transcript
    and ``predictions``: a list of every run's prediction (as :func:`predictions`, without uid)."""
    where = f"split = {sql_quote(split)} AND dialogue_id = {sql_quote(dialogue_id)}"
    if dataset:
        where += f" AND dataset = {sql_quote(dataset)}"
    utt = store.read("utterances", ["uid", "dataset", "turn", "speaker", "text", "label", "sentiment"], where=where).sort("turn")
    if utt.height == 0:
        raise QueryError(f"no dialogue {dialogue_id!r} in split {split!r} of {store.path}")
    datasets = sorted(set(utt["dataset"].to_list()))
    if len(datasets) > 1:
        raise QueryError(f"dialogue {dialogue_id!r} of split {split!r} exists in datasets {', '.join(datasets)}: name one")
    uids = utt["uid"].to_list()
    descriptions = _feature_column(store, "behavior", "description", uids)
    spoken = _feature_column(store, "audio", "transcript", uids)
    preds = predictions(store, uids)
    per_uid = preds.group_by("uid", maintain_order=True).agg(pl.struct(pl.exclude("uid")).alias("predictions"))
    return utt.with_columns(
        pl.Series("description", [descriptions.get(u) for u in uids], dtype=pl.String),
        pl.Series("transcript", [spoken.get(u) for u in uids], dtype=pl.String),
    ).join(per_uid, on="uid", how="left", maintain_order="left")


# --- where / export ------------------------------------------------------------------------------


def where(store: Store, sql: str, limit: int | None = None, columns: list[str] | None = None) -> pl.DataFrame:
    """Utterances matching the SQL filter ``sql``, in dialogue order (at most ``limit``).

    >>> where(store, "label = 'fear' AND split = 'dev'", limit=5)   # doctest: +SKIP
    """
    if not sql.strip():
        raise QueryError("empty filter: give an SQL condition such as \"split = 'dev'\"")
    df = dialogue_order(_read(store, "utterances", where=sql))
    df = df.head(limit) if limit is not None else df
    return df.select(columns) if columns else df


def resolve_table(store: Store, table: str) -> str:
    """A table name, or a feature-set reference (``text``, ``text/minilm-l6``, an id) -> its table."""
    if store.has_table(table) or table in BASE_TABLES:
        return table
    try:
        return store.feature_set(table).table_name
    except StoreError:
        raise QueryError(
            f"no table or feature set {table!r} in {store.path} (tables: {', '.join(store.table_names()) or 'none'})"
        ) from None


def export_format(out: str | Path, fmt: str | None = None) -> str:
    """The format to write ``out`` in: ``fmt`` when given (it must not contradict a known suffix),
    else the one its suffix names (``.csv``; ``.parquet``/``.pq``); a :class:`QueryError` otherwise.

    >>> export_format("utt.csv"), export_format("utt.pq"), export_format("utt.data", "csv")
    ('csv', 'parquet', 'csv')
    >>> try:
    ...     export_format("utt.csv", "parquet")
    ... except QueryError as exc:
    ...     print(exc)
    utt.csv: the name says csv but the format asked is parquet (rename the file or change --format)
    """
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise QueryError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    named = EXPORT_SUFFIXES.get(Path(out).suffix.lower())
    if fmt is None:
        if named is None:
            raise QueryError(f"{out}: cannot tell the format from the name (end it in {', '.join(EXPORT_SUFFIXES)}, or give --format)")
        return named
    if named is not None and named != fmt:
        raise QueryError(f"{out}: the name says {named} but the format asked is {fmt} (rename the file or change --format)")
    return fmt


def export(store: Store, table: str, out: str | Path, fmt: str | None = None) -> int:
    """Write a whole table (or a feature set's table) to ``out`` as parquet or csv (None: from the
    suffix of ``out``, see :func:`export_format`); returns rows.

    CSV has no list type, so list columns (vectors, probabilities) are written as JSON arrays.

    The file is written whole or not at all: into a temporary file beside ``out``, then renamed onto
    it, so a failed write (a full disk, a folder that takes no files such as ``/proc``) leaves
    ``out`` as it was and no partial file; the :class:`QueryError` names the real cause. An ``out``
    that is a symbolic link is refused (its target is never written through the link), as is a folder.

    >>> export(store, "utterances", "utterances.csv")   # doctest: +SKIP
    11098
    """
    fmt = export_format(out, fmt)
    name = resolve_table(store, table)
    out = Path(out)
    if out.is_symlink():
        raise QueryError(f"{out}: is a symbolic link (to {os.readlink(out)}); nothing was written: the export never "
                         "writes through a link onto its target nor replaces the link (remove it, or name another file)")
    if out.is_dir():
        raise QueryError(f"{out}: is a folder; name a file to export to")
    data = store.read_arrow(name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise QueryError(f"{out}: cannot create a file in {out.parent} {_os_cause(exc)}; nothing was written") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(data, handle)
            else:
                df = pl.from_arrow(data)
                lists = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array))]
                df = df.with_columns(
                    pl.Series(c, [None if v is None else json.dumps(list(v)) for v in df[c].to_list()], dtype=pl.String)
                    for c in lists
                )
                df.write_csv(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(partial, 0o666 & ~_umask())
        os.replace(partial, out)
    except BaseException as exc:
        Path(partial).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "it was left as it was" if out.exists() else "no file was left"
            raise QueryError(f"{out}: cannot write {_os_cause(exc)}; {kept}") from exc
        raise
    return data.num_rows


def _os_cause(exc: OSError) -> str:
    """The cause of a failed write in words: ``(no space left on the device)``; polars and pyarrow
    raise OSErrors whose text holds ``os error 28`` / ``[Errno 28]`` and no errno."""
    code = exc.errno
    if code is None:
        match = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(exc))
        code = int(match.group(1) or match.group(2)) if match else None
    if code == errno.ENOSPC:
        return "(no space left on the device: free space, then export again)"
    if code is not None:
        return f"({os.strerror(code).lower()})"
    return f"({exc})"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_records(rows: pl.DataFrame | list[dict]) -> list[dict]:
    """Rows as JSON-able dicts (timestamps as ISO strings)."""
    return _jsonable(rows.to_dicts() if isinstance(rows, pl.DataFrame) else rows)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, pa.Scalar):
        return _jsonable(value.as_py())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
