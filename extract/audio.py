"""Speech features: Whisper encoder states pooled over the utterance, eGeMAPS functionals, a transcript.

The stock Whisper pipeline pads every input to 30 s (1500 encoder positions) before encoding. A
MELD utterance lasts about 3 s, so :meth:`AudioExtractor.encode` runs the encoder on the real
frames only: the mel spectrogram of the utterance (100 frames/s), the two convolutions (the second
halves the frames to 50/s), the positional embedding sliced to that length, the blocks. The states
are then pooled over exactly the utterance, with nothing from the padding in them.

The states pooled are those of the encoder layers the profile names (option ``layers`` of the
speech stage): 0 is the input of the first block (convolutions + positional embedding), k the
output of block k, and the last layer is taken after ``ln_post``, as the stock encoder returns it.
Several layers are averaged frame by frame, then pooled over the voiced frames only
(:func:`voiced_frames`: room silence and pauses left out), so ``vector`` keeps one width. The middle
layers carry more of the speaker's emotion than the last one, which is specialised for
transcription (docs/audio.md, measured with ``bench/audio_layers.py``); blocks above the deepest layer kept
are not run.

Silence is judged on the loudest part of the signal (:func:`loudness_dbfs`): quiet speech with a
second of room silence on each side is speech; only digital silence and near-silence fail.
"""

from __future__ import annotations

from functools import cached_property

import json
import os

import numpy as np
import pyarrow as pa

from bemerc.extract.base import MEDIA_INPUTS, TorchDevice, UtteranceMedia, vector_field
from bemerc.extract.media import SAMPLE_RATE, MediaError, decode_audio
from bemerc.models.profiles import DEFAULT_PROFILE, Profile, ProfileError, load_profile, model_path
from bemerc.precision import DEFAULT_PRECISION, torch_dtype

HOP = 160  # samples per mel frame at 16 kHz (10 ms), as in whisper.audio
MAX_FRAMES = 3000  # Whisper's context: 30 s of mel frames; longer audio is encoded in 30 s windows
POOLINGS = ("mean", "mean+std")
LOUDNESS_WINDOW_S = 0.1  # silence is judged on the RMS of the loudest window of this length
SILENCE_DBFS = -85.0  # loudest-window RMS below this is silent: digital silence or near-silence (16-bit LSB: -90)
DEFAULT_LAYERS = (-1,)  # the last layer (after ln_post) when a profile names none
FRAMES = ("all", "voiced")  # which encoder frames are pooled
VOICED_DB = 35.0  # a 20 ms encoder frame is voiced when its RMS is within this of the loudest 100 ms window
FRAME_SAMPLES = 2 * HOP  # one encoder frame: two mel frames (20 ms)
DECODE_AHEAD = 2  # threads that decode a batch's audio (ffmpeg processes) and compute eGeMAPS ahead of the encoder


def loudness_dbfs(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, window_s: float = LOUDNESS_WINDOW_S) -> float:
    """RMS level in dBFS of the loudest ``window_s`` window of ``audio`` (consecutive windows; the
    whole signal when shorter); about -200 for digital silence.

    A whole-clip RMS counts the room silence around an utterance: a quiet utterance with a second of
    silence each side reads ~20 dB lower than its speech. The loudest window hears the speech only.

    >>> round(loudness_dbfs(np.r_[np.zeros(32_000), 0.01 * np.ones(1_600), np.zeros(32_000)].astype(np.float32)))
    -40
    """
    size = max(1, int(round(window_s * sample_rate)))
    x = np.asarray(audio, dtype=np.float64)
    full = len(x) // size * size
    levels = [np.sqrt((x[:full].reshape(-1, size) ** 2).mean(axis=1)).max()] if full else []
    if len(x) > full:  # a tail shorter than a window (or the whole of a short signal) counts as one
        levels.append(np.sqrt((x[full:] ** 2).mean()))
    return 20 * float(np.log10(max(max(levels, default=0.0), 1e-10)))


