"""The tuned model as a run leaves it, one home for the training loop's evaluation and saving,
``/predict`` and any caller from Python: the adapter folder (:func:`save_adapter`, :func:`load_tuned`:
weights, :class:`TuneInfo`, prompt templates, speaker normaliser), and a :class:`TunedModel` that
scores every label of every utterance of a :class:`~bemerc.train.tensors.Corpus`, in the layout the
run was trained with.

>>> tuned = TunedModel.load("store/runs/tune-20261130-190000-ab12/adapter")      # doctest: +SKIP
>>> probabilities = tuned.predict_proba(load_corpus(store, tuned.feature_sets, dict.fromkeys(tuned.feature_sets)))  # doctest: +SKIP
>>> probabilities.shape                                                           # (N, C)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bemerc.train.tensors import Corpus, SpeakerNorm
from bemerc.train.tune.config import MICRO_BATCH_TOKENS
from bemerc.train.tune.data import DemoRetriever, Inputs, SoftInput, corpus_inputs, prompt_batches, window_batches
from bemerc.train.tune.model import LEGACY_SPEAKER_KEYS, MercModel, base_dtype, load_llm
from bemerc.train.tune.prompt import Prompter, load_template
from bemerc.train.tune.score import answer_scores, label_probabilities, label_scores


@dataclass
class TuneInfo:
    """What a saved adapter needs besides its weights to be used again (``tune.json``): the base
    model, the label set and its order, the prompt layout and its settings, and the soft inputs the
    projectors expect. Saved beside the weights, as whisper keeps ``ModelDimensions`` in its
    checkpoint, so an adapter folder explains itself."""

    base_model: str
    classes: list[str]
    layout: str = "utterance"  # utterance | dialogue (see bemerc.train.tune.prompt)
    context: int = 3  # utterance layout: previous turns in each prompt
    max_len: int = 512  # tokens of a prompt (utterance) or a window (dialogue)
    overlap: int = 2  # dialogue layout: turns repeated as context at the start of the next window
    demos: int = 0  # retrieved labelled train utterances shown before the dialogue
    demo_feature_set: str | None = None  # the text feature set the demonstrations are retrieved by
    normalize_scores: bool = False
    dataset: str | None = None
    soft: list[SoftInput] = field(default_factory=list)
    precision: str = "fp32"  # what the run trained and scored in (fp32 | bf16); loading uses it, so predictions match the run's

    @classmethod
    def from_dict(cls, values: dict) -> "TuneInfo":
        known = {f.name for f in fields(cls)}
        info = cls(**{k: v for k, v in values.items() if k in known})
        info.soft = [s if isinstance(s, SoftInput) else SoftInput(**s) for s in info.soft]
        return info


def save_adapter(model: MercModel, folder: Path, info: TuneInfo, templates: dict[str, str], norm: SpeakerNorm | None = None) -> Path:
    """Write the LoRA adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``)
    plus ``projectors.safetensors``, ``tune.json`` (:class:`TuneInfo`), the prompt templates and the
    speaker normaliser (``speaker_norm.safetensors``, when the run normalises a modality per speaker),
    so ``PeftModel.from_pretrained(base, folder)``, :func:`load_tuned` and :func:`load_speaker_norm` work."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(str(folder))
    projectors = {k: v.contiguous() for k, v in model.projectors.state_dict().items()}
    if projectors:
        save_file(projectors, str(folder / "projectors.safetensors"))
    (folder / "tune.json").write_text(json.dumps(asdict(info), indent=2))
    if norm is not None:
        norm.save(folder)
    (folder / "prompts").mkdir(exist_ok=True)
    for name, text in templates.items():
        (folder / "prompts" / f"{name}.toml").write_text(text)
    return folder


