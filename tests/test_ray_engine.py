"""`bemerc extract --engine ray` on a real local Ray cluster (2 CPUs, no dashboard), into a local
folder and into a real S3 server: same feature sets and vectors as the local engine, failures kept,
re-runs skip, and a worker killed mid-run is retried with every utterance stored once."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
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
    cli("extract", "--modality", "text", "--store", local)
    out = cli("extract", "--modality", "text", "--engine", "ray", "--workers", "2", "--store", s3_store)
    assert "51 extracted" in out
    local_id, local_vectors = vectors(Store(local), "text")
    ray_id, ray_vectors = vectors(Store(s3_store), "text")
    assert ray_id == local_id and ray_vectors.keys() == local_vectors.keys()
    for uid, vector in local_vectors.items():
        np.testing.assert_allclose(ray_vectors[uid], vector, atol=1e-5)
    assert "0 extracted, 51 already stored" in cli("extract", "--modality", "text", "--engine", "ray", "--store", s3_store)
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


class DiesOnce:
    """The real text extractor, whose process kills itself (SIGKILL) on its first batch of the run."""

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
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.extract(items)


def test_a_killed_worker_is_retried_and_every_utterance_stored_once(ray_cluster, demo_manifest, tmp_path):
    import functools

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    store_path = str(tmp_path / "store")
    cli("ingest", "manifest", str(demo_manifest), "--dataset", "demo", "--store", store_path)
    store = Store(store_path)
    marker = tmp_path / "killed"
    engine = RayEngine(functools.partial(DiesOnce, str(marker)), workers=2)
    summary = run_extractor(store, ExtractorRecipe("text")(), limit=24, batch_size=8, engine=engine)
    assert marker.exists(), "no worker was killed"
    assert (summary.done, summary.failed) == (24, 0)
    uids = store.read_features(store.feature_set("text"), ["uid"])["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 24
