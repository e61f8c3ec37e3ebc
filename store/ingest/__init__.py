"""Ingest annotations (and media paths) into the store's ``utterances`` table.

Each reader validates a whole corpus before anything is written, so bad input leaves the store as it
was; writing is one commit of only the rows that are new or changed, so re-ingesting is a no-op.
"""

from bemerc.store.ingest.common import IngestError, IngestReport, write_utterances
from bemerc.store.ingest.iemocap import read_iemocap
from bemerc.store.ingest.manifest import read_manifest
from bemerc.store.ingest.meld import read_meld

__all__ = ["IngestError", "IngestReport", "read_iemocap", "read_manifest", "read_meld", "write_utterances"]
