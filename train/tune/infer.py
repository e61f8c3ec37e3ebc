"""The tuned model's inference, one home for the training loop's evaluation, ``/predict`` and any
caller from Python: a :class:`TunedModel` scores every label of every utterance of a
:class:`~bemerc.train.tensors.Corpus`, in the layout the run was trained with.

>>> tuned = TunedModel.load("store/runs/tune-20261130-190000-ab12/adapter")      # doctest: +SKIP
>>> probabilities = tuned.predict_proba(load_corpus(store, tuned.feature_sets))   # doctest: +SKIP
>>> probabilities.shape                                                           # (N, C)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bemerc.train.tensors import Corpus, SpeakerNorm
from bemerc.train.tune.config import MICRO_BATCH_TOKENS
from bemerc.train.tune.data import DemoRetriever, Inputs, corpus_inputs, dialogue_windows, merc_examples
from bemerc.train.tune.model import MercModel, TuneInfo, collate, collate_windows, load_speaker_norm, load_tuned, micro_batches
from bemerc.train.tune.prompt import Prompter, Window
from bemerc.train.tune.score import answer_scores, label_probabilities, label_scores

class TunedModel:
    """A tuned (or zero-shot) MERC model: the LLM with its LoRA and projectors, its prompter and its
    :class:`TuneInfo` and its speaker normaliser (:class:`~bemerc.train.tensors.SpeakerNorm`, applied
    to a corpus's features as in training). :meth:`predict_proba` scores every label of the requested rows in the run's
    layout, in batches sorted by length (less padding), and puts them back in order: ``batch_size``
    prompts at a time (``utterance`` layout) or as many dialogue windows as fit in ``max_tokens``
    padded tokens (``dialogue`` layout: short windows, such as one-utterance dialogues, go many to a
    pass, long ones one or two)."""

    def __init__(self, model: MercModel, prompter: Prompter, info: TuneInfo, batch_size: int = 8,
                 device: torch.device | str = "cpu", autocast: Callable | None = None, retriever: DemoRetriever | None = None,
                 max_tokens: int = MICRO_BATCH_TOKENS, norm: SpeakerNorm | None = None):
        if info.demos and retriever is None:
            raise ValueError(f"the model was trained with {info.demos} retrieved demonstrations: pass a DemoRetriever "
                             f"(a store holding {info.demo_feature_set})")
        self.model, self.prompter, self.info = model, prompter, info
        self.batch_size, self.max_tokens, self.device = batch_size, max_tokens, torch.device(device)
        self.autocast = autocast
        self.retriever = retriever
        self.norm = norm if norm is not None else SpeakerNorm()

    @classmethod
    def load(cls, folder: str | Path, base: str | Path | None = None, store=None, **kwargs) -> "TunedModel":
        """A saved adapter folder (``RUN_DIR/adapter``) as a ready model (CPU); ``store`` is needed
        when the run shows retrieved demonstrations (they come from its train split)."""
        model, prompter, info = load_tuned(folder, base)
        kwargs.setdefault("norm", load_speaker_norm(folder))
        if info.demos and store is not None:
            kwargs["retriever"] = DemoRetriever(store, info.demo_feature_set, info.demos, info.dataset)
        return cls(model, prompter, info, **kwargs)

    @property
    def feature_sets(self) -> list[str]:
        return [s.feature_set for s in self.info.soft]

    def predict_proba(self, corpus: Corpus | Inputs, rows=None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(len(rows), C) label probabilities (all rows of ``corpus`` by default), in ``classes``
        order; ``progress(n_done, n_tokens)`` is called after every batch."""
        inputs = corpus if isinstance(corpus, Inputs) else corpus_inputs(corpus, self.info.soft, self.norm)
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
