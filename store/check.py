"""``bemerc store check``: read every table of a store whole and name what cannot be read.

A store damaged by hand or by a failing disk (a data file deleted or cut short) still lists its
tables and row counts, since those come from the version manifests; only reading the rows finds the
damage. :func:`check_store` reads each table in full (every column, every row: seconds for a store of
a corpus) and returns one :class:`Damage` per unreadable table, with the table's folder and the
cause in one line.

>>> check_store(Store("store"))        # doctest: +SKIP
[Damage(table='predictions', path='store/predictions.lance', cause='Invalid range 0..2211 for object of size 100 bytes')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bemerc.store.db import Store

# what to do about a damaged table, by table (features_* tables: "features")
REPAIR = {
    "utterances": "ingest the corpus into a new store",
    "features": "drop the feature set's table and run `bemerc extract` again",
    "predictions": "train the runs again (or drop the table: runs then have no stored predictions)",
    "runs": "train the runs again",
}


@dataclass(frozen=True)
class Damage:
    table: str
    path: str  # the table's folder (or URI)
    cause: str  # one line

    def line(self) -> str:
        kind = "features" if self.table.startswith("features_") else self.table
        repair = REPAIR.get(kind, "restore it from a backup")
        return f"{self.path}: table {self.table!r} cannot be read: {self.cause} (to repair: {repair})"


def lance_cause(exc: BaseException) -> str:
    """LanceDB's error as one short line: the message without the ``lance error:`` prefix, the Rust
    source location and the backtrace.

    >>> lance_cause(RuntimeError("lance error: Not found: a/b.lance/data/x.lance, /root/.cargo/src/local.rs:273:40"))
    'Not found: a/b.lance/data/x.lance'
    """
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^(?:lance error: )?(?:LanceError\(\w+\): )?", "", text)
    text = re.sub(r"^(?:External error: )?(?:LanceError\(\w+\): )?(?:Generic memory error: )?", "", text)
    text = re.sub(r",\s*/\S+\.rs:\d+:\d+.*$", "", text)
    return text[:300]


def check_table(store: Store, name: str) -> Damage | None:
    """None when every row of table ``name`` reads; else the :class:`Damage`."""
    path = f"{store.path}/{name}.lance"
    try:
        table = store.db.open_table(name)
        rows = table.count_rows()
        read = 0
        for batch in table.search().limit(None).to_batches():
            read += batch.num_rows
        if read != rows:
            return Damage(name, path, f"{read:,} of its {rows:,} rows read")
    except Exception as exc:  # LanceDB raises RuntimeError, OSError or ValueError for unreadable files
        return Damage(name, path, lance_cause(exc))
    return None


def probe_store(store: Store) -> list[Damage]:
    """A quick look for :func:`check_store`'s damage: the first row of every table (milliseconds a
    table). It finds a table whose first data file is gone or cut short, not every damaged file."""
    damaged = []
    for name in store.table_names():
        try:
            store.db.open_table(name).search().limit(1).to_arrow()
        except Exception as exc:  # as in check_table
            damaged.append(Damage(name, f"{store.path}/{name}.lance", lance_cause(exc)))
    return damaged


def check_store(store: Store) -> list[Damage]:
    """Every table read whole; the damaged ones, in table order (empty: the store reads)."""
    return [d for name in store.table_names() if (d := check_table(store, name)) is not None]
