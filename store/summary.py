"""Answers about the store cached beside its tables while it is unchanged: what ``bemerc store info``
prints, and which feature sets an ``extract`` run found complete.

Every LanceDB commit adds a version manifest to its table's ``_versions`` folder, so the names (and
sizes) of those files, listed without opening LanceDB, say whether anything changed since an answer was
computed. An unchanged store answers from ``.bemerc-info.json`` in a few milliseconds; any write (a
new table, row, deletion or cleanup) changes the listing and every cached answer is computed again.
Object-storage stores are always read through LanceDB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

SUMMARY_FILE = ".bemerc-info.json"


def tables_state(path: str | Path) -> dict[str, list[str]] | None:
    """Table -> its version manifests (``NAME:SIZE``, sorted), read from the folder; None when
    ``path`` is not a local folder.

    >>> tables_state("/no/such/store") is None
    True
    """
    if "://" in str(path) or not os.path.isdir(path):
        return None
    state = {}
    for entry in os.scandir(path):
        if entry.name.endswith(".lance") and entry.is_dir():
            try:  # name and size: a manifest cut short (a damaged table) is a change too
                versions = [f"{v.name}:{v.stat().st_size}" for v in os.scandir(os.path.join(entry.path, "_versions"))
                            if v.name.endswith(".manifest")]
            except FileNotFoundError:
                versions = []
            state[entry.name.removesuffix(".lance")] = sorted(versions)
    return state


def _load(path: str | Path) -> dict:
    try:
        saved = json.loads((Path(path) / SUMMARY_FILE).read_text())
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def recall(path: str | Path, key: str) -> Any:
    """What :func:`remember` stored under ``key``, if no table of the store changed since; else None."""
    state = tables_state(path)
    saved = _load(path)
    if state is None or saved.get("state") != state:
        return None
    return saved.get("values", {}).get(key)


def remember(path: str | Path, values: dict[str, Any], state: dict[str, list[str]] | None) -> None:
    """Store ``values`` (key -> answer) for the tables as they were in ``state``, read with
    :func:`tables_state` before the answers were computed (or after, by a caller that knows no
    other process changed what they depend on): a write since then makes them unrecallable."""
    if state is None:
        return
    saved = _load(path)
    kept = saved.get("values", {}) if saved.get("state") == state else {}
    cache = Path(path) / SUMMARY_FILE
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"state": state, "values": {**kept, **values}}))
        os.replace(tmp, cache)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)  # a read-only store still answers, uncached
        except OSError:
            pass


def cached_info(path: str | Path, compute: Callable[[], dict]) -> dict:
    """The summary of the store at ``path`` (``Store.info()``): recalled while the tables are
    unchanged, else ``compute()`` (e.g. ``Store(path).info``), then remembered."""
    info = recall(path, "info")
    if info is not None:
        return {"path": str(path), **info}
    state = tables_state(path)
    info = compute()
    remember(path, {"info": {k: v for k, v in info.items() if k != "path"}}, state)
    return info
