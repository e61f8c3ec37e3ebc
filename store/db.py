"""Open the store, write under the one-writer lock, read tables as polars or Arrow.

Every write is a single LanceDB commit (one new table version), so a crash or Ctrl-C leaves each
table either before or after that write, never half-way. Keys make writes idempotent: rows are
upserted by their key (``uid`` for utterances and features), so a re-run never duplicates.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import lancedb
import polars as pl
import pyarrow as pa

from bemerc.store import inputs as I
from bemerc.store import schema as S
from bemerc.store.lock import CLAIM_PREFIX, ObjectStoreLock, WriteLock
from bemerc.store.objects import is_uri

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A problem with the store's contents (a missing table, an unknown feature set, ...)."""


class StaleFeaturesError(StoreError):
    """Stored feature rows were computed from inputs that have changed since (see :mod:`bemerc.store.inputs`)."""


class DamagedTableError(StoreError):
    """A table LanceDB cannot open (its newest version manifest cut short or gone): every command
    answers this one line, which points at ``bemerc store check`` (it says how to recover)."""

    def __init__(self, store: str | Path, table: str, cause: str):
        self.table, self.cause = table, cause
        super().__init__(f"{store}: the store is damaged: table {table!r} cannot be opened ({cause}); "
                         f"`bemerc store check --store {store}` names every damaged table and how to recover it")


@dataclass(frozen=True)
class FeatureSet:
    """One set of features: a modality, an extractor and the hash of its configuration; ``id`` is
    ``"{modality}/{extractor}@{config_hash}"``, e.g. ``"text/minilm-l6@3f2a9c1b"`` (set from them)."""

    modality: str
    extractor: str
    config_hash: str
    table_name: str
    dim: int
    random_weights: bool
    config: dict
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.modality}/{self.extractor}@{self.config_hash}")


