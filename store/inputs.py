"""What a feature row was computed from: the input digest every feature row records.

An extractor declares the inputs it reads (``Extractor.inputs`` in ``extract/base.py``): utterance
columns (``text``, ``media_sha256``, ``start_s``, ``end_s``, ...) or one of :data:`DERIVED`. Its feature
table records that list once (metadata of the ``inputs_sha256`` column) and every row the sha256 of
those inputs' values for its utterance, as the extractor was given them (:func:`input_digest`, the one
rule). A row whose digest differs from its utterance's current one is stale: ``bemerc extract``
recomputes it, ``store info`` counts it and :func:`bemerc.train.tensors.load_corpus` refuses it. A row
with no digest (written before digests were recorded, or by a caller that does not track inputs) is
unverified: extract recomputes it, the readers warn.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

import pyarrow as pa

from bemerc.store.schema import UTTERANCES

DIGEST_COLUMN = "inputs_sha256"
INPUTS_KEY = b"bemerc.inputs"  # field metadata of DIGEST_COLUMN: the inputs, comma-separated
# Inputs that are not a column of the utterances table, computed from its row (and stored transcripts).
DERIVED = {
    "spoken_text": "the utterance's text, or when it has none the transcript stored by the newest audio "
                   "feature set with transcripts (what the text extractor embeds)",
    "has_text": "whether the utterance has a non-blank text (audio transcribes only utterances without one)",
}


def check_inputs(inputs: Iterable[str]) -> tuple[str, ...]:
    """``inputs`` as a tuple, each an utterance column or a :data:`DERIVED` name (else ValueError).

    >>> check_inputs(["media_sha256", "start_s"])
    ('media_sha256', 'start_s')
    """
    inputs = tuple(inputs)
    unknown = [name for name in inputs if name not in UTTERANCES.names and name not in DERIVED]
    if unknown or not inputs:
        raise ValueError(f"an extractor's inputs must be utterance columns or {', '.join(DERIVED)}; got {list(inputs)}")
    return inputs


def spoken_text(row: Mapping, transcripts: Mapping[str, str] | None = None) -> str | None:
    """The text an utterance is embedded from: its own, else its stored transcript (None: neither).

    >>> spoken_text({"uid": "u", "text": None}, {"u": "hello"}), spoken_text({"uid": "u", "text": "hi"}, {"u": "x"})
    ('hello', 'hi')
    """
    return row.get("text") or (transcripts or {}).get(row["uid"])


def input_value(name: str, row: Mapping, transcripts: Mapping[str, str] | None = None) -> object:
    if name == "spoken_text":
        return spoken_text(row, transcripts)
    if name == "has_text":
        return bool((row.get("text") or "").strip())
    return row.get(name)


def input_digest(inputs: Iterable[str], row: Mapping, transcripts: Mapping[str, str] | None = None) -> str:
    """sha256 of the values of ``inputs`` for the utterance ``row`` (a dict of the utterances table),
    as sorted JSON: equal inputs give equal digests, any changed value (text, media bytes, span) another.

    >>> a = input_digest(["media_sha256", "start_s", "end_s"], {"media_sha256": "ab", "start_s": 0.5, "end_s": 2.0})
    >>> a == input_digest(["media_sha256", "start_s", "end_s"], {"media_sha256": "ab", "start_s": 0.5, "end_s": 2.5})
    False
    """
    values = {name: input_value(name, row, transcripts) for name in inputs}
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digest_field(inputs: Iterable[str]) -> pa.Field:
    """The ``inputs_sha256`` column of a feature table that records ``inputs``."""
    return pa.field(DIGEST_COLUMN, pa.string(), metadata={INPUTS_KEY: ",".join(check_inputs(inputs)).encode()})


def recorded_inputs(schema: pa.Schema) -> tuple[str, ...] | None:
    """The inputs a feature table's rows were digested from; None when it records no digests."""
    if DIGEST_COLUMN not in schema.names:
        return None
    metadata = schema.field(DIGEST_COLUMN).metadata or {}
    text = metadata.get(INPUTS_KEY, b"").decode()
    return tuple(text.split(",")) if text else None
