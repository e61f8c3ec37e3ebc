"""The tuned model's inference, one home for the training loop's evaluation, ``/predict`` and any
caller from Python: a :class:`TunedModel` scores every label of every utterance of a
:class:`~bemerc.train.tensors.Corpus`, in the layout the run was trained with.

>>> tuned = TunedModel.load("store/runs/tune-20261130-190000-ab12/adapter")      # doctest: +SKIP
>>> probabilities = tuned.predict_proba(load_corpus(store, tuned.feature_sets))   # doctest: +SKIP
>>> probabilities.shape                                                           # (N, C)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bemerc.train.tensors import Corpus, normalise_speakers, speaker_groups
from bemerc.train.tune.config import MICRO_BATCH_TOKENS
from bemerc.train.tune.model import (MercModel, SoftInput, TuneInfo, collate, collate_windows, load_tuned,
                                     micro_batches)
from bemerc.train.tune.prompt import DialogueTurn, Encoded, Prompter, Turn, Window
from bemerc.train.tune.score import answer_scores, label_probabilities, label_scores

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


def corpus_inputs(corpus: Corpus, soft: list[SoftInput],
                  speaker_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Inputs:
    """:class:`Inputs` of a corpus for a model projecting ``soft`` (a modality the corpus lacks is
    absent for every utterance: the model's learned "missing" tokens stand in). A speaker-normalised
    soft input has each speaker's features normalised to its ``speaker_stats`` entry (the train mean
    and std, :func:`~bemerc.train.tensors.normalise_speakers`)."""
    u = corpus.utterances
    n = u.height
    features = {}
    groups = speaker_groups(u) if any(s.speaker_norm for s in soft) else None
    for s in soft:
        values, present = soft_values(corpus, s)
        if s.speaker_norm:
            if not speaker_stats or s.modality not in speaker_stats:
                raise ValueError(f"{s.modality} soft tokens are normalised per speaker: give the train mean and std they are normalised to")
            values = normalise_speakers(values, present, groups, *speaker_stats[s.modality])
        features[s.modality] = (values, present)
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

    def __init__(self, store, feature_set: str, k: int, dataset: str | None):
        from bemerc.store.schema import sql_quote

        self.k = k
        self.table = store.table(store.feature_set(feature_set).table_name)
        where = "split = 'train' AND label IS NOT NULL" + (f" AND dataset = {sql_quote(dataset)}" if dataset else "")
        u = store.read("utterances", ["uid", "split", "dialogue_id", "text", "label"], where=where)
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


class TunedModel:
    """A tuned (or zero-shot) MERC model: the LLM with its LoRA and projectors, its prompter and its
    :class:`TuneInfo`. :meth:`predict_proba` scores every label of the requested rows in the run's
    layout, in batches sorted by length (less padding), and puts them back in order: ``batch_size``
    prompts at a time (``utterance`` layout) or as many dialogue windows as fit in ``max_tokens``
    padded tokens (``dialogue`` layout: short windows, such as one-utterance dialogues, go many to a
    pass, long ones one or two)."""

    def __init__(self, model: MercModel, prompter: Prompter, info: TuneInfo, batch_size: int = 8,
                 device: torch.device | str = "cpu", autocast: Callable | None = None, retriever: DemoRetriever | None = None,
                 max_tokens: int = MICRO_BATCH_TOKENS):
        if info.demos and retriever is None:
            raise ValueError(f"the model was trained with {info.demos} retrieved demonstrations: pass a DemoRetriever "
                             f"(a store holding {info.demo_feature_set})")
        self.model, self.prompter, self.info = model, prompter, info
        self.batch_size, self.max_tokens, self.device = batch_size, max_tokens, torch.device(device)
        self.autocast = autocast
        self.retriever = retriever

    @classmethod
    def load(cls, folder: str | Path, base: str | Path | None = None, store=None, **kwargs) -> "TunedModel":
        """A saved adapter folder (``RUN_DIR/adapter``) as a ready model (CPU); ``store`` is needed
        when the run shows retrieved demonstrations (they come from its train split)."""
        model, prompter, info = load_tuned(folder, base)
        if info.demos and store is not None:
            kwargs["retriever"] = DemoRetriever(store, info.demo_feature_set, info.demos, info.dataset)
        return cls(model, prompter, info, **kwargs)

    @property
    def feature_sets(self) -> list[str]:
        return [s.feature_set for s in self.info.soft]

    def predict_proba(self, corpus: Corpus | Inputs, rows=None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(len(rows), C) label probabilities (all rows of ``corpus`` by default), in ``classes``
        order; ``progress(n_done, n_tokens)`` is called after every batch."""
        inputs = corpus if isinstance(corpus, Inputs) else corpus_inputs(corpus, self.info.soft, self.model.speaker_stats())
        rows = np.arange(len(inputs.texts)) if rows is None else np.asarray(rows)
        self.model.eval()
        scored: dict[int, np.ndarray] = {}
        if self.info.layout == "dialogue":
            demos = self.retriever.for_inputs(inputs) if self.retriever is not None else None
            windows = dialogue_windows(self.prompter, inputs, rows, self.info.overlap, demos)
            first_ids = self.prompter.answer_first_ids()
            for chunk in self._chunks(windows):
                batch = collate_windows(chunk, inputs.features, self.prompter.tokenizer.pad_token_id).to(self.device)
                with self._autocast():
                    scores, answered = answer_scores(self.model, batch, chunk, first_ids)
                scored.update(zip(answered, label_probabilities(scores)))
                if progress:
                    progress(sum(w.new.count(True) for w in chunk), batch.tokens)
        else:
            examples = merc_examples(self.prompter, inputs, rows)
            order = np.argsort([len(e) for e in examples], kind="stable")
            label_ids = self.prompter.label_ids()
            for i in range(0, len(order), self.batch_size):
                index = order[i: i + self.batch_size]
                batch = collate([examples[j] for j in index], rows[index].tolist(), inputs.features,
                                self.prompter.tokenizer.pad_token_id, with_answer=False).to(self.device)
                with self._autocast():
                    scores = label_scores(self.model, batch, label_ids, self.info.normalize_scores)
                scored.update(zip(rows[index].tolist(), label_probabilities(scores)))
                if progress:
                    progress(len(index), batch.tokens)
        return np.stack([scored[int(r)] for r in rows]) if len(rows) else np.zeros((0, len(self.info.classes)), np.float32)

    def _chunks(self, windows: list[Window]) -> list[list[Window]]:
        lengths = [len(w) for w in windows]
        return [[windows[j] for j in chunk] for chunk in micro_batches(lengths, list(range(len(windows))), self.max_tokens)]

    def _autocast(self):
        """The caller's autocast (tuning passes its accelerator's), else the run's precision."""
        if self.autocast is not None:
            return self.autocast()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.info.precision == "bf16")