@dataclass(frozen=True)
class Staleness:
    """A feature set's rows against their utterances' current inputs (see :mod:`bemerc.store.inputs`):
    ``stale`` uids were computed from other inputs; ``unverified`` rows record no digest."""

    rows: int
    stale: list[str]
    unverified: int


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def check_store_path(path: Path, create: bool) -> None:
    """Make sure ``path`` is a store folder: created when ``create``, else it must exist.

    >>> try:
    ...     check_store_path(Path("/no/such/store"), create=False)
    ... except StoreError as exc:  # printed, not shown as a traceback: its module path depends on the import
    ...     print(exc)
    /no/such/store: no store here (create one with `bemerc ingest ...`)
    """
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store (--store names the folder holding the store's tables)")
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: no store here (create one with `bemerc ingest ...`)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the store folder ({e.strerror or e})") from None


def dialogue_order(df: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by dataset, split, dialogue and turn (the columns of those present); dialogue ids
    that are numbers sort as numbers and before the others, which sort as text.

    >>> ids = pl.DataFrame({"dialogue_id": ["b", "10", "2", "a"], "turn": [0, 0, 1, 0]})
    >>> dialogue_order(ids)["dialogue_id"].to_list()
    ['2', '10', 'a', 'b']
    """
    if df.height == 0:
        return df
    keys = [c for c in ("dataset", "split") if c in df.columns] + ["_d", "dialogue_id"]
    keys += ["turn"] if "turn" in df.columns else []
    numeric = pl.col("dialogue_id").cast(pl.Int64, strict=False).alias("_d")
    return df.with_columns(numeric).sort(keys, nulls_last=True).drop("_d")


def _table_name(modality: str, extractor: str, config_hash: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", extractor)
    return f"features_{modality}_{safe}_{config_hash}"


class Store:
    """A bemerc feature store: a folder (or an object-storage prefix, ``s3://bucket/store``) holding
    LanceDB tables.

    Tables: ``utterances``, ``feature_sets`` (one row per feature table), ``features_*`` (one table
    per feature set), ``failures``, ``runs`` and ``predictions``. Reads never block; writes take the
    store's write lock (see :mod:`bemerc.store.lock`): a lock file in a local folder, a lease object
    with conditional PUTs on object storage.

    >>> store = Store("store")                  # doctest: +SKIP
    >>> store.read("utterances", where="split = 'dev'").height   # doctest: +SKIP
    1109
    """

    def __init__(self, path: str | Path, lock_timeout_s: float | None = None, *, create: bool = True):
        """Open the store at ``path``; ``create=False`` (read-only commands) never makes a folder and
        raises :class:`StoreError` when there is no store there. A path naming a file is a
        :class:`StoreError` either way."""
        self.path: str | Path = str(path).rstrip("/") if is_uri(path) else Path(path)
        if is_uri(path):
            self.db = lancedb.connect(self.path)  # endpoint and credentials from the environment
            self.lock: WriteLock | ObjectStoreLock = ObjectStoreLock(self.path, lock_timeout_s)
            if not create and not self.table_names():
                raise StoreError(f"{self.path}: no store here (create one with `bemerc ingest ...`)")
            return
        check_store_path(self.path, create)
        self.db = lancedb.connect(str(self.path))
        self.lock = WriteLock(self.path, lock_timeout_s)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def extract_claim(self, fs: "FeatureSet") -> WriteLock | ObjectStoreLock:
        """The claim one extraction holds on ``fs`` while it computes rows (``with store.extract_claim(fs):``):
        a second extraction of the same feature set waits (as long as it takes: Ctrl-C stops it) and then
        finds the first one's rows stored, so two processes never compute the same rows. A lock file (an
        OS lock, released when its holder dies), or a lease object on object storage."""
        name, work = f"{CLAIM_PREFIX}{fs.table_name}.lock", f"extracting {fs.id}"
        if is_uri(self.path):
            return ObjectStoreLock(str(self.path), float("inf"), name=name, work=work)
        return WriteLock(Path(self.path), float("inf"), name=name, work=work)

    # -- tables -------------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        """Names of the tables present, sorted."""
        result = self.db.list_tables()
        names = getattr(result, "tables", result)
        return sorted(names)

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def table(self, name: str) -> Any:
        """The LanceDB table ``name`` (raises :class:`StoreError` when missing)."""
        if not self.has_table(name):
            raise StoreError(f"{self.path}: no table {name!r} (tables: {', '.join(self.table_names()) or 'none'})")
        return self._open(name)

    def _open(self, name: str, version: int | None = None) -> Any:
        """Open a table that exists; one LanceDB cannot open (a version manifest cut short or gone) is
        a :class:`DamagedTableError`, never a raw Rust error or, worse, an older version read as if
        it were the newest."""
        try:
            return self.db.open_table(name, **({"version": version} if version is not None else {}))
        except (OSError, RuntimeError, ValueError) as exc:
            from bemerc.store.check import DAMAGE, lance_cause

            if not DAMAGE.search(str(exc)):
                raise  # the disk's or the network's fault, not the table's (bemerc.cli.faults says which)
            raise DamagedTableError(self.path, name, lance_cause(exc)) from exc

    def _ensure(self, name: str, schema: pa.Schema) -> Any:
        if self.has_table(name):
            return self._open(name)
        return self.db.create_table(name, schema=schema)

    def version(self, name: str) -> int:
        return int(self.table(name).version)

    def count(self, name: str, where: str | None = None) -> int:
        if not self.has_table(name):
            return 0
        return int(self.table(name).count_rows(where))

    def read_arrow(self, name: str, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """A whole table (or the rows matching the SQL ``where``) as Arrow; empty when missing."""
        if not self.has_table(name):
            schema = S.BASE_TABLES.get(name)
            if schema is None:
                raise StoreError(f"{self.path}: no table {name!r}")
            table = schema.empty_table()
            return table.select(columns) if columns else table
        tbl = self._open(name)
        if where is None:
            data = tbl.to_arrow()
            return data.select(columns) if columns else data
        query = tbl.search().where(where)
        if columns:
            query = query.select(columns)
        return query.limit(None).to_arrow()

    def read(self, name: str, columns: list[str] | None = None, where: str | None = None) -> pl.DataFrame:
        """A table as a polars DataFrame.

        >>> store.read("utterances", ["uid", "label"], where="split = 'dev'")  # doctest: +SKIP
        """
        return pl.from_arrow(self.read_arrow(name, columns, where))  # type: ignore[return-value]

    def utterances(self, split: str | None = None, dataset: str | None = None) -> pl.DataFrame:
        """Utterances in dialogue order (:func:`dialogue_order`), so "the first N utterances" means
        the first dialogues."""
        clauses = [f"{column} = {S.sql_quote(value)}" for column, value in (("split", split), ("dataset", dataset)) if value]
        return dialogue_order(self.read("utterances", where=" AND ".join(clauses) or None))

    # -- writing ------------------------------------------------------------------------------
    def upsert(self, name: str, rows: pa.Table, schema: pa.Schema | None = None) -> int:
        """Insert or replace ``rows`` by the table's key in one commit; returns the rows written.

        Takes the write lock for the duration of the write.
        """
        if rows.num_rows == 0:
            return 0
        schema = schema or S.BASE_TABLES[name]
        keys = S.KEYS.get(name, ["uid"])
        rows = rows.select(schema.names).cast(schema)
        with self.lock:
            tbl = self._ensure(name, schema)
            (
                tbl.merge_insert(keys if len(keys) > 1 else keys[0])
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(rows)
            )
        return rows.num_rows

    def delete(self, name: str, where: str) -> None:
        """Delete the rows matching ``where`` (one commit) under the write lock."""
        if not self.has_table(name):
            return
        with self.lock:
            self._open(name).delete(where)

    def record_run(self, predictions: pa.Table, run: dict, feature_sets: list[str]) -> None:
        """Record a run under one hold of the write lock: its ``predictions`` rows, then its ``runs``
        row (``run``, stamped ``table_versions_json`` with the versions of the utterances table and
        of ``feature_sets``' tables it read), so a run listed in ``runs`` always has its predictions."""
        with self.lock:
            tables = ["utterances", *[self.feature_set(f).table_name for f in feature_sets]]
            versions = {name: self.version(name) for name in tables}
            self.upsert("predictions", predictions)
            self.upsert("runs", pa.Table.from_pylist([{**run, "table_versions_json": json.dumps(versions)}], schema=S.RUNS))

    # -- feature sets -------------------------------------------------------------------------
    def register_feature_set(
        self,
        modality: str,
        extractor: str,
        config_hash: str,
        config: dict,
        fields: list[pa.Field],
        random_weights: bool = False,
        inputs: Iterable[str] | None = None,
    ) -> FeatureSet:
        """Create (once) the feature table of an extractor configuration and record it.

        A changed model or setting gives a new ``config_hash`` and so a new table beside the old one:
        stored features are never silently overwritten by a different configuration. ``inputs``
        (what the extractor reads, see :mod:`bemerc.store.inputs`) gives the table an
        ``inputs_sha256`` column; see :meth:`track_inputs`.
        """
        feature_schema = S.feature_schema(fields + ([I.digest_field(inputs)] if inputs is not None else []))
        fs = FeatureSet(
            modality=modality,
            extractor=extractor,
            config_hash=config_hash,
            table_name=_table_name(modality, extractor, config_hash),
            dim=S.vector_dim(feature_schema),
            random_weights=random_weights,
            config=config,
        )
        with self.lock:
            self._ensure(fs.table_name, feature_schema)
            if fs.id not in {f.id for f in self.feature_sets()}:
                row = {
                    "feature_set": fs.id,
                    "modality": modality,
                    "extractor": extractor,
                    "config_hash": config_hash,
                    "config_json": json.dumps(config, sort_keys=True),
                    "table_name": fs.table_name,
                    "dim": fs.dim,
                    "random_weights": random_weights,
                    "created_at": now_utc(),
                }
                self.upsert("feature_sets", pa.Table.from_pylist([row], schema=S.FEATURE_SETS))
        if inputs is not None:
            self.track_inputs(fs, inputs)
        return fs

    def track_inputs(self, fs: FeatureSet, inputs: Iterable[str]) -> bool:
        """Make ``fs``'s table record digests of ``inputs``: a table written before digests were recorded
        (or recording other inputs) gets an empty ``inputs_sha256`` column, so each of its rows counts
        as unverified until extracted again. True when the table changed."""
        inputs = I.check_inputs(inputs)
        table = self.table(fs.table_name)
        recorded = I.recorded_inputs(table.schema)
        if recorded == inputs:
            return False
        with self.lock:
            if I.DIGEST_COLUMN in table.schema.names:
                table.drop_columns([I.DIGEST_COLUMN])
            table.add_columns(I.digest_field(inputs))
        return True

    def feature_sets(self, modality: str | None = None) -> list[FeatureSet]:
        """Feature sets recorded in the store, oldest first."""
        df = self.read("feature_sets").sort("created_at")
        sets = [
            FeatureSet(
                modality=r["modality"],
                extractor=r["extractor"],
                config_hash=r["config_hash"],
                table_name=r["table_name"],
                dim=int(r["dim"]),
                random_weights=bool(r["random_weights"]),
                config=json.loads(r["config_json"]),
            )
            for r in df.iter_rows(named=True)
        ]
        return [f for f in sets if modality is None or f.modality == modality]

    def feature_set(self, ref: str) -> FeatureSet:
        """Look a feature set up by id (``text/minilm-l6@3f2a9c1b``), by ``modality/extractor``
        (the newest configuration) or by modality alone (the newest feature set of it with trained
        weights: rows of random weights feed a model only when named by id or ``modality/extractor``)."""
        sets = self.feature_sets()
        for candidates in (
            [f for f in sets if f.id == ref],
            [f for f in sets if f"{f.modality}/{f.extractor}" == ref],
            [f for f in sets if f.modality == ref and not f.random_weights],
        ):
            if candidates:
                return candidates[-1]
        random = [f.id for f in sets if f.modality == ref]
        if random:
            raise StoreError(f"{self.path}: {ref} has only features of random weights ({', '.join(random)}); "
                             "name one by id or modality/extractor to use it anyway")
        known = ", ".join(f.id for f in sets) or "none"
        raise StoreError(f"{self.path}: no feature set {ref!r} (present: {known})")

    def write_features(self, fs: FeatureSet, rows: pa.Table) -> int:
        """Upsert feature rows (keyed by uid) of ``fs`` and clear their old failure rows."""
        tbl_schema = self.table(fs.table_name).schema
        if I.DIGEST_COLUMN in tbl_schema.names and I.DIGEST_COLUMN not in rows.column_names:
            rows = rows.append_column(I.DIGEST_COLUMN, pa.nulls(rows.num_rows, pa.string()))  # unverified rows
        written = self.upsert(fs.table_name, rows, tbl_schema)
        if written:
            self.delete("failures", f"feature_set = {S.sql_quote(fs.id)} AND uid IN ({S.sql_in(rows['uid'].to_pylist())})")
        return written

    def stored_uids(self, fs: FeatureSet) -> set[str]:
        """uids that already have a row in ``fs``'s table."""
        return set(self.stored_digests(fs))

    def stored_digests(self, fs: FeatureSet) -> dict[str, str | None]:
        """uid -> the input digest of its row in ``fs``'s table (None: not recorded)."""
        if not self.has_table(fs.table_name):
            return {}
        if I.DIGEST_COLUMN not in self.table(fs.table_name).schema.names:
            return dict.fromkeys(self.read_arrow(fs.table_name, ["uid"])["uid"].to_pylist())
        table = self.read_arrow(fs.table_name, ["uid", I.DIGEST_COLUMN])
        return dict(zip(table["uid"].to_pylist(), table[I.DIGEST_COLUMN].to_pylist()))

    def transcripts(self) -> dict[str, str]:
        """uid -> transcript from the newest audio feature set that has a ``transcript`` column (what
        the text extractor embeds for an utterance without text)."""
        for fs in reversed(self.feature_sets("audio")):
            if self.has_table(fs.table_name) and "transcript" in self.table(fs.table_name).schema.names:
                table = self.read_arrow(fs.table_name, ["uid", "transcript"])  # not the vectors
                return {u: t for u, t in zip(table["uid"].to_pylist(), table["transcript"].to_pylist()) if t}
        return {}

    def input_digests(self, inputs: Iterable[str], utterances: pl.DataFrame | list[dict]) -> dict[str, str]:
        """uid -> the current digest of ``inputs`` (:func:`bemerc.store.inputs.input_digest`) for each
        utterance row; transcripts are read only when an input needs them."""
        inputs = tuple(inputs)
        rows = utterances.to_dicts() if isinstance(utterances, pl.DataFrame) else utterances
        spoken = self.transcripts() if "spoken_text" in inputs and any(not r.get("text") for r in rows) else {}
        return {r["uid"]: I.input_digest(inputs, r, spoken) for r in rows}

    def staleness(self, fs: FeatureSet, utterances: pl.DataFrame | None = None) -> "Staleness":
        """Which of ``fs``'s rows (for ``utterances``, default all) still match their inputs."""
        utterances = self.read("utterances") if utterances is None else utterances
        stored = self.stored_digests(fs)
        inputs = I.recorded_inputs(self.table(fs.table_name).schema) if self.has_table(fs.table_name) else None
        uids = [u for u in utterances["uid"].to_list() if u in stored]
        if inputs is None:
            return Staleness(rows=len(uids), stale=[], unverified=len(uids))
        current = self.input_digests(inputs, utterances.filter(pl.col("uid").is_in(uids)))
        unverified = sum(1 for u in uids if stored[u] is None)
        stale = [u for u in uids if stored[u] is not None and stored[u] != current[u]]
        return Staleness(rows=len(uids), stale=stale, unverified=unverified)

    def read_features(self, fs: FeatureSet | str, columns: list[str] | None = None,
                      current_for: pl.DataFrame | None = None) -> pa.Table:
        """All rows of a feature set as Arrow (``uid``, ``vector``, ...; every column by default).

        ``current_for``: the utterances a model is about to read the rows of; any of their rows that
        is stale (computed from a text, media file or span that has changed since) refuses the read
        with a :class:`StaleFeaturesError`, one line naming the feature set and the fix. Rows that
        record no input digest (a store written before digests were) are read with a warning."""
        fs = self.feature_set(fs) if isinstance(fs, str) else fs
        if current_for is not None:
            staleness = self.staleness(fs, current_for)
            if staleness.stale:
                shown = ", ".join(staleness.stale[:3]) + (" ..." if len(staleness.stale) > 3 else "")
                raise StaleFeaturesError(
                    f"{self.path}: {len(staleness.stale)} row(s) of feature set {fs.id} were computed from inputs that have "
                    f"changed since ({shown}): run `bemerc extract --modality {fs.modality}` to recompute them")
            if staleness.unverified:
                log.warning(f"warning: {staleness.unverified} row(s) of feature set {fs.id} record no input digest (written before "
                            f"bemerc recorded them, or not by `bemerc extract`): `bemerc extract --modality {fs.modality}` checks them")
        return self.read_arrow(fs.table_name, columns)

    def record_failures(self, fs: FeatureSet, failures: Iterable[tuple[str, str]]) -> int:
        """Record ``(uid, reason)`` failures of a feature set (one row per uid, latest reason)."""
        rows = [
            {"uid": uid, "feature_set": fs.id, "stage": fs.modality, "reason": reason, "created_at": now_utc()}
            for uid, reason in failures
        ]
        return self.upsert("failures", pa.Table.from_pylist(rows, schema=S.FAILURES)) if rows else 0

    # -- summary ------------------------------------------------------------------------------
    def info(self) -> dict:
        """Tables with rows and versions, feature sets and failure counts, as plain data.

        ``{"tables": {name: {"rows", "version"}}, "features": {"modality/extractor": {"rows", "dim",
        "random_weights", "feature_set", "stale", "unverified"}}, "failures": {stage: n}}``: ``stale``
        rows were computed from inputs that have changed since, ``unverified`` rows record no input
        digest (see :mod:`bemerc.store.inputs`). The newest configuration of an
        extractor is keyed ``modality/extractor``; older ones ``modality/extractor@hash``.
        """
        tables = {}
        for name in self.table_names():
            tbl = self._open(name)
            tables[name] = {"rows": int(tbl.count_rows()), "version": int(tbl.version)}
        features: dict[str, dict] = {}
        sets = self.feature_sets()
        utterances = self.read("utterances") if sets else None
        for fs in reversed(sets):  # newest first takes the short key
            key = f"{fs.modality}/{fs.extractor}"
            if key in features:
                key = fs.id
            staleness = self.staleness(fs, utterances) if fs.table_name in tables else Staleness(0, [], 0)
            features[key] = {
                "feature_set": fs.id,
                "rows": tables.get(fs.table_name, {}).get("rows", 0),
                "dim": fs.dim,
                "random_weights": fs.random_weights,
                "stale": len(staleness.stale),
                "unverified": staleness.unverified,
            }
        failures: dict[str, int] = {}
        if "failures" in tables:
            for row in self.read("failures", ["stage"]).group_by("stage").len().iter_rows():
                failures[row[0]] = int(row[1])
        return {"path": str(self.path), "tables": tables, "features": features, "failures": failures}

