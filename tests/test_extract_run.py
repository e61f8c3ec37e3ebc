"""`bemerc extract` over a store: every modality on real clips, failures as rows, idempotent and
resumable runs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.summary import SUMMARY_FILE

runner = CliRunner()


@pytest.fixture(scope="module")
def ravdess_store(tmp_path_factory, ravdess_dir) -> Path:
    """A manifest of the real RAVDESS video (no text: it gets transcribed), two real wavs, a corrupt
    mp4, a silent wav and a video without an audio stream, extracted with `--modality all`."""
    root = tmp_path_factory.mktemp("ravdess")
    video = next((ravdess_dir / "video").glob("*.mp4"))
    wavs = sorted((ravdess_dir / "audio").glob("*.wav"))
    (root / "corrupt.mp4").write_bytes(video.read_bytes()[:4000])
    # ingest refuses an empty file, so the unusable audio is a real wav of digital silence
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1", str(root / "silent.wav")], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-an", "-c:v", "copy", str(root / "mute.mp4")], check=True)
    rows = [
        {"dialogue_id": "a", "turn": 0, "speaker": "actor01", "text": "", "label": "neutral", "video": str(video), "audio": ""},
        {"dialogue_id": "a", "turn": 1, "speaker": "actor01", "text": "I am so happy today!", "label": "joy", "video": "", "audio": str(wavs[2])},
        {"dialogue_id": "a", "turn": 2, "speaker": "actor01", "text": "Leave me alone.", "label": "anger", "video": "", "audio": str(wavs[4])},
        {"dialogue_id": "b", "turn": 0, "speaker": "x", "text": "Broken clip.", "label": "fear", "video": "corrupt.mp4", "audio": ""},
        {"dialogue_id": "b", "turn": 1, "speaker": "x", "text": "Nothing to hear.", "label": "sadness", "video": "", "audio": "silent.wav"},
        {"dialogue_id": "b", "turn": 2, "speaker": "x", "text": "Silent film.", "label": "surprise", "video": "mute.mp4", "audio": ""},
    ]
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    store = root / "store"
    assert runner.invoke(app, ["ingest", "manifest", str(root / "manifest.csv"), "--store", str(store)]).exit_code == 0
    result = runner.invoke(app, ["extract", "--modality", "all", "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store


def test_every_modality_is_stored_and_reported(ravdess_store):
    result = runner.invoke(app, ["store", "info", "--json", "--store", str(ravdess_store)])
    info = json.loads(result.output)
    features = info["features"]
    assert {key.split("/")[0] for key in features} == {"text", "audio", "behavior", "visual"}
    by_modality = {key.split("/")[0]: f for key, f in features.items()}
    assert by_modality["visual"]["random_weights"] is False  # the face embedding of bemerc's trained network
    assert by_modality["text"]["random_weights"] is False
    assert by_modality["audio"]["rows"] == 3  # the video and the two real wavs
    assert by_modality["behavior"]["rows"] == 2  # the real video, and the mute copy has the same face
    assert by_modality["text"]["rows"] == 6  # five texts + the transcript of the video
    assert info["failures"]["audio"] == 3  # corrupt, silent, no audio stream


def test_failures_name_the_problem(ravdess_store):
    failures = {(r["uid"], r["stage"]): r["reason"] for r in Store(ravdess_store).read("failures").to_dicts()}
    assert "silent" in failures[("train/b_1", "audio")]
    assert "no audio stream" in failures[("train/b_2", "audio")]
    assert ("train/b_0", "behavior") in failures and ("train/b_0", "audio") in failures


def test_text_of_an_utterance_without_text_is_its_transcript(ravdess_store):
    store = Store(ravdess_store)
    audio = store.read_features("audio", ["uid", "transcript"]).to_pylist()
    transcript = next(r["transcript"] for r in audio if r["uid"] == "train/a_0")
    assert "door" in transcript.lower()
    assert "train/a_0" in store.read_features("text", ["uid"])["uid"].to_pylist()


def test_rerun_does_no_model_work(ravdess_store):
    store = Store(ravdess_store)
    versions = {name: store.version(name) for name in store.table_names()}
    result = runner.invoke(app, ["extract", "--modality", "all", "--store", str(ravdess_store)])
    assert result.exit_code == 0
    assert result.output.count(" 0 extracted") == 4
    assert {name: store.version(name) for name in store.table_names()} == versions


def test_a_rerun_on_an_unchanged_store_answers_without_lancedb(ravdess_store, ravdess_dir, tmp_path):
    """A run remembers what a re-run would print; a re-run on the unchanged store prints it without
    importing LanceDB or any model library, and it is what a run reading the store prints. A write
    (one more utterance) makes the next run read the store and extract just that utterance."""
    cmd = [sys.executable, "-c", "import sys\nfrom bemerc.cli import main\ntry:\n    main()\nfinally:\n"
           "    print('IMPORTED', sorted(m for m in ('lancedb', 'torch', 'transformers', 'mediapipe', 'open_clip') if m in sys.modules))",
           "extract", "--modality", "all", "--store", str(ravdess_store)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    remembered = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert remembered.returncode == 0, remembered.stderr
    assert remembered.stdout.count(" 0 extracted") == 4 and "IMPORTED []" in remembered.stdout
    (ravdess_store / SUMMARY_FILE).unlink()
    read = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert "'lancedb'" in read.stdout  # this one read the store

    def lines(output: str) -> str:
        return re.sub(r" in [0-9.]+ s", "", output.split("IMPORTED")[0])

    assert lines(remembered.stdout) == lines(read.stdout)

    wav = tmp_path / "more.csv"
    wav.write_text(f"dialogue_id,turn,text,label,audio\nc,0,One more line.,joy,{next((ravdess_dir / 'audio').glob('*.wav'))}\n")
    assert runner.invoke(app, ["ingest", "manifest", str(wav), "--store", str(ravdess_store)]).exit_code == 0
    result = runner.invoke(app, ["extract", "--modality", "text", "--store", str(ravdess_store)])
    assert result.exit_code == 0 and "1 extracted" in result.output


def test_strict_exits_non_zero_on_failures(ravdess_store):
    result = runner.invoke(app, ["extract", "--modality", "audio", "--strict", "--retry-failures", "--store", str(ravdess_store)])
    assert result.exit_code == 1


def test_device_cpu_writes_the_same_feature_set_and_cuda_without_a_gpu_is_one_line(ravdess_store, tmp_path, monkeypatch):
    import torch

    store = tmp_path / "store"
    shutil.copytree(ravdess_store, store)
    before = Store(store).read("feature_sets")
    result = runner.invoke(app, ["extract", "--modality", "text", "--device", "cpu", "--retry-failures", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "0 extracted" in result.output  # the device is not part of the feature set: nothing to redo
    assert Store(store).read("feature_sets").equals(before)
    monkeypatch.setenv("BEMERC_DEVICE", "gpu0")
    result = runner.invoke(app, ["extract", "--modality", "text", "--store", str(store)])
    assert result.exit_code == 1 and "BEMERC_DEVICE='gpu0': expected one of auto, cpu, cuda" in result.output
    monkeypatch.delenv("BEMERC_DEVICE")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = runner.invoke(app, ["extract", "--modality", "audio", "--device", "cuda", "--store", str(store)])
    assert result.exit_code == 1
    assert "torch sees no CUDA GPU" in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_killed_run_resumes_without_duplicates(tmp_path, meld_dir):
    store = tmp_path / "store"
    assert runner.invoke(app, ["ingest", "meld", str(meld_dir), "--store", str(store)]).exit_code == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bemerc", "extract", "--modality", "text", "--limit", "3000", "--batch-size", "32",
           "--store", str(store)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            fs = Store(store).feature_sets("text")
            written = Store(store).count(fs[0].table_name) if fs else 0
        except Exception:  # the table may be mid-creation
            continue
        if written:
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store(store).count(Store(store).feature_sets("text")[0].table_name)
    assert 0 < partial < 3000
    result = runner.invoke(app, ["extract", "--modality", "text", "--limit", "3000", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert f"{3000 - partial} extracted, {partial} already stored" in result.output
    uids = Store(store).read_features("text", ["uid"])["uid"].to_pylist()
    assert len(uids) == 3000 == len(set(uids))


def test_two_extractions_of_one_feature_set_compute_each_row_once(tmp_path, meld_dir):
    """A second `bemerc extract` of the feature set another process is extracting waits for it (its claim)
    and then finds the rows stored: every row is computed once, the store holds each once."""
    import fcntl

    from bemerc.store.ingest import read_meld, write_utterances
    from bemerc.store.lock import CLAIM_PREFIX

    store_path = tmp_path / "store"
    rows = [r for r in read_meld(meld_dir).rows if r["split"] == "train"][:300]
    write_utterances(Store(store_path), rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bemerc", "extract", "--modality", "text", "--store", str(store_path)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def claimed() -> bool:  # the first process holds its claim (an OS lock on the claim file)
        for path in store_path.glob(f"{CLAIM_PREFIX}*.lock"):
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                except BlockingIOError:
                    return True
        return False

    deadline = time.monotonic() + 120
    while not claimed():
        assert first.poll() is None and time.monotonic() < deadline, "the first extraction never claimed its rows"
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert "300 extracted" in out, out
    assert "waiting for extracting text/" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert " 0 extracted, 300 already stored" in second.stdout, second.stdout
    store = Store(store_path)
    uids = store.read_features(store.feature_set("text"), ["uid"])["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 300
