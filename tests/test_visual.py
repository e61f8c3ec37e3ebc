"""open_clip visual extractor: the offline random-weight path on the real RAVDESS video."""

from __future__ import annotations

import numpy as np
import pytest

from bemerc.extract.base import UtteranceMedia
from bemerc.extract.media import MediaError
from bemerc.extract.visual import ClipVisualExtractor


@pytest.fixture(scope="module")
def extractor() -> ClipVisualExtractor:
    return ClipVisualExtractor("ViT-S-32", pretrained=None, fps=2.0, max_frames=4)


def test_random_weight_clip_gives_unit_vectors_of_the_declared_dim(extractor, ravdess_dir):
    video = str(ravdess_dir / "video" / "01-01-01-01-01-01-01.mp4")
    items = [UtteranceMedia("whole", video_path=video), UtteranceMedia("start", video_path=video, end_s=1.0),
             UtteranceMedia("audio", audio_path=video)]
    whole, start, missing = extractor.extract(items)
    [vector_field] = [f for f in extractor.fields() if f.name == "vector"]
    for row in (whole, start):
        assert row["vector"].shape == (vector_field.type.list_size,) == (384,)
        assert np.isfinite(row["vector"]).all()
        assert np.linalg.norm(row["vector"]) == pytest.approx(1.0, abs=1e-5)
    assert (whole["frames"], start["frames"]) == (4, 2)  # 3.35 s at 2 fps capped at 4; 1 s at 2 fps
    assert not np.allclose(whole["vector"], start["vector"])  # different frames, different embedding
    assert isinstance(missing, MediaError)
    assert extractor.random_weights and extractor.name == "openclip-ViT-S-32-random"


def test_random_weights_are_reproducible_and_keyed(extractor, ravdess_dir):
    frames = np.random.default_rng(0).integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    again = ClipVisualExtractor("ViT-S-32", pretrained=None, fps=2.0, max_frames=4)
    np.testing.assert_allclose(extractor.embed(frames), again.embed(frames), atol=1e-6)
    other_seed = ClipVisualExtractor("ViT-S-32", pretrained=None, fps=2.0, max_frames=4, seed=1)
    assert other_seed.config()["weights_sha256"] != extractor.config()["weights_sha256"]


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        ClipVisualExtractor("ViT-Nope")
