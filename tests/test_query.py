"""`bemerc query` and bemerc.store.query on a real MELD subset with real MiniLM text features.

Neighbours are checked against a brute-force cosine search in numpy over the same stored vectors.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store import query as Q
from conftest import small_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir) -> Store:
    return small_store(tmp_path_factory.getbasetemp(), meld_dir)


def brute_force(store: Store, uid: str, candidates: set[str] | None = None) -> list[tuple[str, float]]:
    """(uid, cosine distance) of every other stored vector, nearest first."""
    table = store.read_features("text")
    uids = table["uid"].to_pylist()
    vectors = np.stack([np.asarray(v, dtype=np.float64) for v in table["vector"].to_pylist()])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    distances = 1.0 - vectors @ vectors[uids.index(uid)]
    ranked = sorted(zip(uids, distances), key=lambda p: p[1])
    return [(u, float(d)) for u, d in ranked if u != uid and (candidates is None or u in candidates)]


def test_similar_matches_a_brute_force_cosine_search(store):
    got = Q.similar(store, "dev/dia1_utt3", "text", k=5)
    expected = brute_force(store, "dev/dia1_utt3")[:5]
    assert got.columns == ["uid", "text", "label", "speaker", "split", "distance"]
    assert got["uid"].to_list() == [u for u, _ in expected]
    assert np.allclose(got["distance"].to_numpy(), [d for _, d in expected], atol=1e-4)
    assert "dev/dia1_utt3" not in got["uid"].to_list()
    utt = store.read("utterances").filter(pl.col("uid").is_in(got["uid"].to_list()))
    assert dict(zip(utt["uid"], utt["text"])) == dict(zip(got["uid"], got["text"]))


@pytest.mark.parametrize("split", ["dev", "train"])  # a minority (IN prefilter) and a majority (NOT IN)
def test_similar_where_filters_on_utterance_columns(store, split):
    got = Q.similar(store, "dev/dia1_utt3", "text", k=4, where=f"split = '{split}'")
    in_split = set(store.read("utterances", ["uid"], where=f"split = '{split}'")["uid"].to_list())
    expected = brute_force(store, "dev/dia1_utt3", in_split)[:4]
    assert got["uid"].to_list() == [u for u, _ in expected]
    assert set(got["split"].to_list()) == {split}


def test_similar_reports_unknown_uid_modality_and_filter(store):
    with pytest.raises(Q.QueryError, match="no utterance with uid 'dev/nope'"):
        Q.similar(store, "dev/nope", "text")
    with pytest.raises(Q.QueryError, match="no 'audio' features .*modalities present: text"):
        Q.similar(store, "dev/dia1_utt3", "audio")
    with pytest.raises(Q.QueryError, match="bad filter"):
        Q.similar(store, "dev/dia1_utt3", "text", where="no_such_column = 1")


def test_show_gives_context_features_and_failures(store):
    fs = store.feature_set("text")
    store.record_failures(fs, [("dev/dia2_utt1", "test: recorded failure")])
    try:
        view = Q.show(store, "dev/dia2_utt1")
    finally:
        store.delete("failures", "uid = 'dev/dia2_utt1'")
    assert view.utterance["uid"] == "dev/dia2_utt1" and view.utterance["meta"]["Season"]
    assert view.context["uid"].to_list() == ["dev/dia2_utt0"]
    assert view.feature_sets == [fs.id]
    assert view.failures["reason"].to_list() == ["test: recorded failure"]
    data = view.to_dict()
    json.dumps(data)  # plain JSON all the way down
    assert data["context"][0]["text"] == store.read("utterances", where="uid = 'dev/dia2_utt0'")["text"][0]
    first = Q.show(store, "dev/dia2_utt0")
    assert first.context.height == 0 and first.failures.height == 0


def test_where_returns_utterances_in_dialogue_order(store):
    df = Q.where(store, "split = 'train' AND speaker = 'Joey'", limit=6)
    assert df.height == 6 and set(df["speaker"]) == {"Joey"}
    keys = [(int(d), t) for d, t in zip(df["dialogue_id"], df["turn"])]
    assert keys == sorted(keys)
    everyone = Q.where(store, "split = 'train' AND speaker = 'Joey'")
    assert everyone.height == store.count("utterances", "split = 'train' AND speaker = 'Joey'")
    with pytest.raises(Q.QueryError, match="bad filter"):
        Q.where(store, "label = ")


def test_export_parquet_and_csv_round_trip(store, tmp_path):
    n = Q.export(store, "utterances", tmp_path / "u.parquet", "parquet")
    assert pq.read_table(tmp_path / "u.parquet").num_rows == n == store.count("utterances")
    n = Q.export(store, "text", tmp_path / "t.csv", "csv")  # a feature set by modality
    csv = pl.read_csv(tmp_path / "t.csv")
    stored = store.read_features("text")
    first = json.loads(csv.filter(pl.col("uid") == stored["uid"][0].as_py())["vector"][0])
    assert n == csv.height == stored.num_rows
    assert np.allclose(first, stored["vector"][0].as_py(), atol=1e-6)
    with pytest.raises(Q.QueryError, match="no table or feature set 'nope'"):
        Q.export(store, "nope", tmp_path / "x.csv", "csv")


def test_vector_index_is_built_only_on_large_tables(store, tmp_path):
    assert not Q.create_vector_index(store, "text")  # a few hundred rows: exact search stays
    copy = Store(tmp_path / "copy")
    copy.upsert("utterances", store.read_arrow("utterances"))
    fs = store.feature_set("text")
    fs_copy = copy.register_feature_set(fs.modality, fs.extractor, fs.config_hash, fs.config,
                                        [f for f in store.table(fs.table_name).schema if f.name != "uid"])
    copy.write_features(fs_copy, store.read_features(fs))
    assert Q.create_vector_index(copy, "text", min_rows=256)
    assert copy.table(fs_copy.table_name).list_indices()
    got = Q.similar(copy, "dev/dia1_utt3", "text", k=10)
    assert got.height == 10 and "dev/dia1_utt3" not in got["uid"].to_list()
    assert brute_force(store, "dev/dia1_utt3")[0][0] in got["uid"].to_list()  # approximate, but not lost


def test_cli_similar_show_where_export(store, tmp_path):
    out = runner.invoke(app, ["query", "similar", "dev/dia1_utt3", "-m", "text", "-k", "3", "--json", "--store", str(store.path)])
    assert out.exit_code == 0, out.output
    assert [r["uid"] for r in json.loads(out.stdout)] == Q.similar(store, "dev/dia1_utt3", "text", k=3)["uid"].to_list()

    out = runner.invoke(app, ["query", "similar", "dev/dia1_utt3", "-k", "3", "--where", "split = 'dev'", "--store", str(store.path)])
    assert out.exit_code == 0 and "nearest to dev/dia1_utt3" in out.stdout

    out = runner.invoke(app, ["query", "show", "dev/dia1_utt3", "--store", str(store.path)])
    assert out.exit_code == 0 and "Now, there’s two reasons." in out.stdout and "context" in out.stdout

    out = runner.invoke(app, ["query", "where", "label = 'fear'", "--json", "--limit", "2", "--store", str(store.path)])
    rows = json.loads(out.stdout)
    assert out.exit_code == 0 and len(rows) == 2 and {r["label"] for r in rows} == {"fear"}

    out = runner.invoke(app, ["query", "export", "utterances", str(tmp_path / "u.csv"), "--format", "csv", "--store", str(store.path)])
    assert out.exit_code == 0 and pl.read_csv(tmp_path / "u.csv").height == store.count("utterances")


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "show", "dev/nope"], "no utterance with uid 'dev/nope'"),
        (["query", "similar", "dev/nope"], "no utterance with uid 'dev/nope'"),
        (["query", "export", "nope", "x.csv"], "no table or feature set 'nope'"),
        (["query", "where", "nope = 1"], "bad filter"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(store, args, message):
    out = runner.invoke(app, [*args, "--store", str(store.path)])
    assert out.exit_code == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
