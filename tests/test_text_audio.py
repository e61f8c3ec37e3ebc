"""Text and audio extractors on real models (offline profile) and real media."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import subprocess
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from bemerc.extract.audio import AudioExtractor
from bemerc.extract.base import Extractor, UtteranceMedia, config_hash
from bemerc.extract.media import MediaError, decode_audio
from bemerc.extract.text import TextExtractor
from bemerc.precision import cpu_has_bf16

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RAVDESS_WAVS = sorted((DATA / "ravdess" / "audio").glob("*.wav"))
RAVDESS_VIDEO = DATA / "ravdess" / "video" / "01-01-01-01-01-01-01.mp4"



@pytest.fixture(scope="module")
def text_extractor(models_cache):
    return TextExtractor("offline")


@pytest.fixture(scope="module")
def audio_extractor(models_cache):
    return AudioExtractor("offline")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# --- text ------------------------------------------------------------------------------------------


def test_text_extractor_follows_the_protocol(text_extractor):
    assert isinstance(text_extractor, Extractor)
    assert text_extractor.modality == "text" and text_extractor.name == "minilm-l6"
    assert text_extractor.fields() == [pa.field("vector", pa.list_(pa.float32(), 384))]
    assert text_extractor.config()["weights_sha256"]["model.safetensors"].startswith("53aa5117")
    assert len(config_hash(text_extractor)) == 12


def test_similar_sentences_are_closer_than_unrelated_ones(text_extractor):
    a, b, c = text_extractor.embed(
        ["I am so happy to see you again!", "It's great to see you, I'm really glad.", "The invoice is due on Friday."]
    )
    assert np.allclose([np.linalg.norm(v) for v in (a, b, c)], 1.0, atol=1e-5)
    assert a @ b > a @ c + 0.3 and a @ b > b @ c + 0.3


def test_text_batching_and_sorting_keep_each_result_with_its_item(text_extractor):
    texts = ["Oh my God!", "What?", "He's totally lost it, I can't believe he said that to her.", "Okay."]
    together = text_extractor.embed(texts)
    alone = np.stack([text_extractor.embed([t])[0] for t in texts])
    # padding changes the rounding of bf16 sums: vectors agree to bf16's precision there, to fp32's in fp32
    if text_extractor.precision == "fp32":
        np.testing.assert_allclose(together, alone, atol=1e-5)
    else:
        assert ((together * alone).sum(1) >= 0.9995).all()

    items = [UtteranceMedia(uid="a", text=texts[2]), UtteranceMedia(uid="b", text="  "),
             UtteranceMedia(uid="c", text=None), UtteranceMedia(uid="d", text=texts[0])]
    results = text_extractor.extract(items)
    assert isinstance(results[1], MediaError) and results[1].reason == "no text" and results[1].path == "b"
    assert isinstance(results[2], MediaError)
    np.testing.assert_allclose(results[0]["vector"], together[2], atol=1e-6)
    np.testing.assert_allclose(results[3]["vector"], together[0], atol=1e-6)


def test_config_hash_changes_with_an_output_setting(text_extractor, models_cache):
    shorter = TextExtractor("offline", max_length=32)
    assert config_hash(shorter) != config_hash(text_extractor)
    assert config_hash(TextExtractor("offline")) == config_hash(text_extractor)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
def test_bf16_encoders_are_a_new_feature_set_with_vectors_close_to_fp32(models_cache):
    """--precision bf16 (auto on this CPU): the text and speech encoders' vectors are within cosine
    0.999 of fp32's; bf16 is recorded in the feature set's config (a new set), fp32 records nothing
    (the sets made before the option keep their ids); transcripts come from the fp32 model."""
    texts = ["Oh my God!", "What?", "He's totally lost it, I can't believe he said that to her.", "Okay."]
    fp32, bf16 = TextExtractor("offline", precision="fp32"), TextExtractor("offline", precision="bf16")
    assert bf16.model.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # held in bf16, not cast per call
    a, b = fp32.embed(texts), bf16.embed(texts)
    assert ((a * b).sum(1) >= 0.999).all() and not np.array_equal(a, b)
    assert "precision" not in fp32.config() and bf16.config()["precision"] == "bf16"
    assert config_hash(fp32) != config_hash(bf16)

    audio32, audio16 = AudioExtractor("offline", precision="fp32"), AudioExtractor("offline", precision="bf16")
    items = [UtteranceMedia(uid=p.stem, text="given", audio_path=str(p)) for p in RAVDESS_WAVS[:3]]
    v32 = np.stack([r["vector"] for r in audio32.extract(items)])
    v16 = np.stack([r["vector"] for r in audio16.extract(items)])
    cos = (v32 * v16).sum(1) / np.linalg.norm(v32, axis=1) / np.linalg.norm(v16, axis=1)
    assert (cos >= 0.999).all() and not np.array_equal(v32, v16)
    assert config_hash(audio32) != config_hash(audio16) and "precision" not in audio32.config()
    assert audio16.model.encoder.blocks[0].mlp[0].weight.dtype == torch.float32  # the fp32 model stays for transcripts


# --- audio -----------------------------------------------------------------------------------------


def test_ravdess_wavs_give_distinct_vectors_and_finite_egemaps(audio_extractor):
    assert isinstance(audio_extractor, Extractor) and audio_extractor.name == "whisper-base"
    items = [UtteranceMedia(uid=p.stem, text="Kids are talking by the door", audio_path=str(p)) for p in RAVDESS_WAVS]
    assert len(items) == 8
    rows = audio_extractor.extract(items)
    assert all(isinstance(row, dict) for row in rows), rows
    vectors = np.stack([row["vector"] for row in rows])
    assert vectors.shape == (8, 1024) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    assert distances[~np.eye(8, dtype=bool)].min() > 1e-3  # eight different emotions, eight vectors
    for row, path in zip(rows, RAVDESS_WAVS):
        assert row["egemaps"].shape == (88,) and np.isfinite(row["egemaps"]).all()
        assert row["transcript"] is None  # the item has text: no ASR
        assert row["duration_s"] == pytest.approx(len(decode_audio(path)) / 16_000)
    # The columns the extractor declares are the keys it returns, and pyarrow accepts the rows.
    schema = pa.schema(audio_extractor.fields())
    table = pa.Table.from_pylist([{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
                                  for row in rows], schema=schema)
    assert table.num_rows == 8 and len(schema.field("egemaps").metadata[b"names"]) > 88


def test_video_without_text_is_transcribed(audio_extractor):
    row = audio_extractor.extract([UtteranceMedia(uid="v", video_path=str(RAVDESS_VIDEO))])[0]
    assert row["transcript"].lower().strip(" .!") == "kids are talking by the door"


def test_encoder_runs_on_the_true_length_only(audio_extractor):
    audio = decode_audio(RAVDESS_WAVS[0])
    frames = len(audio) // 160
    assert audio_extractor.encode(audio).shape == (math.ceil(frames / 2), 512)
    long = np.tile(audio, 10)[: 31 * 16_000]  # 31 s: two Whisper windows, 30 s + 1 s
    assert audio_extractor.encode(long).shape == (1500 + 50, 512)


def test_span_of_a_longer_recording(audio_extractor):
    item = UtteranceMedia(uid="span", text="x", audio_path=str(RAVDESS_WAVS[0]), start_s=0.5, end_s=2.5)
    row = audio_extractor.extract([item])[0]
    assert row["duration_s"] == pytest.approx(2.0, abs=0.01)


def test_bad_media_give_media_errors_with_reasons(audio_extractor, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + os.urandom(2000))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent = write_wav(tmp_path / "silent.wav", np.zeros(16_000 * 2))
    tiny = write_wav(tmp_path / "tiny.wav", 0.3 * np.sin(np.arange(400) / 5))
    mute_video = tmp_path / "mute.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=64x64:d=1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(mute_video)], check=True)
    items = [
        UtteranceMedia(uid="corrupt", text="x", audio_path=str(corrupt)),
        UtteranceMedia(uid="empty", text="x", audio_path=str(empty)),
        UtteranceMedia(uid="silent", text="x", audio_path=str(silent)),
        UtteranceMedia(uid="tiny", text="x", audio_path=str(tiny)),
        UtteranceMedia(uid="mute", text="x", video_path=str(mute_video)),
        UtteranceMedia(uid="nothing", text="x"),
        UtteranceMedia(uid="ok", text="x", audio_path=str(RAVDESS_WAVS[0])),
    ]
    results = audio_extractor.extract(items)
    assert [type(r).__name__ for r in results] == ["MediaError"] * 6 + ["dict"]
    reasons = [r.reason for r in results[:6]]
    assert reasons[0].startswith("cannot decode audio")
    assert reasons[1] == "empty file (0 bytes)"
    assert reasons[2].startswith("silent audio")
    assert reasons[3].startswith("audio too short")
    assert reasons[4] == "no audio stream"
    assert reasons[5] == "no audio or video path"
    assert results[0].path == str(corrupt) and "\n" not in str(results[0])
