"""``/predict``'s media limit holds on what decodes, not on what a container's header says (issue 30,
item 1). Real ffmpeg-made files whose header lies: an MP3 without a Xing header (a short 320 kbit/s
start, then 8 kbit/s noise: ffprobe estimates the length from the first frame's bitrate) and an MP4
whose duration fields are overwritten; the real app on an empty store on a temp dir.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bemerc.serve import create_app
from bemerc.serve.request import PredictError, ServeLimits
from bemerc.serve.uploads import check_media, decoded_seconds
from bemerc.store import Store
from conftest import LOCAL

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
LIMIT_S = 10.0


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def probed_s(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lying-media")
    hi, lo, spoof = folder / "hi.mp3", folder / "lo.mp3", folder / "spoof.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-t", "2", "-c:a", "libmp3lame", "-b:a", "320k",
           "-write_xing", "0", str(hi))
    ffmpeg("-f", "lavfi", "-i", "anoisesrc=r=16000:a=0.3", "-t", "40", "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame",
           "-b:a", "8k", "-write_xing", "0", str(lo))
    spoof.write_bytes(hi.read_bytes() + lo.read_bytes())
    video, lying_video = folder / "v.mp4", folder / "v-lies.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-f", "lavfi", "-i", "sine=sample_rate=16000", "-t", "30",
           "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(video))
    data = bytearray(video.read_bytes())
    for tag, offset in ((b"mvhd", 16), (b"mdhd", 16), (b"tkhd", 20)):  # version-0 boxes: the duration field
        at = data.find(tag)
        while at >= 0:
            assert data[at + 4] == 0
            data[at + 4 + offset : at + 8 + offset] = struct.pack(">I", 1)
            at = data.find(tag, at + 4)
    lying_video.write_bytes(data)
    return {"hi": hi, "spoof": spoof, "video": video, "lying_video": lying_video}


def test_the_files_lie_to_ffprobe(media):
    assert probed_s(media["spoof"]) < 5 and probed_s(media["lying_video"]) < 0.01
    assert decoded_seconds(media["spoof"], "audio", 1000) > 41
    assert decoded_seconds(media["lying_video"], "video", 1000) == pytest.approx(30, abs=0.2)


def test_an_mp3_whose_header_says_less_is_refused_on_what_it_decodes(media):
    start = time.monotonic()
    with pytest.raises(PredictError) as err:
        check_media(media["spoof"], "audio", "audio_0", LIMIT_S)
    assert err.value.status == 413
    assert "'audio_0'" in str(err.value) and "10 s" in str(err.value) and "decodes to over" in str(err.value)
    assert time.monotonic() - start < 5


def test_decoding_stops_a_moment_past_the_limit(media):
    """The check decodes no more than the limit and its slack, however long the file is."""
    assert decoded_seconds(media["spoof"], "audio", 11.0) == pytest.approx(11.0, abs=0.1)
    assert decoded_seconds(media["lying_video"], "video", 11.0) == pytest.approx(11.0, abs=0.2)


def test_a_video_whose_header_says_less_is_refused_for_its_video_and_its_audio(media):
    for kind in ("video", "audio"):  # a video uploaded as audio_<i> has its audio track decoded
        with pytest.raises(PredictError, match=f"its {kind} decodes to over 10 s") as err:
            check_media(media["lying_video"], kind, f"{kind}_0", LIMIT_S)
        assert err.value.status == 413


def test_honest_media_within_and_over_the_limit(media):
    assert check_media(media["hi"], "audio", "audio_0", LIMIT_S) == pytest.approx(2.0, abs=0.2)
    assert check_media(media["video"], "video", "video_0", 60.0) == pytest.approx(30.0, abs=0.2)
    with pytest.raises(PredictError, match="lasts 30.0 s, over the limit of 10 s") as err:  # the header already says so
        check_media(media["video"], "video", "video_0", LIMIT_S)
    assert err.value.status == 413
    assert check_media(media["spoof"], "audio", "audio_0") > 0  # no limit: the probe alone, nothing decoded


def test_predict_answers_413_for_the_lying_mp3(media, tmp_path):
    Store(tmp_path / "store")  # an empty store: the upload is checked before any run is looked for
    client = TestClient(create_app(tmp_path / "store", limits=ServeLimits(max_media_s=LIMIT_S)), base_url=LOCAL)
    dialogue = json.dumps({"utterances": [{"text": "Hello there."}]})
    start = time.monotonic()
    r = client.post("/predict", data={"dialogue": dialogue},
                    files={"audio_0": ("clip.mp3", media["spoof"].read_bytes(), "audio/mpeg")})
    assert r.status_code == 413, r.text
    assert "'audio_0'" in r.json()["detail"] and "limit of 10 s" in r.json()["detail"]
    assert time.monotonic() - start < 10
    r = client.post("/predict", data={"dialogue": dialogue},
                    files={"video_0": ("clip.mp4", media["lying_video"].read_bytes(), "video/mp4")})
    assert r.status_code == 413 and "'video_0'" in r.json()["detail"]
