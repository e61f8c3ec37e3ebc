"""`bemerc ingest predictions`: a real baseline run's predictions written to a file and read back as a
run of kind `external` score the same, fuse with their source to the source's score, appear in
`compare` (with the paired test), `/runs` and the browse page's dialogues; bad files are refused
with one line naming the row, and nothing stored changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.runs import list_runs
from bemerc.train.external import PROBABILITY_TOLERANCE
from conftest import LOCAL, ngram_store, write_csv

runner = CliRunner()


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, meld_dir) -> tuple[Store, str]:
    """(store, run id) of a real baseline on :func:`ngram_store` (24 MELD dialogues, train/dev/test)."""
    folder = tmp_path_factory.mktemp("external")
    store = ngram_store(folder, meld_dir)
    out = _cli("baseline", "--store", str(store.path), "--feature-set", "text", "--run-dir", str(folder / "baseline"), "--json")
    return store, json.loads(out)["run_id"]


def _ingest(store: Store, path, name: str) -> str:
    out = _cli("ingest", "predictions", str(path), "--name", name, "--store", str(store.path))
    return out.split(":", 1)[0].strip()


def _compare(store: Store, *run_ids: str, split: str = "dev") -> dict:
    return json.loads(_cli("compare", *run_ids, "--store", str(store.path), "--split", split, "--json"))


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_round_trip_scores_the_same_and_fuses_to_the_source(baseline, tmp_path, suffix):
    store, source = baseline
    path = tmp_path / f"predictions.{suffix}"
    _cli("export", "predictions", source, str(path), "--store", str(store.path))
    external = _ingest(store, path, f"copy-{suffix}")
    assert external.startswith(f"external-copy-{suffix}-")
    run = next(r for r in list_runs(store) if r["run_id"] == external)
    assert run["kind"] == "external" and run["config"]["probabilities"] is True and run["dataset"] == "meld"
    stored = {r: store.read("predictions", where=f"run_id = '{r}'").sort("uid") for r in (source, external)}
    np.testing.assert_array_equal(np.stack(stored[source]["probabilities"].to_list()), np.stack(stored[external]["probabilities"].to_list()))
    for split in ("dev", "test"):
        scores = {r["run_id"]: r for r in _compare(store, source, external, split=split)["runs"]}
        assert abs(scores[external]["weighted_f1"] - scores[source]["weighted_f1"]) <= 1e-9
        assert scores[external]["confusion"] == scores[source]["confusion"]
        assert abs(run["metrics"][split]["weighted_f1"] - scores[source]["weighted_f1"]) <= 1e-9
    fused = json.loads(_cli("fuse", source, external, "--store", str(store.path), "--json"))
    source_metrics = next(r for r in list_runs(store) if r["run_id"] == source)["metrics"]
    for split in ("dev", "test"):
        assert abs(fused["metrics"][split]["weighted_f1"] - source_metrics[split]["weighted_f1"]) <= 1e-9
    again = runner.invoke(app, ["ingest", "predictions", str(path), "--name", f"copy-{suffix}", "--store", str(store.path)])
    assert again.exit_code == 0 and "already stored" in again.output and again.output.startswith(external)


def test_labels_only_are_compared_with_the_paired_test_but_not_fused(baseline, tmp_path):
    store, source = baseline
    preds = store.read("predictions", where=f"run_id = '{source}'").sort("uid")
    gold = dict(zip(preds["uid"].to_list(), preds["gold"].to_list()))
    rows = [{"uid": u, "label": g if i % 3 else "neutral"} for i, (u, g) in enumerate(gold.items()) if u.startswith("dev/")]
    external = _ingest(store, write_csv(tmp_path / "labels.csv", rows), "oracle-ish")
    data = _compare(store, source, external)
    scored = {r["run_id"]: r for r in data["runs"]}
    truth = np.array([r["label"] for r in rows]) == np.array([gold[r["uid"]] for r in rows])
    assert scored[external]["accuracy"] == pytest.approx(truth.mean()) and scored[external]["n"] == len(rows)
    assert {data["paired_test"]["run_a"], data["paired_test"]["run_b"]} == {source, external}
    assert 0 <= data["paired_test"]["p_value"] <= 1
    refused = runner.invoke(app, ["fuse", source, external, "--store", str(store.path)])
    assert refused.exit_code == 1 and f"run(s) {external} hold labels, not probabilities" in refused.output


def test_runs_and_the_browse_page_list_the_external_run(baseline, tmp_path):
    from bemerc.serve import create_app

    store, source = baseline
    path = tmp_path / "p.parquet"
    _cli("export", "predictions", source, str(path), "--store", str(store.path))
    external = _ingest(store, path, "served")
    client = TestClient(create_app(store.path), base_url=LOCAL)
    runs = {r["run_id"]: r for r in client.get("/runs").json()}
    assert runs[external]["kind"] == "external" and runs[external]["metrics"]["dev"]["n"] > 0
    split, dialogue = next((u.split("/")[0], u.split("/")[1].rsplit("_", 1)[0]) for u in
                           store.read("predictions", ["uid"], where=f"run_id = '{external}'")["uid"].to_list())
    turns = client.get(f"/dialogues/{split}/{dialogue}").json()["utterances"]
    assert all(any(p["run_id"] == external and p["kind"] == "external" for p in t["predictions"]) for t in turns)


def _refused(store: Store, path, name: str = "bad") -> str:
    def versions() -> dict:
        return {t: store.version(t) if store.has_table(t) else None for t in ("runs", "predictions")}

    before = versions()
    result = runner.invoke(app, ["ingest", "predictions", str(path), "--name", name, "--store", str(store.path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert versions() == before  # nothing written
    return " ".join(result.output.split())


def test_bad_files_are_refused_with_one_line_naming_the_row(baseline, tmp_path):
    store, source = baseline
    dev = store.read("utterances", ["uid", "label"], where="split = 'dev'")["uid"].to_list()[:3]
    classes = list(next(r for r in list_runs(store) if r["run_id"] == source)["classes"])
    even = {c: round(1 / len(classes), 6) for c in classes}

    def rows(*changes: dict) -> list[dict]:
        return [{"uid": u, **even, **change} for u, change in zip(dev, changes)]

    cases = {
        "unknown_uid": (rows({}, {"uid": "dev/nope_1"}), "row 3: uid 'dev/nope_1' is not in the store"),
        "unknown_label": ([{"uid": dev[0], "label": "joy"}, {"uid": dev[1], "label": "happy"}],
                          "row 3: label 'happy' is not a label of dataset 'meld'"),
        "not_a_distribution": (rows({}, {}, {"joy": 0.5}), f"row 4: probabilities sum to 1.357, not 1 (within {PROBABILITY_TOLERANCE})"),
        "twice": (rows({}, {"uid": dev[0]}), f"row 3: uid '{dev[0]}' appears twice (rows 2 and 3)"),
        "unknown_column": ([{"uid": dev[0], "label": "joy", "happy": 1}], "column(s) 'happy' are not labels of dataset 'meld'"),
        "missing_column": ([{"uid": dev[0], "joy": 1.0}], "no probability column for neutral, surprise"),
    }
    for name, (content, expected) in cases.items():
        message = _refused(store, write_csv(tmp_path / f"{name}.csv", content))
        assert f"{tmp_path / name}.csv: " in message and expected in message, message
    assert "row 1: invalid JSON" in _refused(store, _write(tmp_path / "broken.jsonl", "{not json\n"))
    assert "unknown file format '.txt'" in _refused(store, _write(tmp_path / "p.txt", "uid\n"))
    assert "--name must be" in _refused(store, write_csv(tmp_path / "ok.csv", rows({})), name="a b")


def test_a_split_without_labels_is_refused(tmp_path):
    rows = [{"dialogue_id": d, "turn": t, "speaker": "Ann", "text": f"line {t}", "label": "" if split == "test" else "joy", "split": split}
            for d, split in (("1", "train"), ("2", "dev"), ("3", "test")) for t in range(2)]
    _cli("ingest", "manifest", str(write_csv(tmp_path / "m.csv", rows)), "--store", str(tmp_path / "s"))
    path = write_csv(tmp_path / "p.csv", [{"uid": "dev/2_0", "label": "joy"}, {"uid": "test/3_0", "label": "joy"}])
    assert "row 3: uid 'test/3_0' is of split 'test', which has no labels in the store" in _refused(Store(tmp_path / "s"), path)


def _write(path, text: str):
    path.write_text(text)
    return path
