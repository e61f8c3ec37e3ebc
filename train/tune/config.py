"""The tuning run's settings (:class:`TuneConfig`) and the names they choose from: light (no torch), so
the CLI builds its ``--help`` defaults from here and every default has one home.

>>> TuneConfig(model="m").epochs
2
>>> TuneConfig(model="m", layout="utterance").max_len
512
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path

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


def option(default=MISSING, help: str = "", **cli):
    """A :class:`TuneConfig` field that ``bemerc tune`` offers as an option (the CLI builds its options
    from these, in field order): ``help`` is its --help text; ``cli`` holds what the option needs besides
    (typer settings ``min``, ``max``, ``show_default``, ``flag``: the option's one name, ``choices``: the
    names it takes, ``cli_type``: the type the command line reads, ``parse``: text -> the field's
    value, ``always``: passed with its default even when not given, ``shared``: the CLI's common option of
    that name). An option left out on the command line leaves the field's default."""
    return field(default=default, metadata={"help": help, **cli})


def parse_modalities(text: str) -> list[str]:
    """``--modalities``: comma-separated names, or ``none``.

    >>> parse_modalities("audio, behavior"), parse_modalities("none")
    (['audio', 'behavior'], [])
    """
    return [m for m in parse_names(text) if m != "none"]


def parse_names(text: str) -> list[str]:
    """Comma-separated names (``--lora-modules``).

    >>> parse_names("q_proj, v_proj")
    ['q_proj', 'v_proj']
    """
    return [m.strip() for m in text.split(",") if m.strip()]


@dataclass
class TuneConfig:
    """Everything that defines a tuning run (saved in the run's config and checkpoint). The fields
    made with :func:`option` are ``bemerc tune``'s options, in this order, with their help."""

    model: str = option(help="Hugging Face causal LM: a local folder or a hub id. Default: the LLM of --profile.")
    stage: str = option("all", choices=tuple(STAGES), always=True, help=(
        "align: the behaviour projector learns to describe behaviour; project: the voice and behaviour projectors (not the text "
        "embedding's) learn, with the LLM frozen, to answer the emotion from their soft tokens alone; merc: emotion instruction "
        "tuning (LoRA and projectors); all: the three in that order (align is skipped without behaviour descriptions, project "
        "without a voice or behaviour modality)."))
    layout: str = option("dialogue", choices=LAYOUTS, help=(
        "dialogue: one sequence per dialogue, every turn answered in one pass (labels scored by their first token); utterance: "
        "one prompt per utterance with its last --context turns."))
    run_dir: str | None = option(None, cli_type=Path, help="Output folder (default: runs/<run_id> inside the store).")
    dataset: str | None = option(None, help="Dataset to use when the store holds several.")
    modalities: list[str] | None = option(None, cli_type=str, parse=parse_modalities, help=(  # None = text, audio and behavior when stored
        "Comma-separated modalities projected to soft tokens, or 'none'. Default: text, audio and behavior when stored."))
    context: int = option(3, help="utterance layout: previous utterances shown in the prompt.")
    overlap: int = option(2, help="dialogue layout: turns repeated as context when a long dialogue is split into windows.")
    demos: int = option(0, help=("Show the K nearest labelled train utterances (by stored text embedding, never the same dialogue) "
                                 "before each dialogue."))
    max_len: int | None = option(None, help=(  # context dropped beyond it (utterance layout)
        f"Tokens of a prompt (utterance layout, {DEFAULT_MAX_LEN['utterance']}) or a window (dialogue layout, {DEFAULT_MAX_LEN['dialogue']})."))
    train_limit: int | None = option(None, help="Train on the first N train utterances (whole dialogues, store order).")
    eval_limit: int | None = option(None, help="Evaluate on the first N utterances of each labelled eval split, dev and test (whole dialogues).")
    epochs: int = option(2, help="Epochs of the merc stage.")  # chosen on RAVDESS and MELD dev; docs/tune.md, Epochs
    align_epochs: int = option(1, help="Epochs of the align stage.")
    project_epochs: int = option(1, help="Epochs of the project stage (0: none).")
    lr: float = option(1e-3, help="Peak learning rate of the merc stage (and of the project stage unless --projector-lr).")
    align_lr: float = option(1e-3, help="Peak learning rate of the align stage.")
    projector_lr: float | None = option(None, help=(
        "Peak learning rate of the projectors in every stage. Default: the stage's own (--lr, --align-lr)."))
    batch_size: int = option(4, help="Utterances (utterance layout) or dialogue windows (dialogue layout) per optimiser step and device.")
    micro_batch_tokens: int = option(MICRO_BATCH_TOKENS, min=1, help=(  # a step's batch is cut to fit (memory)
        "Padded tokens per forward pass: a batch over it is trained in micro-batches with gradient accumulation (same step, "
        "bounded memory; peak memory per window length: docs/tune.md, Tune memory)."))
    balance: float = option(0.5, help=(  # example weight (class share * n_classes) ** -balance
        "Class-balanced loss: weight examples by (class share) ** -BALANCE (0 = off, 0.5 = inverse square root, 1 = inverse frequency)."))
    lora_r: int = option(8, help="LoRA rank (alpha = 2 * rank).")
    lora_dropout: float = option(0.0, min=0.0, max=0.9, help=(  # 0.05 cost a quarter of a bf16 step for no dev gain on MELD (docs/tune.md, Precision)
        "Dropout on the LoRA layers' inputs (its masks cost as much as the MLP's bf16 work on a CPU)."))
    lora_layers: int | None = option(None, help="LoRA on the top N decoder blocks only (faster, but learns much less). Default: all.")
    lora_modules: list[str] | None = option(None, cli_type=str, parse=parse_names, help=(  # None = every linear layer; q_proj,v_proj: 1.4x a step, MELD dev 0.573 vs 0.621 (docs/tune.md)
        "Comma-separated linear layers of each decoder block that get LoRA (e.g. q_proj,v_proj). Default: all of them."))
    speaker_norm: bool = option(True, shared=True)  # normalise audio/behaviour/visual soft inputs per speaker (bemerc.train.tensors.SpeakerNorm)
    normalize_scores: bool = option(False, flag="--normalize-scores", show_default=False, help=(  # mean instead of sum of token log-probs
        "utterance layout: score a label by its mean token log-probability instead of the sum."))
    zero_shot: bool = option(False, always=True, help="No training: evaluate the base model by label scoring (no LoRA, no soft tokens).")
    seed: int = option(0, help="Seed of initialisation, data order and dropout.")
    threads: int = option(2, help="Torch CPU threads.")
    precision: str = option(DEFAULT_PRECISION, shared=True)  # auto | fp32 | bf16: frozen base weights and matmuls (bemerc.precision); LoRA, projectors and optimiser stay fp32
    checkpoint_every: int = option(50, help="Write RUN_DIR/checkpoint.pt every N optimiser steps.")
    stop_after: int | None = option(None, help="Stop after N optimiser steps with a checkpoint (continue with --resume).")
    # not options of `bemerc tune`
    warmup: float = 0.05  # share of the steps with a linear warm-up, then cosine decay to 10%
    weight_decay: float = 0.0
    lora_alpha: int = 16  # `bemerc tune --lora-r R` sets it to 2 * R
    align_lora: bool = False
    gradient_checkpointing: bool | None = None  # None = on when a GPU is used
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
        if self.lora_modules is not None and not self.lora_modules:
            raise TuneError("--lora-modules names no layer (leave it out for all of them)")
        for name in ("batch_size", "lora_r", "checkpoint_every", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise TuneError(f"{name} must be positive, found {getattr(self, name)}")
