"""The embedded demo: real espeak-ng speech and ffmpeg clips, made once per test session in a tmp dir."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from bemerc.demo import make_demo
from bemerc.extract.media import probe, sample_frames

MELD_LABELS = {"neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The manifest of the demo, built once for this module."""
    return make_demo(tmp_path_factory.mktemp("demo"))


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_manifest_columns_labels_and_splits(demo):
    manifest = demo
    rows = _rows(manifest)
    assert manifest.name == "manifest.jsonl"
    columns = ["dialogue_id", "turn", "speaker", "text", "label", "split", "video", "audio", "start", "end", "sentiment"]
    assert all(list(row) == columns for row in rows)
    assert {row["label"] for row in rows} == MELD_LABELS
    assert {row["sentiment"] for row in rows} == {"positive", "neutral", "negative"}
    keys = [(row["dialogue_id"], row["turn"]) for row in rows]
    assert len(keys) == len(set(keys))
    dialogues = {split: {r["dialogue_id"] for r in rows if r["split"] == split} for split in ("train", "dev", "test")}
    assert len(dialogues["dev"]) == 2 and len(dialogues["test"]) == 2
    assert len(dialogues["train"]) > len(dialogues["dev"]) + len(dialogues["test"])
    for dialogue in set().union(*dialogues.values()):
        turns = sorted(r["turn"] for r in rows if r["dialogue_id"] == dialogue)
        speakers = {r["speaker"] for r in rows if r["dialogue_id"] == dialogue}
        assert 4 <= len(turns) <= 6 and turns == list(range(len(turns)))
        assert 2 <= len(speakers) <= 3


def test_every_clip_is_video_with_its_speech(demo):
    manifest = demo
    for row in _rows(manifest):
        video, audio = manifest.parent / row["video"], manifest.parent / row["audio"]
        with wave.open(str(audio), "rb") as wav:
            assert wav.getnchannels() == 1
            wav_s = wav.getnframes() / wav.getframerate()
        assert row["start"] == 0.0 and row["end"] == pytest.approx(wav_s, abs=1e-3)
        info = probe(video)
        assert info.has_video and info.has_audio, video
        # One video frame at 12 fps plus AAC padding at most.
        assert abs(info.duration_s - wav_s) < 0.15, (video, info.duration_s, wav_s)


def test_face_is_found_in_every_label_style(demo):
    mediapipe = pytest.importorskip("mediapipe")
    manifest = demo
    first_per_label = {row["label"]: row for row in reversed(_rows(manifest))}
    with mediapipe.solutions.face_mesh.FaceMesh(static_image_mode=True) as mesh:
        for label, row in first_per_label.items():
            frames, _ = sample_frames(manifest.parent / row["video"], fps=2)
            # The last frame carries the label's full zoom, tilt and brightness change.
            assert mesh.process(frames[-1]).multi_face_landmarks, f"no face in the last frame of {label} {row['video']}"


def test_second_call_reuses_every_file(demo):
    manifest = demo
    before = _mtimes(manifest.parent)
    assert make_demo(manifest.parent) == manifest
    assert _mtimes(manifest.parent) == before


def test_a_missing_clip_is_remade_alone(demo):
    manifest = demo
    row = _rows(manifest)[3]
    (manifest.parent / row["video"]).unlink()
    before = _mtimes(manifest.parent)
    make_demo(manifest.parent)
    after = _mtimes(manifest.parent)
    assert set(after) - set(before) == {row["video"]}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert probe(manifest.parent / row["video"]).has_audio
    assert not list(manifest.parent.rglob("*.part"))


def test_missing_tool_says_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither espeak-ng nor ffmpeg can be found
    with pytest.raises(RuntimeError, match="make setup"):
        make_demo(tmp_path / "demo")


def test_cli_demo_reports_manifest_and_next_step(demo):
    from typer.testing import CliRunner

    from bemerc.cli import app

    manifest = demo
    result = CliRunner().invoke(app, ["demo", "--out", str(manifest.parent)])
    assert result.exit_code == 0, result.output
    assert "manifest.jsonl" in result.output
    assert "bemerc ingest manifest" in result.output
    assert str(len(_rows(manifest))) in result.output


def test_cli_help_names_the_next_step():
    from typer.testing import CliRunner

    from bemerc.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "bemerc ingest manifest" in result.output
