"""Store -> arrays, once: utterances in dialogue order with their stored feature vectors.

Arrow's fixed-size-list vectors become numpy views without a copy (``values`` of the flat child
array reshaped), and torch tensors share that memory through ``torch.from_numpy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from bemerc.store import FeatureSet, Store


def vectors_of(table: pa.Table, column: str = "vector") -> np.ndarray:
    """(N, D) float32 view of a fixed-size-list column (no copy when the column has one chunk)."""
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    flat = col.flatten() if col.offset else col.values
    return flat.to_numpy(zero_copy_only=False).reshape(len(col), width)


def dialogue_starts(utterances: pl.DataFrame) -> np.ndarray:
    """(N,) int64: for each utterance (rows already in dialogue order, as :func:`load_corpus` gives
    them), the row of the first utterance of its dialogue (same dataset, split and dialogue_id).

    >>> u = pl.DataFrame({"dataset": ["m"] * 4, "split": ["dev"] * 4, "dialogue_id": ["0", "0", "1", "1"]})
    >>> dialogue_starts(u).tolist()
    [0, 0, 2, 2]
    """
    key = (utterances["dataset"] + "\x1f" + utterances["split"] + "\x1f" + utterances["dialogue_id"]).to_numpy()
    new = np.ones(len(key), dtype=bool)
    new[1:] = key[1:] != key[:-1]
    return np.flatnonzero(new)[np.cumsum(new) - 1].astype(np.int64)


# -- speaker normalisation ------------------------------------------------------------------------
# Voice and face vectors say who is speaking before what they feel. Each speaker's vectors are
# standardised on their own mean and spread and put back on the train rows' mean and spread (the
# speaker-level z-normalisation of speech emotion work, and OpenFace's person-specific calibration of
# action units); what it gains on RAVDESS, and where it does not, is in docs/speakers.md. Text vectors
# are left as they are: a speaker's words are what they say, not how they sound.
SPEAKER_NORMALISED = ("audio", "behavior", "visual")
SPEAKER_PRIOR = 5.0  # the train mean and variance count as this many utterances in each speaker's estimates


def speaker_groups(utterances: pl.DataFrame) -> np.ndarray:
    """(N,) int64 group of each utterance's speaker (by dataset and name, across splits); -1 where
    the speaker is unknown (empty or null).

    >>> speaker_groups(pl.DataFrame({"dataset": ["a", "a", "b", "a"], "speaker": ["Ann", "Bo", "Ann", None]})).tolist()
    [0, 1, 2, -1]
    """
    names = utterances["speaker"].fill_null("").to_list()
    keys = [f"{d}\x00{s}" if s.strip() else None for d, s in zip(utterances["dataset"].to_list(), names)]
    index: dict[str, int] = {}
    return np.array([-1 if k is None else index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def normalise_speakers(values: np.ndarray, present: np.ndarray, groups: np.ndarray, mean: np.ndarray, std: np.ndarray,
                       prior: float = SPEAKER_PRIOR) -> np.ndarray:
    """(N, D) ``values`` with each known speaker's rows standardised per feature on the speaker's
    mean and variance, then scaled back to ``mean`` and ``std`` (the train rows'). The speaker's
    estimates count the train ones as ``prior`` extra rows: a speaker with n rows that have the
    modality has mean ``(n * m + prior * mean) / (n + prior)`` and likewise variance, so a speaker
    heard often is fully normalised, and one heard once (a short request) only moves to
    ``sqrt(prior / (1 + prior))`` (0.91) of its distance from ``mean``. Rows without the modality or
    a known speaker are left as they are. Labels are never read.

    >>> v = np.array([[10.0], [14.0], [0.0], [5.0]])
    >>> out = normalise_speakers(v, np.ones(4, bool), np.array([0, 0, 1, -1]), np.array([1.0]), np.array([2.0]), prior=2)
    >>> [round(float(x), 3) for x in out.ravel()]  # Ann (10, 14) -> centre 6.5, spread 2; Bo heard once; unknown kept
    [4.5, 8.5, 0.184, 5.0]
    """
    out = np.array(values, dtype=np.float32, copy=True)
    rows = present & (groups >= 0)
    if not rows.any():
        return out
    x = out[rows].astype(np.float64)
    ids, inverse, counts = np.unique(groups[rows], return_inverse=True, return_counts=True)
    sums, squares = np.zeros((len(ids), x.shape[1])), np.zeros((len(ids), x.shape[1]))
    np.add.at(sums, inverse, x)
    np.add.at(squares, inverse, x * x)
    n = counts[:, None].astype(np.float64)
    means = sums / n
    variances = np.maximum(squares / n - means ** 2, 0.0)
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64) ** 2
    centre = (n * means + prior * mean) / (n + prior)
    spread = np.sqrt((n * variances + prior * var) / (n + prior))
    ratio = np.where(spread > 1e-12, np.sqrt(var) / np.maximum(spread, 1e-12), 1.0)
    out[rows] = (mean + (x - centre[inverse]) * ratio[inverse]).astype(np.float32)
    return out


@dataclass
class SpeakerNorm:
    """The per-speaker normaliser of a tuned model, fitted once on its train rows and saved beside its
    adapter (``speaker_norm.safetensors``): for each speaker-normalised modality the (K*D,) train mean
    and std that every speaker's features are brought to (:func:`normalise_speakers`). Empty: nothing
    is normalised.

    >>> norm = SpeakerNorm({"audio": (np.array([1.0], np.float32), np.array([2.0], np.float32))})
    >>> u = pl.DataFrame({"dataset": ["d"] * 3, "speaker": ["Ann", "Ann", "Bo"]})
    >>> out = norm.normalise({"audio": (np.array([[10.0], [14.0], [5.0]]), np.ones(3, bool))}, ["audio"], u, prior=2)
    >>> [round(float(x), 3) for x in out["audio"][0].ravel()]  # Ann (10, 14) -> centre 6.5, spread 2; Bo heard once
    [4.5, 8.5, 4.266]
    """

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    FILE = "speaker_norm.safetensors"

    @classmethod
    def fit(cls, features: dict[str, tuple[np.ndarray, np.ndarray]], modalities: list[str], rows: np.ndarray) -> "SpeakerNorm":
        """The train mean and std of ``rows`` (those that have the modality; zeros when none does)
        of each of ``modalities``, from ``features`` (modality -> (N, K*D) values, (N,) present)."""
        stats = {}
        for m in modalities:
            values, present = features[m]
            fit = values[rows[present[rows]]] if present[rows].any() else np.zeros((1, values.shape[1]), np.float32)
            stats[m] = (fit.mean(axis=0), fit.std(axis=0))
        return cls(stats)

    def normalise(self, features: dict[str, tuple[np.ndarray, np.ndarray]], modalities: list[str], utterances: pl.DataFrame,
                  prior: float = SPEAKER_PRIOR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``features`` (modality -> (N, K*D) values, (N,) present mask of ``utterances``' rows) with
        each speaker's values of ``modalities`` normalised to the train mean and std (the others as
        they are); a ValueError when the normaliser lacks one of ``modalities``."""
        missing = [m for m in modalities if m not in self.stats]
        if missing:
            raise ValueError(f"{missing[0]} soft tokens are normalised per speaker: give the train mean and std they are normalised to")
        if not modalities:
            return dict(features)
        groups = speaker_groups(utterances)
        return {m: (normalise_speakers(values, present, groups, *self.stats[m], prior=prior) if m in modalities else values, present)
                for m, (values, present) in features.items()}

    def save(self, folder) -> None:
        """``FOLDER/speaker_norm.safetensors`` (tensors ``MODALITY.mean`` and ``MODALITY.std``, float32); nothing when empty."""
        if not self.stats:
            return
        from safetensors.numpy import save_file

        tensors = {f"{m}.{k}": np.ascontiguousarray(v, dtype=np.float32) for m, pair in self.stats.items()
                   for k, v in zip(("mean", "std"), pair)}
        save_file(tensors, str(Path(folder) / self.FILE))

    @classmethod
    def load(cls, folder) -> "SpeakerNorm | None":
        """The normaliser saved in ``folder``, or None when it holds none."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        modalities = dict.fromkeys(name.rsplit(".", 1)[0] for name in tensors)
        return cls({m: (tensors[f"{m}.mean"], tensors[f"{m}.std"]) for m in modalities})


@dataclass
class ModalityArrays:
    """One feature set aligned to a list of utterances: ``vectors[i]`` is utterance i's vector,
    meaningful only where ``present[i]`` (a missing modality is never zero-filled as if real)."""

    feature_set: FeatureSet
    vectors: np.ndarray  # (N, D) float32; rows where present is False are zeros and must be masked
    present: np.ndarray  # (N,) bool
    extras: dict[str, list] = field(default_factory=dict)  # other columns (description, tokens, ...)
    schema: pa.Schema | None = None  # the feature table's columns as stored (load_corpus), e.g. the width of ``tokens``


@dataclass
class Corpus:
    """Utterances of the store in dialogue order plus their features per modality."""

    utterances: pl.DataFrame  # uid, dataset, split, dialogue_id, turn, speaker, text, label, ...
    modalities: dict[str, ModalityArrays]
    dialogue_start: np.ndarray = field(init=False, repr=False)  # (N,) int64 row of each utterance's dialogue's first (dialogue_starts)

    def __post_init__(self) -> None:
        self.dialogue_start = dialogue_starts(self.utterances)

    def split_mask(self, split: str) -> np.ndarray:
        return (self.utterances["split"] == split).to_numpy()


def load_corpus(
    store: Store,
    feature_sets: list[str | FeatureSet] | None = None,
    extra_columns: dict[str, list[str] | None] | None = None,
    dataset: str | None = None,
    utterances: pl.DataFrame | None = None,
) -> Corpus:
    """Read utterances and the given feature sets (:class:`FeatureSet` records, ids, ``modality/extractor``
    or modality names; default: the newest feature set of trained weights of each modality present)
    aligned by uid.

    ``extra_columns`` maps a feature-set ref to other columns to keep (e.g. ``{"behavior":
    ["description", "tokens"]}``; None: every column the table has). A feature set with stale rows
    for these utterances is refused (:meth:`Store.read_features`, :class:`~bemerc.store.db.StaleFeaturesError`): this
    is the one place ``train/`` reads features. ``utterances``: the rows (of ``dataset``, in dialogue
    order, :meth:`Store.utterances`) when the caller has read them.

    >>> corpus = load_corpus(Store("store"), ["text", "behavior"])   # doctest: +SKIP
    >>> corpus.modalities["text"].vectors.shape                        # doctest: +SKIP
    (11098, 384)
    """
    if utterances is None:
        utterances = store.utterances(dataset=dataset)
    if feature_sets is None:
        newest: dict[str, FeatureSet] = {}
        for fs in store.feature_sets():
            if not fs.random_weights:  # random-weight rows feed a model only when named (Store.feature_set)
                newest[fs.modality] = fs
        chosen = list(newest.values())
    else:
        chosen = [ref if isinstance(ref, FeatureSet) else store.feature_set(ref) for ref in feature_sets]
    extra_columns = extra_columns or {}
    index = {uid: i for i, uid in enumerate(utterances["uid"].to_list())}
    modalities: dict[str, ModalityArrays] = {}
    for fs in chosen:
        refs = [ref for ref in extra_columns if ref in (fs.id, fs.modality, f"{fs.modality}/{fs.extractor}")]
        every = any(extra_columns[ref] is None for ref in refs)
        wanted = [c for ref in refs for c in extra_columns[ref] or []]
        table = store.read_features(fs, None if every else ["uid", "vector", *wanted], current_for=utterances)
        if every:
            wanted = [c for c in table.column_names if c not in ("uid", "vector")]
        rows = np.array([index.get(u, -1) for u in table["uid"].to_pylist()], dtype=np.int64)
        keep = rows >= 0
        extras = {c: np.array(table[c].to_pylist(), dtype=object)[keep] for c in wanted}
        arrays = pack_rows(fs, utterances.height, rows[keep], vectors_of(table)[keep], extras)
        arrays.schema = table.schema
        modalities[fs.modality] = arrays
    return Corpus(utterances, modalities)


def pack_rows(fs: FeatureSet, n: int, rows, vectors, extras: dict | None = None) -> ModalityArrays:
    """The :class:`ModalityArrays` of ``n`` utterances given the results of those at ``rows``:
    ``vectors[k]`` (and each ``extras[name][k]``) belongs to utterance ``rows[k]``; every other
    utterance is absent (a zero row, ``present`` False, None in each extra). The one packing of
    feature rows into arrays: :func:`load_corpus` packs stored rows, ``/predict`` freshly extracted ones.

    >>> fs = FeatureSet("text", "fake", "0", "features_text", 2, False, {})
    >>> a = pack_rows(fs, 3, [2], np.ones((1, 2)), {"tokens": [7]})
    >>> a.present.tolist(), a.vectors[2].tolist(), a.extras["tokens"]
    ([False, False, True], [1.0, 1.0], [None, None, 7])
    """
    rows = np.asarray(rows, dtype=np.int64)
    packed = np.zeros((n, fs.dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    packed[rows] = np.asarray(vectors, dtype=np.float32).reshape(len(rows), fs.dim)
    present[rows] = True
    columns: dict[str, list] = {}
    for name, values in (extras or {}).items():
        column: list = [None] * n
        for r, v in zip(rows, values):
            column[r] = v
        columns[name] = column
    return ModalityArrays(fs, packed, present, columns)