def load_projectors(model: MercModel, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load projector weights; an adapter saved before input standardisation (no ``shift``/``scale``)
    keeps the identity scaling it was trained with; one saved before ``speaker_norm.safetensors``
    holds speaker statistics in its projectors (read by :func:`load_speaker_norm`, left out here)."""
    state = {k: v for k, v in state.items() if not k.endswith(LEGACY_SPEAKER_KEYS)}
    missing, unexpected = model.projectors.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".shift", ".scale"))]
    if missing or unexpected:
        raise ValueError(f"{folder}: projector weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_tuned(folder: str | Path, base: str | Path | None = None) -> tuple[MercModel, Prompter, TuneInfo]:
    """(model, prompter, info) of an adapter saved by :func:`save_adapter`: the prompter has the
    run's templates, classes, context and soft tokens. ``base`` defaults to the base model the
    adapter was trained on.

    >>> model, prompter, info = load_tuned("store/runs/tune-20261122-031500-4f2a/adapter")   # doctest: +SKIP
    >>> info.layout, info.classes[:2]                                                         # doctest: +SKIP
    ('dialogue', ['neutral', 'surprise'])
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "tune.json").is_file():
        raise FileNotFoundError(f"{folder}: not a bemerc adapter folder (no tune.json)")
    info = TuneInfo.from_dict(json.loads((folder / "tune.json").read_text()))
    llm, tokenizer = load_llm(base or info.base_model, base_dtype(info.precision, cuda=False))
    llm = PeftModel.from_pretrained(llm, str(folder))
    model = MercModel(llm, info.soft)
    if (folder / "projectors.safetensors").is_file():
        load_projectors(model, load_file(str(folder / "projectors.safetensors")), folder)
    prompter = Prompter(tokenizer, info.classes, info.context, {s.modality: s.n_tokens for s in model.soft.values()},
                        load_template(folder / "prompts" / "merc.toml"), load_template(folder / "prompts" / "align.toml"),
                        info.max_len)
    return model.eval(), prompter, info


def load_speaker_norm(folder: str | Path) -> SpeakerNorm:
    """The speaker normaliser saved with an adapter (``speaker_norm.safetensors``); for an adapter
    saved before that file, the statistics its projectors held as ``speaker_mean``/``speaker_std``
    buffers. Empty when the run normalised nothing per speaker."""
    folder = Path(folder)
    norm = SpeakerNorm.load(folder)
    if norm is not None:
        return norm
    if not (folder / "projectors.safetensors").is_file():
        return SpeakerNorm()
    from safetensors import safe_open

    with safe_open(str(folder / "projectors.safetensors"), framework="numpy") as fh:
        names = [n for n in fh.keys() if n.endswith(LEGACY_SPEAKER_KEYS[0])]
        return SpeakerNorm({n.split(".")[0]: (fh.get_tensor(n), fh.get_tensor(n[: -len("mean")] + "std")) for n in names})


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
            first_ids = self.prompter.answer_first_ids()
            for chunk, batch in window_batches(self.prompter, inputs, rows, self.info.overlap, demos, self.max_tokens, self.device):
                with self._autocast():
                    scores, answered = answer_scores(self.model, batch, chunk, first_ids)
                scored.update(zip(answered, label_probabilities(scores)))
                if progress:
                    progress(sum(w.new.count(True) for w in chunk), batch.tokens)
        else:
            label_ids = self.prompter.label_ids()
            for index, batch in prompt_batches(self.prompter, inputs, rows, self.batch_size, self.device):
                with self._autocast():
                    scores = label_scores(self.model, batch, label_ids, self.info.normalize_scores)
                scored.update(zip(rows[index].tolist(), label_probabilities(scores)))
                if progress:
                    progress(len(index), batch.tokens)
        return np.stack([scored[int(r)] for r in rows]) if len(rows) else np.zeros((0, len(self.info.classes)), np.float32)

    def _autocast(self):
        """The caller's autocast (tuning passes its accelerator's), else the run's precision."""
        if self.autocast is not None:
            return self.autocast()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.info.precision == "bf16")
