"""Bad input never crashes, hangs or slips through, and the local API resists cross-site use and
overload: each case of issue 9 with its exact input, on real stores, real media and real servers.

The /predict cases use a baseline run on text and audio: real MiniLM text features of MELD's first
dialogues and real Whisper/eGeMAPS features of the RAVDESS clips, given to two utterances in three.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.serve import create_app
from bemerc.serve.request import PredictError, ServeLimits
from bemerc.serve.routes.predict import Admission
from bemerc.store import Store
from bemerc.store.runs import list_runs
from conftest import LOCAL, running_server, small_store

runner = CliRunner()


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory, ravdess_dir) -> dict[str, Path]:
    """Uploads: a short real wav, silence, the first 20 KB of the RAVDESS mp4, 10 minutes of low-bitrate
    audio (~450 KB) and ~20 s of real speech without text (Whisper transcribes it: seconds of work)."""
    root = tmp_path_factory.mktemp("media")
    video = ravdess_dir / "video" / "01-01-01-01-01-01-01.mp4"
    wav = sorted((ravdess_dir / "audio").glob("*.wav"))[2]
    files = {"speech": root / "speech.wav", "silence": root / "silence.wav", "truncated": root / "truncated.mp4",
             "ten_minutes": root / "ten_minutes.ogg", "long_speech": root / "long_speech.wav"}
    ffmpeg("-i", str(wav), "-ac", "1", "-ar", "16000", str(files["speech"]))
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "3", str(files["silence"]))
    files["truncated"].write_bytes(video.read_bytes()[:20_000])
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=16000", "-t", "600", "-c:a", "libopus", "-b:a", "6k",
           str(files["ten_minutes"]))
    ffmpeg("-stream_loop", "12", "-i", str(wav), "-ac", "1", "-ar", "16000", "-t", "20", str(files["long_speech"]))
    return files


@pytest.fixture(scope="module")
def audio_store(tmp_path_factory, meld_dir, ravdess_dir, models_cache) -> tuple[Store, str]:
    """(store, run id): a copy of the small MELD store with real audio features and a text+audio baseline."""
    from bemerc.extract.base import UtteranceMedia
    from bemerc.extract.factory import build_extractor
    from bemerc.extract.run import register
    from bemerc.store.schema import feature_schema
    from bemerc.train.baseline import BaselineConfig, train_baseline

    root = tmp_path_factory.mktemp("audio-run")
    store = Store(shutil.copytree(small_store(tmp_path_factory.getbasetemp(), meld_dir).path, root / "store"))
    extractor = build_extractor("audio", "offline")
    fs = register(store, extractor)
    clips = [*sorted((ravdess_dir / "audio").glob("*.wav")), ravdess_dir / "video" / "01-01-01-01-01-01-01.mp4"]
    features = extractor.extract([UtteranceMedia(uid=str(i), text="-", audio_path=str(p)) for i, p in enumerate(clips)])
    uids = store.utterances()["uid"].to_list()
    rows = [{"uid": uid, **features[i % len(features)]} for i, uid in enumerate(uids) if i % 3]
    store.write_features(fs, pa.Table.from_pylist(rows, schema=feature_schema(extractor.fields())))
    config = BaselineConfig(max_rounds=40, early_stopping_rounds=10, bootstrap_resamples=20, fusion_steps=5)
    result = train_baseline(store, feature_sets=["text", "audio"], config=config, run_dir=root / "run")
    return store, result.run_id


@pytest.fixture(scope="module")
def audio_client(audio_store) -> TestClient:
    return TestClient(create_app(audio_store[0].path), base_url=LOCAL)


def _post(client, run_id: str, files: dict[str, Path], texts: list[str | None]) -> httpx.Response:
    dialogue = json.dumps({"utterances": [{"speaker": "A", "text": t} for t in texts], "run": run_id})
    return client.post("/predict", data={"dialogue": dialogue},
                       files={name: (path.name, path.read_bytes(), "application/octet-stream") for name, path in files.items()})


# -- /predict: missing or undecodable media falls back to the other modalities ---------------------


def test_the_audio_run_uses_both_modalities(audio_client, audio_store, media):
    store, run_id = audio_store
    assert {fs.split("/")[0] for fs in next(r for r in list_runs(store) if r["run_id"] == run_id)["feature_sets"]} == {"text", "audio"}
    r = _post(audio_client, run_id, {"audio_0": media["speech"]}, ["Kids are talking by the door."])
    assert r.status_code == 200, r.text
    assert r.json()["utterances"][0]["modalities"] == ["audio", "text"]


def test_no_audio_falls_back_to_text(audio_client, audio_store):
    _, run_id = audio_store
    r = audio_client.post("/predict", json={"utterances": [{"speaker": "Ross", "text": "We were on a break!"}], "run": run_id})
    assert r.status_code == 200, r.text
    got = r.json()["utterances"][0]
    assert got["modalities"] == ["text"] and got["label"] in r.json()["classes"]
    assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("upload", ["truncated", "silence"])
def test_undecodable_or_silent_audio_falls_back_to_text(audio_client, audio_store, media, upload):
    _, run_id = audio_store
    kind = "video_0" if upload == "truncated" else "audio_0"
    r = _post(audio_client, run_id, {kind: media[upload]}, ["Kids are talking by the door."])
    assert r.status_code in (200, 415), r.text  # never a 500
    if r.status_code == 200:
        got = r.json()["utterances"][0]
        assert got["modalities"] == ["text"] and "audio" in got["errors"]
        assert got["label"] in r.json()["classes"]
    else:
        assert kind in r.json()["detail"]


def test_media_alone_that_cannot_be_used_is_a_422_naming_the_part(audio_client, audio_store, media):
    _, run_id = audio_store
    r = _post(audio_client, run_id, {"audio_0": media["silence"]}, [None])
    assert r.status_code == 422, r.text
    assert "utterance 0" in r.json()["detail"] and "audio_0" in r.json()["detail"] and "silent" in r.json()["detail"]


def test_xgboost_probabilities_of_no_rows_keep_their_class_axis(audio_store):
    import numpy as np

    from bemerc.train.baseline import BaselineModel, xgboost_proba

    store, run_id = audio_store
    model = BaselineModel.load(next(r for r in list_runs(store) if r["run_id"] == run_id)["run_dir"])
    booster = model.boosters["audio"]
    assert xgboost_proba(booster, np.zeros((0, booster.num_features()), dtype=np.float32)).shape == (0, len(model.classes))


# -- /predict: duration limit, bounded queue, time limit ------------------------------------------


def test_ten_minutes_of_audio_is_refused_before_decoding(audio_client, audio_store, media):
    _, run_id = audio_store
    assert media["ten_minutes"].stat().st_size < 600_000
    started = time.perf_counter()
    r = _post(audio_client, run_id, {"audio_0": media["ten_minutes"]}, ["Hello."])
    assert r.status_code == 413, r.text
    assert "audio_0" in r.json()["detail"] and "600.0 s" in r.json()["detail"] and "60 s" in r.json()["detail"]
    assert time.perf_counter() - started < 10  # probed, not decoded


def test_a_full_queue_answers_503_with_retry_after():
    admission = Admission(ServeLimits(max_pending=2, max_media_pending=1, retry_after_s=7))
    with admission.enter(media=True):
        with pytest.raises(PredictError) as err:
            with admission.enter(media=True):
                pass
        assert err.value.status == 503 and err.value.retry_after_s == 7 and "media" in str(err.value)
        with admission.enter(media=False):  # a text request still gets in
            with pytest.raises(PredictError, match="queue of /predict requests is full"):
                with admission.enter(media=False):
                    pass
    assert admission.pending == 0 and admission.media_pending == 0


def test_long_audio_holds_neither_text_requests_nor_the_queue(audio_store, media):
    """While one long-audio request is transcribed, a second media request gets 503 + Retry-After at
    once and text-only requests are answered without waiting for it."""
    store, run_id = audio_store
    limits = ServeLimits(max_media_pending=1, retry_after_s=5)
    with running_server(create_app(store.path, limits=limits)) as url, httpx.Client(base_url=url, timeout=120) as http:
        text = {"utterances": [{"speaker": "Ross", "text": "We were on a break!"}], "run": run_id}
        assert http.post("/predict", json=text).status_code == 200  # models loaded
        assert _post(http, run_id, {"audio_0": media["speech"]}, ["Hi."]).status_code == 200
        long_result: dict = {}
        worker = threading.Thread(target=lambda: long_result.update(r=_post(http, run_id, {"audio_0": media["long_speech"]}, [None])))
        started = time.perf_counter()
        worker.start()
        time.sleep(1.0)
        busy = _post(http, run_id, {"audio_0": media["speech"]}, ["Hi."])
        t = time.perf_counter()
        quick = http.post("/predict", json=text)
        text_seconds = time.perf_counter() - t
        worker.join(120)
        long_seconds = time.perf_counter() - started
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5", busy.text
    assert quick.status_code == 200
    assert long_result["r"].status_code == 200, long_result["r"].text
    assert "door" in long_result["r"].json()["utterances"][0]["transcript"].lower()
    assert text_seconds < long_seconds / 2, (text_seconds, long_seconds)


def test_a_request_over_its_time_limit_is_504(audio_store):
    store, run_id = audio_store
    client = TestClient(create_app(store.path, limits=ServeLimits(request_timeout_s=0.0)), base_url=LOCAL)
    r = client.post("/predict", json={"utterances": [{"speaker": "A", "text": "Hi."}], "run": run_id})
    assert r.status_code == 504 and "time limit" in r.json()["detail"]


# -- cross-site use: Host, Origin, token ----------------------------------------------------------


def test_a_cross_site_multipart_post_is_refused(audio_client, audio_store, media):
    _, run_id = audio_store
    dialogue = json.dumps({"utterances": [{"text": "Hi."}], "run": run_id})
    files = {"audio_0": ("a.wav", media["speech"].read_bytes(), "audio/wav")}
    attack = audio_client.post("/predict", data={"dialogue": dialogue}, files=files,
                               headers={"Origin": "http://evil.example", "Host": "attacker.example"})
    assert attack.status_code == 400 and "attacker.example" in attack.json()["detail"]
    csrf = audio_client.post("/predict", data={"dialogue": dialogue}, files=files, headers={"Origin": "http://evil.example"})
    assert csrf.status_code == 403 and "evil.example" in csrf.json()["detail"]
    null = audio_client.post("/predict", json={"utterances": [{"text": "Hi."}]}, headers={"Origin": "null"})
    assert null.status_code == 403
    fetch = audio_client.post("/predict", json={"utterances": [{"text": "Hi."}]}, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403
    own = audio_client.post("/predict", json={"utterances": [{"text": "Hi."}], "run": run_id}, headers={"Origin": LOCAL})
    assert own.status_code == 200


def test_host_is_checked_on_every_request(audio_client, audio_store):
    store, _ = audio_store
    assert audio_client.get("/info", headers={"Host": "attacker.example"}).status_code == 400
    assert audio_client.get("/info", headers={"Host": "localhost:8000"}).status_code == 200
    assert audio_client.get("/info", headers={"Host": "[::1]:8000"}).status_code == 200
    named = TestClient(create_app(store.path, allow_hosts=("merc.lab.example",)), base_url="http://merc.lab.example")
    assert named.get("/info").status_code == 200
    anywhere = TestClient(create_app(store.path, host="0.0.0.0", token="t"), base_url="http://10.1.2.3")
    assert anywhere.get("/info", headers={"Authorization": "Bearer t"}).status_code == 200
    assert anywhere.get("/info", headers={"Authorization": "Bearer t", "Host": "rebound.example"}).status_code == 400


def test_a_token_is_required_when_given(audio_store):
    store, _ = audio_store
    client = TestClient(create_app(store.path, token="s3cret-token"), base_url=LOCAL)
    assert client.get("/info").status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/info", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/").status_code == 401
    page = client.get("/", params={"token": "s3cret-token"}, follow_redirects=False)
    assert page.status_code == 303 and "httponly" in page.headers["set-cookie"].lower()
    assert client.get("/info").status_code == 200  # the page's cookie


def test_serve_on_all_interfaces_needs_a_token(audio_store):
    store, _ = audio_store
    out = runner.invoke(app, ["serve", "--store", str(store.path), "--host", "0.0.0.0"], env={"BEMERC_TOKEN": ""})
    assert out.exit_code == 1 and "--token" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- ingest ---------------------------------------------------------------------------------------


def _manifest(path: Path, **overrides) -> Path:
    row = {"dialogue_id": "d", "turn": "0", "speaker": "A", "text": "Hi.", "label": "joy", "split": "train",
           "video": "", "audio": "", "start": "", "end": ""}
    rows = [row, {**row, "turn": "1", **overrides}]
    path.write_text("\n".join([",".join(row), *(",".join(r.values()) for r in rows)]) + "\n")
    return path


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-ingest")
    store = root / "store"
    result = runner.invoke(app, ["ingest", "manifest", str(_manifest(root / "good.csv")), "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store


BAD_ROWS = {
    "nan start": ({"start": "nan", "end": "1"}, "row 3: start must be a finite number of seconds >= 0, found nan"),
    "inf end": ({"start": "0", "end": "inf"}, "row 3: end must be a finite number of seconds >= 0, found inf"),
    "negative start": ({"start": "-1", "end": "1"}, "row 3: start must be a finite number"),
    "start after end": ({"start": "2", "end": "1"}, "row 3: the span must end after it starts"),
    "/dev/zero as video": ({"video": "/dev/zero"}, "row 3: video /dev/zero is not a regular file"),
    "/etc/passwd as audio": ({"audio": "/etc/passwd"}, "row 3: audio file /etc/passwd is not audio, video or a still image"),
    "a folder as video": ({"video": "/tmp"}, "row 3: video /tmp is a folder"),
    "turn 99999999999": ({"turn": "99999999999"}, "row 3: turn must be a whole number from 0 to 2147483647, found '99999999999'"),
    "negative turn": ({"turn": "-1"}, "row 3: turn must be a whole number"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_one_line_and_leave_the_store_as_it_was(ingested, tmp_path, case):
    overrides, message = BAD_ROWS[case]
    before = {name: Store(ingested).version(name) for name in Store(ingested).table_names()}
    bad = _manifest(tmp_path / "bad.csv", **overrides)
    started = time.perf_counter()
    result = runner.invoke(app, ["ingest", "manifest", str(bad), "--store", str(ingested)])
    assert time.perf_counter() - started < 20  # /dev/zero used to hang for ever
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr and message in result.stderr, result.stderr
    assert {name: Store(ingested).version(name) for name in Store(ingested).table_names()} == before


def test_an_empty_media_file_is_refused(ingested, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    result = runner.invoke(app, ["ingest", "manifest", str(_manifest(tmp_path / "m.csv", audio="empty.wav")), "--store", str(ingested)])
    assert result.exit_code == 1 and "empty.wav is empty" in result.stderr


# -- dataset names in filters -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def obrien_store(tmp_path_factory, meld_dir) -> Store:
    """The small MELD store with its dataset renamed to "o'brien ds"."""
    from bemerc.store.ingest import write_utterances

    root = tmp_path_factory.mktemp("obrien")
    store = Store(shutil.copytree(small_store(tmp_path_factory.getbasetemp(), meld_dir).path, root / "store"))
    store.delete("runs", "true")
    write_utterances(store, [{**r, "dataset": "o'brien ds"} for r in store.read("utterances").to_dicts()])
    return store


def test_a_dataset_name_with_a_quote_trains(obrien_store, tmp_path):
    out = runner.invoke(app, ["baseline", "--dataset", "o'brien ds", "--store", str(obrien_store.path), "--run-dir", str(tmp_path / "run")])
    assert out.exit_code == 0, out.output
    assert list_runs(obrien_store)[-1]["dataset"] == "o'brien ds"


def test_a_dataset_name_is_never_pasted_into_a_filter(obrien_store):
    assert obrien_store.utterances(dataset="x' OR '1'='1").height == 0
    out = runner.invoke(app, ["baseline", "--dataset", "x' OR '1'='1", "--store", str(obrien_store.path)])
    assert out.exit_code == 1 and "no utterances of dataset" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- queries and the store path -------------------------------------------------------------------


def test_a_filter_is_parsed_whole(ingested):
    out = runner.invoke(app, ["query", "where", "label = 'joy' ADN speaker = 'Ross'", "--store", str(ingested)])
    assert out.exit_code == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "'ADN' follows a complete condition" in out.stderr
    for bad in ("label = 'joy') OR (1 = 1", "label = 'joy", "(label = 'joy'"):
        out = runner.invoke(app, ["query", "where", bad, "--store", str(ingested)])
        assert out.exit_code == 1 and "bad filter" in out.stderr, bad
    out = runner.invoke(app, ["query", "where", "label = 'joy' -- a comment", "--json", "--store", str(ingested)])
    assert out.exit_code == 0 and len(json.loads(out.stdout)) == 2


@pytest.mark.parametrize("command", [["store", "info"], ["query", "show", "train/d_0"], ["query", "where", "turn = 0"],
                                     ["baseline"], ["compare"], ["extract", "--modality", "text"]])
def test_read_only_commands_never_create_a_store(tmp_path, command):
    missing, a_file = tmp_path / "typo", tmp_path / "notes.txt"
    a_file.write_text("not a store")
    out = runner.invoke(app, [*command, "--store", str(missing)])
    assert out.exit_code == 1 and "no store here" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not missing.exists()
    out = runner.invoke(app, [*command, "--store", str(a_file)])
    assert out.exit_code == 1 and "is a file, not a store" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_ingest_into_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    out = runner.invoke(app, ["ingest", "manifest", str(_manifest(tmp_path / "m.csv")), "--store", str(a_file)])
    assert out.exit_code == 1 and "is a file, not a store" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -- extraction checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def meld_text_store(tmp_path_factory, meld_dir) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "store"
    assert runner.invoke(app, ["ingest", "meld", str(meld_dir), "--store", str(path)]).exit_code == 0
    return path


@pytest.fixture(scope="module")
def text_extractor(models_cache):
    from bemerc.extract.text import TextExtractor

    return TextExtractor("offline", num_threads=1)


def test_rows_are_flushed_on_time(tmp_path, meld_text_store, text_extractor):
    from bemerc.extract.run import run_extractor

    store = Store(shutil.copytree(meld_text_store, tmp_path / "store"))
    stored_after_batch = []

    def after_batch(n: int) -> None:
        fs = store.feature_sets("text")[0]
        stored_after_batch.append(store.count(fs.table_name))

    # no flush by row count; flush_seconds=0 writes after every batch
    run_extractor(store, text_extractor, limit=48, batch_size=16, flush_rows=10**9, flush_seconds=0, on_batch=after_batch)
    assert stored_after_batch == [16, 32, 48]


def test_sigterm_keeps_what_was_computed(tmp_path, meld_text_store, text_extractor):
    from bemerc.extract.run import Terminated, run_extractor

    store = Store(shutil.copytree(meld_text_store, tmp_path / "store"))
    batches = []

    def after_batch(n: int) -> None:
        batches.append(n)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        run_extractor(store, text_extractor, limit=160, batch_size=16, flush_rows=10**9, on_batch=after_batch)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert store.count(store.feature_sets("text")[0].table_name) == 32  # both batches, though no flush was due


def test_cli_exits_143_on_sigterm_and_resumes(tmp_path, meld_text_store, models_cache):
    store = shutil.copytree(meld_text_store, tmp_path / "store")
    cmd = [sys.executable, "-m", "bemerc", "extract", "--modality", "text", "--limit", "3000", "--batch-size", "16",
           "--threads", "1", "--store", str(store)]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:  # the first flush (256 rows) shows the model is working
        time.sleep(0.3)
        sets = Store(store).feature_sets("text")
        if sets and Store(store).count(sets[0].table_name):
            break
    assert proc.poll() is None, "the run ended before it could be stopped"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    kept = Store(store).count(Store(store).feature_sets("text")[0].table_name)
    assert 0 < kept < 3000
