"""The tuning data path, read top to bottom: the store becomes a :class:`Data` once
(:func:`load_data`: the corpus, its classes, the soft inputs and their speaker normaliser, the train
and evaluation rows), its :class:`Inputs` (words, speakers, descriptions, soft values) become the
prompts of the utterance layout (:func:`merc_examples`) or the windows of the dialogue layout
(:func:`dialogue_windows`), and each training stage's items and collation are :func:`stage_examples`.
Training (``loop.py``), evaluation and ``/predict`` (``infer.py``) and ``bemerc export`` read them from here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from bemerc.store import Store
from bemerc.store.schema import EVAL_SPLITS, run_classes
from bemerc.train.metrics import class_weights as balanced_weights
from bemerc.train.tensors import SPEAKER_NORMALISED, Corpus, SpeakerNorm, load_corpus
from bemerc.train.tune.config import SOFT_MODALITIES, TuneConfig, TuneError, project_modalities
from bemerc.train.tune.model import Batch, SoftInput, collate, collate_windows
from bemerc.train.tune.prompt import DialogueTurn, Encoded, Prompter, Turn, Window

# corpus rows of one dialogue -> the (text, label) demonstrations shown before it
Demos = Callable[[list[int]], list[tuple[str, str]]]


@dataclass
class Inputs:
    """What the prompts read from a corpus, one entry per utterance: speakers, texts, behaviour
    descriptions, the (N, K*D) features and (N,) present mask of each soft modality, and the first
    row of each utterance's dialogue."""

    speakers: list[str]
    texts: list[str]
    descriptions: list[str | None]
    features: dict[str, tuple[np.ndarray, np.ndarray]]
    dialogue_start: np.ndarray
    dialogue_keys: list[str]  # "split/dialogue_id" of each utterance
    text_vectors: tuple[np.ndarray, np.ndarray] | None = None  # stored text embeddings and present mask (demo retrieval)

    def turn(self, row: int) -> Turn:
        return Turn(self.speakers[row], self.texts[row])

    def dialogue_turn(self, row: int) -> DialogueTurn:
        return DialogueTurn(self.speakers[row], self.texts[row], self.descriptions[row], row)

    def context(self, row: int, n: int) -> list[Turn]:
        start = max(int(self.dialogue_start[row]), row - n)
        return [self.turn(r) for r in range(start, row)]

    def dialogues(self, rows: np.ndarray) -> list[list[int]]:
        """``rows`` grouped by dialogue, each group extended to its whole dialogue from its start
        (so context turns are present), in order."""
        groups: dict[int, int] = {}
        for r in rows:
            start = int(self.dialogue_start[r])
            groups[start] = max(groups.get(start, start), int(r))
        return [list(range(start, last + 1)) for start, last in sorted(groups.items())]


def soft_values(corpus: Corpus, s: SoftInput) -> tuple[np.ndarray, np.ndarray]:
    """(N, K*D) stored features of one soft input, as stored, and the (N,) present mask (all False
    when the corpus lacks the modality)."""
    n = corpus.utterances.height
    arrays = corpus.modalities.get(s.modality)
    values = np.zeros((n, s.n_tokens * s.dim), dtype=np.float32)
    if arrays is None:
        return values, np.zeros(n, dtype=bool)
    if s.column == "vector":
        return arrays.vectors, arrays.present
    for i, v in enumerate(arrays.extras[s.column]):  # e.g. behaviour tokens: (N, K * D), zeros where absent
        if v is not None:
            values[i] = v
    return values, arrays.present


