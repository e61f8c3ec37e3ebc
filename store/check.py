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
from pathlib import Path

from bemerc.store.db import Store

# what to do about a damaged table, by table (features_* tables: "features")
REPAIR = {
    "utterances": "ingest the corpus into a new store",
    "features": "drop the feature set's table and run `bemerc extract` again",
    "predictions": "train the runs again (or drop the table: runs then have no stored predictions)",
    "runs": "train the runs again",
}


# LanceDB's words for a file it cannot read (cut short, overwritten, gone), as opposed to a disk or network fault
DAMAGE = re.compile(r"[Cc]orrupt|not a lance file|Invalid (?:data|file)|Invalid range \S+ for object of size|unexpected end of file|"
                    r"failed to fill whole buffer|Unexpected EOF|out of range|invalid footer|magic|file size is too small|"
                    r"Not found: \S+\.lance|failed to decode")


@dataclass(frozen=True)
class Damage:
    table: str
    path: str  # the table's folder (or URI)
    cause: str  # one line
    # the newest version that reads whole, when the newest one cannot be opened (its manifest damaged)
    previous_version: int | None = None
    previous_rows: int | None = None

    def line(self, store: str | None = None) -> str:
        kind = "features" if self.table.startswith("features_") else self.table
        repair = REPAIR.get(kind, "restore it from a backup")
        if self.previous_version is not None:
            where = f" --store {store}" if store else ""
            repair = (f"`bemerc store check --restore{where}` makes version {self.previous_version} "
                      f"({self.previous_rows:,} rows) the newest; what was written after it is lost: run the command "
                      f"that wrote it again; else {repair}")
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


def _read_whole(table) -> str | None:
    """None when every row of the opened LanceDB ``table`` reads; else the cause in one line."""
    rows = table.count_rows()
    read = 0
    for batch in table.search().limit(None).to_batches():
        read += batch.num_rows
    return None if read == rows else f"{read:,} of its {rows:,} rows read"


def _manifests(store: Store, name: str) -> list[Path]:
    """The version manifests of table ``name`` of a local store, oldest first (file names are
    ``N.manifest``, or ``2**64 - 1 - N`` in Lance's newer naming); empty on object storage."""
    if "://" in str(store.path):
        return []
    folder = Path(store.path) / f"{name}.lance" / "_versions"

    def version(path: Path) -> int:
        n = int(path.name.removesuffix(".manifest"))
        return n if n < 2**63 else 2**64 - 1 - n

    return sorted((f for f in folder.glob("*.manifest") if f.name.removesuffix(".manifest").isdigit()), key=version)


def _previous_readable(store: Store, name: str, tries: int = 3) -> tuple[int, int, int] | None:
    """(version, rows, k) of the newest version that opens and reads whole once the newest ``k``
    manifests are left out (LanceDB opens a table, at any version, through its newest manifest, so
    older versions are read through a folder of links to the table's files without those): None
    when none does, or on object storage."""
    import tempfile

    import lancedb

    manifests = _manifests(store, name)
    table_dir = Path(store.path).resolve() / f"{name}.lance"
    for k in range(1, min(tries, len(manifests) - 1) + 1):
        with tempfile.TemporaryDirectory(prefix="bemerc-check-") as tmp:
            view = Path(tmp) / f"{name}.lance"
            view.mkdir()
            for entry in table_dir.iterdir():
                if entry.name != "_versions":
                    (view / entry.name).symlink_to(entry)
            (view / "_versions").mkdir()
            for manifest in manifests[:-k]:
                (view / "_versions" / manifest.name).symlink_to(manifest.resolve())
            try:
                table = lancedb.connect(tmp).open_table(name)
                if _read_whole(table) is None:
                    return int(table.version), int(table.count_rows()), k
            except Exception:  # noqa: BLE001 - as in check_table: try the one before
                continue
    return None


def check_table(store: Store, name: str) -> Damage | None:
    """None when every row of table ``name`` reads; else the :class:`Damage`. When the newest
    version cannot even be opened (its manifest cut short or gone), the damage names the newest
    older version that reads whole, which :func:`restore_previous` can make the newest again."""
    path = f"{store.path}/{name}.lance"
    try:
        table = store.db.open_table(name)
    except Exception as exc:  # LanceDB raises RuntimeError, OSError or ValueError for unreadable files
        previous = _previous_readable(store, name)
        return Damage(name, path, f"its newest version cannot be opened: {lance_cause(exc)}",
                      *(previous[:2] if previous else (None, None)))
    try:
        cause = _read_whole(table)
    except Exception as exc:  # as above
        return Damage(name, path, lance_cause(exc))
    return Damage(name, path, cause) if cause else None


