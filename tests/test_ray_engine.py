"""`bemerc extract --engine ray` on a real local Ray cluster (2 CPUs, no dashboard), into a local
folder and into a real S3 server: same feature sets and vectors as the local engine, failures kept,
re-runs skip, and a worker killed mid-run is retried with every utterance stored once."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.extract.ray_engine import ExtractorRecipe, RayEngine
from bemerc.extract.run import run_extractor
from bemerc.store import Store

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_cluster(s3_server, models_cache):
    """One local Ray cluster for the module (its start-up is the slow part); started after the S3
    server and the models cache so that its workers inherit their environment."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_corpus(demo_manifest, tmp_path_factory) -> Path:
    """Four demo clips and one corrupt video, as a manifest with absolute paths."""
    root = tmp_path_factory.mktemp("small-corpus")
    rows = [json.loads(line) for line in demo_manifest.read_text().splitlines()[:4]]
    for row in rows:
        row["video"], row["audio"] = (str(demo_manifest.parent / row[k]) for k in ("video", "audio"))
    (root / "corrupt.mp4").write_bytes(Path(rows[0]["video"]).read_bytes()[:3000])
    rows.append({**rows[0], "turn": 4, "video": str(root / "corrupt.mp4"), "audio": ""})
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "manifest.jsonl"


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def vectors(store: Store, modality: str) -> tuple[str, dict[str, np.ndarray]]:
    fs = store.feature_set(modality)
    table = store.read_features(fs, ["uid", "vector"])
    return fs.id, {u: np.asarray(v) for u, v in zip(table["uid"].to_pylist(), table["vector"].to_pylist())}


