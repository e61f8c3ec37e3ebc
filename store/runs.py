"""Trained runs as the store records them: the ``runs`` table read back as :class:`Run` records, and
where a run's files go.

Training (``bemerc.train``) writes runs and says what each kind means (:mod:`bemerc.train.runs`:
the kinds, their models, seed groups); the API, reports and fusion read the records here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from bemerc.store.db import Store, StoreError


@dataclass(frozen=True)
class Run:
    """One trained run, as its row in the ``runs`` table records it (JSON columns decoded).

    Fields are read as attributes (``run.kind``); ``run["kind"]`` reads them too, for scripts written
    when runs were dicts. A trainer builds one without ``created_at`` and ``table_versions``, which
    recording it (:func:`bemerc.train.runs.save_run`) stamps.
    """

    run_id: str
    kind: str  # what trained it: one of bemerc.train.runs.KINDS
    dataset: str | None
    classes: list[str]  # the order of its predictions' probabilities
    feature_sets: list[str]  # ids of the feature sets it read
    config: dict
    metrics: dict  # the metrics.json layout: {split: {"weighted_f1", ...}, ...}
    run_dir: str | None  # the folder of its files
    created_at: datetime | None = None  # UTC, whole seconds (None: not recorded yet)
    table_versions: dict = field(default_factory=dict)  # {table: version} it read

    def __getitem__(self, name: str) -> Any:
        if name not in RUN_FIELDS:
            raise KeyError(name)
        return getattr(self, name)


RUN_FIELDS = tuple(f.name for f in fields(Run))


def list_runs(store: Store) -> list[Run]:
    """Runs in the store, oldest first, with ``config``/``metrics``/``table_versions`` decoded.

    ``created_at`` has whole seconds, so runs recorded in the same second keep the order they were
    written in (the table's row order; a stable sort): the last one written is the newest, and
    ``KIND:latest`` names it every time.

    >>> [r.run_id for r in list_runs(Store("store"))]   # doctest: +SKIP
    ['baseline-20261122-031500-4f2a', 'tune-20261122-041200-9c1e']
    """
    return [
        Run(run_id=r["run_id"], kind=r["kind"], created_at=r["created_at"], dataset=r.get("dataset"), classes=r["classes"],
            feature_sets=r["feature_sets"], config=json.loads(r.get("config_json") or "{}"),
            metrics=json.loads(r.get("metrics_json") or "{}"), table_versions=json.loads(r.get("table_versions_json") or "{}"),
            run_dir=r.get("run_dir"))
        for r in store.read("runs").sort("created_at", maintain_order=True).to_dicts()
    ]


def default_run_dir(store: Store, run_id: str) -> Path:
    """Where a run's files go when no folder is given: ``runs/RUN_ID`` inside a local store's folder
    (so the store and its runs are moved or deleted together), ``./runs/RUN_ID`` for a store on
    object storage.

    >>> default_run_dir(Store("out/store"), "baseline-20261122-031500-4f2a")   # doctest: +SKIP
    PosixPath('out/store/runs/baseline-20261122-031500-4f2a')
    """
    if "://" in str(store.path):
        return Path("runs") / run_id
    return Path(store.path) / "runs" / run_id


class RunDirError(StoreError):
    """A run's folder that is taken: a file, or a folder already holding files (a run never writes
    over another run's files)."""


def check_run_dir(run_dir: str | Path, *, allow: Iterable[str] = (), option: str = "--run-dir") -> None:
    """Refuse ``run_dir`` as the folder of a new run (or report) unless it is absent or empty, with
    one line naming it: a file in its place, or a folder already holding files. ``allow``: glob
    patterns of entries it may hold (a seed group's ``seed-N`` folders; an earlier report that
    ``compare`` replaces). Every run writer (baseline, tune, fuse, compare) calls it before any work.

    >>> check_run_dir("/no/such/folder")        # absent: a new run may go there
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: is a file; {option} names a folder for the run's files (a new or empty one)")
    if not path.is_dir():
        return
    allowed = list(allow)
    taken = sorted(e.name for e in path.iterdir() if not any(fnmatch.fnmatchcase(e.name, p) for p in allowed))
    if taken:
        shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise RunDirError(f"{path}: already holds {shown}; nothing was written (a run never writes over another's "
                          f"files): give {option} a new or empty folder")


def write_run_files(run_dir: str | Path, write: Callable[[Path], None], *, replace: Iterable[str] = ()) -> list[str]:
    """Write a run's (or a report's) files whole or not at all; returns the names written.

    ``write(folder)`` fills a temporary folder beside ``run_dir`` (``.NAME.partial-XXXX``), which
    then becomes ``run_dir``: one rename when ``run_dir`` is absent or empty, else its entries move in
    (a seed group's folder holding its seed folders, a tuned run's working folder); entries of
    ``run_dir`` matching the ``replace`` globs (an earlier report) go first. Any error (a full disk)
    removes the temporary folder, so no half-written run folder stays behind, and an ``OSError``
    that names no file is raised again naming ``run_dir``.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.partial-", dir=run_dir.parent))
    try:
        try:
            write(staging)
        except OSError as exc:
            if exc.filename is None and exc.errno:  # a write() that failed: say where
                raise OSError(exc.errno, exc.strerror, str(run_dir)) from exc
            raise
        names = sorted(os.listdir(staging))
        patterns = list(replace)
        if run_dir.is_dir():
            for entry in run_dir.iterdir():
                if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            if not any(run_dir.iterdir()):
                run_dir.rmdir()
        if not run_dir.exists():
            staging.rename(run_dir)
            return names
        taken = [n for n in names if os.path.lexists(run_dir / n)]
        if taken:
            raise RunDirError(f"{run_dir}: already holds {', '.join(taken)}; nothing was written (a run never writes over "
                              "another's files)")
        for name in names:
            (staging / name).rename(run_dir / name)
        staging.rmdir()
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_run_files(run_dir: str | Path, names: Iterable[str]) -> None:
    """Take back what :func:`write_run_files` wrote (the run could not be recorded); ``run_dir``
    goes too when nothing else is left in it."""
    run_dir = Path(run_dir)
    for name in names:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # not empty (a seed group's seed folders, a tuned run's checkpoint) or already gone

