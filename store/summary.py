"""The store's summary (what ``bemerc store info`` prints), cached beside its tables.

Every LanceDB commit adds a version manifest to its table's ``_versions`` folder, so the names of
those files, listed without opening LanceDB, say whether anything changed since the summary was
made. An unchanged store answers from ``.bemerc-info.json`` in a few milliseconds; any write (a new
table, row, deletion or cleanup) changes the listing and the summary is made again. Object-storage
stores are always read through LanceDB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

SUMMARY_FILE = ".bemerc-info.json"


def tables_state(path: str | Path) -> dict[str, list[str]] | None:
    """Table -> sorted names of its version manifests, read from the folder; None when ``path`` is
    not a local folder.

    >>> tables_state("/no/such/store") is None
    True
    """
    if "://" in str(path) or not os.path.isdir(path):
        return None
    state = {}
    for entry in os.scandir(path):
        if entry.name.endswith(".lance") and entry.is_dir():
            try:
                versions = os.listdir(os.path.join(entry.path, "_versions"))
            except FileNotFoundError:
                versions = []
            state[entry.name.removesuffix(".lance")] = sorted(n for n in versions if n.endswith(".manifest"))
    return state


def cached_info(path: str | Path, compute: Callable[[], dict]) -> dict:
    """The summary of the store at ``path``: the cached one while the tables are unchanged, else
    ``compute()`` (e.g. ``Store(path).info``), then cached. The state is read before computing, so
    a write during ``compute`` leaves a stale key and the next call computes again."""
    state = tables_state(path)
    cache = Path(path) / SUMMARY_FILE
    if state is not None:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("state") == state:
                return {"path": str(path), **saved["info"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or an unreadable one: compute
    info = compute()
    if state is not None:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"state": state, "info": {k: v for k, v in info.items() if k != "path"}}))
            os.replace(tmp, cache)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only store still answers, uncached
    return info
