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


def test_export_takes_the_format_from_the_name_and_refuses_a_mismatch(store, tmp_path):
    out = runner.invoke(app, ["query", "export", "runs", str(tmp_path / "runs.csv"), "--store", str(store.path)])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "runs.csv").read_bytes()[:4] != b"PAR1"  # not parquet in a .csv
    assert pl.read_csv(tmp_path / "runs.csv").columns[:2] == ["run_id", "kind"]
    assert Q.export(store, "utterances", tmp_path / "u.pq") == pq.read_table(tmp_path / "u.pq").num_rows
    out = runner.invoke(app, ["query", "export", "utterances", str(tmp_path / "u2.csv"), "-f", "parquet", "--store", str(store.path)])
    assert out.exit_code == 1 and "the name says csv but the format asked is parquet" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "u2.csv").exists()
    out = runner.invoke(app, ["query", "export", "utterances", str(tmp_path / "u.data"), "--store", str(store.path)])
    assert out.exit_code == 1 and "cannot tell the format from the name" in out.stderr
    out = runner.invoke(app, ["query", "export", "utterances", str(tmp_path / "u.data"), "-f", "csv", "--store", str(store.path)])
    assert out.exit_code == 0 and pl.read_csv(tmp_path / "u.data").height == store.count("utterances")


def test_show_lists_a_bounded_window_of_a_long_dialogue(tmp_path, meld_dir):
    from bemerc.store.ingest import read_meld, write_utterances

    first = next(r for r in read_meld(meld_dir).rows if r["split"] == "dev")
    rows = [{**first, "uid": f"dev/long_{t}", "dialogue_id": "long", "turn": t, "text": f"line {t}"} for t in range(10_000)]
    long = Store(tmp_path / "long")
    write_utterances(long, rows)
    view = Q.show(long, "dev/long_9000")
    assert view.context["turn"].to_list() == list(range(9000 - Q.SHOW_CONTEXT, 9000)) and view.earlier_turns == 9000
    assert Q.show(long, "dev/long_9000", context=3).context["text"].to_list() == ["line 8997", "line 8998", "line 8999"]
    assert Q.show(long, "dev/long_2", context=50).context.height == 2
    assert Q.show(long, "dev/long_9000", context=None).context.height == 9000
    out = runner.invoke(app, ["query", "show", "dev/long_9000", "--context", "4", "--store", str(long.path)])
    assert out.exit_code == 0, out.output
    assert "line 8996" in out.stdout and "line 8995" not in out.stdout and "8,996 earlier not shown" in out.stdout
    assert len(out.stdout.splitlines()) < 40


def test_latest_of_runs_recorded_in_the_same_second_is_the_last_written(tmp_path):
    from datetime import datetime, timezone

    import pyarrow as pa

    from bemerc.store import schema as S
    from bemerc.store.runs import list_runs
    from bemerc.train.fuse import resolve_runs

    runs = Store(tmp_path / "runs")
    second = datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)
    earlier = datetime(2026, 12, 1, 9, 59, 59, tzinfo=timezone.utc)
    # written in this order; the ids sort the other way, so neither id nor chance can pass the test
    order = [("baseline-20261201-100000-ffff", second), ("baseline-20261201-095959-9999", earlier),
             ("baseline-20261201-100000-aaaa", second), ("baseline-20261201-100000-0000", second)]
    for run_id, created in order:
        row = {"run_id": run_id, "kind": "baseline", "created_at": created, "classes": ["a"], "feature_sets": []}
        runs.upsert("runs", pa.Table.from_pylist([row], schema=S.RUNS))
        assert resolve_runs(runs, ["baseline:latest"]) == [run_id if created == second else "baseline-20261201-100000-ffff"]
    for _ in range(3):
        assert [r["run_id"] for r in list_runs(runs)] == [order[1][0], order[0][0], order[2][0], order[3][0]]
        assert resolve_runs(runs, ["baseline:latest"]) == ["baseline-20261201-100000-0000"]
