"""Seed groups: `baseline --seeds` and `tune --seeds` record one run per seed plus a run of kind
`group`; `compare` shows the group as one row (mean and sample std over the seeds); `fuse` takes a
group; the same seed gives the same run; a failed seed is named and the others still count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bemerc.store.runs import list_runs
from conftest import ngram_store

METRICS = ("weighted_f1", "accuracy", "macro_f1")


def _predictions(store, run_id: str) -> tuple[list[str], np.ndarray]:
    rows = store.read("predictions", ["uid", "probabilities"], where=f"run_id = '{run_id}'").sort("uid")
    return rows["uid"].to_list(), np.array(rows["probabilities"].to_list())


@pytest.fixture(scope="module")
def groups(tmp_path_factory, meld_dir):
    """(store, folder, group A: seeds 0,1 of context 3, group B: seeds 0,1 of context 0 whose seed 1
    cannot write its run folder), each as the JSON `baseline --seeds` printed."""
    from bemerc.cli import app

    folder = tmp_path_factory.mktemp("seeds")
    store = ngram_store(folder, meld_dir)
    runner = CliRunner()
    a = runner.invoke(app, ["baseline", "--store", str(store.path), "--seeds", "0,1", "--run-dir", str(folder / "a"), "--json"])
    assert a.exit_code == 0, a.output
    (folder / "b").mkdir()
    (folder / "b" / "seed-1").write_text("a file where seed 1's run folder would go")
    b = runner.invoke(app, ["baseline", "--store", str(store.path), "--context", "0", "--seeds", "0,1",
                            "--run-dir", str(folder / "b"), "--json"])
    assert b.exit_code == 0, b.output
    return store, folder, json.loads(a.output), json.loads(b.output)


def test_a_two_seed_baseline_records_two_runs_and_a_group(groups):
    store, folder, a, _ = groups
    runs = {r["run_id"]: r for r in list_runs(store)}
    group = runs[a["group_id"]]
    members = group["config"]["members"]
    assert group["kind"] == "group" and group["config"]["member_kind"] == "baseline" and group["config"]["failed"] == {}
    assert sorted(members) == ["0", "1"] and all(runs[m]["kind"] == "baseline" for m in members.values())
    assert [runs[members[s]]["config"]["seed"] for s in ("0", "1")] == [0, 1]
    assert (folder / "a" / "seed-0" / "baseline.json").exists() and (folder / "a" / "metrics.json").exists()
    # the group's predictions are the seeds' mean probabilities, utterance by utterance
    uids, mean = _predictions(store, a["group_id"])
    seeds = [_predictions(store, m) for m in members.values()]
    assert all(u == uids for u, _ in seeds) and len(uids) > 0
    assert np.allclose(mean, np.mean([p for _, p in seeds], axis=0), atol=1e-6)


def test_the_group_table_shows_the_score_of_the_seeds_mean_probabilities(groups, capsys, monkeypatch):
    from bemerc.cli.common import console
    from bemerc.cli.train_cmds import print_group
    from bemerc.train.metrics import classification_metrics

    store, _, a, _ = groups
    rows = store.read("predictions", ["gold", "split", "probabilities"], where=f"run_id = '{a['group_id']}'")
    classes = {r["run_id"]: r for r in list_runs(store)}[a["group_id"]]["classes"]
    dev = np.array(rows["split"].to_list()) == "dev"
    gold = np.array([classes.index(g) for g in rows["gold"].to_list()])
    mean = np.array(rows["probabilities"].to_list())  # the group's predictions: the seeds' mean probabilities
    expected = classification_metrics(gold[dev], mean[dev].argmax(1), classes)["weighted_f1"]
    monkeypatch.setattr(console, "width", 200)  # one line per row
    print_group(a, as_json=False)
    out = capsys.readouterr().out
    row = next((line for line in out.splitlines() if "seed mean" in line), None)
    assert row is not None and f"{expected:.4f}" in row, out


def test_compare_shows_a_group_as_one_row_with_numpys_mean_and_std(groups):
    from bemerc.cli import app

    store, folder, a, _ = groups
    members = a["members"]
    runs = {r["run_id"]: r for r in list_runs(store)}
    runner = CliRunner()
    rows = {}
    for split in ("dev", "test"):
        data = json.loads(runner.invoke(app, ["compare", a["group_id"], "--store", str(store.path), "--split", split, "--json"]).output)
        (row,) = data["runs"]  # the members are folded into the group
        rows[split] = row
        assert row["kind"] == "group" and row["seeds"] == 2 and row["failed"] == {}
        for k in METRICS:
            values = [runs[members[s]]["metrics"][split][k] for s in ("0", "1")]
            assert values[0] != values[1] or k == "accuracy"  # the seeds differ: subsampling follows the seed
            assert row[k] == pytest.approx(np.mean(values), abs=1e-12)
            assert row["std"][k] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert [row["per_seed"][s][k] for s in ("0", "1")] == pytest.approx(values)
    shown = runner.invoke(app, ["compare", a["group_id"], "--store", str(store.path), "--out", str(folder / "report"), "--per-seed"])
    assert shown.exit_code == 0, shown.output
    row = rows["dev"]
    line = next(line for line in shown.output.splitlines() if line.startswith(a["group_id"]))
    assert all(f"{row[k]:.4f} ± {row['std'][k]:.4f}" in line for k in METRICS) and " 2 " in line
    for s, m in members.items():  # --per-seed: a line per seed under the group
        assert any(line.split()[:3] == [m, "seed", s] and f"{row['per_seed'][s]['weighted_f1']:.4f}" in line
                   for line in shown.output.splitlines())
    page = (folder / "report" / "report.html").read_text(encoding="utf-8")
    assert f"{row['macro_f1']:.4f} ± {row['std']['macro_f1']:.4f}" in page and all(m in page for m in members.values())


def test_the_same_seed_gives_the_same_run(groups):
    from bemerc.cli import app

    store, folder, a, _ = groups
    again = CliRunner().invoke(app, ["baseline", "--store", str(store.path), "--seed", "1", "--run-dir", str(folder / "again"), "--json"])
    assert again.exit_code == 0, again.output
    uids, p = _predictions(store, json.loads(again.output)["run_id"])
    uids_1, p_1 = _predictions(store, a["members"]["1"])
    _, p_0 = _predictions(store, a["members"]["0"])
    assert uids == uids_1 and np.array_equal(p, p_1)
    assert not np.allclose(p_0, p_1)  # and another seed gives another run


def test_a_group_with_a_failed_seed_reports_the_finished_seed_and_names_the_failed_one(groups):
    from bemerc.cli import app

    store, folder, a, b = groups
    assert list(b["members"]) == ["0"] and list(b["failed"]) == ["1"] and "seed-1" in b["failed"]["1"]
    group = next(r for r in list_runs(store) if r["run_id"] == b["group_id"])
    assert group["config"]["seeds"] == [0, 1] and list(group["config"]["failed"]) == ["1"]
    only = next(r for r in list_runs(store) if r["run_id"] == b["members"]["0"])
    runner = CliRunner()
    data = json.loads(runner.invoke(app, ["compare", a["group_id"], b["group_id"], "--store", str(store.path), "--json"]).output)
    row = next(r for r in data["runs"] if r["run_id"] == b["group_id"])
    assert row["seeds"] == 1 and list(row["failed"]) == ["1"] and row["std"]["weighted_f1"] == 0.0
    assert row["weighted_f1"] == pytest.approx(only["metrics"]["dev"]["weighted_f1"])
    # the paired test between two groups compares their seeds' mean probabilities
    test = data["paired_test"]
    assert {test["run_a"], test["run_b"]} == {a["group_id"], b["group_id"]} and set(test["groups"]) == {a["group_id"], b["group_id"]}
    shown = runner.invoke(app, ["compare", a["group_id"], b["group_id"], "--store", str(store.path), "--out", str(folder / "r2")])
    assert shown.exit_code == 0 and "seed 1 failed" in shown.output and "1 failed" in shown.output
    (folder / "c").mkdir()
    (folder / "c" / "seed-1").write_text("a file where seed 1's run folder would go")
    everything_fails = runner.invoke(app, ["baseline", "--store", str(store.path), "--seeds", "1", "--run-dir", str(folder / "c")])
    assert everything_fails.exit_code == 1 and "every seed failed: seed 1" in everything_fails.output


def test_fuse_takes_groups_and_fuses_their_mean_probabilities(groups):
    from bemerc.cli import app

    store, _, a, b = groups
    result = CliRunner().invoke(app, ["fuse", a["group_id"], "baseline-group:latest", "--store", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    fused = json.loads(result.output)
    assert set(fused["weights"]) == {a["group_id"], b["group_id"]}
    uids, p = _predictions(store, fused["run_id"])
    members = {g: dict(zip(*_predictions(store, g))) for g in fused["weights"]}
    expected = sum(w * np.array([members[g][u] for u in uids]) for g, w in fused["weights"].items())
    assert np.allclose(p, expected, atol=1e-5)


def test_tune_seeds_records_a_group_and_repeats_a_seed_exactly(tiny_llm, tmp_path, meld_dir):
    from bemerc.cli import app

    store = ngram_store(tmp_path, meld_dir, n_dialogues=12)
    common = ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--layout", "utterance", "--context", "1",
              "--train-limit", "24", "--eval-limit", "12", "--batch-size", "4", "--epochs", "1", "--lr", "1e-2", "--json"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--seeds", "3,4", "--run-dir", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    group = json.loads(result.output)
    assert list(group["members"]) == ["3", "4"] and group["failed"] == {} and group["metrics"]["dev"]["seeds"] == 2
    runs = {r["run_id"]: r for r in list_runs(store)}
    assert runs[group["group_id"]]["kind"] == "group" and runs[group["group_id"]]["config"]["member_kind"] == "tune"
    assert [runs[group["members"][s]]["config"]["seed"] for s in ("3", "4")] == [3, 4]
    again = runner.invoke(app, [*common, "--seed", "3", "--run-dir", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    _, p = _predictions(store, json.loads(again.output)["run_id"])
    _, p3 = _predictions(store, group["members"]["3"])
    _, p4 = _predictions(store, group["members"]["4"])
    assert np.allclose(p, p3, atol=1e-6) and not np.allclose(p3, p4, atol=1e-4)


def test_runs_endpoint_and_page_show_groups(groups, tmp_path):
    from fastapi.testclient import TestClient

    from bemerc.serve import create_app
    from bemerc.store import query as Q
    from conftest import LOCAL, running_server
    from test_page import CHROMIUM, blocks, chromium

    store, _, a, b = groups
    runs = {r["run_id"]: r for r in TestClient(create_app(store.path), base_url=LOCAL).get("/runs").json()}
    group = runs[a["group_id"]]
    assert group["kind"] == "group" and group["group"]["members"] == a["members"] and group["group_id"] is None
    assert group["metrics"]["dev"]["std"]["weighted_f1"] == pytest.approx(a["metrics"]["dev"]["std"]["weighted_f1"])
    assert all(runs[m]["group_id"] == a["group_id"] for m in a["members"].values())
    assert runs[b["group_id"]]["group"]["failed"].keys() == {"1"}
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the page part needs it")
    dialogue = Q.dialogues(store, "dev")["dialogue_id"][0]
    with running_server(create_app(store.path)) as url:
        dom = chromium(f"{url}/#dev/{dialogue}", tmp_path, "--dump-dom").stdout
    tags = blocks(dom, "run-tag")
    assert sum(t.startswith("baseline ×2 seeds: ") for t in tags) == 1 and sum(t.startswith("baseline ×1 seeds: ") for t in tags) == 1
    shown = len(tags)  # a member run of a group has no tag (nor prediction) of its own
    grouped = {m for g in (a, b) for m in g["members"].values()}
    assert shown == len([r for r in runs if r not in grouped])
