"""Sentence embeddings of utterance texts: a transformer encoder, mean-pooled and L2-normalised.

This is what sentence-transformers computes for models such as all-MiniLM-L6-v2 (Transformer ->
mean Pooling -> Normalize), done with plain ``transformers`` so the model loads through
``AutoModel.from_pretrained(dir)``. Utterances are sorted by length so each batch pads little.
"""

from __future__ import annotations

from functools import cached_property

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from bemerc.extract.base import TorchDevice, UtteranceMedia, vector_field
from bemerc.extract.media import MediaError
from bemerc.models.profiles import DEFAULT_PROFILE, Profile, ProfileError, load_profile, model_path
from bemerc.precision import DEFAULT_PRECISION, torch_dtype


class TextExtractor(TorchDevice):
    """Embed ``item.text`` with the ``text`` stage of a profile.

    >>> extractor = TextExtractor("offline")  # doctest: +SKIP
    >>> extractor.embed(["I am so happy!", "This is awful."]).shape  # doctest: +SKIP
    (2, 384)
    """

    modality = "text"
    inputs = ("spoken_text",)  # the utterance's text, else its stored transcript

    def __init__(
        self,
        profile: Profile | str = DEFAULT_PROFILE,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        num_threads: int | None = None,
        device: str | None = None,
        precision: str = DEFAULT_PRECISION,
    ):
        profile = load_profile(profile) if isinstance(profile, str) else profile
        self.entry = profile.stage("text")
        self.requested_device = device  # resolved with the model: a run with nothing to do imports no torch
        self.requested_precision = precision
        self.name = self.entry.model_id
        self.random_weights = self.entry.random_weights
        self.batch_size = batch_size
        self.num_threads = num_threads or os.cpu_count() or 1
        path = model_path(profile, "text")
        _check_mean_pooling(path, self.entry.label)
        self.path = path
        # Only the model folder's config.json here, read without transformers: the library and the
        # weights load on first use, so a re-run with nothing to do imports neither.
        self.dim = _hidden_size(path, self.entry.label)
        self.max_length = max_length or _max_seq_length(path) or min(self.tokenizer.model_max_length, 512)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    @cached_property
    def model(self):
        from transformers import AutoModel

        try:  # weights held in the precision's dtype, not cast on every call
            return AutoModel.from_pretrained(self.path, dtype=torch_dtype(self.precision)).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ProfileError(f"{self.entry.label}: cannot load a text encoder from {self.path}: {exc}") from exc

    def config(self) -> dict:
        return {
            "model": self.name,
            "source": self.entry.source,
            "weights_sha256": self.entry.sha256,
            "pooling": "mean",
            "normalize": True,
            "max_length": self.max_length,
            **self.precision_config(),
        }

    def fields(self) -> list[pa.Field]:
        return [vector_field("vector", self.dim)]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings, float32 array of shape (len(texts), dim), in input order."""
        import torch

        torch.set_num_threads(self.num_threads)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                tokens = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**tokens).last_hidden_state.float()  # (B, T, dim); pooled in fp32
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        texts = [(item.text or "").strip() for item in items]
        keep = [i for i, text in enumerate(texts) if text]
        vectors = self.embed([texts[i] for i in keep]) if keep else np.zeros((0, self.dim), np.float32)
        results: list[dict | MediaError] = [MediaError(item.uid, "no text") for item in items]
        for row, i in enumerate(keep):
            results[i] = {"vector": vectors[row]}
        return results


def _hidden_size(path: Path, label: str) -> int:
    """Width of the encoder's hidden states, from the model folder's ``config.json``."""
    try:
        return int(json.loads((path / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"{label}: cannot load a text encoder from {path}: no hidden_size in its config.json ({exc})") from exc


def _max_seq_length(path: Path) -> int | None:
    """The sequence length a sentence-transformers folder was trained with, when it says."""
    config = path / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length") if config.is_file() else None


def _check_mean_pooling(path: Path, label: str) -> None:
    config = path / "1_Pooling" / "config.json"
    if config.is_file() and not json.loads(config.read_text()).get("pooling_mode_mean_tokens", False):
        raise ProfileError(f"{label}: {config} asks for a pooling other than mean, which bemerc does not do")
