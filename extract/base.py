"""What every feature extractor takes, returns and promises.

The orchestrator builds :class:`UtteranceMedia` items from the store, calls ``extract`` in batches and
writes one row per item: ``uid`` plus the extractor's ``fields()``. ``config_hash`` keys the feature
set, so changing a model, its weights or a setting that changes outputs makes a new feature set.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import pyarrow as pa

from bemerc.extract.media import MediaError
from bemerc.store.schema import MODALITIES

# The order `extract --modality all` runs the modalities in: audio first, its transcripts feed text.
MODALITY_ORDER = ("audio", *(m for m in MODALITIES if m != "audio"))
# What an extractor reads of an utterance (its ``inputs``; names from bemerc.store.inputs): every feature
# row records their digest, so a changed text, media file or span makes the row stale and extract redoes it.
MEDIA_INPUTS = ("media_sha256", "start_s", "end_s")
DEFAULT_INPUTS = {"text": ("spoken_text",), "audio": MEDIA_INPUTS, "behavior": MEDIA_INPUTS, "visual": MEDIA_INPUTS}
# Where an extractor's torch model runs: "auto" is CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
# Device files of a GPU driver (NVIDIA, AMD ROCm, WSL2): without any, "auto" is the CPU, known without torch.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
# The modalities whose models run on a GPU when given one; behaviour's MediaPipe and TFLite run on CPUs
# (its optional describer is the exception: an extractor's ``gpu_capable`` says so, see uses_gpu).
GPU_MODALITIES = ("text", "audio", "visual")


def resolve_precision(precision: str, device: str | None) -> str:
    """``fp32`` or ``bf16`` for an encoder on ``device`` (see :func:`resolve_device`): the rule of
    :func:`bemerc.precision.resolve` (what a feature set records of it: :meth:`TorchDevice.precision_config`)."""
    from bemerc.precision import resolve

    return resolve(precision, resolve_device(device))


class TorchDevice:
    """The device (and precision) an extractor's torch model runs on, resolved on first use from what
    it was asked for (``requested_device``, ``requested_precision``), so a run with nothing to do
    imports no torch. Text, audio and visual extractors share it."""

    requested_device: str | None = None
    requested_precision: str = "fp32"  # an extractor that runs bf16 sets the requested precision

    @cached_property
    def device(self) -> str:
        return resolve_device(self.requested_device)

    @cached_property
    def precision(self) -> str:
        return resolve_precision(self.requested_precision, self.requested_device)

    def precision_config(self) -> dict:
        """What the feature set's config records of the precision: ``{"precision": "bf16"}`` in bf16,
        nothing in fp32 (so the sets made before the option keep their ids)."""
        return {"precision": "bf16"} if self.precision == "bf16" else {}


def uses_gpu(extractor: "Extractor") -> bool:
    """Whether ``extractor``'s models would run on a GPU given one: its ``gpu_capable`` attribute when
    it has one, else whether its modality is one of :data:`GPU_MODALITIES`."""
    return bool(getattr(extractor, "gpu_capable", extractor.modality in GPU_MODALITIES))


def resolve_device(device: str | None = None) -> str:
    """``"cpu"`` or ``"cuda"`` for a requested device (None: ``$BEMERC_DEVICE``, else ``"auto"``).

    Imports torch only to look for a GPU (``"auto"``, ``"cuda"``); ``"cuda"`` on a machine where torch
    sees none is an error naming the machine.

    >>> resolve_device("cpu")
    'cpu'
    """
    device = device or os.environ.get("BEMERC_DEVICE") or "auto"
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu" or (device == "auto" and not any(os.path.exists(node) for node in GPU_DEVICE_NODES)):
        return "cpu"  # no GPU driver: torch could not see one, and is not imported to ask
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError(f"device cuda asked for, but torch sees no CUDA GPU on {socket.gethostname()} "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): use --device auto or cpu")
    return "cpu"


@dataclass(frozen=True)
class UtteranceMedia:
    """One utterance as the extractors see it.

    ``text`` is the transcript (or None); ``audio_path``/``video_path`` are media files (audio is
    preferred for speech); ``start_s``/``end_s`` cut a span out of a longer recording.
    """

    uid: str
    text: str | None = None
    video_path: str | None = None
    audio_path: str | None = None
    start_s: float | None = None
    end_s: float | None = None


# What part of an utterance each modality is computed from: text from its text; audio from its audio
# file, else the soundtrack of its video; behaviour and visual from its video. The first is preferred.
INPUT_SOURCES = {"text": ("text",), "audio": ("audio", "video"), "behavior": ("video",), "visual": ("video",)}
SOURCE_FIELDS = {"text": "text", "audio": "audio_path", "video": "video_path"}  # where UtteranceMedia holds each


def has_input(modality: str, item: "UtteranceMedia | Mapping") -> bool:
    """Whether ``item`` (an :class:`UtteranceMedia`, or a row with its field names) has what
    ``modality`` is computed from (:data:`INPUT_SOURCES`); an utterance without it gets no row.

    >>> has_input("audio", UtteranceMedia(uid="u", video_path="a.mp4")), has_input("visual", {"audio_path": "a.wav"})
    (True, False)
    """
    get = item.get if isinstance(item, Mapping) else lambda name: getattr(item, name, None)
    return any(get(SOURCE_FIELDS[source]) for source in INPUT_SOURCES[modality])


@runtime_checkable
class Extractor(Protocol):
    """A feature extractor of one modality ("text", "audio", "behavior" or "visual")."""

    modality: str
    name: str
    random_weights: bool
    # The utterance inputs its outputs depend on: utterances-table columns or bemerc.store.inputs.DERIVED
    # names (``spoken_text``: the text, or the stored transcript without one). See extractor_inputs.
    inputs: tuple[str, ...]

    def config(self) -> dict:
        """Everything that changes the outputs (model id, weight sha256, pooling, ...), JSON-serialisable."""
        ...

    def fields(self) -> list[pa.Field]:
        """Output columns except ``uid``; the main embedding is ``vector`` (fixed_size_list<float32>)."""
        ...

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        """One result per item, in order: a row dict keyed by ``fields()`` names, or a MediaError."""
        ...


def extractor_inputs(extractor: Extractor) -> tuple[str, ...]:
    """What ``extractor`` reads of an utterance: its ``inputs``, else its modality's
    :data:`DEFAULT_INPUTS` (an extractor that reads more must say so).

    >>> class Fake:
    ...     modality = "visual"
    >>> extractor_inputs(Fake())
    ('media_sha256', 'start_s', 'end_s')
    """
    return tuple(getattr(extractor, "inputs", None) or DEFAULT_INPUTS[extractor.modality])


def feature_set_id(extractor: Extractor) -> str:
    """The id of the feature set ``extractor`` writes, ``{modality}/{name}@{config_hash}``, as
    :attr:`bemerc.store.FeatureSet.id` spells it."""
    return f"{extractor.modality}/{extractor.name}@{config_hash(extractor)}"


def config_hash(extractor: Extractor) -> str:
    """Stable 12-hex-digit key of an extractor's config (sha256 of its sorted JSON).

    >>> class Fake:
    ...     def config(self): return {"model": "m", "pooling": "mean"}
    >>> config_hash(Fake())
    'd63339b96abb'
    """
    text = json.dumps(extractor.config(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def vector_field(name: str, dim: int) -> pa.Field:
    """A ``fixed_size_list<float32>[dim]`` column, the type of every embedding column."""
    return pa.field(name, pa.list_(pa.float32(), dim))
