"""The HTTP API on a real MELD subset: real MiniLM text features, a real baseline run, real uploads.

Most requests go through FastAPI's TestClient; one test talks to a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bemerc.serve import create_app
from bemerc.serve.request import PredictError, ServeLimits
from bemerc.serve.uploads import check_media
from bemerc.store import Store
from bemerc.store import query as Q
from bemerc.store.ingest.common import sniff_container
from bemerc.store.runs import list_runs
from conftest import LOCAL, running_server, served_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir) -> Store:
    return served_store(tmp_path_factory.getbasetemp(), meld_dir)


@pytest.fixture(scope="module")
def client(store) -> TestClient:
    return TestClient(create_app(store.path, limits=ServeLimits(max_upload_bytes=200_000, max_request_bytes=2_000_000)), base_url=LOCAL)


@pytest.fixture(scope="module")
def run(store) -> dict:
    return list_runs(store)[-1]


def test_utterance_by_uid_with_slashes(client, store, run):
    r = client.get("/utterances/dev/dia1_utt3")
    assert r.status_code == 200
    body = r.json()
    assert body["utterance"]["text"] == "Now, there’s two reasons."
    assert [c["uid"] for c in body["context"]] == ["dev/dia1_utt0", "dev/dia1_utt1", "dev/dia1_utt2"]
    assert body["feature_sets"] == [store.feature_set("text").id]
    [pred] = body["predictions"]
    stored = store.read("predictions", where="uid = 'dev/dia1_utt3'")
    assert pred["run_id"] == run["run_id"] and pred["label"] == stored["label"][0]
    assert list(pred["probabilities"]) == run["classes"]
    assert pred["probabilities"][pred["label"]] == max(pred["probabilities"].values())


def test_unknown_uid_is_404(client):
    r = client.get("/utterances/dev/dia999_utt0")
    assert r.status_code == 404 and "dev/dia999_utt0" in r.json()["detail"]
    assert client.get("/similar", params={"uid": "dev/dia999_utt0"}).status_code == 404


def test_similar_equals_the_query_module(client, store):
    r = client.get("/similar", params={"uid": "dev/dia1_utt3", "modality": "text", "k": 4, "split": "train"})
    assert r.status_code == 200
    expected = Q.similar(store, "dev/dia1_utt3", "text", k=4, where="split = 'train'")
    assert [h["uid"] for h in r.json()] == expected["uid"].to_list()
    assert all(h["split"] == "train" for h in r.json())
    assert client.get("/similar", params={"uid": "dev/dia1_utt3", "modality": "audio"}).status_code == 404
    assert client.get("/similar", params={"uid": "dev/dia1_utt3", "split": "dev' OR 1=1 --"}).status_code == 422
    assert client.get("/similar", params={"uid": "dev/dia1_utt3", "k": 0}).status_code == 422


def test_runs_and_report(client, run, tmp_path, store):
    r = client.get("/runs")
    assert r.status_code == 200
    assert [x["run_id"] for x in r.json()] == [x["run_id"] for x in list_runs(store)]
    report = client.get(f"/runs/{run['run_id']}/report").json()
    saved = json.loads((Path(run["run_dir"]) / "metrics.json").read_text())
    assert report["metrics"]["dev"]["weighted_f1"] == saved["dev"]["weighted_f1"] and report["report"] is None
    (tmp_path / "report.md").write_text("# runs compared\n")
    with_report = TestClient(create_app(store.path, report_dir=tmp_path), base_url=LOCAL).get(f"/runs/{run['run_id']}/report").json()
    assert with_report["report"] == {"file": "report.md", "format": "md", "content": "# runs compared\n"}
    assert client.get("/runs/no-such-run/report").status_code == 404


def test_dialogues_list_and_one_dialogue(client, store, run):
    listed = client.get("/dialogues", params={"split": "dev"}).json()
    assert [d["dialogue_id"] for d in listed] == [str(i) for i in range(len(listed))]
    assert sum(d["utterances"] for d in listed) == store.count("utterances", "split = 'dev'")
    body = client.get("/dialogues/dev/1").json()
    turns = body["utterances"]
    assert [u["turn"] for u in turns] == list(range(len(turns))) and turns[3]["text"] == "Now, there’s two reasons."
    assert all(u["predictions"][0]["run_id"] == run["run_id"] for u in turns)
    assert client.get("/dialogues/dev/4242").status_code == 404


def test_predict_text_only_matches_the_stored_run(client, store, run):
    """The dialogue of dev/dia1, sent as plain text, gets the probabilities the run stored for it."""
    turns = client.get("/dialogues/dev/1").json()["utterances"]
    body = {"utterances": [{"speaker": u["speaker"], "text": u["text"]} for u in turns]}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["run"] == run["run_id"] and out["kind"] == "baseline" and out["classes"] == run["classes"]
    assert len(out["utterances"]) == len(turns)
    stored = {u["uid"]: u["predictions"][0] for u in turns}
    for u, got in zip(turns, out["utterances"]):
        assert got["modalities"] == ["text"] and got["errors"] == {}
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert got["label"] == stored[u["uid"]]["label"]
        # The store embedded these texts in a large length-sorted batch, /predict in a batch of 5: float
        # rounding differs in the last bits and can move an XGBoost split, so allow a small gap.
        assert np.allclose(list(got["probabilities"].values()), list(stored[u["uid"]]["probabilities"].values()), atol=0.03)


def test_predict_names_a_run_and_refuses_unknown_ones(client, run):
    body = {"utterances": [{"speaker": "Ross", "text": "I can't believe you did that!"}], "run": run["run_id"]}
    assert client.post("/predict", json=body).json()["run"] == run["run_id"]
    r = client.post("/predict", json={**body, "run": "baseline-nope"})
    assert r.status_code == 404 and "baseline-nope" in r.json()["detail"]


@pytest.mark.parametrize("field", ["audio", "video_path", "path"])
def test_predict_refuses_a_path_in_json(client, field):
    r = client.post("/predict", json={"utterances": [{"speaker": "A", "text": "hi", field: "/etc/passwd"}]})
    assert r.status_code == 422
    assert f"'{field}' is not accepted" in r.json()["detail"] and "upload" in r.json()["detail"]


def test_predict_refuses_a_path_in_a_form_field(client):
    fields = {"dialogue": (None, json.dumps({"utterances": [{"text": "hi"}]})), "audio_0": (None, "/etc/passwd")}
    r = client.post("/predict", files=fields)  # multipart with plain text parts
    assert r.status_code == 422 and "must be uploaded as a file" in r.json()["detail"]
    r = client.post("/predict", data={"dialogue": "{}"})  # urlencoded
    assert r.status_code == 415


def test_predict_bad_requests_are_4xx_with_a_message(client):
    assert client.post("/predict", json={"utterances": []}).status_code == 422
    assert client.post("/predict", json={"utterances": [{"speaker": "A"}]}).status_code == 422
    r = client.post("/predict", content=b"utterances=hi", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    dialogue = json.dumps({"utterances": [{"text": "hi"}]})
    r = client.post("/predict", data={"dialogue": dialogue}, files={"audio_5": ("a.wav", b"RIFF", "audio/wav")})
    assert r.status_code == 422 and "utterance 5" in r.json()["detail"]
    r = client.post("/predict", data={"dialogue": dialogue}, files={"../../etc/x": ("a.wav", b"RIFF", "audio/wav")})
    assert r.status_code == 422 and "audio_<index>" in r.json()["detail"]


def test_predict_upload_over_the_size_limit_is_413(client, ravdess_dir):
    wav = next((ravdess_dir / "audio").glob("*.wav"))  # ~0.6 MB, the test app allows 200 kB per file
    dialogue = json.dumps({"utterances": [{"text": "Kids are talking by the door."}]})
    r = client.post("/predict", data={"dialogue": dialogue}, files={"audio_0": (wav.name, wav.read_bytes(), "audio/wav")})
    assert r.status_code == 413 and "audio_0" in r.json()["detail"]
    big = b"\0" * 2_100_000  # over the whole-request limit of 2 MB
    r = client.post("/predict", data={"dialogue": dialogue}, files={"audio_0": ("a.wav", big, "audio/wav")})
    assert r.status_code == 413


@pytest.mark.parametrize(
    "name, content",
    [
        ("audio_0", b"just some text, not audio at all"),
        ("audio_0", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n"),  # a playlist naming a server file
        ("audio_0", b"ffconcat version 1.0\nfile '/etc/passwd'\n"),
        ("video_0", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\0" * 40),  # a truncated wav header
    ],
)
def test_predict_non_media_upload_is_415(client, name, content):
    dialogue = json.dumps({"utterances": [{"text": "Hello there."}]})
    r = client.post("/predict", data={"dialogue": dialogue}, files={name: ("clip.wav", content, "audio/wav")})
    assert r.status_code == 415, r.text
    assert name in r.json()["detail"]


def test_media_check_on_real_files(ravdess_dir):
    video = ravdess_dir / "video" / "01-01-01-01-01-01-01.mp4"
    wav = next((ravdess_dir / "audio").glob("*.wav"))
    assert sniff_container(video.read_bytes()[:16]) == "mp4" and sniff_container(wav.read_bytes()[:16]) == "wav"
    check_media(video, "video", "video_0")
    check_media(video, "audio", "audio_0")  # its audio track
    check_media(wav, "audio", "audio_0")
    with pytest.raises(PredictError, match="no video stream") as err:
        check_media(wav, "video", "video_0")
    assert err.value.status == 415


def test_predict_with_an_uploaded_audio_keeps_the_text_run_working(client, ravdess_dir, tmp_path, store):
    """A text-only run ignores media it has no extractor for; the upload is still checked."""
    small = tmp_path / "short.wav"
    wav = next((ravdess_dir / "audio").glob("*.wav"))
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-t", "0.5", "-ac", "1", "-ar", "16000", str(small)], check=True)
    dialogue = json.dumps({"utterances": [{"speaker": "Actor", "text": "Kids are talking by the door."}]})
    r = client.post("/predict", data={"dialogue": dialogue}, files={"audio_0": ("x.bin", small.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["utterances"][0]["modalities"] == ["text"]


def test_real_uvicorn_on_loopback(store):
    app = create_app(store.path)
    with running_server(app) as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/utterances/dev/dia0_utt0").json()["utterance"]["speaker"]
            assert http.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
            assert http.get("/docs").status_code == 200
            page = http.get("/")
            assert page.status_code == 200 and "/static/app.js" in page.text
            assert http.get("/static/style.css").status_code == 200
            r = http.post("/predict", json={"utterances": [{"speaker": "Monica", "text": "Oh my God, that is amazing!"}]})
            assert r.status_code == 200 and r.json()["utterances"][0]["label"] in r.json()["classes"]


def test_predict_with_a_tuned_run_matches_its_stored_predictions(store, run, tiny_llm, tmp_path):
    """A LoRA run of a tiny random-weight Llama (text only) on a copy of the store: /predict scores
    the labels of a dev dialogue as the run's own evaluation did."""
    from bemerc.train.tune.loop import TuneConfig, tune

    copy = Store(shutil.copytree(store.path, tmp_path / "store"))
    config = TuneConfig(model=str(tiny_llm), stage="merc", run_dir=str(tmp_path / "tune"), modalities=[], context=3,
                        epochs=1, batch_size=8, lr=1e-2, train_limit=80, progress=False)
    run_id = tune(copy, config)["run_id"]
    client = TestClient(create_app(copy.path), base_url=LOCAL)
    turns = client.get("/dialogues/dev/1").json()["utterances"]
    r = client.post("/predict", json={"utterances": [{"speaker": u["speaker"], "text": u["text"]} for u in turns], "run": run_id})
    assert r.status_code == 200, r.text
    for u, got in zip(turns, r.json()["utterances"]):
        [mine] = [p for p in u["predictions"] if p["run_id"] == run_id]
        assert np.allclose(list(got["probabilities"].values()), list(mine["probabilities"].values()), atol=2e-3)
        assert got["modalities"] == [] and got["label"] in got["probabilities"]

    # a fusion of the baseline and the tuned run: /predict loads both members and fuses with the run's weights
    from bemerc.train.fuse import fuse_runs

    fused = fuse_runs(copy, [run["run_id"], run_id], run_dir=tmp_path / "fusion")
    r = client.post("/predict", json={"utterances": [{"speaker": u["speaker"], "text": u["text"]} for u in turns], "run": fused.run_id})
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "fusion"
    turns = client.get("/dialogues/dev/1").json()["utterances"]
    for u, got in zip(turns, r.json()["utterances"]):
        [mine] = [p for p in u["predictions"] if p["run_id"] == fused.run_id]
        assert np.allclose(list(got["probabilities"].values()), list(mine["probabilities"].values()), atol=0.03)


