"""The store on object storage: a real S3 server (moto) on 127.0.0.1, the real CLI, two real writers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store, StoreError, StoreLockedError
from bemerc.store.lock import LOCK_FILE

runner = CliRunner()

WRITER = """
import sys
import pyarrow as pa
from bemerc.store import Store
store = Store(sys.argv[1])
first = int(sys.argv[2])
fs = store.register_feature_set("text", "probe", "h1", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
for round in range(6):
    uids = [f"u{i:03d}" for i in range(first + 20 * round, first + 20 * round + 60)]
    rows = pa.table({"uid": uids, "vector": pa.array([[float(first), float(round)]] * len(uids), pa.list_(pa.float32(), 2))})
    store.write_features(fs, rows)
"""


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_pipeline_runs_on_s3(s3_store, demo_manifest, models_cache, tiny_llm, tmp_path, monkeypatch):
    """Every command on a store on S3: ingest, extract, baseline, tune, fuse, compare, query, serve."""
    from fastapi.testclient import TestClient

    from bemerc.serve import create_app

    monkeypatch.chdir(tmp_path)  # run folders of a store on object storage go to ./runs
    cli("ingest", "manifest", str(demo_manifest), "--dataset", "demo", "--store", s3_store)
    cli("extract", "--modality", "text", "--store", s3_store)
    assert "0 extracted, 51 already stored" in cli("extract", "--modality", "text", "--store", s3_store)
    assert "late fusion dev" in cli("baseline", "--store", s3_store)
    assert "weighted F1" in cli("tune", "--model", str(tiny_llm), "--epochs", "1", "--align-epochs", "0", "--store", s3_store)
    assert "fusion dev" in cli("fuse", "baseline:latest", "tune:latest", "--store", s3_store)
    cli("compare", "--out", str(tmp_path / "report"), "--store", s3_store)
    assert (tmp_path / "report" / "report.md").is_file()
    client = TestClient(create_app(s3_store), base_url="http://127.0.0.1")
    assert sorted(r["kind"] for r in client.get("/runs").json()) == ["baseline", "fusion", "tune"]
    answer = client.post("/predict", json={"utterances": [{"speaker": "A", "text": "I am so happy for you!"}]})
    assert answer.status_code == 200 and len(answer.json()["utterances"]) == 1, answer.text
    neighbours = cli("query", "similar", "train/demo01_0", "-k", "3", "--store", s3_store).split("┡")[1]  # table body
    assert neighbours.count("/demo") == 3 and "train/demo01_0 " not in neighbours
    info = json.loads(cli("store", "info", "--json", "--store", s3_store))
    assert info["tables"]["utterances"]["rows"] == 51 and info["features"]["text/minilm-l6"]["rows"] == 51
    assert len(list((tmp_path / "runs").iterdir())) == 3
    bucket, prefix = s3_store.removeprefix("s3://").split("/", 1)
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]
    assert any(o["Key"].startswith(f"{prefix}/utterances.lance/") for o in listed)
    assert not any(o["Key"].startswith(f"{prefix}/runs/") for o in listed)


def test_two_writers_at_once_store_every_key_once(s3_store):
    """Two processes upsert overlapping keys in six commits each, at the same time: the lease lock
    serialises them (LanceDB's merge_insert alone duplicates keys here)."""
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, s3_store, str(first)]) for first in (0, 50)]
    assert [w.wait(120) for w in writers] == [0, 0]
    store = Store(s3_store, create=False)
    uids = store.read_features(store.feature_set("text/probe"), ["uid"])["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 210  # u000..u209, each once
    assert store.count("feature_sets") == 1


def _put_lease(uri: str, lease: dict) -> None:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{LOCK_FILE}", Body=json.dumps(lease).encode())


def test_a_live_lease_makes_a_writer_wait_then_fail_and_a_dead_one_is_taken_over(s3_store):
    rows = pa.table({"uid": ["a"], "vector": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))})
    _put_lease(s3_store, {"holder": "pid 4242 on elsewhere (bemerc extract)", "expires_at": time.time() + 60})
    store = Store(s3_store, lock_timeout_s=0.5)
    with pytest.raises(StoreLockedError, match="pid 4242 on elsewhere"):
        store.register_feature_set("text", "probe", "h1", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
    _put_lease(s3_store, {"holder": "pid 4242 on elsewhere (bemerc extract)", "expires_at": time.time() - 1})
    fs = store.register_feature_set("text", "probe", "h1", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
    assert store.write_features(fs, rows) == 1
    assert "pid 4242" not in store.lock.holder()


def test_reading_a_missing_store_on_s3_is_an_error(s3_store):
    with pytest.raises(StoreError, match="no store here"):
        Store(s3_store, create=False)


def test_bad_manifests_and_media_on_s3_are_one_line_and_store_nothing(s3_server, s3_store, demo_manifest):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    row = json.loads(demo_manifest.read_text().splitlines()[0])
    s3.upload_file(str(demo_manifest.parent / row["video"]), "bemerc-test", "bad/clip.mp4")
    s3.put_object(Bucket="bemerc-test", Key="bad/notes.mp4", Body=b"not a video, just notes\n")
    s3.put_object(Bucket="bemerc-test", Key="bad/empty.wav", Body=b"")
    good = {**row, "video": "clip.mp4", "audio": ""}
    cases = {
        "missing.jsonl": (None, "s3://bemerc-test/bad/missing.jsonl: file not found"),
        "text.jsonl": ({**good, "turn": 1, "video": "notes.mp4"}, "row 2: video object s3://bemerc-test/bad/notes.mp4 is not audio, video or a still image"),
        "empty.jsonl": ({**good, "turn": 1, "audio": "empty.wav"}, "row 2: audio object s3://bemerc-test/bad/empty.wav is empty"),
        "elsewhere.jsonl": ({**good, "turn": 1, "video": "s3://no-such-bucket/clip.mp4"}, "row 2: video"),
    }
    cli("ingest", "manifest", str(demo_manifest), "--store", s3_store)
    before = Store(s3_store).version("utterances")
    for name, (bad_row, expected) in cases.items():
        if bad_row is not None:
            s3.put_object(Bucket="bemerc-test", Key=f"bad/{name}", Body="".join(json.dumps(r) + "\n" for r in (good, bad_row)))
        result = runner.invoke(app, ["ingest", "manifest", f"s3://bemerc-test/bad/{name}", "--store", s3_store])
        assert result.exit_code == 1, result.output
        assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert Store(s3_store).version("utterances") == before


def test_meld_and_iemocap_folders_on_s3_ingest_like_local_ones(s3_server, meld_dir, ravdess_dir, tmp_path):
    """The same trees on disk and under s3://: the same rows, clips linked by URI, missing ones
    reported, checksums equal."""
    import csv
    import shutil
    from pathlib import Path

    from conftest import write_iemocap

    from bemerc.store.ingest import read_iemocap, read_meld

    meld = tmp_path / "MELD"
    (meld / "data" / "MELD").mkdir(parents=True)
    shutil.copy(meld_dir / "train_sent_emo.csv", meld / "data" / "MELD")
    rows = list(csv.DictReader(open(meld_dir / "dev_sent_emo.csv", encoding="utf-8")))[:12]
    with open(meld / "data" / "MELD" / "dev_sent_emo.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (meld / "MELD.Raw" / "dev_splits_complete").mkdir(parents=True)
    video = next((ravdess_dir / "video").glob("*.mp4"))
    for r in rows[:-1]:  # the last clip is missing, as two are in the real release
        shutil.copy(video, meld / "MELD.Raw" / "dev_splits_complete" / f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}.mp4")
    iemocap = tmp_path / "IEMOCAP_full_release"
    write_iemocap(iemocap, sorted((ravdess_dir / "audio").glob("*.wav"))[0])
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for tree in (meld, iemocap):
        for path in tree.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), "bemerc-test", f"corpora/{path.relative_to(tmp_path)}")

    def as_uri(value):
        return f"s3://bemerc-test/corpora/{Path(value).relative_to(tmp_path)}" if value else value

    remotes = {}
    for reader, tree in ((read_meld, meld), (read_iemocap, iemocap)):
        local, remote = reader(tree), reader(f"s3://bemerc-test/corpora/{tree.name}")
        expected = [{**r, "video_path": as_uri(r["video_path"]), "audio_path": as_uri(r["audio_path"])} for r in local.rows]
        assert remote.rows == expected and remote.skipped == local.skipped and remote.missing_media == local.missing_media
        remotes[tree.name] = remote
    assert sum(str(r["video_path"]).startswith("s3://") for r in remotes["MELD"].rows) == 11
    assert len(remotes["MELD"].missing_media) == 1 and remotes["IEMOCAP_full_release"].skipped == {"label xxx": 2}
    assert all(r["audio_path"].startswith("s3://") for r in remotes["IEMOCAP_full_release"].rows)

    stores = {"local": str(tmp_path / "local"), "s3": str(tmp_path / "from-s3")}
    cli("ingest", "meld", str(meld), "--store", stores["local"])
    out = cli("ingest", "meld", "s3://bemerc-test/corpora/MELD", "--store", stores["s3"])
    assert "MELD: 10,001 utterances (train 9,989, dev 12)" in out and "1 utterance(s) have no clip" in out
    sums = [Store(s).read("utterances", ["uid", "media_sha256"]).sort("uid") for s in stores.values()]
    assert sums[0].equals(sums[1]) and sums[0]["media_sha256"].drop_nulls().len() == 11


def test_media_objects_are_downloaded_once_and_the_cache_stays_bounded(s3_server, ravdess_dir, tmp_path):
    """A recording cut into many utterances is fetched once; past the cache's limit the oldest copies
    go (never the two newest), and decoding from the object equals decoding the file."""
    from bemerc.extract.media import MediaError, _MediaCache, decode_audio, local_media, sample_frames

    s3 = boto3.client("s3", endpoint_url=s3_server)
    wavs = sorted((ravdess_dir / "audio").glob("*.wav"))[:3]
    uris = []
    for wav in wavs:
        s3.upload_file(str(wav), "bemerc-test", f"cache/{wav.name}")
        uris.append(f"s3://bemerc-test/cache/{wav.name}")
    first = local_media(uris[0])
    assert local_media(uris[0]) == first and first.read_bytes() == wavs[0].read_bytes()
    np.testing.assert_array_equal(decode_audio(uris[0], start_s=0.5, end_s=1.0), decode_audio(wavs[0], start_s=0.5, end_s=1.0))

    cache = _MediaCache(limit_mb=wavs[0].stat().st_size / 2**20 * 1.5)  # room for about one and a half files
    copies = [cache.get(uri) for uri in uris]
    assert not copies[0].exists() and copies[1].exists() and copies[2].exists()
    assert list(cache.files) == uris[1:]
    with pytest.raises(MediaError, match=r"object not found \(s3://bemerc-test/cache/none.wav\)"):
        local_media("s3://bemerc-test/cache/none.wav")
    video = next((ravdess_dir / "video").glob("*.mp4"))
    s3.put_object(Bucket="bemerc-test", Key="cache/truncated.mp4", Body=video.read_bytes()[:3000])
    with pytest.raises(MediaError, match=r"^s3://bemerc-test/cache/truncated.mp4: unreadable media"):
        sample_frames("s3://bemerc-test/cache/truncated.mp4")  # named by its URI, not the local copy


HOLDER = """
import sys
import pyarrow as pa
from bemerc.store import Store
store = Store(sys.argv[1])
store.lock.lease_s = float(sys.argv[2])  # a short lease (renewed every lease_s / 4 while held)
fs = store.register_feature_set("text", "probe", "h1", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
with store.lock:  # held across commits, as a command's writes are, until the process is killed
    for n in range(100_000):
        rows = pa.table({"uid": [f"dead{n:05d}"], "vector": pa.array([[float(n), 0.0]], pa.list_(pa.float32(), 2))})
        store.write_features(fs, rows)
        print(n, flush=True)  # committed
"""


def _read_lease(uri: str) -> dict:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{LOCK_FILE}")["Body"].read())


def test_a_writer_killed_while_holding_the_lease_is_taken_over_once_its_lease_expires(s3_store, capsys):
    """A real writer process SIGKILLed in the middle of its commits, lease held: a second writer is
    refused while the dead holder's lease runs, waits, takes the lease over once it has expired
    (nobody released it), and writes; every commit of the dead writer is there whole, once."""
    import signal

    lease_s = 4.0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, s3_store, str(lease_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0", "the writer made no commit"  # it holds the lease now
        deadline = time.monotonic() + 60
        while True:  # kill it just after a renewal, so that most of its lease is left to run
            lease = _read_lease(s3_store)
            if lease["expires_at"] - time.time() > lease_s - 1:
                break
            assert time.monotonic() < deadline, f"the holder never renewed its lease: {lease}"
            time.sleep(0.05)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    committed = 1 + len(holder.stdout.read().split())  # commits it said were done; one more may have landed
    holder.stdout.close()
    lease = _read_lease(s3_store)
    assert f"pid {holder.pid} on " in lease["holder"] and lease["expires_at"] > time.time(), lease  # dead, not released

    store = Store(s3_store, lock_timeout_s=0)
    fs = store.feature_set("text/probe")
    rows = pa.table({"uid": ["after"], "vector": pa.array([[1.0, 1.0]], pa.list_(pa.float32(), 2))})
    with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on "):
        store.write_features(fs, rows)  # its lease still runs: the holder may only be slow

    store = Store(s3_store, lock_timeout_s=60)
    assert store.write_features(fs, rows) == 1
    assert time.time() >= lease["expires_at"]  # taken over, not before the dead lease expired
    assert f"waiting for the store's writer (pid {holder.pid} on " in capsys.readouterr().err
    after = _read_lease(s3_store)
    assert after["expires_at"] == 0 and f"pid {holder.pid} " not in after["holder"]  # the new holder released it

    uids = Store(s3_store, create=False).read_features(fs, ["uid"])["uid"].to_pylist()
    dead = sorted(u for u in uids if u.startswith("dead"))
    assert len(uids) == len(set(uids)) and "after" in uids
    assert dead == [f"dead{n:05d}" for n in range(len(dead))] and len(dead) in (committed, committed + 1)
    result = runner.invoke(app, ["store", "check", "--store", s3_store])
    assert result.exit_code == 0, result.output
