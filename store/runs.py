"""Trained runs as the store records them: the ``runs`` table read back, and where a run's files go.

Training (``bemerc.train``) writes runs; the API, reports and fusion read them here, so nothing
that only reads runs goes through ``train``.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Iterable

from bemerc.store.db import Store, StoreError

GROUP_KIND = "group"  # the kind of a seed group's run (see seed_groups)


def list_runs(store: Store) -> list[dict]:
    """Runs in the store, oldest first, with ``config``/``metrics``/``table_versions`` decoded.

    ``created_at`` has whole seconds, so runs recorded in the same second keep the order they were
    written in (the table's row order; a stable sort): the last one written is the newest, and
    ``KIND:latest`` names it every time.

    >>> [r["run_id"] for r in list_runs(Store("store"))]   # doctest: +SKIP
    ['baseline-20261122-031500-4f2a', 'tune-20261122-041200-9c1e']
    """
    runs = store.read("runs").sort("created_at", maintain_order=True).to_dicts()
    for r in runs:
        r["config"] = json.loads(r.pop("config_json") or "{}")
        r["metrics"] = json.loads(r.pop("metrics_json") or "{}")
        r["table_versions"] = json.loads(r.pop("table_versions_json") or "{}")
    return runs


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


def seed_groups(runs: list[dict]) -> dict[str, dict]:
    """The seed groups among ``runs`` (as :func:`list_runs` gives them), by group run id:
    ``{"member_kind", "seeds", "members": {seed: run_id}, "failed": {seed: reason}}``. A group is a
    run of kind ``group`` (``bemerc baseline --seeds``, ``bemerc tune --seeds``); its members are
    ordinary runs, tied to it only by its config, so stores written before groups read unchanged.

    >>> seed_groups(list_runs(Store("store")))   # doctest: +SKIP
    {'baseline-group-20261202-052813-3d09': {'member_kind': 'baseline', 'seeds': [0, 1, 2], 'members': {...}, 'failed': {}}}
    """
    return {
        r["run_id"]: {"member_kind": r["config"].get("member_kind"), "seeds": r["config"].get("seeds", []),
                      "members": r["config"].get("members", {}), "failed": r["config"].get("failed", {})}
        for r in runs if r["kind"] == GROUP_KIND
    }
