"""The LanceDB feature store: schemas, one-writer locking, ingest, reads as polars.

The store is the hub of bemerc: ``extract`` writes it, ``train`` reads it, ``serve`` uses all.
This package imports no model library. Its names load on first use, so a command that only needs
the schema vocabulary or the cached summary (:mod:`bemerc.store.summary`) never imports LanceDB.

>>> from bemerc.store import Store
>>> store = Store("store")                      # doctest: +SKIP
>>> store.utterances(split="dev").height         # doctest: +SKIP
1109
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bemerc.store.db import FeatureSet, Store, StoreError
    from bemerc.store.lock import StoreLockedError

_EXPORTS = {"FeatureSet": "bemerc.store.db", "Store": "bemerc.store.db", "StoreError": "bemerc.store.db",
            "StoreLockedError": "bemerc.store.lock"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bemerc.store' has no attribute {name!r}")
