"""Arrow schemas of the store's tables, one per table, and the vocabulary every stage shares: the
modalities, the label sets and the class list of a run.

Feature tables have one schema per extractor (``uid`` plus the extractor's own columns), so they are
built by :func:`feature_schema` from the fields an extractor declares.
"""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa

# The feature modalities, in the order reports and the baseline's ablation list them (the first is
# the ablation's anchor). Extraction runs audio first because its transcripts feed text.
MODALITIES = ("text", "audio", "behavior", "visual")
MELD_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
IEMOCAP_LABELS = ("happy", "sad", "neutral", "angry", "excited", "frustrated")
LABEL_SETS: dict[str, tuple[str, ...]] = {"meld": MELD_LABELS, "iemocap": IEMOCAP_LABELS}
SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")  # scored when labelled; anything a model chooses is chosen on dev only
# The most characters one cell of an utterance may hold (its text, speaker, ids), at every entry point:
# manifests of any format (a longer cell stops the ingest with one line naming the row) and /predict
# (422). An utterance's text is a few hundred characters; 5,000 leaves room for a long monologue's
# transcript while a pasted book (seconds and gigabytes to extract a few rows; docs/store.md) stays out.
MAX_TEXT_CHARS = 5_000


def run_classes(dataset: str | None, labels: Iterable[str | None]) -> list[str]:
    """The classes of a run, in the order of its probabilities: the corpus's fixed label set for
    MELD and IEMOCAP, otherwise every label present in ``labels`` (all splits, so that every model
    trained on a corpus scores the same labelled utterances), sorted.

    >>> run_classes("meld", [])[:3]
    ['neutral', 'joy', 'surprise']
    >>> run_classes("my_corpus", ["sad", None, "happy", "sad"])
    ['happy', 'sad']
    """
    if dataset in LABEL_SETS:
        return list(LABEL_SETS[dataset])
    return sorted({label for label in labels if label is not None})

UTTERANCES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),  # "{split}/dia{D}_utt{U}" (MELD) or "{split}/{dialogue}_{turn}"
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("dialogue_id", pa.string(), nullable=False),
        pa.field("turn", pa.int32(), nullable=False),  # 0-based order inside the dialogue
        pa.field("speaker", pa.string()),
        pa.field("text", pa.string()),
        pa.field("label", pa.string()),
        pa.field("sentiment", pa.string()),
        # Span of the utterance inside its media: in the video when there is one, else in the audio.
        # A separate audio file given beside a video is taken whole. Null = the whole file.
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("video_path", pa.string()),
        pa.field("audio_path", pa.string()),
        pa.field("media_sha256", pa.string()),  # sha256 of video bytes then audio bytes; null without media
        pa.field("meta_json", pa.string()),  # dataset-specific extras (MELD season/episode/times, ...)
    ]
)

FEATURE_SETS = pa.schema(
    [
        pa.field("feature_set", pa.string(), nullable=False),  # "{modality}/{extractor}@{config_hash}"
        pa.field("modality", pa.string(), nullable=False),
        pa.field("extractor", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("config_json", pa.string(), nullable=False),
        pa.field("table_name", pa.string(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("created_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)

FAILURES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("feature_set", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # the modality: text, audio, behavior, visual
        pa.field("reason", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # what made the run: one of bemerc.train.runs.KINDS
        pa.field("created_at", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("classes", pa.list_(pa.string()), nullable=False),  # order of predictions.probabilities
        pa.field("feature_sets", pa.list_(pa.string()), nullable=False),
        pa.field("table_versions_json", pa.string()),  # {"table": version} read by the run
        pa.field("config_json", pa.string()),
        pa.field("metrics_json", pa.string()),
        pa.field("run_dir", pa.string()),
    ]
)

PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("uid", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # the predicted label
        pa.field("gold", pa.string()),  # the utterance's label when known
        pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # in runs.classes order
    ]
)

BASE_TABLES: dict[str, pa.Schema] = {
    "utterances": UTTERANCES,
    "feature_sets": FEATURE_SETS,
    "failures": FAILURES,
    "runs": RUNS,
    "predictions": PREDICTIONS,
}
KEYS: dict[str, list[str]] = {
    "utterances": ["uid"],
    "feature_sets": ["feature_set"],
    "failures": ["uid", "feature_set"],
    "runs": ["run_id"],
    "predictions": ["run_id", "uid"],
}


def feature_schema(fields: list[pa.Field]) -> pa.Schema:
    """Schema of a feature table: ``uid`` then the extractor's ``fields`` (``vector`` among them).

    >>> feature_schema([pa.field("vector", pa.list_(pa.float32(), 384))]).names
    ['uid', 'vector']
    """
    names = [f.name for f in fields]
    if "vector" not in names:
        raise ValueError(f"an extractor must declare a 'vector' column; got {names}")
    return pa.schema([pa.field("uid", pa.string(), nullable=False), *fields])


def vector_dim(schema: pa.Schema, column: str = "vector") -> int:
    """Width of a fixed-size-list vector column."""
    field_type = schema.field(column).type
    if not pa.types.is_fixed_size_list(field_type):
        raise ValueError(f"column {column!r} must be a fixed_size_list of float32, found {field_type}")
    return field_type.list_size


def sql_quote(value: object) -> str:
    """``value`` as one SQL string literal: single quotes doubled, the whole wrapped in quotes.

    Every value that enters a store filter goes through this function (or :func:`sql_in`), so a
    name such as ``o'brien`` is matched literally and can never end the literal early.

    >>> print(sql_quote("o'brien ds"))
    'o''brien ds'
    >>> print("dataset = " + sql_quote("x' OR '1'='1"))
    dataset = 'x'' OR ''1''=''1'
    """
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(values: Iterable[object]) -> str:
    """The inside of an SQL ``IN (...)`` list: every value quoted by :func:`sql_quote`.

    >>> print("uid IN (" + sql_in(["dev/a_0", "it's"]) + ")")
    uid IN ('dev/a_0', 'it''s')
    """
    return ", ".join(sql_quote(v) for v in values)
