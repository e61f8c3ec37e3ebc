"""The tuning run's settings (:class:`TuneConfig`) and the names they choose from: light (no torch), so
the CLI builds its ``--help`` defaults from here and every default has one home.

>>> TuneConfig(model="m").epochs
2
>>> TuneConfig(model="m", layout="utterance").max_len
512
"""

from __future__ import annotations

from dataclasses import dataclass

from bemerc.precision import DEFAULT_PRECISION, PRECISIONS

# padded tokens one forward pass holds (a training batch over it is cut into micro-batches with gradient
# accumulation; evaluation batches windows up to it): bounds memory; peak RSS per window length is in
# docs/tune.md (Tune memory)
MICRO_BATCH_TOKENS = 2048
STAGES = {"align": ["align"], "project": ["project"], "merc": ["merc"], "all": ["align", "project", "merc"]}
LAYOUTS = ("dialogue", "utterance")
SOFT_MODALITIES = ("text", "audio", "behavior")  # projected by default when the store has them
# Soft modalities that embed the words the LLM already reads: the project stage leaves them out (their
# projector learns in merc, beside the words); it exists for what the words do not say.
WORDS_MODALITIES = ("text",)
DEFAULT_MAX_LEN = {"utterance": 512, "dialogue": 1024}


def project_modalities(soft) -> list[str]:
    """The soft modalities (names, in order) that the ``project`` stage trains: all but
    :data:`WORDS_MODALITIES`.

    >>> project_modalities(["text", "audio", "behavior"])
    ['audio', 'behavior']
    """
    return [m for m in soft if m not in WORDS_MODALITIES]


class TuneError(ValueError):
    """A tuning request that cannot run (no data, unknown modality, bad option); one-line message."""


@dataclass
class TuneConfig:
    """Everything that defines a tuning run (saved in the run's config and checkpoint)."""

    model: str  # a local Hugging Face folder or a hub id
    stage: str = "all"  # align | project | merc | all (the three in that order)
    run_dir: str | None = None  # default: inside the store (see bemerc.store.runs.default_run_dir)
    dataset: str | None = None  # needed when the store holds several datasets
    modalities: list[str] | None = None  # projected to soft tokens; None = text, audio and behavior when stored
    layout: str = "dialogue"  # dialogue: one sequence per dialogue; utterance: one prompt per utterance
    context: int = 3  # utterance layout: previous utterances shown in the prompt
    overlap: int = 2  # dialogue layout: turns repeated as context when a dialogue needs several windows
    demos: int = 0  # K retrieved labelled train utterances shown before each dialogue (0 = none)
    train_limit: int | None = None  # first N train utterances (whole dialogues)
    eval_limit: int | None = None  # first N utterances of each eval split (whole dialogues)
    epochs: int = 2  # merc epochs (chosen on RAVDESS and MELD dev; docs/tune.md, Epochs)
    align_epochs: int = 1
    project_epochs: int = 1  # epochs of the project stage (0 = none)
    batch_size: int = 4  # utterances (utterance layout) or dialogue windows (dialogue layout) per step
    micro_batch_tokens: int = MICRO_BATCH_TOKENS  # padded tokens per forward pass; a step's batch is cut to fit (memory)
    lr: float = 1e-3
    align_lr: float = 1e-3
    projector_lr: float | None = None  # learning rate of the projectors in every stage (None: the stage's own)
    warmup: float = 0.05  # share of the steps with a linear warm-up, then cosine decay to 10%
    weight_decay: float = 0.0
    balance: float = 0.5  # class-balanced loss: example weight (class share * n_classes) ** -balance
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # 0.05 cost a quarter of a bf16 step (its masks) for no dev gain on MELD (docs/tune.md, Precision)
    lora_layers: int | None = None  # LoRA on the top N decoder blocks only (None = all)
    align_lora: bool = False
    max_len: int | None = None  # tokens of a prompt (512; context dropped beyond it) or a window (1024)
    normalize_scores: bool = False  # label score = mean instead of sum of token log-probs
    speaker_norm: bool = True  # normalise audio/behaviour/visual soft inputs per speaker (bemerc.train.tensors.normalise_speakers)
    zero_shot: bool = False  # no training: score labels with the base model (no LoRA, no soft tokens)
    seed: int = 0
    threads: int = 2  # torch CPU threads
    precision: str = DEFAULT_PRECISION  # auto | fp32 | bf16: frozen base weights and matmuls (bemerc.precision); LoRA, projectors and optimiser stay fp32
    gradient_checkpointing: bool | None = None  # None = on when a GPU is used
    checkpoint_every: int = 50
    stop_after: int | None = None  # stop (with a checkpoint) after this many optimiser steps of the run
    progress: bool = True
    merc_prompt: str | None = None  # template name or .toml path; default: the layout's (dialogue or merc)
    align_prompt: str = "align"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TuneError(f"--stage must be one of {', '.join(STAGES)}, found {self.stage!r}")
        if self.precision not in PRECISIONS:
            raise TuneError(f"--precision must be one of {', '.join(PRECISIONS)}, found {self.precision!r}")
        if self.layout not in LAYOUTS:
            raise TuneError(f"--layout must be one of {', '.join(LAYOUTS)}, found {self.layout!r}")
        if self.max_len is None:
            self.max_len = DEFAULT_MAX_LEN[self.layout]
        if self.merc_prompt is None:
            self.merc_prompt = "dialogue" if self.layout == "dialogue" else "merc"
        for name in ("demos", "overlap", "context", "epochs", "align_epochs", "project_epochs"):
            if getattr(self, name) < 0:
                raise TuneError(f"{name} must be 0 or more, found {getattr(self, name)}")
        for name in ("batch_size", "lora_r", "checkpoint_every", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise TuneError(f"{name} must be positive, found {getattr(self, name)}")