def corpus_inputs(corpus: Corpus, soft: list[SoftInput], norm: SpeakerNorm | None = None,
                  stored: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Inputs:
    """:class:`Inputs` of a corpus for a model projecting ``soft`` (a modality the corpus lacks is
    absent for every utterance: the model's learned "missing" tokens stand in). A speaker-normalised
    soft input has each speaker's features normalised by ``norm`` (the train mean and std,
    :class:`~bemerc.train.tensors.SpeakerNorm`): the one place the normaliser is applied.
    ``stored``: the soft inputs' stored values when the caller has them (:func:`soft_values`)."""
    u = corpus.utterances
    n = u.height
    stored = stored or {s.modality: soft_values(corpus, s) for s in soft}
    features = (norm or SpeakerNorm()).normalise(stored, [s.modality for s in soft if s.speaker_norm], u)
    behavior = corpus.modalities.get("behavior")
    descriptions = (behavior.extras.get("description") if behavior else None) or [None] * n
    text = corpus.modalities.get("text")
    return Inputs([s or "Speaker" for s in u["speaker"].to_list()], [t or "" for t in u["text"].to_list()],
                  list(descriptions), features, corpus.dialogue_start, (u["split"] + "/" + u["dialogue_id"]).to_list(),
                  (text.vectors, text.present) if text is not None else None)


class DemoRetriever:
    """Retrieved demonstrations: for each turn of a dialogue the nearest labelled *train* utterances
    of ``dataset`` by the stored text embedding (a LanceDB vector search on the feature set's
    table; never an evaluation split, never the dialogue itself), the ``k`` closest overall, as
    ``(text, label)``.

    >>> retriever = DemoRetriever(store, "text/minilm-l6@ea2f1d25add8", k=4, dataset="meld")  # doctest: +SKIP
    >>> retriever(vectors, exclude="train/12")[:1]                                           # doctest: +SKIP
    [('Oh my God!', 'surprise')]
    """

    def __init__(self, store, feature_set: str, k: int, dataset: str | None, utterances=None):
        """``utterances``: the store's utterances when the caller has read them (else they are read)."""
        from bemerc.store.schema import sql_quote

        self.k = k
        self.table = store.table(store.feature_set(feature_set).table_name)
        if utterances is None:
            where = "split = 'train' AND label IS NOT NULL" + (f" AND dataset = {sql_quote(dataset)}" if dataset else "")
            u = store.read("utterances", ["uid", "split", "dialogue_id", "text", "label"], where=where)
        else:
            keep = (utterances["split"] == "train") & utterances["label"].is_not_null()
            u = utterances.filter(keep & (utterances["dataset"] == dataset) if dataset else keep)
        self.train = {uid: (f"{split}/{d}", text or "", label) for uid, split, d, text, label in
                      zip(u["uid"], u["split"], u["dialogue_id"], u["text"], u["label"])}
        self.where = "uid LIKE " + sql_quote("train/%")

    def __call__(self, vectors: np.ndarray, exclude: str | None = None) -> list[tuple[str, str]]:
        found: dict[str, float] = {}
        for vector in vectors:
            hits = self.table.search(vector).where(self.where, prefilter=True).limit(self.k + 32).select(["uid"]).to_list()
            for hit in hits:
                known = self.train.get(hit["uid"])
                if known is not None and known[0] != exclude:
                    found[hit["uid"]] = min(found.get(hit["uid"], np.inf), hit["_distance"])
        return [self.train[uid][1:] for uid in sorted(found, key=found.get)[: self.k]]

    def for_inputs(self, inputs: Inputs) -> Demos:
        """The demonstrations of a dialogue of ``inputs`` given its corpus rows."""
        if inputs.text_vectors is None:
            raise ValueError("demonstrations need the utterances' text embeddings (a text feature set)")
        vectors, present = inputs.text_vectors

        def demos(rows: list[int]) -> list[tuple[str, str]]:
            return self(vectors[[r for r in rows if present[r]]], exclude=inputs.dialogue_keys[rows[0]])

        return demos


def merc_examples(prompter: Prompter, inputs: Inputs, rows, labels: list[str | None] | None = None) -> list[Encoded]:
    """``utterance`` layout: one prompt per row (its last ``prompter.context`` turns as context)."""
    labels = labels or [None] * len(rows)
    return [prompter.merc(inputs.context(r, prompter.context), inputs.turn(r), inputs.descriptions[r], label)
            for r, label in zip(rows, labels)]


def dialogue_windows(prompter: Prompter, inputs: Inputs, rows, overlap: int, demos: Demos | None = None,
                     soft_only: bool = False) -> list[Window]:
    """``dialogue`` layout: the windows of the dialogues holding ``rows`` (whole dialogues, from
    their first turn), each dialogue preceded by its retrieved demonstrations when ``demos`` is given;
    ``soft_only``: every turn shown by its soft tokens alone (the ``project`` stage)."""
    windows = []
    for dialogue in inputs.dialogues(np.asarray(rows)):
        shown = demos(dialogue) if demos is not None else []
        windows += prompter.dialogue([inputs.dialogue_turn(r) for r in dialogue], shown, overlap, soft_only)
    return windows


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    """The corpus with what the prompts need (:class:`Inputs`), its classes
    and soft inputs, and the selected rows: train, and each labelled evaluation split's."""

    corpus: Corpus
    dataset: str | None
    classes: list[str]
    labels: list[str | None]
    soft: list[SoftInput]
    inputs: Inputs
    train_rows: np.ndarray
    eval_rows: dict[str, np.ndarray]  # split -> rows, dev first
    norm: SpeakerNorm  # the speaker-normalised modalities' train mean and std (saved with the adapter)

    @property
    def features(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.inputs.features

    @property
    def descriptions(self) -> list[str | None]:
        return self.inputs.descriptions

    def label(self, row: int) -> str:
        return self.labels[row]


def first_dialogues(rows: np.ndarray, dialogue_start: np.ndarray, limit: int | None) -> np.ndarray:
    """The longest prefix of ``rows`` (in order) made of whole dialogues with at most ``limit`` rows
    (at least one dialogue)."""
    if limit is None or len(rows) <= limit:
        return rows
    starts = dialogue_start[rows]
    cut = next((i for i in range(limit, 0, -1) if starts[i] != starts[i - 1]), None)
    if cut is None:  # the first dialogue alone is longer than the limit
        cut = int(np.argmax(starts != starts[0])) or len(rows)
    return rows[:cut]


def _soft_input(store: Store, fs, modality: str, speaker_norm: bool) -> SoftInput:
    """Behaviour with ``tokens`` (K from the feature set's ``tokens_k``) gives K soft tokens; any
    other feature set its ``vector`` as one. Voice, face and frame features are normalised per
    speaker when ``speaker_norm``."""
    schema = store.table(fs.table_name).schema
    k = fs.config.get("tokens_k")
    normalised = speaker_norm and modality in SPEAKER_NORMALISED
    if modality == "behavior" and "tokens" in schema.names and k:
        return SoftInput(modality, "tokens", int(k), schema.field("tokens").type.list_size // int(k), fs.id, normalised)
    return SoftInput(modality, "vector", 1, fs.dim, fs.id, normalised)


def load_data(store: Store, config: TuneConfig) -> Data:
    """Read the store once: utterances (the table read once), the soft modalities' features and behaviour descriptions."""
    utterances = store.utterances()
    if utterances.height == 0:
        raise TuneError(f"{store.path}: the store has no utterances; run `bemerc ingest` first")
    datasets = sorted(set(utterances["dataset"].to_list()))
    dataset = config.dataset or (datasets[0] if len(datasets) == 1 else None)
    if dataset is None or dataset not in datasets:
        raise TuneError(f"{store.path}: choose a dataset with --dataset (the store holds {', '.join(datasets)})")

    stored = {fs.modality: fs for fs in store.feature_sets()}
    if config.zero_shot:
        modalities = []
    elif config.modalities is None:
        modalities = [m for m in SOFT_MODALITIES if m in stored]
    else:
        modalities = list(config.modalities)
    unknown = [m for m in modalities if m not in stored]
    if unknown:
        raise TuneError(f"{store.path}: no feature set for modality {', '.join(unknown)} "
                        f"(stored: {', '.join(sorted(stored)) or 'none'}); run `bemerc extract` or change --modalities")
    if config.demos and "text" not in stored:
        raise TuneError(f"{store.path}: --demos needs a text feature set to retrieve by; run `bemerc extract --modality text`")
    soft = [_soft_input(store, stored[m], m, config.speaker_norm) for m in modalities]
    behavior = stored.get("behavior")
    has_description = behavior is not None and "description" in store.table(behavior.table_name).schema.names
    refs = sorted({s.feature_set for s in soft} | ({behavior.id} if has_description else set())
                  | ({stored["text"].id} if config.demos else set()))
    extra: dict[str, list[str]] = {}
    for s in soft:
        if s.column != "vector":
            extra.setdefault(s.feature_set, []).append(s.column)
    if has_description:
        extra.setdefault(behavior.id, []).append("description")
    corpus = load_corpus(store, refs, extra, dataset, utterances.filter(utterances["dataset"] == dataset))

    u = corpus.utterances
    labelled = u["label"].is_not_null().to_numpy()
    train = np.flatnonzero(corpus.split_mask("train") & labelled)
    evaluation = {split: np.flatnonzero(corpus.split_mask(split) & labelled) for split in EVAL_SPLITS}
    evaluation = {split: first_dialogues(rows, corpus.dialogue_start, config.eval_limit)
                  for split, rows in evaluation.items() if len(rows)}
    if "dev" not in evaluation:
        raise TuneError(f"{store.path}: dataset {dataset!r} has no labelled 'dev' utterances (needed to evaluate and select)")
    if len(train) == 0 and not config.zero_shot:
        raise TuneError(f"{store.path}: dataset {dataset!r} has no labelled train utterances")
    labels = u["label"].to_list()
    train = first_dialogues(train, corpus.dialogue_start, config.train_limit)
    stored = {s.modality: soft_values(corpus, s) for s in soft}
    norm = SpeakerNorm.fit(stored, [s.modality for s in soft if s.speaker_norm], train)  # every speaker is brought to the train rows
    return Data(corpus, dataset, run_classes(dataset, labels), labels, soft, corpus_inputs(corpus, soft, norm, stored),
                train, evaluation, norm)


def make_prompter(tokenizer, data: Data, config: TuneConfig) -> Prompter:
    """The run's prompter: its classes, templates, context and soft tokens."""
    return Prompter(tokenizer, data.classes, config.context, {s.modality: s.n_tokens for s in data.soft},
                    config.merc_prompt, config.align_prompt, config.max_len)


def make_retriever(store: Store, data: Data, config: TuneConfig) -> DemoRetriever | None:
    """The demonstrations' retriever when ``config.demos`` asks for them (by the stored text embedding)."""
    if not config.demos:
        return None
    return DemoRetriever(store, data.corpus.modalities["text"].feature_set.id, config.demos, data.dataset, data.corpus.utterances)


def class_weights(labels: list[str], balance: float) -> np.ndarray:
    """(N,) loss weights: each example's class weight (:func:`bemerc.train.metrics.class_weights` over
    the classes present, power ``balance``) scaled to mean 1: 0 weighs all examples alike, 0.5 by inverse
    square-root class frequency, 1 by inverse frequency (every class then weighs the same in total).

    >>> class_weights(["a", "a", "a", "b"], 1.0).round(2).tolist()
    [0.67, 0.67, 0.67, 2.0]
    """
    names, y = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    weights = balanced_weights(y, len(names), balance)[y]
    return weights / weights.mean()


@dataclass
class Examples:
    """What one stage trains on: ``lengths[i]`` tokens and ``utterances[i]`` answered utterances of
    item i (a prompt or a dialogue window), and ``batch(items)`` that collates a list of items."""

    lengths: list[int]
    utterances: list[int]
    batch: Callable[[list[int]], Batch]


def stage_examples(stage: str, prompter: Prompter, data: Data, config: TuneConfig, demos=None) -> Examples:
    """The items of ``stage``: align prompts, or the MERC prompts/windows of the train rows, with
    class-balanced loss weights (see :func:`class_weights`); for ``project`` the MERC windows with
    every utterance's words, description and text soft tokens left out (and no demonstrations), so
    the soft tokens of :func:`project_modalities` alone must carry the answer."""
    pad_id = prompter.tokenizer.pad_token_id
    if stage == "align":
        rows = np.array([r for r in data.train_rows if data.descriptions[r]], dtype=np.int64)
        prompts = [prompter.align(data.descriptions[r]) for r in rows]
        return Examples([len(e) for e in prompts], [1] * len(prompts),
                        lambda items: collate([prompts[i] for i in items], rows[items].tolist(), data.features, pad_id))
    project = stage == "project"
    if project:  # only the soft tokens of what the words do not say (and, one prompt per utterance, no context turns)
        prompter = prompter.but(soft_tokens={m: prompter.soft_tokens[m] for m in project_modalities(prompter.soft_tokens)},
                                context=0 if config.layout == "utterance" else None)
    if project and config.layout == "utterance":  # no words, no description
        n = len(data.inputs.texts)
        data = replace(data, inputs=replace(data.inputs, texts=[""] * n, descriptions=[None] * n))
    rows = data.train_rows
    weights = class_weights([data.label(r) for r in rows], config.balance)
    if config.layout == "utterance":
        prompts = merc_examples(prompter, data.inputs, rows, [data.label(r) for r in rows])
        return Examples([len(e) for e in prompts], [1] * len(prompts), lambda items: collate(
            [prompts[i] for i in items], rows[items].tolist(), data.features, pad_id, weights=weights[items].tolist()))
    first_ids = dict(zip(data.classes, prompter.answer_first_ids()))
    answers = {int(r): first_ids[data.label(r)] for r in rows}
    weight_of = dict(zip(rows.tolist(), weights.tolist()))
    windows = [w for w in dialogue_windows(prompter, data.inputs, rows, config.overlap, None if project else demos, project)
               if any(new and r in answers for r, new in zip(w.rows, w.new))]
    return Examples([len(w) for w in windows], [sum(new and r in answers for r, new in zip(w.rows, w.new)) for w in windows],
                    lambda items: collate_windows([windows[i] for i in items], data.features, pad_id, answers, weight_of))