def voiced_frames(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """(n_frames,) bool: the 20 ms encoder frames of ``audio`` whose RMS is within :data:`VOICED_DB`
    of its loudest 100 ms window (:func:`loudness_dbfs`); room silence and breaths fall out.

    >>> voiced_frames(np.r_[np.zeros(3_200), 0.1 * np.ones(1_600)].astype(np.float32), 15).nonzero()[0].tolist()
    [10, 11, 12, 13, 14]
    """
    top = loudness_dbfs(audio)
    frames = np.zeros(n_frames * FRAME_SAMPLES)
    frames[: min(len(audio), len(frames))] = audio[: len(frames)]
    rms = np.sqrt((frames.reshape(n_frames, FRAME_SAMPLES) ** 2).mean(1))
    return 20 * np.log10(np.maximum(rms, 1e-10)) >= top - VOICED_DB


def silence_error(audio: np.ndarray, threshold_dbfs: float = SILENCE_DBFS) -> str | None:
    """Why ``audio`` is silent (a one-line reason), or None when its loudest window reaches ``threshold_dbfs``."""
    level = loudness_dbfs(audio)
    if level < threshold_dbfs:
        return (f"silent audio (loudest {LOUDNESS_WINDOW_S * 1000:.0f} ms RMS {level:.0f} dBFS "
                f"< {threshold_dbfs:.0f} dBFS)")
    return None


class AudioExtractor(TorchDevice):
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
        profile: Profile | str = DEFAULT_PROFILE,
        *,
        transcribe: bool = False,
        pooling: str = "mean+std",
        layers: list[int] | tuple[int, ...] | None = None,
        frames: str = "voiced",
        silence_dbfs: float = SILENCE_DBFS,
        min_duration_s: float = 0.1,
        language: str = "en",
        num_threads: int | None = None,
        device: str | None = None,
        precision: str = DEFAULT_PRECISION,
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
        if frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}, not {frames!r}")
        self.frames = frames
        # The encoder layers pooled: the argument, else the profile's option `layers`, else the last.
        layers = layers if layers is not None else self.entry.options.get("layers", DEFAULT_LAYERS)
        if (isinstance(layers, (int, str)) or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ProfileError(f"{self.entry.label}: option `layers` must be a non-empty list of encoder "
                               f"layer numbers (0 = after the convolutions, -1 = the last), not {layers!r}")
        self.layers = tuple(layers)
        self.silence_dbfs = silence_dbfs
        self.min_duration_s = min_duration_s
        self.language = language
        self.num_threads = num_threads or os.cpu_count() or 1
        self.requested_device = device  # resolved with the model: a run with nothing to do imports no torch
        self.requested_precision = precision
        self.decode_ahead = DECODE_AHEAD  # 0: decode each item when its turn comes (the bench's baseline)
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
        self.layer_indices(int(dims["n_audio_layer"]))  # a layer the encoder lacks fails before any work
        return int(dims["n_audio_state"]) * (2 if self.pooling == "mean+std" else 1)

    def layer_indices(self, n_layer: int) -> list[int]:
        """``layers`` as numbers 0..n_layer of an encoder of ``n_layer`` blocks (negative ones count from the last)."""
        resolved = [i + n_layer + 1 if i < 0 else i for i in self.layers]
        if not all(0 <= i <= n_layer for i in resolved):
            raise ProfileError(f"{self.entry.label}: option `layers` {list(self.layers)} names a layer this "
                               f"encoder lacks: it has layers 0..{n_layer} (or -{n_layer + 1}..-1)")
        return resolved

    @cached_property
    def smile(self):
        import opensmile

        return opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                               feature_level=opensmile.FeatureLevel.Functionals)

    @cached_property
    def model(self):
        import whisper

        try:
            return whisper.load_model(str(self.path), device=self.device).eval()
        except Exception as exc:  # torch.load and load_state_dict raise many types
            raise ProfileError(f"{self.entry.label}: cannot load a whisper checkpoint from {self.path}: {exc}") from exc

    @cached_property
    def blocks(self):
        """The encoder's transformer blocks as :meth:`encode_layers` runs them: in bf16 (linear layers
        held in bf16, layer norms in fp32 as whisper computes them) when the precision is bf16, else the
        model's own. The convolutions stay fp32 (2% of the encoder's time: docs/audio.md), and
        transcription uses the fp32 model, so a transcript does not depend on the precision."""
        import copy

        import torch

        if self.precision != "bf16":
            return self.model.encoder.blocks
        blocks = copy.deepcopy(self.model.encoder.blocks)
        for module in blocks.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(torch.bfloat16)
        return blocks

    def config(self) -> dict:
        return {
            "model": self.name,
            "source": self.entry.source,
            "weights_sha256": self.entry.sha256,
            **self.precision_config(),
            "encoder": "true-length",
            "pooling": self.pooling,
            "layers": list(self.layers),
            "frames": self.frames if self.frames == "all" else f"voiced (within {VOICED_DB:g} dB of the loudest 100 ms)",
            "egemaps": "eGeMAPSv02-functionals",
            "silence": f"loudest-{LOUDNESS_WINDOW_S * 1000:.0f}ms-rms",
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
        """States of 16 kHz mono ``audio`` over its true length, averaged over the chosen ``layers``:
        shape (ceil(frames / 2), n_state).

        Audio longer than 30 s is encoded in consecutive 30 s windows, as Whisper's context allows.
        """
        per_layer = self.encode_layers(audio, self.layer_indices(self.model.dims.n_audio_layer))
        return per_layer[0] if len(per_layer) == 1 else sum(per_layer) / len(per_layer)

    def encode_layers(self, audio: np.ndarray, layers: list[int]) -> list[torch.Tensor]:
        """The states of each of ``layers`` (numbers 0..n_layer, see :meth:`layer_indices`) over the
        true length of ``audio``: one (ceil(frames / 2), n_state) tensor per layer, in that order.
        Blocks above the deepest layer asked for are not run."""
        import torch
        import torch.nn.functional as F
        import whisper

        encoder, blocks = self.model.encoder, self.blocks
        dtype = torch_dtype(self.precision)
        n_layer = len(blocks)
        deepest = max(layers)
        mel = whisper.log_mel_spectrogram(torch.from_numpy(audio).to(self.device), n_mels=self.model.dims.n_mels)  # (n_mels, T)
        states: dict[int, list] = {i: [] for i in layers}
        with torch.inference_mode():
            for start in range(0, mel.shape[1], MAX_FRAMES):
                x = mel[None, :, start : start + MAX_FRAMES]  # (1, n_mels, T)
                x = F.gelu(encoder.conv1(x))
                x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (1, T', n_state), T' = ceil(T / 2)
                x = (x + encoder.positional_embedding[: x.shape[1]]).to(dtype)
                for depth in range(deepest + 1):
                    if depth:
                        x = blocks[depth - 1](x)
                    if depth in states:
                        states[depth].append((encoder.ln_post(x) if depth == n_layer else x)[0].float())
        return [torch.cat(states[i]) for i in layers]

    def pool(self, states: torch.Tensor, audio: np.ndarray | None = None) -> np.ndarray:
        """Pool (T', n_state) states into one float32 vector of size ``dim``: over the voiced frames of
        ``audio`` when the stage pools voiced frames (all of them when none is, or no audio is given)."""
        import torch

        if self.frames == "voiced" and audio is not None:
            voiced = voiced_frames(audio, states.shape[0])
            if voiced.any():
                states = states[torch.from_numpy(voiced).to(states.device)]
        parts = [states.mean(0)]
        if self.pooling == "mean+std":
            parts.append(states.std(0, unbiased=False))
        return torch.cat(parts).float().cpu().numpy().astype(np.float32)

    def extract(self, items: list[UtteranceMedia]) -> list[dict | MediaError]:
        """One result per item, in order. The audio of the batch is decoded ahead, in threads (ffmpeg
        runs as its own process), while the encoder works on the items before (docs/audio.md, speed)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        torch.set_num_threads(self.num_threads)
        if not self.decode_ahead:
            return [self._extract_one(item, self._decode(item)) for item in items]
        self.smile  # built here, once, not by the threads that share it
        with ThreadPoolExecutor(max_workers=self.decode_ahead) as pool:
            decoded = [pool.submit(self._decode, item) for item in items]
            return [self._extract_one(item, future.result()) for item, future in zip(items, decoded)]

    def _decode(self, item: UtteranceMedia) -> tuple[np.ndarray, np.ndarray] | MediaError:
        """The item's audio, checked (long enough, not silent), and its eGeMAPS functionals (openSMILE
        runs in C, beside the encoder), or why the audio cannot be used."""
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
        silent = silence_error(audio, self.silence_dbfs)
        if silent:
            return MediaError(path, silent)
        return audio, self.smile.process_signal(audio, SAMPLE_RATE).to_numpy()[0].astype(np.float32)

    def _extract_one(self, item: UtteranceMedia, decoded: tuple[np.ndarray, np.ndarray] | MediaError) -> dict | MediaError:
        if isinstance(decoded, MediaError):
            return decoded
        audio, egemaps = decoded
        transcript = None
        if self.transcribe or not (item.text or "").strip():
            result = self.model.transcribe(audio, language=self.language, fp16=False, temperature=0.0,
                                           condition_on_previous_text=False)
            transcript = result["text"].strip()
        return {
            "vector": self.pool(self.encode(audio), audio),
            "egemaps": egemaps,
            "transcript": transcript,
            "duration_s": np.float32(len(audio) / SAMPLE_RATE),
        }