def test_ray_text_into_s3_matches_local_then_baseline_and_query(ray_cluster, s3_store, demo_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = str(tmp_path / "local")
    for store in (local, s3_store):
        cli("ingest", "manifest", str(demo_manifest), "--dataset", "demo", "--store", store)
    # fp32: Ray's workers batch the rows otherwise than one local process, which bf16 (auto on a CPU with
    # bf16 units) rounds differently; the engines must agree to fp32's rounding
    cli("extract", "--modality", "text", "--precision", "fp32", "--store", local)
    out = cli("extract", "--modality", "text", "--precision", "fp32", "--engine", "ray", "--workers", "2", "--store", s3_store)
    assert "51 extracted" in out
    local_id, local_vectors = vectors(Store(local), "text")
    ray_id, ray_vectors = vectors(Store(s3_store), "text")
    assert ray_id == local_id and ray_vectors.keys() == local_vectors.keys()
    for uid, vector in local_vectors.items():
        np.testing.assert_allclose(ray_vectors[uid], vector, atol=1e-5)
    assert "0 extracted, 51 already stored" in cli("extract", "--modality", "text", "--precision", "fp32", "--engine", "ray", "--store", s3_store)
    assert "late fusion dev" in cli("baseline", "--store", s3_store)
    similar = [cli("query", "similar", "train/demo01_0", "-k", "3", "--store", store) for store in (s3_store, local)]
    assert similar[0] == similar[1] and similar[0].count("/demo") == 4  # the query and 3 neighbours


def test_ray_behavior_matches_local_and_keeps_failures(ray_cluster, small_corpus, tmp_path):
    stores = {engine: str(tmp_path / engine) for engine in ("local", "ray")}
    for engine, store in stores.items():
        cli("ingest", "manifest", str(small_corpus), "--dataset", "small", "--store", store)
        out = cli("extract", "--modality", "behavior", "--engine", engine, "--workers", "2", "--store", store)
        assert "4 extracted, 0 already stored, 1 failed" in out, out
    (local_id, local_vectors), (ray_id, ray_vectors) = (vectors(Store(s), "behavior") for s in stores.values())
    assert ray_id == local_id and ray_vectors.keys() == local_vectors.keys()
    for uid, vector in local_vectors.items():
        np.testing.assert_allclose(ray_vectors[uid], vector, rtol=1e-4, atol=1e-4)
    failures = Store(stores["ray"]).read("failures")
    assert failures["uid"].to_list() == ["train/demo01_4"] and failures["feature_set"][0] == ray_id
    rerun = cli("extract", "--modality", "behavior", "--engine", "ray", "--store", stores["ray"])
    assert "0 extracted, 4 already stored, 0 failed, 1 failed before" in rerun


def test_ray_workers_read_media_from_object_storage(ray_cluster, s3_server, small_corpus, tmp_path):
    """Clips and manifest on S3, nothing shared on disk: ingest checks and hashes the objects, the Ray
    workers download what they extract, features equal those from the same files on a local path, and
    an object deleted after ingest becomes a failure naming it."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    rows = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    for row in rows:  # upload each clip under clips/ and point the manifest at it relatively
        for key in ("video", "audio"):
            if row[key]:
                s3.upload_file(row[key], "bemerc-test", f"corpus/clips/{Path(row[key]).name}")
                row[key] = f"clips/{Path(row[key]).name}"
    rows.append({**rows[1], "turn": 5, "video": "clips/gone.mp4", "audio": ""})
    s3.upload_file(str(small_corpus.parent / "corrupt.mp4"), "bemerc-test", "corpus/clips/gone.mp4")
    s3.put_object(Bucket="bemerc-test", Key="corpus/manifest.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))
    remote, local = "s3://bemerc-test/corpus/store", str(tmp_path / "local")
    cli("ingest", "manifest", "s3://bemerc-test/corpus/manifest.jsonl", "--dataset", "small", "--store", remote)
    cli("ingest", "manifest", str(small_corpus), "--dataset", "small", "--store", local)
    checksums = [dict(zip(*Store(s).read("utterances", ["uid", "media_sha256"]).to_dict(as_series=False).values()))
                 for s in (remote, local)]
    assert {u: checksums[0][u] for u in checksums[1]} == checksums[1]  # the same bytes hash the same
    s3.delete_object(Bucket="bemerc-test", Key="corpus/clips/gone.mp4")

    for modality in ("behavior", "audio"):
        out = cli("extract", "--modality", modality, "--engine", "ray", "--workers", "2", "--store", remote)
        assert f"{4 if modality == 'behavior' else 4} extracted" in out and "2 failed" in out, out
        cli("extract", "--modality", modality, "--store", local)
        (local_id, local_vectors), (ray_id, ray_vectors) = (vectors(Store(s), modality) for s in (local, remote))
        assert ray_id == local_id and ray_vectors.keys() == local_vectors.keys()
        for uid, vector in local_vectors.items():
            np.testing.assert_allclose(ray_vectors[uid], vector, rtol=1e-4, atol=1e-4)
    failures = Store(remote).read("failures").filter(pl.col("feature_set") == Store(remote).feature_set("behavior").id)
    reasons = dict(zip(failures["uid"].to_list(), failures["reason"].to_list()))
    assert reasons.keys() == {"train/demo01_4", "train/demo01_5"}
    assert "object not found" in reasons["train/demo01_5"] and "s3://bemerc-test/corpus/clips/gone.mp4" in reasons["train/demo01_5"]

    s3.put_object(Bucket="bemerc-test", Key="corpus/bad.jsonl", Body=json.dumps({**rows[0], "video": "clips/none.mp4"}) + "\n")
    result = runner.invoke(app, ["ingest", "manifest", "s3://bemerc-test/corpus/bad.jsonl", "--store", remote])
    assert result.exit_code == 1
    assert "s3://bemerc-test/corpus/bad.jsonl: row 1: video object not found: s3://bemerc-test/corpus/clips/none.mp4" in result.output


def test_actors_ask_for_gpus_only_where_a_model_runs_on_one():
    from bemerc.extract.ray_engine import actor_gpus

    from bemerc.extract.base import uses_gpu
    from bemerc.extract.factory import build_extractor

    capable = [uses_gpu(build_extractor(m)) for m in ("text", "audio", "visual", "behavior")]
    assert capable == [True, True, False, False]  # offline visual and behaviour: MediaPipe and a 1 ms CPU network
    assert [actor_gpus(c, None, cluster_gpus=4) for c in capable] == [1, 1, 0, 0]
    assert actor_gpus(True, None, cluster_gpus=0) == 0  # a CPU cluster
    assert actor_gpus(True, None, cluster_gpus=4, device="cpu") == 0
    assert actor_gpus(False, 0.25, cluster_gpus=4) == 0.25  # --worker-gpus wins


def test_a_cpu_cluster_runs_actors_on_the_cpu(ray_cluster, demo_manifest, tmp_path):
    store = Store(str(tmp_path / "store"))
    cli("ingest", "manifest", str(demo_manifest), "--dataset", "demo", "--store", str(tmp_path / "store"))
    engine = RayEngine(ExtractorRecipe("text"), workers=1)
    summary = run_extractor(store, ExtractorRecipe("text", device="cpu")(), limit=4, engine=engine)
    assert summary.done == 4 and engine.gpus_used == 0


class WaitsToBeKilled:
    """The real text extractor; on the run's first batch its worker writes its pid to ``marker`` and
    waits (up to a minute) for the test to kill the process."""

    def __init__(self, marker: str):
        from bemerc.extract.text import TextExtractor

        self.inner, self.marker = TextExtractor("offline"), Path(marker)
        self.modality, self.name, self.random_weights = self.inner.modality, self.inner.name, self.inner.random_weights

    def config(self) -> dict:
        return self.inner.config()

    def fields(self):
        return self.inner.fields()

    def extract(self, items):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(60)
        return self.inner.extract(items)


def test_a_killed_worker_is_retried_and_every_utterance_stored_once(ray_cluster, demo_manifest, tmp_path):
    import functools

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    store_path = str(tmp_path / "store")
    cli("ingest", "manifest", str(demo_manifest), "--dataset", "demo", "--store", store_path)
    store = Store(store_path)
    marker, killed = tmp_path / "worker.pid", []

    def kill_the_worker() -> None:  # from the test process, as an operator or the OOM killer would
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_the_worker, daemon=True)
    watcher.start()
    engine = RayEngine(functools.partial(WaitsToBeKilled, str(marker)), workers=2)
    summary = run_extractor(store, ExtractorRecipe("text")(), limit=24, batch_size=8, engine=engine)
    watcher.join(5)
    assert killed and killed[0] != os.getpid(), "no worker was killed"
    assert (summary.done, summary.failed) == (24, 0)
    uids = store.read_features(store.feature_set("text"), ["uid"])["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 24
