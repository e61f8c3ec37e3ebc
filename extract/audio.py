"""Speech features: Whisper encoder states pooled over the utterance, eGeMAPS functionals, a transcript.

The stock Whisper pipeline pads every input to 30 s (1500 encoder positions) before encoding. A
MELD utterance lasts about 3 s, so :meth:`AudioExtractor.encode` runs the encoder on the real
frames only: the mel spectrogram of the utterance (100 frames/s), the two convolutions (the second
halves the frames to 50/s), the positional embedding sliced to that length, the blocks. The states
are then pooled over exactly the utterance, with nothing from the padding in them.
"""

from __future__ import annotations

from functools import cached_property

import json
import os

import numpy as np
import pyarrow as pa

from bemerc.extract.base import MEDIA_INPUTS, UtteranceMedia, resolve_device, vector_field
from bemerc.extract.media import SAMPLE_RATE, MediaError, decode_audio
from bemerc.models.profiles import Profile, ProfileError, load_profile, model_path

HOP = 160  # samples per mel frame at 16 kHz (10 ms), as in whisper.audio
MAX_FRAMES = 3000  # Whisper's context: 30 s of mel frames; longer audio is encoded in 30 s windows
POOLINGS = ("mean", "mean+std")


class AudioExtractor:
    """Whisper encoder embedding, eGeMAPSv02 functionals and (when needed) a Whisper transcript.

    The transcript is computed only for items without text, or for all items when built with
    ``transcribe=True``: decoding costs several times the encoding.

    >>> extractor = AudioExtractor("offline")  # doctest: +SKIP
    >>> row = extractor.extract([UtteranceMedia(uid="u1", audio_path="speech.wav")])[0]  # doctest: +SKIP
    >>> row["vector"].shape, row["egemaps"].shape, row["transcript"]  # doctest: +SKIP
    ((1024,), (88,), 'Kids are talking by the door.')
    """

    modality = "audio"

    def __init__(
        self,
        profile: Profile | str = "offline",
        *,
        transcribe: bool = False,
        pooling: str = "mean+std",
        silence_dbfs: float = -60.0,
        min_duration_s: float = 0.1,
        language: str = "en",
        num_threads: int | None = None,
        device: str | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        profile = load_profile(profile) if isinstance(profile, str) else profile
        self.entry = profile.stage("speech")
        self.name = self.entry.model_id
        self.random_weights = self.entry.random_weights
        self.transcribe = transcribe
        self.inputs = MEDIA_INPUTS + (() if transcribe else ("has_text",))  # transcribes when the text is blank
        self.pooling = pooling
        self.silence_dbfs = silence_dbfs
        self.min_duration_s = min_duration_s
        self.language = language
        self.num_threads = num_threads or os.cpu_count() or 1
        self.requested_device = device  # resolved with the model: a run with nothing to do imports no torch
        self.path = model_path(profile, "speech")
        # torch, whisper and opensmile load on first use (dims, smile, model), so a re-run with
        # nothing to do imports none of them.

    @cached_property
    def dim(self) -> int:
        """Width of ``vector``: the encoder width, twice for mean+std pooling."""
        import torch

        try:
            # Only the checkpoint's dims here (memory-mapped): the weights load with the model.
            dims = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)["dims"]
        except Exception as exc:  # torch.load raises many types
            raise ProfileError(f"{self.entry.label}: cannot load a whisper checkpoint from {self.path}: {exc}") from exc
        return int(dims["n_audio_state"]) * (2 if self.pooling == "mean+std" else 1)

    @cached_property
    def smile(self):
        import opensmile

        return opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                               feature_level=opensmile.FeatureLevel.Functionals)

    @cached_property
    def device(self) -> str:
        return resolve_device(self.requested_device)

    @cached_property
    def model(self):
        import whisper

        try:
            return whisper.load_model(str(self.path), device=self.device).eval()
        except Exception as exc:  # torch.load and load_state_dict raise many types
            raise ProfileError(f"{self.entry.label}: cannot load a whisper checkpoint from {self.path}: {exc}") from exc

    def config(self) -> dict:
        return {
            "model": self.name,
            "source": self.entry.source,
            "weights_sha256": self.entry.sha256,
            "encoder": "true-length",
            "pooling": self.pooling,
            "egemaps": "eGeMAPSv02-functionals",
            "silence_dbfs": self.silence_dbfs,
            "min_duration_s": self.min_duration_s,
            "language": self.language,
        }

    def fields(self) -> list[pa.Field]:
        names = json.dumps(list(self.smile.feature_names))
        return [
            vector_field("vector", self.dim),
            vector_field("egemaps", len(self.smile.feature_names)).with_metadata({"names": names}),
            pa.field("transcript", pa.string()),
            pa.field("duration_s", pa.float32()),
        ]

    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """Encoder states of 16 kHz mono ``audio`` over its true length: shape (ceil(frames / 2), n_state).

        Audio longer than 30 s is encoded in consecutive 30 s windows, as Whisper's context allows.
        """
        import torch
        import torch.nn.functional as F
        import whisper

        encoder = self.model.encoder
        mel = whisper.log_mel_spectrogram(torch.from_numpy(audio).to(self.device), n_mels=self.model.dims.n_mels)  # (n_mels, T)
        states = []
        with torch.inference_mode():
            for start in range(0, mel.shape[1], MAX_FRAMES):
                x = mel[None, :, start : start + MAX_FRAMES]  # (1, n_mels, T)
                x = F.gelu(encoder.conv1(x))
                x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (1, T', n_state), T' = ceil(T / 2)
                x = x + encoder.positional_embedding[: x.shape[1]]
                for block in encoder.blocks:
                    x = block(x)
                states.append(encoder.ln_post(x)[0])
        return torch.cat(states)

    def pool(self, states: torch.Tensor) -> np.ndarray:
        """Pool (T', n_state) states into one float32 vector of size ``dim``."""
        import torch

        parts = [states.mean(0)]
        if self.pooling == "mean+std":
            parts.append(states.std(0, unbiased=False))
        return torch.cat(parts).float().cpu().numpy().astype(np.float32)

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        import torch

        torch.set_num_threads(self.num_threads)
        return [self._extract_one(item) for item in items]

    def _extract_one(self, item: UtteranceMedia) -> dict | MediaError:
        path = item.audio_path or item.video_path
        if not path:
            return MediaError(item.uid, "no audio or video path")
        try:
            audio = decode_audio(path, start_s=item.start_s, end_s=item.end_s)
        except MediaError as err:
            return err
        duration = len(audio) / SAMPLE_RATE
        if duration < self.min_duration_s:
            return MediaError(path, f"audio too short ({duration:.3f} s < {self.min_duration_s} s)")
        rms_dbfs = 20 * np.log10(max(float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), 1e-10))
        if rms_dbfs < self.silence_dbfs:
            return MediaError(path, f"silent audio (RMS {rms_dbfs:.0f} dBFS < {self.silence_dbfs:.0f} dBFS)")

        transcript = None
        if self.transcribe or not (item.text or "").strip():
            result = self.model.transcribe(audio, language=self.language, fp16=False, temperature=0.0,
                                           condition_on_previous_text=False)
            transcript = result["text"].strip()
        return {
            "vector": self.pool(self.encode(audio)),
            "egemaps": self.smile.process_signal(audio, SAMPLE_RATE).to_numpy()[0].astype(np.float32),
            "transcript": transcript,
            "duration_s": np.float32(duration),
        }