def restore_previous(store: Store, damage: Damage) -> list[Path]:
    """Make ``damage.previous_version`` the newest version of its table again: the manifests of the
    damaged newer versions move to ``TABLE.lance/_damaged_versions/`` (kept, never read) and Lance's
    latest-version hint goes, under the write lock. Local stores only; returns the moved files."""
    found = _previous_readable(store, damage.table)
    if damage.previous_version is None or found is None or found[0] != damage.previous_version:
        raise ValueError(f"{damage.path}: no earlier version of table {damage.table!r} reads whole")
    moved = []
    with store.lock:
        table_dir = Path(store.path) / f"{damage.table}.lance"
        aside = table_dir / "_damaged_versions"
        aside.mkdir(exist_ok=True)
        for manifest in _manifests(store, damage.table)[-found[2]:]:
            manifest.rename(aside / manifest.name)
            moved.append(aside / manifest.name)
        (table_dir / "_versions" / "latest_version_hint.json").unlink(missing_ok=True)
    return moved


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


# -- what belongs to no recorded run --------------------------------------------------------------
# A run writer records its run last: its files go into their folder (through a ``.NAME.partial-*``
# staging folder), then its predictions and its ``runs`` row in one hold of the write lock. Killed in
# between (kill -9, a power cut), it leaves prediction rows or a run folder that no ``runs`` row
# names. Readers never see them (they start from ``runs``); :func:`find_orphans` names them and
# :func:`remove_orphans` takes them away.


@dataclass(frozen=True)
class Orphans:
    predictions: dict[str, int]  # run id -> rows of ``predictions`` whose run has no ``runs`` row
    folders: list[Path]  # entries of STORE/runs/ that are no recorded run's folder nor inside one
    resumable: list[Path]  # of those, tune runs stopped with a checkpoint (`bemerc tune --resume` continues them)

    def __bool__(self) -> bool:
        return bool(self.predictions or self.folders)

    def lines(self) -> list[str]:
        out = [f"predictions of run {run_id!r} ({rows:,} rows): no `runs` row names the run" for run_id, rows in self.predictions.items()]
        for folder in self.folders:
            if folder in self.resumable:
                out.append(f"{folder}: a tune run stopped with a checkpoint and not recorded (kept: `bemerc tune --resume "
                           f"--run-dir {folder}` continues it)")
            elif folder.name.startswith(".") and ".partial-" in folder.name:
                out.append(f"{folder}: the half-written files of a run whose writer stopped")
            else:
                out.append(f"{folder}: a run folder that no `runs` row names")
        return out


def find_orphans(store: Store) -> Orphans:
    """Prediction rows and run folders (in the store's own ``runs/`` folder; a ``--run-dir``
    elsewhere cannot be found) that belong to no recorded run. Tables that cannot be read are
    :func:`check_store`'s business: they count as empty here."""
    def column(table: str, name: str) -> list:
        if not store.has_table(table):
            return []
        try:
            return store.read(table, [name])[name].to_list()
        except Exception:  # noqa: BLE001 - a damaged table: check_store names it
            return []

    recorded = set(column("runs", "run_id"))
    predictions: dict[str, int] = {}
    for run_id in column("predictions", "run_id"):
        if run_id not in recorded:
            predictions[run_id] = predictions.get(run_id, 0) + 1
    folders: list[Path] = []
    resumable: list[Path] = []
    root = Path(store.path) / "runs"
    if "://" not in str(store.path) and root.is_dir():
        run_dirs = [Path(d).resolve() for d in column("runs", "run_dir") if d]
        for entry in sorted(root.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            real = entry.resolve()
            if any(real == d or d.is_relative_to(real) or real.is_relative_to(d) for d in run_dirs):
                continue
            folders.append(entry)
            if (entry / "checkpoint.pt").is_file():
                resumable.append(entry)
    return Orphans(dict(sorted(predictions.items())), folders, resumable)


def _age_s(folder: Path) -> float:
    """Seconds since anything in ``folder`` last changed."""
    import os
    import time

    newest = folder.stat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except OSError:
                continue
    return time.time() - newest


def remove_orphans(store: Store, min_age_s: float | None = None) -> tuple[dict[str, int], list[Path], list[Path]]:
    """Remove, under the write lock, the prediction rows and run folders of :func:`find_orphans`:
    ``(predictions removed by run id, folders removed, folders kept)``.

    Under the lock no run is half-recorded (its predictions and ``runs`` row are written in one hold
    of it), so the rows found then are final. A folder may belong to a writer that is still waiting
    for the lock to record its run: only folders unchanged for ``min_age_s`` (default: the lock
    timeout plus a minute, after which such a writer has given up and taken its files back) go, and
    a stopped tune run's folder with its checkpoint never does.
    """
    import shutil

    from bemerc.store.lock import lock_timeout_s
    from bemerc.store.schema import sql_in

    min_age_s = lock_timeout_s(None) + 60 if min_age_s is None else min_age_s
    with store.lock:
        orphans = find_orphans(store)
        if orphans.predictions:
            store.delete("predictions", f"run_id IN ({sql_in(orphans.predictions)})")
        removed, kept = [], []
        for folder in orphans.folders:
            if folder in orphans.resumable or _age_s(folder) < min_age_s:
                kept.append(folder)
                continue
            shutil.rmtree(folder)
            removed.append(folder)
    return orphans.predictions, removed, kept
