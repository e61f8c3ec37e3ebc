"""The LanceDB feature store: schemas, one-writer locking, ingest, reads as polars.

The store is the hub of bemerc: ``extract`` writes it, ``train`` reads it, ``serve`` uses all.
This package imports no model library.

>>> from bemerc.store import Store
>>> store = Store("store")                      # doctest: +SKIP
>>> store.utterances(split="dev").height         # doctest: +SKIP
1109
"""

from bemerc.store.db import FeatureSet, Store, StoreError
from bemerc.store.lock import StoreLockedError

__all__ = ["FeatureSet", "Store", "StoreError", "StoreLockedError"]
