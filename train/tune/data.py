"""The tuning data path, read top to bottom: the store becomes a :class:`Data` once (:func:`load_data`:
the utterances and every feature set the run reads, through :func:`~bemerc.train.tensors.load_corpus`;
the classes, the soft inputs (:class:`SoftInput`, decided by what the feature tables hold) and their
speaker normaliser, the train and evaluation rows, the demonstrations' retriever). Its
:class:`Inputs` (words, speakers, descriptions, soft values) become, through the run's prompter
(:func:`make_prompter`), the prompts of the utterance layout (:func:`merc_examples`) or the windows of
the dialogue layout (:func:`dialogue_windows`); a stage trains on :func:`stage_examples`, whose
:meth:`Examples.batches` are the padded tensors (:class:`Batch`) of one optimiser step, and scoring
reads :func:`window_batches` or :func:`prompt_batches`. Training (``loop.py``), evaluation and
``/predict`` (``infer.py``) and ``bemerc export`` read them from here; nothing here loads a model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from bemerc.store import Store
from bemerc.store.schema import EVAL_SPLITS, run_classes
from bemerc.train.metrics import class_weights as balanced_weights
from bemerc.train.tensors import SPEAKER_NORMALISED, Corpus, ModalityArrays, SpeakerNorm, load_corpus
from bemerc.train.tune.config import SOFT_MODALITIES, TuneConfig, TuneError, project_modalities
from bemerc.train.tune.prompt import DialogueTurn, Encoded, Prompter, Turn, Window

IGNORE = -100  # target value of positions without a loss

@dataclass(frozen=True)
class SoftInput:
    """How one modality's stored features become soft tokens: its ``column`` (``vector`` or
    ``tokens``) viewed as (K, D), each of the K rows projected to one LLM input embedding."""

    modality: str
    column: str
    n_tokens: int  # K
    dim: int  # D, the width of one token's features
    feature_set: str
    speaker_norm: bool = False  # features normalised per speaker to the train mean and std (bemerc.train.tensors.SpeakerNorm)


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


# -- batches ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Right-padded sequences as tensors.

    input_ids, attention_mask: (B, T). targets: (B, T), the token that the hidden state at each
    position must predict (IGNORE where there is no loss); weights: (B, T) its loss weight.
    soft: modality -> (features (M, K*D), present (M,), sequence (M,), positions (M, K)): M runs of K
    soft tokens, run m written into sequence ``sequence[m]`` at ``positions[m]``.
    prompt_lengths: (B,) (``utterance`` layout). tokens: the number of real (unpadded) tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    soft: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    prompt_lengths: torch.Tensor
    tokens: int

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                     self.weights.to(device), {m: tuple(t.to(device) for t in v) for m, v in self.soft.items()},  # type: ignore[misc]
                     self.prompt_lengths.to(device), self.tokens)


def micro_batches(lengths: list[int], items: list[int], budget: int) -> list[list[int]]:
    """``items`` (indices into ``lengths``) cut into micro-batches whose padded size (items x the
    longest) stays within ``budget`` tokens, longest first; an item longer than ``budget`` goes alone.

    >>> micro_batches([100, 300, 200, 50], [0, 1, 2, 3], budget=600)
    [[1, 2], [0, 3]]
    """
    chunks: list[list[int]] = []
    for i in sorted(items, key=lambda i: -lengths[i]):  # stable: ties keep their order
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def pad_ids(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) right-padded ids and their (N, T) attention mask."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return input_ids, mask


def _soft(runs: dict[str, list[tuple[int, int, list[int]]]], features: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """modality -> [(sequence, corpus row, K positions)] as the tensors of :attr:`Batch.soft`."""
    soft = {}
    for modality, entries in runs.items():
        values, present = features[modality]
        rows = [row for _, row, _ in entries]
        soft[modality] = (torch.from_numpy(values[rows]), torch.from_numpy(present[rows]),
                          torch.tensor([b for b, _, _ in entries], dtype=torch.long),
                          torch.tensor([where for _, _, where in entries], dtype=torch.long))
    return soft


def collate(
    examples: list[Encoded],
    rows: list[int],
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    pad_id: int,
    with_answer: bool = True,
    weights: list[float] | None = None,
) -> Batch:
    """Pad ``utterance``-layout ``examples`` (of corpus rows ``rows``) into a :class:`Batch`.

    ``features`` maps a modality to its (N, K*D) values and (N,) present mask over the corpus;
    only the modalities that have positions in the examples are gathered. ``weights``: the loss
    weight of each example (default 1).
    """
    seqs = [e.prompt_ids + (e.answer_ids if with_answer else []) for e in examples]
    input_ids, mask = pad_ids(seqs, pad_id)
    targets = torch.full_like(input_ids, IGNORE)
    weight = torch.zeros(input_ids.shape, dtype=torch.float32)
    for i, e in enumerate(examples):
        if with_answer and e.answer_ids:  # position n - 1 + j predicts answer token j
            n = len(e.prompt_ids)
            targets[i, n - 1: n - 1 + len(e.answer_ids)] = torch.tensor(e.answer_ids)
            weight[i, n - 1: n - 1 + len(e.answer_ids)] = 1.0 if weights is None else weights[i]
    runs = {m: [(i, row, e.soft_positions[m]) for i, (e, row) in enumerate(zip(examples, rows))]
            for m in examples[0].soft_positions}
    lengths = torch.tensor([len(e.prompt_ids) for e in examples])
    return Batch(input_ids, mask, targets, weight, _soft(runs, features), lengths, int(mask.sum()))


def collate_windows(
    windows: list[Window],
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    pad_id: int,
    answers: dict[int, int] | None = None,
    weights: dict[int, float] | None = None,
) -> Batch:
    """Pad ``dialogue``-layout windows into a :class:`Batch`. ``answers`` maps a corpus row to its
    answer's token id (training: the target at the row's answer position when the row is new in its
    window); ``weights`` a row to its loss weight (default 1)."""
    input_ids, mask = pad_ids([w.ids for w in windows], pad_id)
    targets = torch.full_like(input_ids, IGNORE)
    weight = torch.zeros(input_ids.shape, dtype=torch.float32)
    for b, w in enumerate(windows):
        for row, position, new in zip(w.rows, w.answer_positions, w.new):
            if new and answers is not None and row in answers:
                targets[b, position] = answers[row]
                weight[b, position] = 1.0 if weights is None else weights[row]
    runs: dict[str, list] = {}
    for b, w in enumerate(windows):
        for modality, entries in w.soft.items():
            runs.setdefault(modality, []).extend((b, row, where) for row, where in entries)
    lengths = torch.tensor([len(w.ids) for w in windows])
    return Batch(input_ids, mask, targets, weight, _soft(runs, features), lengths, int(mask.sum()))


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    """The corpus with what the prompts need (:class:`Inputs`), its classes and soft inputs, the
    selected rows (train, and each labelled evaluation split's), the speaker normaliser fitted on the
    train rows, the settings it was read with and, when they show demonstrations, their retriever."""

    corpus: Corpus
    dataset: str | None
    classes: list[str]
    labels: list[str | None]
    soft: list[SoftInput]
    inputs: Inputs
    train_rows: np.ndarray
    eval_rows: dict[str, np.ndarray]  # split -> rows, dev first
    norm: SpeakerNorm  # the speaker-normalised modalities' train mean and std (saved with the adapter)
    config: TuneConfig
    retriever: DemoRetriever | None = None  # config.demos: the nearest labelled train utterances (by the stored text embedding)

    @property
    def features(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self.inputs.features


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


def _soft_input(arrays: ModalityArrays, modality: str, speaker_norm: bool) -> SoftInput:
    """Behaviour with ``tokens`` (K from the feature set's ``tokens_k``) gives K soft tokens; any
    other feature set its ``vector`` as one. Voice, face and frame features are normalised per
    speaker when ``speaker_norm``."""
    fs, schema = arrays.feature_set, arrays.schema
    k = fs.config.get("tokens_k")
    normalised = speaker_norm and modality in SPEAKER_NORMALISED
    if modality == "behavior" and "tokens" in schema.names and k:
        return SoftInput(modality, "tokens", int(k), schema.field("tokens").type.list_size // int(k), fs.id, normalised)
    return SoftInput(modality, "vector", 1, fs.dim, fs.id, normalised)


def load_data(store: Store, config: TuneConfig) -> Data:
    """Read the store once: the utterances (the table read once), then each feature set the run
    reads (its soft modalities, the behaviour descriptions, the text embeddings that demonstrations
    are retrieved by), every column, refused when stale (:func:`~bemerc.train.tensors.load_corpus`);
    the soft inputs are what those tables hold."""
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
    read = {stored[m].id: stored[m] for m in [*modalities, *(["behavior"] if "behavior" in stored else []),
                                               *(["text"] if config.demos else [])]}
    corpus = load_corpus(store, [read[i] for i in sorted(read)], dict.fromkeys(read), dataset,
                         utterances.filter(utterances["dataset"] == dataset))
    soft = [_soft_input(corpus.modalities[m], m, config.speaker_norm) for m in modalities]

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
    values = {s.modality: soft_values(corpus, s) for s in soft}
    norm = SpeakerNorm.fit(values, [s.modality for s in soft if s.speaker_norm], train)  # every speaker is brought to the train rows
    retriever = (DemoRetriever(store, corpus.modalities["text"].feature_set.id, config.demos, dataset, corpus.utterances)
                 if config.demos else None)
    return Data(corpus, dataset, run_classes(dataset, labels), labels, soft, corpus_inputs(corpus, soft, norm, values),
                train, evaluation, norm, config, retriever)


def make_prompter(tokenizer, data: Data, stage: str = "merc") -> Prompter:
    """The run's prompter: its classes, templates, context and soft tokens; for the ``project``
    stage only the soft tokens of :func:`project_modalities` (and, one prompt per utterance, no context
    turns). In the ``dialogue`` layout it fails early, in one line, when two labels share a first token.
    ``tokenizer`` None: text only (``bemerc export instructions``)."""
    config = data.config
    soft_tokens = {s.modality: s.n_tokens for s in data.soft}
    context = config.context
    if stage == "project":
        soft_tokens = {m: soft_tokens[m] for m in project_modalities(soft_tokens)}
        context = 0 if config.layout == "utterance" else context
    prompter = Prompter(tokenizer, data.classes, context, soft_tokens, config.merc_prompt, config.align_prompt, config.max_len)
    if tokenizer is not None and config.layout == "dialogue":
        prompter.answer_first_ids()
    return prompter


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

    def batches(self, items: list[int], budget: int, device: torch.device | str) -> list[Batch]:
        """One optimiser step's ``items`` as batches on ``device``, cut by :func:`micro_batches` to at
        most ``budget`` padded tokens each."""
        return [self.batch(chunk).to(device) for chunk in micro_batches(self.lengths, items, budget)]


def stage_examples(stage: str, prompter: Prompter, data: Data) -> Examples:
    """The items of ``stage``: align prompts, or the MERC prompts/windows of the train rows, with
    class-balanced loss weights (see :func:`class_weights`); for ``project`` the MERC windows with
    every utterance's words, description and text soft tokens left out (and no demonstrations), so
    the soft tokens of :func:`project_modalities` alone must carry the answer."""
    config = data.config
    pad_id = prompter.tokenizer.pad_token_id
    if stage == "align":
        rows = np.array([r for r in data.train_rows if data.inputs.descriptions[r]], dtype=np.int64)
        prompts = [prompter.align(data.inputs.descriptions[r]) for r in rows]
        return Examples([len(e) for e in prompts], [1] * len(prompts),
                        lambda items: collate([prompts[i] for i in items], rows[items].tolist(), data.inputs.features, pad_id))
    project = stage == "project"
    demos = None
    if project:  # only the soft tokens of what the words do not say (and, one prompt per utterance, no context turns)
        prompter = make_prompter(prompter.tokenizer, data, "project")
    elif data.retriever is not None:
        demos = data.retriever.for_inputs(data.inputs)
    if project and config.layout == "utterance":  # no words, no description
        n = len(data.inputs.texts)
        data = replace(data, inputs=replace(data.inputs, texts=[""] * n, descriptions=[None] * n))
    rows = data.train_rows
    labels = [data.labels[r] for r in rows]
    weights = class_weights(labels, config.balance)
    features = data.inputs.features
    if config.layout == "utterance":
        prompts = merc_examples(prompter, data.inputs, rows, labels)
        return Examples([len(e) for e in prompts], [1] * len(prompts), lambda items: collate(
            [prompts[i] for i in items], rows[items].tolist(), features, pad_id, weights=weights[items].tolist()))
    first_ids = dict(zip(data.classes, prompter.answer_first_ids()))
    answers = {int(r): first_ids[label] for r, label in zip(rows, labels)}
    weight_of = dict(zip(rows.tolist(), weights.tolist()))
    windows = [w for w in dialogue_windows(prompter, data.inputs, rows, config.overlap, demos, project)
               if any(new and r in answers for r, new in zip(w.rows, w.new))]
    return Examples([len(w.ids) for w in windows], [sum(new and r in answers for r, new in zip(w.rows, w.new)) for w in windows],
                    lambda items: collate_windows([windows[i] for i in items], features, pad_id, answers, weight_of))


# -- scoring ------------------------------------------------------------------------------------
def window_batches(prompter: Prompter, inputs: Inputs, rows, overlap: int, demos: Demos | None, budget: int,
                   device: torch.device | str) -> Iterator[tuple[list[Window], Batch]]:
    """``dialogue`` layout, to score ``rows``: the windows of their dialogues (:func:`dialogue_windows`)
    in :func:`micro_batches` of at most ``budget`` padded tokens (short windows go many to a pass),
    each as (its windows, their batch on ``device``)."""
    windows = dialogue_windows(prompter, inputs, rows, overlap, demos)
    for chunk in micro_batches([len(w.ids) for w in windows], list(range(len(windows))), budget):
        part = [windows[j] for j in chunk]
        yield part, collate_windows(part, inputs.features, prompter.tokenizer.pad_token_id).to(device)


def prompt_batches(prompter: Prompter, inputs: Inputs, rows: np.ndarray, batch_size: int,
                   device: torch.device | str) -> Iterator[tuple[np.ndarray, Batch]]:
    """``utterance`` layout, to score ``rows``: their prompts without answers (:func:`merc_examples`),
    ``batch_size`` at a time in order of length (less padding), each as (its positions in ``rows``,
    their batch on ``device``)."""
    examples = merc_examples(prompter, inputs, rows)
    order = np.argsort([len(e) for e in examples], kind="stable")
    for i in range(0, len(order), batch_size):
        index = order[i: i + batch_size]
        yield index, collate([examples[j] for j in index], rows[index].tolist(), inputs.features,
                             prompter.tokenizer.pad_token_id, with_answer=False).to(device)
