"""The audio stage's encoder layers (profile option `layers`) and its silence rule, on real RAVDESS speech."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bemerc.extract.audio import SILENCE_DBFS, AudioExtractor, loudness_dbfs, silence_error, voiced_frames
from bemerc.extract.base import UtteranceMedia, config_hash
from bemerc.extract.media import MediaError, decode_audio
from bemerc.models.profiles import ProfileError, load_profile

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
# The quietest clip of the shared subset (sad, normal intensity, actor 9): loudest 100 ms at -55.6 dBFS,
# whole-clip RMS -63.5 dBFS (the old whole-clip rule, < -60 dBFS, called it silent).
QUIET_CLIP = RAVDESS / "speech" / "03-01-04-01-02-02-09.flac"


@pytest.fixture(scope="module")
def audio_extractor(models_cache):
    return AudioExtractor("offline")


def write_float_wav(path: Path, samples: np.ndarray) -> Path:
    """A 32-bit float wav (so -90 dBFS noise is not rounded away by 16-bit samples), written by ffmpeg."""
    raw = path.with_suffix(".f32")
    raw.write_bytes(samples.astype("<f4").tobytes())
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", "16000", "-ac", "1",
                    "-i", str(raw), "-c:a", "pcm_f32le", str(path)], check=True)
    return path


def test_profiles_name_the_layers_they_keep():
    offline, hub = load_profile("offline").stage("speech"), load_profile("hub").stage("speech")
    assert offline.options["layers"] == [2, 3, 4, 5]  # of whisper-base's 6 blocks: chosen on RAVDESS dev (docs/audio.md)
    assert hub.options["layers"] == [4, 5, 6, 7, 8, 9, 10]  # whisper-small, 12 blocks: the same depths
    # The layers decide the extractor's output, not the prepared weights: the model is not converted again.
    from dataclasses import replace
    assert replace(offline, options={**offline.options, "layers": [-1]}).fingerprint() == offline.fingerprint()


def test_stored_vector_is_the_chosen_layers_over_voiced_frames_and_the_feature_set_says_so(audio_extractor):
    last = AudioExtractor("offline", layers=[-1], frames="all")  # the stage before issue 17
    last.__dict__["model"] = audio_extractor.model  # share the loaded weights
    assert audio_extractor.config()["layers"] == [2, 3, 4, 5] and last.config()["layers"] == [-1]
    assert audio_extractor.config()["frames"].startswith("voiced") and last.config()["frames"] == "all"
    assert config_hash(audio_extractor) != config_hash(last)
    assert audio_extractor.dim == last.dim == 1024  # one vector column, the width of before

    audio = decode_audio(QUIET_CLIP)
    *middle, layer6 = audio_extractor.encode_layers(audio, [2, 3, 4, 5, 6])
    row = audio_extractor.extract([UtteranceMedia(uid="q", text="x", audio_path=str(QUIET_CLIP))])[0]
    average = sum(middle) / 4
    voiced = voiced_frames(audio, average.shape[0])
    assert 0.2 < voiced.mean() < 0.9  # the room silence before and after the speech is left out
    kept = average[torch.from_numpy(voiced)]
    expected = torch.cat([kept.mean(0), kept.std(0, unbiased=False)]).numpy()
    np.testing.assert_allclose(row["vector"], expected, rtol=1e-4, atol=1e-4)
    # The last layer (after ln_post) is what the stock encoder returns; the old vector is another one.
    np.testing.assert_allclose(last.encode(audio).numpy(), layer6.numpy(), rtol=1e-5, atol=1e-5)
    old = last.extract([UtteranceMedia(uid="q", text="x", audio_path=str(QUIET_CLIP))])[0]["vector"]
    np.testing.assert_allclose(old, last.pool(layer6), rtol=1e-5, atol=1e-5)
    assert not np.allclose(row["vector"], old, atol=1e-2)


@pytest.mark.parametrize("layers", [[7], [-8], [], "4", [4.0]])
def test_a_layer_the_encoder_lacks_is_one_clear_error(audio_extractor, layers):
    with pytest.raises(ProfileError, match="option `layers`"):
        extractor = AudioExtractor("offline", layers=layers)
        extractor.dim


def test_soft_speech_padded_with_room_silence_is_encoded_and_silence_is_not(audio_extractor, tmp_path):
    speech = decode_audio(QUIET_CLIP) * 10 ** (-20 / 20)  # 20 dB softer
    pad = np.zeros(16_000, dtype=np.float32)
    soft = write_float_wav(tmp_path / "soft.wav", np.concatenate([pad, speech, pad]))
    zeros = write_float_wav(tmp_path / "zeros.wav", np.zeros(16_000 * 3))
    noise = np.random.default_rng(0).standard_normal(16_000 * 3)
    noise *= 10 ** (-90 / 20) / np.sqrt(np.mean(noise ** 2))  # RMS -90 dBFS
    hiss = write_float_wav(tmp_path / "hiss.wav", noise)
    # Its loudest 100 ms is at -75.6 dBFS; the whole-clip RMS the old rule used is ~25 dB under its -60 dBFS.
    assert 20 * np.log10(np.sqrt(np.mean(decode_audio(soft).astype(np.float64) ** 2))) < -80
    items = [UtteranceMedia(uid=p.stem, text="x", audio_path=str(p)) for p in (soft, zeros, hiss)]
    encoded, silent, quiet_noise = audio_extractor.extract(items)
    assert isinstance(encoded, dict) and encoded["vector"].shape == (1024,) and np.isfinite(encoded["vector"]).all()
    for failed in (silent, quiet_noise):
        assert isinstance(failed, MediaError) and failed.reason.startswith("silent audio (loudest 100 ms RMS")
    assert f"< {SILENCE_DBFS:.0f} dBFS" in quiet_noise.reason


def test_loudness_is_the_loudest_window():
    tone = 0.1 * np.sin(np.arange(1_600) / 3)  # 100 ms at about -23 dBFS
    padded = np.r_[np.zeros(48_000), tone, np.zeros(48_000)]
    assert loudness_dbfs(padded) == pytest.approx(loudness_dbfs(tone), abs=0.5)
    assert loudness_dbfs(tone[:100]) == pytest.approx(loudness_dbfs(tone), abs=1.0)  # shorter than a window
    assert loudness_dbfs(np.zeros(10)) < -150 and silence_error(np.zeros(10)).startswith("silent audio")
    assert silence_error(padded) is None