def test_cli_serve_refuses_a_missing_store(tmp_path):
    from typer.testing import CliRunner

    from bemerc.cli import app

    out = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "no store here" in out.stderr and not (tmp_path / "nope").exists()


# -- slow and dropped clients, ids with slashes (issue 18): a real uvicorn with serve's protocol --------
import contextlib
import logging
import socket
import threading
import time


@contextlib.contextmanager
def timed_server(app, limits: ServeLimits):
    """``app`` on 127.0.0.1 under uvicorn as `bemerc serve` runs it (server_config: header deadline);
    uvicorn leaves logging alone, so its warnings reach pytest's caplog."""
    import uvicorn

    from bemerc.serve.server import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, limits, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _trickle(port: int, body: bytes, results: list, stop: threading.Event) -> None:
    """A /predict whose headers arrive at once and whose body comes one byte a second; records
    the status line the server answers (or 'closed')."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        s.settimeout(1.0)
        for byte in body:
            if stop.is_set():
                break
            try:
                s.sendall(bytes([byte]))
                answer = s.recv(200)
                results.append(answer.split(b"\r\n", 1)[0].decode() if answer else "closed")
                return
            except socket.timeout:
                continue
            except OSError:
                results.append("closed")
                return
        results.append("unanswered")


def test_twenty_trickling_clients_hold_no_slot_and_get_408(store, caplog):
    limits = ServeLimits(max_pending=4, receive_timeout_s=2.0)
    body = json.dumps({"utterances": [{"speaker": "Ross", "text": "Hi there, how are you doing today?"}]}).encode()
    results: list[str] = []
    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    with timed_server(create_app(store.path, limits=limits), limits) as port:
        clients = [threading.Thread(target=_trickle, args=(port, body, results, stop)) for _ in range(20)]
        for c in clients:
            c.start()
        time.sleep(0.5)
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            answers = [http.post("/predict", json={"utterances": [{"speaker": "Monica", "text": f"Line {i} of mine!"}]}).status_code
                       for i in range(3)]
        assert answers == [200, 200, 200]  # 20 slow clients hold none of the 4 places
        for c in clients:
            c.join(10)
        stop.set()
        assert time.monotonic() - started < 10
    assert results == ["HTTP/1.1 408 Request Timeout"] * 20
    late = [r.getMessage() for r in caplog.records if "body not received within 2 s" in r.getMessage()]
    assert len(late) == 20 and all("\n" not in m for m in late)
    assert not any(r.exc_info for r in caplog.records)


def test_a_client_that_drops_mid_body_is_one_log_line(store, caplog):
    limits = ServeLimits(receive_timeout_s=5.0)
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    with timed_server(create_app(store.path, limits=limits), limits) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n{\"utterances\": [")
            time.sleep(0.3)
        for _ in range(50):
            if any("disconnected before sending its whole body" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/info").status_code == 200  # still serving
    dropped = [r for r in caplog.records if "disconnected before sending its whole body" in r.getMessage()]
    assert len(dropped) == 1 and "\n" not in dropped[0].getMessage()
    assert not any(r.exc_info or "ClientDisconnect" in r.getMessage() for r in caplog.records)


def test_headers_that_trickle_are_cut_off(store, caplog):
    limits = ServeLimits(receive_timeout_s=1.0)
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    with timed_server(create_app(store.path, limits=limits), limits) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the server
            assert 0.9 < time.monotonic() - started < 3
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:  # kept-alive requests still work
            assert [http.get("/info").status_code for _ in range(3)] == [200, 200, 200]
            time.sleep(1.5)  # idle on a kept-alive connection is not a late header
            assert http.get("/info").status_code == 200
    assert sum("request headers not received within 1 s" in r.getMessage() for r in caplog.records) == 1


def test_a_dialogue_id_with_slashes_is_served(tmp_path, store):
    from typer.testing import CliRunner

    from bemerc.cli import app as cli

    manifest = tmp_path / "m.csv"
    manifest.write_text("dialogue_id,turn,speaker,text,label,split\n"
                        "a/../b,0,Ross,Hi.,neutral,dev\na/../b,1,Rachel,Oh hi!,joy,dev\nplain,0,Joey,How you doin?,joy,dev\n")
    path = tmp_path / "store"
    assert CliRunner().invoke(cli, ["ingest", "manifest", str(manifest), "--store", str(path)]).exit_code == 0
    limits = ServeLimits()
    with timed_server(create_app(path, limits=limits), limits) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            listed = [d["dialogue_id"] for d in http.get("/dialogues", params={"split": "dev"}).json()]
            assert sorted(listed) == ["a/../b", "plain"]
            r = http.get("/dialogues/dev/a%2F..%2Fb")  # as the page asks for it (encodeURIComponent)
            assert r.status_code == 200, r.text
            assert r.json()["dialogue_id"] == "a/../b" and [u["text"] for u in r.json()["utterances"]] == ["Hi.", "Oh hi!"]
            assert http.get("/dialogues/dev/plain").json()["utterances"][0]["speaker"] == "Joey"
            assert http.get("/dialogues/dev/a%2F..%2Fc").status_code == 404
