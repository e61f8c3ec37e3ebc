"""`bemerc fuse` on two real baseline runs of a small MELD store (one on character n-grams, one on
word n-grams that a third of the utterances lack), and the fused run in `bemerc compare`."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.train.fuse import FusionError, fuse_runs, resolve_runs
from bemerc.train.report import DEMO_NOTE
from bemerc.store.runs import Run, list_runs
from bemerc.train.runs import Predictions, save_run
from conftest import ngram_store



def _fuse(store: Store, *refs: str, run_dir=None) -> dict:
    args = ["fuse", *refs, "--store", str(store.path), "--json"] + (["--run-dir", str(run_dir)] if run_dir else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _predictions(store: Store, run_id: str):
    """(uids, splits, gold, (N, C) probabilities) of a run, sorted by uid."""
    rows = store.read("predictions", where=f"run_id = '{run_id}'").sort("uid")
    return rows["uid"].to_list(), rows["split"].to_list(), rows["gold"].to_list(), np.stack(rows["probabilities"].to_list())


def _copy_run(store: Store, run_id: str, new_id: str, tmp_path, change) -> str:
    """Record ``run_id``'s predictions again as run ``new_id`` (kind ``edited``), its probabilities
    passed through ``change(probabilities, splits, gold index)`` first."""
    run = next(r for r in list_runs(store) if r["run_id"] == run_id)
    uids, splits, gold, probabilities = _predictions(store, run_id)
    y = np.array([run["classes"].index(g) for g in gold])
    save_run(store, Run(new_id, "edited", run["dataset"], run["classes"], run["feature_sets"], {}, {}, str(tmp_path / new_id)),
             Predictions(uids, splits, gold, change(probabilities.copy(), np.array(splits), y)))
    return new_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory, meld_dir):
    """(store, folder, [text baseline, lexical baseline], fusion JSON) on a 24-dialogue MELD store."""
    folder = tmp_path_factory.mktemp("fuse")
    store = ngram_store(folder, meld_dir)
    baselines = []
    for feature_set in ("text", "lexical"):
        result = CliRunner().invoke(app, ["baseline", "--store", str(store.path), "--feature-set", feature_set,
                                          "--run-dir", str(folder / feature_set), "--json"])
        assert result.exit_code == 0, result.output
        baselines.append(json.loads(result.output)["run_id"])
    fused = _fuse(store, *baselines, run_dir=folder / "fused")
    return store, folder, baselines, fused


def test_fused_run_predicts_every_shared_eval_utterance_with_probabilities_that_sum_to_one(runs):
    store, folder, baselines, fused = runs
    run = next(r for r in list_runs(store) if r["run_id"] == fused["run_id"])
    assert run["kind"] == "fusion" and run["dataset"] == "meld" and run["run_dir"] == str((folder / "fused").resolve())
    uids, splits, gold, probabilities = _predictions(store, fused["run_id"])
    member_uids = [set(_predictions(store, b)[0]) for b in baselines]
    assert set(uids) == set.intersection(*member_uids) and set(splits) == {"dev", "test"}
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert sorted(fused["weights"]) == sorted(baselines) and sum(fused["weights"].values()) == pytest.approx(1)
    # the stored scores are those of the stored predictions
    dev = [i for i, s in enumerate(splits) if s == "dev"]
    accuracy = np.mean([run["classes"][probabilities[i].argmax()] == gold[i] for i in dev])
    assert fused["metrics"]["dev"]["accuracy"] == pytest.approx(accuracy) and fused["metrics"]["dev"]["n"] == len(dev)


def test_run_files_are_shaped_like_the_baselines(runs):
    _, folder, baselines, fused = runs
    metrics = json.loads((folder / "fused" / "metrics.json").read_text())
    baseline = json.loads((folder / "text" / "metrics.json").read_text())
    assert {"dev", "test"} <= set(metrics)
    for split in ("dev", "test"):
        assert set(metrics[split]) == set(baseline[split])
        assert set(metrics[split]["ci"]) == set(baseline[split]["ci"])
        assert metrics[split]["ci"]["weighted_f1"]["low"] <= metrics[split]["weighted_f1"] <= metrics[split]["ci"]["weighted_f1"]["high"]
    assert set(metrics["models"]) == set(baselines) and metrics["fusion_weights"] == fused["weights"]
    config = json.loads((folder / "fused" / "config.json").read_text())
    assert config["kind"] == "fusion" and config["members"] == baselines and config["weights"] == fused["weights"]
    honest = config["summary"]["cross_fit_dev_weighted_f1"]
    assert 0 <= honest <= 1 and len(config["summary"]["cross_fit_weights"]) == 2


def test_weights_ignore_test_predictions(runs, tmp_path):
    store, _, baselines, fused = runs
    heaviest = max(baselines, key=lambda r: fused["weights"][r])
    rng = np.random.default_rng(0)

    def scramble_test(p, splits, y):
        p[splits == "test"] = rng.dirichlet(np.ones(p.shape[1]), (splits == "test").sum())
        return p

    scrambled = _copy_run(store, heaviest, "baseline-test-scrambled", tmp_path, scramble_test)
    members = [scrambled if r == heaviest else r for r in baselines]
    again = fuse_runs(store, members, run_dir=tmp_path / "again")
    assert list(again.weights.values()) == list(fused["weights"].values())
    assert again.metrics["dev"]["weighted_f1"] == pytest.approx(fused["metrics"]["dev"]["weighted_f1"])
    assert again.metrics["test"]["confusion"] != fused["metrics"]["test"]["confusion"]


def test_a_member_confidently_wrong_on_dev_gets_no_weight(runs, tmp_path):
    store, _, (text, lexical), _ = runs

    def wrong_on_dev(p, splits, y):
        dev = splits == "dev"
        p[dev] = np.eye(p.shape[1])[(y[dev] + 1) % p.shape[1]]  # all mass on a class that is not gold
        return p

    noise = _copy_run(store, lexical, "baseline-wrong-on-dev", tmp_path, wrong_on_dev)
    result = fuse_runs(store, [text, noise, lexical], run_dir=tmp_path / "with-noise")
    assert result.weights[noise] == 0 and result.weights[text] + result.weights[lexical] == pytest.approx(1)
    assert result.summary["cross_fit_weights"] and all(w[noise] == 0 for w in result.summary["cross_fit_weights"])


def test_dev_utterances_are_intersected_and_counted(runs, tmp_path):
    store, _, (text, lexical), _ = runs
    run = next(r for r in list_runs(store) if r["run_id"] == lexical)
    uids, splits, gold, probabilities = _predictions(store, lexical)
    half = np.array([s != "dev" or i % 2 == 0 for i, s in enumerate(splits)])
    save_run(store, Run("baseline-half-dev", "edited", "meld", run["classes"], run["feature_sets"], {}, {}, str(tmp_path / "half")),
             Predictions(np.array(uids)[half].tolist(), np.array(splits)[half].tolist(),
                         np.array(gold, dtype=object)[half].tolist(), probabilities[half]))
    n_dev, n_half = splits.count("dev"), int((half & (np.array(splits) == "dev")).sum())
    result = CliRunner().invoke(app, ["fuse", text, "baseline-half-dev", "--store", str(store.path), "--run-dir", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert f"dev: {n_half} utterances predicted by every run are fused ({text} {n_dev}, baseline-half-dev {n_half})" in result.output
    assert f"(n={n_half})" in result.output and "  test: " not in result.output  # both predicted all of test


def test_runs_with_different_classes_are_refused_in_one_line(runs, tmp_path):
    store, _, (text, _), _ = runs
    run = next(r for r in list_runs(store) if r["run_id"] == text)
    uids, splits, gold, probabilities = _predictions(store, text)
    reordered = sorted(run["classes"])
    save_run(store, Run("baseline-sorted-classes", "edited", "meld", reordered, run["feature_sets"], {}, {}, str(tmp_path / "sorted")),
             Predictions(uids, splits, gold, probabilities[:, [run["classes"].index(c) for c in reordered]]))
    result = CliRunner().invoke(app, ["fuse", text, "baseline-sorted-classes", "--store", str(store.path)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "different class lists" in message
    assert f"{text} ({', '.join(run['classes'])})" in message and f"baseline-sorted-classes ({', '.join(reordered)})" in message


def test_latest_refs_reuse_and_skip_missing(runs):
    store, _, baselines, fused = runs
    kinds = {r["run_id"]: r["kind"] for r in list_runs(store)}
    newest_baseline, newest_fusion, first = resolve_runs(store, ["baseline:latest", "fusion:latest", baselines[0]])
    assert newest_baseline in baselines and kinds[newest_fusion] == "fusion" and first == baselines[0]
    with pytest.raises(FusionError, match="no run of kind 'tune'"):
        resolve_runs(store, ["baseline:latest", "tune:latest"])
    result = CliRunner().invoke(app, ["fuse", "baseline:latest", "tune:latest", "--skip-missing", "--store", str(store.path)])
    assert result.exit_code == 0 and "nothing to fuse" in result.output
    # the same members on the same predictions: the stored fusion run, not a second copy
    count = len(list_runs(store))
    again = _fuse(store, *baselines)
    assert again["run_id"] == fused["run_id"] and again["reused"] and len(list_runs(store)) == count


def test_compare_reports_the_fused_run_beside_its_members(runs, tmp_path):
    store, _, baselines, fused = runs
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", *baselines, fused["run_id"], "--store", str(store.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(CliRunner().invoke(app, ["compare", *baselines, fused["run_id"], "--store", str(store.path), "--json"]).output)
    assert [r["kind"] for r in data["runs"]] == ["baseline", "baseline", "fusion"]
    scored = data["runs"][2]
    assert scored["weighted_f1"] == pytest.approx(fused["metrics"]["dev"]["weighted_f1"]) and scored["n"] == fused["metrics"]["dev"]["n"]
    markdown = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    for text in (markdown, page):
        assert f"Fusion {fused['run_id']}" in text and f"{fused['summary']['cross_fit_dev_weighted_f1']:.4f}" in text
        assert DEMO_NOTE not in text and html.escape(DEMO_NOTE) not in text
    assert (out / f"confusion_{fused['run_id']}.png").is_file()


def test_a_report_on_the_demo_dataset_opens_by_saying_so(tmp_path, meld_dir):
    store = ngram_store(tmp_path, meld_dir, dataset="demo", n_dialogues=12)
    result = CliRunner().invoke(app, ["baseline", "--store", str(store.path), "--feature-set", "text", "--context", "0",
                                      "--run-dir", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["compare", "--store", str(store.path), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert markdown.split("\n\n")[1] == DEMO_NOTE
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert page.index(html.escape(DEMO_NOTE)) < page.index("<h2>")
